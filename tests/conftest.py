"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from tests.helpers import TinyNegatives, TinySegmentation


@pytest.fixture
def tiny_set() -> TinySegmentation:
    return TinySegmentation()


@pytest.fixture
def tiny_negatives() -> TinyNegatives:
    return TinyNegatives()

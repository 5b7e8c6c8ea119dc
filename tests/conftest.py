"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TinyNegatives, TinySegmentation

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N already runs N processes: one intra-op thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


@pytest.fixture
def tiny_set() -> TinySegmentation:
    return TinySegmentation()


@pytest.fixture
def tiny_negatives() -> TinyNegatives:
    return TinyNegatives()

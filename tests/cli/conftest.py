"""Fixtures shared by the command tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(one_thread):
    """Every test here runs on one intra-op thread (see the root conftest's ``one_thread``)."""

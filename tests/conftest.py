"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TinyNegatives, TinySegmentation

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N already runs N processes: one intra-op thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny inputs: faster than two threads fighting over the CI's two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_set() -> TinySegmentation:
    return TinySegmentation()


@pytest.fixture
def tiny_negatives() -> TinyNegatives:
    return TinyNegatives()

"""Device selection, seeding and atomic file writes shared by training, evaluation and the CLI."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import torch

from densehybrid.models.checkpoint import atomic_save as atomic_torch_save  # the one atomic torch.save

__all__ = [
    "StepInterrupted",
    "atomic_torch_save",
    "clear_stop",
    "raise_if_stop_requested",
    "request_stop",
    "rng_state",
    "seed_everything",
    "select_device",
    "set_rng_state",
]


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` to CUDA when available, else CPU; validate explicit choices.

    Raises:
        ValueError: ``"cuda"`` was asked for but no GPU is visible.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"Expected `--device` to be auto, cpu, cuda or cuda:N (or another torch device), but got {device!r}."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Expected a visible CUDA device for `--device {device}`, but torch sees none. Use cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"Expected `--device {device}` among the {torch.cuda.device_count()} visible CUDA device(s), but it is not."
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Expected an available Apple GPU for `--device {device}`, but torch sees none. Use cpu.")
    return resolved


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states, to be stored in a checkpoint."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain ints and tensors only, so checkpoints load with torch.load(weights_only=True)
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepInterrupted(Exception):
    """Raised inside a training step by a long inner loop when a stop was requested (:func:`request_stop`); the
    training loop then drops the unfinished step and ends with a checkpoint of the state before it."""


_STOP_REQUESTED = threading.Event()


def request_stop() -> None:
    """Ask the running training loop to stop (a SIGINT handler calls it); long inner loops poll it."""
    _STOP_REQUESTED.set()


def clear_stop() -> None:
    """Forget a stop request (at the end of a run)."""
    _STOP_REQUESTED.clear()


def raise_if_stop_requested() -> None:
    """Raise :class:`StepInterrupted` when a stop was requested in a single-process run (the ranks of a multi-process
    run stop together after the step instead).

    Raises:
        StepInterrupted: a stop is pending.
    """
    from densehybrid.engine import distributed

    if _STOP_REQUESTED.is_set() and not distributed.is_distributed():
        raise StepInterrupted

"""Helpers shared by the dataset tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def raw_label(path: str | Path) -> np.ndarray:
    """The raw ids of a label file, read independently of the library's readers."""
    return np.array(Image.open(path)).astype(np.int64)


def expected_target(raw: np.ndarray, mapping: dict[int, int], default: int = 255) -> np.ndarray:
    """Apply an explicit raw-id -> target mapping written out in a test."""
    out = np.full(raw.shape, default, dtype=np.int64)
    for source, target in mapping.items():
        out[raw == source] = target
    return out


def rgb(path: str | Path) -> np.ndarray:
    """The RGB bytes of an image file as PIL decodes them."""
    return np.array(Image.open(path).convert("RGB"))

"""Fake dataset trees and tiny-run settings shared by the training command tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: --set overrides that make any recipe run in a second on the CPU (32 px crops, batch 2, no workers).
TINY = ["augment.crop=32", "optim.batch_size=2", "run.num_workers=0", "run.checkpoint_every=1"]
TINY_NEGATIVES = ["negatives.resize=24", "negatives.crop=24"]
LIGHT_LADDER = ["model.name=ladder_mobilenetv3", "model.kwargs={decoder_channels = 16}"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(one_thread):
    """Every test here runs on one intra-op thread (see the root conftest's ``one_thread``)."""


def sets(*items: str) -> list[str]:
    """``--set`` arguments for each item."""
    return [arg for item in items for arg in ("--set", item)]


def make_folder_tree(root: Path, n_train: int = 6, n_val: int = 2, size=(40, 56), classes=("a", "b", "c")) -> Path:
    """DIR/classes.txt, DIR/images, DIR/labels and DIR/val/...; validation labels hold a K (anomaly) square."""
    rng = np.random.default_rng(0)
    for split, n in (("", n_train), ("val", n_val)):
        if n == 0:
            continue
        base = root / split if split else root
        (base / "images").mkdir(parents=True, exist_ok=True)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(base / "images" / f"f{i}.png")
            label = rng.integers(0, len(classes), size).astype(np.uint8)
            label[0, :4] = 255
            if split == "val":
                label[:6, :6] = len(classes)
            Image.fromarray(label).save(base / "labels" / f"f{i}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def make_image_folder(root: Path, n: int = 3, size=(50, 60)) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"n{i}.jpg")
    return root

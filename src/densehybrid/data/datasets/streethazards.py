"""StreetHazards (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022).

Synthetic CARLA scenes at 1280x720: towns t1-t3 for training, t4 for validation, t5 and t6 for testing, where
anomalous objects appear. Annotation PNGs hold raw ids 1..14 (1 unlabeled, 2 building, 3 fence, 4 other,
5 pedestrian, 6 pole, 7 road line, 8 road, 9 sidewalk, 10 vegetation, 11 car, 12 wall, 13 traffic sign, 14 anomaly).

Two encodings are offered because the two protocols disagree about "other":

* ``"densehybrid"`` (default), the released DenseHybrid code: "other" is ignored (255), the 12 remaining classes are
  0..11 (raw id minus 1, shifted down past "other"), anomaly = 12 = K. "unlabeled" stays a class.
* ``"hendrycks"``, the original benchmark: raw id minus 1, so 13 classes 0..12 including "other", anomaly = 13 = K,
  nothing ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from densehybrid.data.datasets._base import (
    BenchmarkDataset,
    Discovery,
    Frame,
    PairingIssue,
    files_with_suffix,
    require_dir,
)
from densehybrid.data.datasets._io import lookup_table
from densehybrid.labels import IGNORE_INDEX

_RAW_NAMES = (
    "unlabeled",
    "building",
    "fence",
    "other",
    "pedestrian",
    "pole",
    "road line",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "wall",
    "traffic sign",
)
_OTHER_RAW = 4
_ANOMALY_RAW = 14

#: encoding -> (class names, raw id -> library id)
ENCODINGS: dict[str, tuple[tuple[str, ...], dict[int, int]]] = {
    "densehybrid": (
        tuple(n for n in _RAW_NAMES if n != "other"),
        {
            raw: (IGNORE_INDEX if raw == _OTHER_RAW else raw - 1 if raw < _OTHER_RAW else raw - 2)
            for raw in range(1, _ANOMALY_RAW + 1)
        },
    ),
    "hendrycks": (_RAW_NAMES, {raw: raw - 1 for raw in range(1, _ANOMALY_RAW + 1)}),
}

_SPLIT_DIRS = {"train": ("train", "training"), "validation": ("train", "validation"), "test": ("test", "test")}


class StreetHazards(BenchmarkDataset):
    """StreetHazards as extracted from ``streethazards_train.tar`` and ``streethazards_test.tar``.

    Targets are semantic: classes ``0..K-1``, anomaly ``K`` (test towns only), void 255; K = 12 with the
    ``"densehybrid"`` encoding and 13 with ``"hendrycks"`` (see the module docstring). Images are RGBA PNGs whose
    alpha channel is dropped. Frame names are ``{town}_{file stem}``, e.g. ``t5_300``.

    Args:
        root: the directory holding ``train/`` and/or ``test/`` (extract both archives into it).
        split: ``"train"`` (towns t1-t3, 5125 frames), ``"validation"`` (t4, 1031) or ``"test"`` (t5 + t6, 1500).
        encoding: ``"densehybrid"`` or ``"hendrycks"``.
        towns: restrict to these town folders, e.g. ``("t5",)`` or ``"t5,t6"``; default all towns of the split.
            The DenseHybrid open-set protocol calibrates on one test town and evaluates on the other.
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "semantic"
    num_classes = 12
    class_names = ENCODINGS["densehybrid"][0]
    splits = ("train", "validation", "test")
    default_split = "test"
    raw_label_values = frozenset(range(1, _ANOMALY_RAW + 1))
    benchmark_name = "streethazards"
    expected_tree = (
        "  train/images/training/{t1,t2,t3}/{name}.png     train/annotations/training/{t1,t2,t3}/{name}.png\n"
        "  train/images/validation/t4/{name}.png           train/annotations/validation/t4/{name}.png\n"
        "  test/images/test/{t5,t6}/{name}.png             test/annotations/test/{t5,t6}/{name}.png"
    )
    download = (
        "https://people.eecs.berkeley.edu/~hendrycks/streethazards_train.tar and "
        "https://people.eecs.berkeley.edu/~hendrycks/streethazards_test.tar, both extracted into ROOT"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        encoding: str = "densehybrid",
        towns: str | Sequence[str] | None = None,
        transform=None,
        strict: bool = True,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"Expected `encoding` to be one of {', '.join(ENCODINGS)}, but got {encoding!r}.")
        if isinstance(towns, str):
            towns = [t.strip() for t in towns.split(",") if t.strip()]
        if towns is not None and (len(towns) == 0 or not all(isinstance(t, str) for t in towns)):
            raise ValueError(f"Expected `towns` to be town folder names such as ('t5',), but got {towns!r}.")
        self.encoding = encoding
        self.towns = None if towns is None else tuple(towns)
        names, mapping = ENCODINGS[encoding]
        self.class_names = names
        self.num_classes = len(names)
        self.label_table = lookup_table(mapping)
        super().__init__(root, split, transform, strict)

    def discover(self) -> Discovery:
        top, sub = _SPLIT_DIRS[self.split]
        fix = self.how_to_fix()
        image_dir = require_dir(self.root / top / "images" / sub, "the image directory", fix)
        label_dir = require_dir(self.root / top / "annotations" / sub, "the annotation directory", fix)
        archive = f"streethazards_{top}.tar"
        discovery = Discovery()
        images = files_with_suffix(image_dir, ".png")
        for image in images:
            relative = image.relative_to(image_dir)
            if self.towns is not None and relative.parts[0] not in self.towns:
                continue
            label = label_dir / relative
            name = "_".join(relative.with_suffix("").parts)
            if label.is_file():
                discovery.frames.append(Frame(name, image, label))
            else:
                discovery.issues.append(
                    PairingIssue(
                        image,
                        f"image {str(image)!r} has no annotation {str(label)!r}",
                        f"Re-extract {archive} into ROOT.",
                    )
                )
        image_set = {image.relative_to(image_dir) for image in images}
        for label in files_with_suffix(label_dir, ".png"):
            relative = label.relative_to(label_dir)
            if self.towns is not None and relative.parts[0] not in self.towns:
                continue
            if relative not in image_set:
                discovery.issues.append(
                    PairingIssue(
                        label, f"annotation {str(label)!r} has no image in {str(image_dir)!r}", f"Re-extract {archive}."
                    )
                )
        if self.towns is not None and not discovery.frames and not discovery.issues:
            present = sorted({image.relative_to(image_dir).parts[0] for image in images})
            raise ValueError(
                f"Expected `towns` among the folders {present} of {str(image_dir)!r}, but got {self.towns}."
            )
        return discovery

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        if 0 in unexpected and int(raw.max()) <= _ANOMALY_RAW - 1:
            return "The ids look already shifted to 0..13; use the annotation PNGs of the archive (raw ids 1..14)."
        return ""

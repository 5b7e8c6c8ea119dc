"""RoadScene as a registered benchmark: the cached, generated road-scene benchmark of the demo
(:mod:`densehybrid.data.roadscene`) read like any other tree, so that ``train``, ``evaluate``, ``calibrate`` and
``evaluate-open-set`` accept ``roadscene`` with ``--data-root``/``--root`` the benchmark's folder (``OUT/data`` of
``densehybrid demo --out OUT``).

The generator (and its scikit-image photographs) is imported only when a tree is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, Frame
from densehybrid.data.datasets._io import DatasetFileError, lookup_table

#: K of the benchmark (:data:`densehybrid.data.ROADSCENE_NUM_CLASSES`; a test keeps the two equal).
NUM_CLASSES = 10


class RoadScene(BenchmarkDataset):
    """One split of a cached RoadScene benchmark (``manifest.json``, ``{train,val,test}.npz``, ``anomalies.json``).

    Samples carry, besides ``image``, ``target`` (ids ``0..9``, the anomaly id 10 in val/test), ``name`` and
    ``path``, the per-pixel anomaly ``family`` (0 none, 1 real, 2 procedural).

    Args:
        root: the benchmark folder (written by ``densehybrid demo`` or ``RoadSceneBenchmark(root).prepare()``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
        digest: when given, the benchmark under ``root`` must be exactly this one
            (:func:`densehybrid.data.roadscene.benchmark_digest`): a recipe that names it never trains on a
            regenerated benchmark of other settings.
    """

    target_kind = "semantic"
    num_classes = NUM_CLASSES
    splits = ("train", "val", "test")
    default_split = "test"
    raw_label_values = frozenset(range(NUM_CLASSES + 1))
    label_table = lookup_table({i: i for i in range(NUM_CLASSES + 1)})
    benchmark_name = "roadscene"
    expected_tree = (
        "  manifest.json\n  train.npz  val.npz  test.npz\n  anomalies.json\n"
        "  (written by `densehybrid demo --out OUT` into OUT/data, or by RoadSceneBenchmark(ROOT).prepare())"
    )
    download = "nothing to download: the benchmark is generated from a seed (`densehybrid demo` writes it)"

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Callable[[dict], dict] | None = None,
        strict: bool = True,
        digest: str = "",
    ) -> None:
        self.digest = str(digest)
        super().__init__(root, split, transform, strict)

    def discover(self) -> Discovery:
        from densehybrid.data.roadscene import (
            ROADSCENE_CLASSES,
            ROADSCENE_PALETTE,
            RoadSceneBenchmark,
            RoadSceneDataset,
            benchmark_digest,
        )
        from densehybrid.errors import DatasetError

        try:
            benchmark = RoadSceneBenchmark.from_root(self.root)
        except DatasetError as exc:
            raise DatasetFileError(self.root, str(exc), self.how_to_fix()) from exc
        if self.digest and benchmark_digest(self.root) != self.digest:
            raise DatasetFileError(
                self.root,
                f"Expected the RoadScene benchmark under {str(self.root)!r} to be the one with digest {self.digest} "
                f"(data.options.digest), but it is {benchmark_digest(self.root)} (generated with other settings: "
                f"{benchmark.config}).",
                "Point --data-root at the benchmark the recipe was made for, or drop data.options.digest.",
            )
        self.class_names = tuple(ROADSCENE_CLASSES)
        self.palette = ROADSCENE_PALETTE[:NUM_CLASSES].tolist()
        self.scenes = RoadSceneDataset(benchmark, self.split)
        path = self.root / f"{self.split}.npz"
        frames = [Frame(f"{self.split}_{i:05d}", path, path, extra={"index": i}) for i in range(len(self.scenes))]
        return Discovery(frames=frames)

    def load_image(self, frame: Frame) -> torch.Tensor:
        return self.scenes[frame.extra["index"]]["image"]

    def load_raw_label(self, frame: Frame) -> np.ndarray:
        return self.scenes[frame.extra["index"]]["target"].numpy()

    def check_frame(self, index: int) -> np.ndarray:
        """Frame ``index``'s label map checked against its image's size and the known ids, returned (the frames are
        arrays of ``{split}.npz``, not image files; see :func:`~densehybrid.data.datasets.check_dataset_files`).

        Raises:
            DatasetFileError: naming ``{split}.npz``.
        """
        frame = self.frames[index]
        return self.load_target(frame, tuple(self.load_image(frame).shape[-2:]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.frames) <= index < len(self.frames):
            raise IndexError(f"Expected `index` in [0, {len(self.frames)}), but got {index}.")
        frame = self.frames[index]
        sample = dict(self.scenes[frame.extra["index"]])
        sample.update(name=frame.name, path=str(frame.image))
        return self.transform(sample) if self.transform is not None else sample

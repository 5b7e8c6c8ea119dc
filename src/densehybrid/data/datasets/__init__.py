"""Benchmark datasets read from their official on-disk layouts, returning the library's label encodings.

:data:`BENCHMARKS` maps every benchmark name the command line accepts (``densehybrid doctor NAME ROOT``,
``--benchmark NAME``) to a :class:`BenchmarkSpec`: the loader class, its default split, the metric protocol of the
official evaluation, the number of known classes of the model it is evaluated with, the SMIYC dataset its outputs
are stored under, and the expected file counts ``densehybrid doctor`` checks against.

Example:
    >>> spec = get_benchmark("fs-laf")
    >>> spec.protocol, spec.num_known_classes, spec.expected_counts["val"]
    ('pooled', 19, 100)
    >>> dataset = spec.create("/data/fishyscapes")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densehybrid.data.datasets._base import (
    TARGET_KINDS,
    BenchmarkDataset,
    Discovery,
    Frame,
    PairingIssue,
    check_dataset_files,
)
from densehybrid.data.datasets._io import DatasetFileError
from densehybrid.data.datasets.ade20k import ADE20K, ADE20K_CLASSES
from densehybrid.data.datasets.cityscapes import CITYSCAPES_CLASSES, LABEL_ID_TO_TRAIN_ID, Cityscapes
from densehybrid.data.datasets.coco import (
    COCO20_CLASSES,
    COCO_THINGS,
    VAL2017_WITHOUT_INSTANCES,
    VOC_CLASSES,
    COCOOpenSet,
)
from densehybrid.data.datasets.fishyscapes import FishyscapesLAF, FishyscapesStatic
from densehybrid.data.datasets.folder import FolderDataset, ImageFolder
from densehybrid.data.datasets.road_anomaly import RoadAnomaly
from densehybrid.data.datasets.roadscene import RoadScene
from densehybrid.data.datasets.smiyc import LostAndFound, LostAndFoundNoKnown, RoadAnomaly21, RoadObstacle21
from densehybrid.data.datasets.streethazards import StreetHazards

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "BENCHMARKS",
    "CITYSCAPES_CLASSES",
    "COCOOpenSet",
    "COCO20_CLASSES",
    "COCO_THINGS",
    "LABEL_ID_TO_TRAIN_ID",
    "PROTOCOLS",
    "TARGET_KINDS",
    "VAL2017_WITHOUT_INSTANCES",
    "VOC_CLASSES",
    "BenchmarkDataset",
    "BenchmarkSpec",
    "Cityscapes",
    "DatasetFileError",
    "Discovery",
    "FishyscapesLAF",
    "FishyscapesStatic",
    "FolderDataset",
    "Frame",
    "ImageFolder",
    "LostAndFound",
    "LostAndFoundNoKnown",
    "PairingIssue",
    "RoadAnomaly",
    "RoadAnomaly21",
    "RoadObstacle21",
    "RoadScene",
    "check_dataset_files",
    "StreetHazards",
    "get_benchmark",
    "list_benchmarks",
    "parse_dataset_options",
]

#: Metric protocols of the official evaluations: pixels pooled over the split (Fishyscapes, the DenseHybrid code),
#: per-image averages (StreetHazards), or the SMIYC toolkit's binned pooled curves plus component metrics.
PROTOCOLS = ("pooled", "per_image", "smiyc")

_FIXED_PARAMETERS = ("self", "root", "split", "transform", "strict")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything the command line needs to know about one benchmark.

    Attributes:
        name: the command-line name.
        dataset: the loader class.
        split: the split evaluated by default.
        protocol: the metric protocol of the official evaluation (one of :data:`PROTOCOLS`), or None for a set that
            is not evaluated (the ADE20K negatives).
        num_known_classes: K of the model evaluated on it (19 for Cityscapes-trained models, 12 for StreetHazards),
            or None (``folder``: K is the tree's, from its ``classes.txt``).
        expected_counts: split -> number of frames of a complete download (empty for a user's own tree).
        description: one line for listings.
        smiyc_dataset: the SMIYC toolkit dataset outputs are stored under, when every frame shares one (frames also
            carry it, see :class:`Frame`; Fishyscapes LAF frames split between ``LostAndFound-train`` and ``-test``).
        export_split: the split ``densehybrid export-smiyc`` runs on by default (all frames of a submission).
        options: keyword arguments always passed to the loader.
    """

    name: str
    dataset: type[BenchmarkDataset]
    split: str
    protocol: str | None
    num_known_classes: int | None
    expected_counts: Mapping[str, int]
    description: str
    smiyc_dataset: str | None = None
    export_split: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def download(self) -> str:
        """Where to get the data, as shown by the docs and ``densehybrid doctor``."""
        return self.dataset.download

    @property
    def expected_tree(self) -> str:
        """The expected tree under the dataset root."""
        return self.dataset.expected_tree

    def option_names(self) -> list[str]:
        """Keyword options of the loader a user may set (``--option KEY=VALUE`` on the command line)."""
        parameters = inspect.signature(self.dataset.__init__).parameters
        return [name for name in parameters if name not in _FIXED_PARAMETERS and name not in self.options]

    def create(self, root: str | Path, split: str | None = None, **options: Any) -> BenchmarkDataset:
        """Build the loader on ``root``.

        Args:
            root: the dataset root (see :attr:`expected_tree`).
            split: default :attr:`split`.
            **options: loader options (see :meth:`option_names`), plus ``transform``, ``strict`` and
                ``void_unknown_ids`` (label ids outside the encoding become void instead of raising; see
                :meth:`BenchmarkDataset.check_label_ids`).

        Raises:
            ValueError: an unknown option or split.
            DatasetError: the tree is missing or broken.
        """
        void_unknown_ids = _flag(options.pop("void_unknown_ids", False), "void_unknown_ids")
        allowed = set(self.option_names()) | {"transform", "strict"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            available = ", ".join(self.option_names()) or "none"
            raise ValueError(
                f"Expected options of benchmark {self.name!r} among ({available}), but got {', '.join(unknown)}."
            )
        dataset = self.dataset(root, split=self.split if split is None else split, **self.options, **options)
        dataset.void_unknown_ids = void_unknown_ids
        return dataset


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"Expected option `{name}` to be true or false, but got {value!r}.")


def _spec(name: str, dataset: type[BenchmarkDataset], **fields: Any) -> BenchmarkSpec:
    fields.setdefault("split", dataset.default_split)
    return BenchmarkSpec(name=name, dataset=dataset, **fields)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "cityscapes",
            Cityscapes,
            protocol="pooled",
            num_known_classes=19,
            expected_counts={"train": 2975, "val": 500, "test": 1525},
            description="Cityscapes fine, trainIds 0..18 (closed-set mIoU of the road-driving models)",
        ),
        _spec(
            "streethazards",
            StreetHazards,
            protocol="per_image",
            num_known_classes=12,
            expected_counts={"train": 5125, "validation": 1031, "test": 1500},
            description="StreetHazards, DenseHybrid encoding: 12 classes, anomaly 12, 'other' ignored",
        ),
        _spec(
            "fs-laf",
            FishyscapesLAF,
            protocol="pooled",
            num_known_classes=19,
            expected_counts={"val": 100},
            description="Fishyscapes Lost & Found validation, binary anomaly masks",
            export_split="val",
        ),
        _spec(
            "fs-static",
            FishyscapesStatic,
            protocol="pooled",
            num_known_classes=19,
            expected_counts={"val": 30},
            description="Fishyscapes Static validation, binary anomaly masks",
        ),
        _spec(
            "smiyc-anomaly",
            RoadAnomaly21,
            protocol="smiyc",
            num_known_classes=19,
            expected_counts={"validation": 10, "test": 100, "all": 110},
            description="SegmentMeIfYouCan RoadAnomaly21 (AnomalyTrack)",
            smiyc_dataset="AnomalyTrack-all",
            export_split="all",
        ),
        _spec(
            "smiyc-obstacle",
            RoadObstacle21,
            protocol="smiyc",
            num_known_classes=19,
            expected_counts={"validation": 30, "test": 327},
            description="SegmentMeIfYouCan RoadObstacle21 (ObstacleTrack)",
            smiyc_dataset="ObstacleTrack-all",
            export_split="all",
        ),
        _spec(
            "laf-test",
            LostAndFound,
            protocol="smiyc",
            num_known_classes=19,
            expected_counts={"test": 1203, "train": 1036},
            description="LostAndFound test (SMIYC toolkit's LostAndFound-test)",
            smiyc_dataset="LostAndFound-test",
            export_split="test",
        ),
        _spec(
            "laf-noknown",
            LostAndFoundNoKnown,
            protocol="smiyc",
            num_known_classes=19,
            expected_counts={"test": 1043},
            description="LostAndFound test without known classes (SMIYC LostAndFound-testNoKnown)",
            smiyc_dataset="LostAndFound-test",
            export_split="test",
        ),
        _spec(
            "road-anomaly",
            RoadAnomaly,
            protocol="pooled",
            num_known_classes=19,
            expected_counts={"test": 60},
            description="RoadAnomaly (Lis et al. 2019), binary anomaly masks",
        ),
        _spec(
            "coco20",
            COCOOpenSet,
            protocol="pooled",
            num_known_classes=20,
            expected_counts={"val2017": 5000, "train2017": 118287},
            description="COCO20/80 open-set: 20 VOC classes known, the other 60 COCO things unknown",
        ),
        _spec(
            "folder",
            FolderDataset,
            split="val",
            protocol="pooled",
            num_known_classes=None,
            expected_counts={},
            description="your own tree: DIR/classes.txt, images/labels and val/ (anomaly pixels = label value K)",
            export_split="val",
        ),
        _spec(
            "roadscene",
            RoadScene,
            protocol="pooled",
            num_known_classes=10,
            expected_counts={"train": 400, "val": 100, "test": 100},
            description="RoadScene, the demo's generated road-scene benchmark (10 classes, anomaly 10; no download)",
        ),
        _spec(
            "ade20k",
            ADE20K,
            protocol=None,
            num_known_classes=None,
            expected_counts={"training": 20210, "validation": 2000},
            description="ADE20K, the negative dataset pasted during DenseHybrid training",
        ),
    )
}


def list_benchmarks() -> list[str]:
    """The registered benchmark names, sorted."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` registered under ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}. Available: {', '.join(list_benchmarks())}.")
    return BENCHMARKS[name]


def parse_dataset_options(items: Sequence[str] | None) -> dict[str, str]:
    """Parse command-line ``KEY=VALUE`` strings into loader options.

    Raises:
        ValueError: an item without ``=`` or with an empty key, or a key given twice.
    """
    options: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"Expected `--option` as KEY=VALUE (e.g. layout=official), but got {item!r}.")
        if key in options:
            raise ValueError(f"Expected each `--option` key once, but got {key!r} twice.")
        options[key] = value.strip()
    return options

"""Cityscapes (Cordts et al., CVPR 2016): the inlier dataset of the road-driving benchmarks.

The official ``gtFine`` archive stores ``labelIds`` (0..33); the 19 evaluated classes are their ``trainIds``
(0..18) and every other id is void, here :data:`~densehybrid.labels.IGNORE_INDEX` (255). The released DenseHybrid
code maps void to 19 (= K) instead; this library keeps 255 everywhere and leaves id K to anomalies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, Frame, pair_by_suffix, require_dir
from densehybrid.data.datasets._io import check_same_size, lookup_table, read_label

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: Official Cityscapes ``labelId -> trainId`` for the 19 evaluated classes; every other labelId (0..33) is void.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

_LABEL_SUFFIX = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def cityscapes_image(root: Path, split: str, frame_id: str) -> Path:
    """``root/leftImg8bit/{split}/{city}/{frame_id}_leftImg8bit.png`` for a frame id like ``frankfurt_000000_000294``."""
    city = frame_id.split("_")[0]
    return root / "leftImg8bit" / split / city / f"{frame_id}{_IMAGE_SUFFIX}"


class Cityscapes(BenchmarkDataset):
    """Cityscapes fine annotations as downloaded (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``).

    Targets are trainIds 0..18 with void = 255 (``target_kind = "semantic"``, no anomaly class).

    Args:
        root: the directory holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"`` (2975), ``"val"`` (500) or ``"test"`` (1525, whose public labels are all void).
        label_type: ``"labelIds"`` (in the archive, remapped here) or ``"labelTrainIds"`` (written by
            cityscapesscripts' ``csCreateTrainIdLabelImgs``, used as is).
        instances: also give each sample ``instances``: the (H, W) int64 ids of ``*_gtFine_instanceIds.png``
            (``labelId * 1000 + k`` inside instances), for the official iIoU.
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.

    Example:
        >>> ds = Cityscapes("/data/cityscapes", split="val")  # doctest: +SKIP
        >>> ds[0]["target"].unique()  # doctest: +SKIP
        tensor([  0,   1,   2, ..., 18, 255])
    """

    target_kind = "semantic"
    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    splits = ("train", "val", "test")
    default_split = "val"
    benchmark_name = "cityscapes"
    expected_tree = (
        "  leftImg8bit/{train,val,test}/{city}/{city}_{seq}_{frame}_leftImg8bit.png\n"
        "  gtFine/{train,val,test}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png"
    )
    download = (
        "https://www.cityscapes-dataset.com/downloads/ (registration required): leftImg8bit_trainvaltest.zip and "
        "gtFine_trainvaltest.zip, both extracted into ROOT"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        label_type: str = "labelIds",
        instances: bool = False,
        transform=None,
        strict: bool = True,
    ) -> None:
        if not isinstance(instances, bool):
            raise ValueError(f"Expected `instances` to be a bool, but got {instances!r}.")
        self.instances = instances
        if label_type not in _LABEL_SUFFIX:
            raise ValueError(f"Expected `label_type` to be one of {', '.join(_LABEL_SUFFIX)}, but got {label_type!r}.")
        self.label_type = label_type
        if label_type == "labelIds":
            self.label_table = lookup_table(LABEL_ID_TO_TRAIN_ID)
            self.raw_label_values = frozenset(range(34))
        else:
            self.label_table = lookup_table({i: i for i in range(19)})
            self.raw_label_values = frozenset(range(19)) | {255}
        super().__init__(root, split, transform, strict)

    def discover(self) -> Discovery:
        fix = self.how_to_fix()
        image_dir = require_dir(self.root / "leftImg8bit" / self.split, "the image directory", fix)
        label_dir = require_dir(self.root / "gtFine" / self.split, "the label directory", fix)
        return pair_by_suffix(
            image_dir, _IMAGE_SUFFIX, label_dir, _LABEL_SUFFIX[self.label_type], label_fix=self._label_fix()
        )

    def instance_path(self, frame: Frame) -> Path:
        """The frame's ``*_gtFine_instanceIds.png`` beside its label file."""
        return frame.label.with_name(frame.label.name.replace(_LABEL_SUFFIX[self.label_type], _INSTANCE_SUFFIX))

    def extra_maps(self, frame: Frame, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        if not self.instances:
            return {}
        path = self.instance_path(frame)
        instances = read_label(path)
        check_same_size(frame.image, size, path, instances.shape)
        return {"instances": torch.from_numpy(instances)}

    def _label_fix(self) -> str:
        if self.label_type == "labelTrainIds":
            return (
                "Generate the trainId files with cityscapesscripts (`CITYSCAPES_DATASET=ROOT csCreateTrainIdLabelImgs`)"
                " or use label_type=labelIds."
            )
        return "Extract gtFine_trainvaltest.zip into ROOT next to leftImg8bit/."

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        if self.label_type == "labelIds" and 255 in unexpected and int(raw[raw != 255].max(initial=0)) <= 18:
            return (
                "The values look like trainIds (0..18, 255): pass the *_labelIds.png files or label_type=labelTrainIds."
            )
        return ""

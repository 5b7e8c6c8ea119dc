"""COCO for the COCO20/80 open-set protocol of the TPAMI paper, read from COCO-Stuff stuff+thing maps.

The DenseHybrid README points to the COCO-Stuff repository for the data; its ``stuffthingmaps_trainval2017`` PNGs
hold ``category_id - 1`` per pixel (things 0..90, stuff 91..181) and 255 for unlabelled.

Which 20 classes are known in the paper's COCO20/80 is not public in our sources (the TPAMI code is not released).
We follow the most standard 20-of-80 split: the 20 PASCAL VOC categories are known and the other 60 COCO thing
categories are unknown (anomalies), as in the VOC -> COCO open-world protocols. Stuff pixels are not part of
either group and are void by default (``background="ignore"``); ``background="class"`` instead makes them a VOC-style
background class 0. ``known_classes`` selects any other split by COCO thing names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, pair_by_stem, require_dir
from densehybrid.data.datasets._io import lookup_table
from densehybrid.labels import IGNORE_INDEX

#: The 80 COCO thing categories: official ``category_id`` -> name (ids 1..90 with 10 gaps).
COCO_THINGS: dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}

#: The 20 PASCAL VOC categories under their COCO names, in VOC order (aeroplane ... tvmonitor).
VOC_CLASSES = (
    "airplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorcycle",
    "person",
    "potted plant",
    "sheep",
    "couch",
    "train",
    "tv",
)

_STUFF_RAW = range(91, 182)  # COCO-Stuff stuff categories 92..182, stored as id - 1
_BACKGROUNDS = ("ignore", "class")


class COCOOpenSet(BenchmarkDataset):
    """COCO images with known thing classes, unknown thing classes as anomalies (COCO20/80 by default).

    Targets are semantic: known classes ``0..K-1`` in the order of ``known_classes`` (shifted by one after a
    ``"background"`` class 0 when ``background="class"``), unknown COCO things = K, unlabelled = 255, stuff = 255
    (``"ignore"``) or 0 (``"class"``).

    Args:
        root: the COCO-Stuff ``dataset`` folder holding ``images/{train2017,val2017}`` and
            ``annotations/{train2017,val2017}`` (as set up by the COCO-Stuff README).
        split: ``"val2017"`` (5000, the default) or ``"train2017"`` (118287).
        known_classes: COCO thing names treated as known, or one comma-separated string; default the 20 VOC
            categories (:data:`VOC_CLASSES`).
        background: ``"ignore"`` or ``"class"`` (see above).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "semantic"
    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES
    splits = ("val2017", "train2017")
    default_split = "val2017"
    raw_label_values = frozenset(range(182)) | {IGNORE_INDEX}
    benchmark_name = "coco20"
    expected_tree = (
        "  images/{train2017,val2017}/{image_id:012d}.jpg\n"
        "  annotations/{train2017,val2017}/{image_id:012d}.png    (COCO-Stuff stuffthingmaps: category_id - 1, 255)"
    )
    download = (
        "http://images.cocodataset.org/zips/val2017.zip (and train2017.zip) into ROOT/images/, and "
        "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip into "
        "ROOT/annotations/ (see https://github.com/nightrome/cocostuff#setup)"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        known_classes: str | Sequence[str] = VOC_CLASSES,
        background: str = "ignore",
        transform=None,
        strict: bool = True,
    ) -> None:
        if isinstance(known_classes, str):
            known_classes = [name.strip() for name in known_classes.split(",") if name.strip()]
        known = tuple(known_classes)
        valid = set(COCO_THINGS.values())
        unknown_names = [name for name in known if name not in valid]
        if not known or unknown_names or len(set(known)) != len(known):
            raise ValueError(
                f"Expected `known_classes` to be distinct COCO thing names (e.g. {', '.join(VOC_CLASSES[:3])}, ...), "
                f"but got {list(known)!r}" + (f"; not COCO things: {unknown_names}." if unknown_names else ".")
            )
        if background not in _BACKGROUNDS:
            raise ValueError(f"Expected `background` to be one of {', '.join(_BACKGROUNDS)}, but got {background!r}.")
        self.known_classes = known
        self.background = background
        offset = 1 if background == "class" else 0
        self.class_names = (("background",) if offset else ()) + known
        self.num_classes = len(self.class_names)
        mapping = {}
        for category_id, name in COCO_THINGS.items():
            mapping[category_id - 1] = known.index(name) + offset if name in known else self.num_classes
        if offset:
            mapping.update(dict.fromkeys(_STUFF_RAW, 0))
        self.label_table = lookup_table(mapping)
        super().__init__(root, split, transform, strict)

    def discover(self) -> Discovery:
        fix = self.how_to_fix()
        image_dir = require_dir(self.root / "images" / self.split, "the image directory", fix)
        label_dir = require_dir(self.root / "annotations" / self.split, "the annotation directory", fix)
        return pair_by_stem(
            image_dir, ".jpg", label_dir, ".png", "Extract stuffthingmaps_trainval2017.zip into ROOT/annotations/."
        )

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        return "Use the COCO-Stuff stuffthingmaps PNGs (ids 0..181 and 255), not panoptic or colour PNGs."

"""COCO for the COCO20/80 open-set protocol of the TPAMI paper, read from COCO-Stuff stuff+thing maps.

The DenseHybrid README points to the COCO-Stuff repository for the data; its ``stuffthingmaps_trainval2017`` PNGs
hold ``category_id - 1`` per pixel (things 0..90, stuff 91..181) and 255 for unlabelled.

By default the loader follows the released TPAMI-era data code (``data/datasets/coco/coco20.py``): the 20 PASCAL VOC
categories are known, numbered 0..19 in COCO category-id order (:data:`COCO20_CLASSES`); the other 60 thing
categories are unknown (anomalies); stuff and unlabelled pixels are void. It reads ``ROOT/labels/{split}`` and, for
val2017, the released list of 4,952 images: val2017 without the 48 images that have no COCO instance annotation
(:data:`VAL2017_WITHOUT_INSTANCES`). ``known_classes="voc"`` numbers the same classes in VOC order,
``layout="cocostuff"`` reads ``ROOT/annotations/{split}`` (the COCO-Stuff README's layout), ``images="all"`` every
file, and ``background="class"`` makes stuff a VOC-style background class 0.
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

#: The same 20 classes in COCO category-id order: the ids 0..19 of the released COCO20 data code and checkpoints.
COCO20_CLASSES = tuple(name for _, name in sorted(COCO_THINGS.items()) if name in VOC_CLASSES)

#: Named class orders of ``known_classes``.
CLASS_ORDERS = {"coco20": COCO20_CLASSES, "voc": VOC_CLASSES}

#: The 48 val2017 images without any COCO instance annotation. The released evaluation's list of 4,952 val2017
#: images (``coco_stuff_val_images.txt``) is val2017 without exactly these.
VAL2017_WITHOUT_INSTANCES = frozenset(
    (25593, 41488, 42888, 49091, 58636, 64574, 98497, 101022, 121153, 127135, 173183, 176701)
    + (198915, 200152, 226111, 228771, 240767, 260657, 261796, 267946, 268996, 270386, 278006, 308391)
    + (310622, 312549, 320706, 330554, 344611, 370999, 374727, 382734, 402096, 404601, 447789, 458790)
    + (461275, 476491, 477118, 481404, 502910, 514540, 528977, 536343, 542073, 550939, 556498, 560371)
)

_STUFF_RAW = range(91, 182)  # COCO-Stuff stuff categories 92..182, stored as id - 1
_BACKGROUNDS = ("ignore", "class")
#: Label folder per layout: the released data code's and the COCO-Stuff README's.
_LAYOUTS = {"released": "labels", "cocostuff": "annotations"}
_IMAGE_SETS = ("released", "all")


class COCOOpenSet(BenchmarkDataset):
    """COCO images with known thing classes, unknown thing classes as anomalies (COCO20/80 by default).

    Targets are semantic: known classes ``0..K-1`` in the order of ``known_classes`` (shifted by one after a
    ``"background"`` class 0 when ``background="class"``), unknown COCO things = K, unlabelled = 255, stuff = 255
    (``"ignore"``) or 0 (``"class"``).

    Args:
        root: the folder holding ``images/{train2017,val2017}`` and ``labels/{train2017,val2017}`` (the released
            layout) or ``annotations/{train2017,val2017}`` (``layout="cocostuff"``).
        split: ``"val2017"`` (the default) or ``"train2017"``.
        known_classes: ``"coco20"`` (default: the 20 VOC categories in COCO id order, as released), ``"voc"`` (the
            same in VOC order), or COCO thing names (a sequence or one comma-separated string), numbered in the given order.
        background: ``"ignore"`` or ``"class"`` (see above).
        layout: ``"released"`` (``labels/``) or ``"cocostuff"`` (``annotations/``).
        images: ``"released"``: val2017 without :data:`VAL2017_WITHOUT_INSTANCES` (the released 4,952-image list;
            train2017: every image, the released list's filter being unknown); ``"all"``: every image; or the path
            of a text file with one label file name (``000000000139.png``) or image id per line.
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "semantic"
    num_classes = len(COCO20_CLASSES)
    class_names = COCO20_CLASSES
    splits = ("val2017", "train2017")
    default_split = "val2017"
    raw_label_values = frozenset(range(182)) | {IGNORE_INDEX}
    benchmark_name = "coco20"
    expected_tree = (
        "  images/{train2017,val2017}/{image_id:012d}.jpg\n"
        "  labels/{train2017,val2017}/{image_id:012d}.png    (COCO-Stuff stuffthingmaps: category_id - 1, 255; "
        "annotations/ with --option layout=cocostuff)"
    )
    download = (
        "http://images.cocodataset.org/zips/val2017.zip (and train2017.zip) into ROOT/images/, and "
        "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip into "
        "ROOT/labels/ (see https://github.com/nightrome/cocostuff#setup)"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        known_classes: str | Sequence[str] = "coco20",
        background: str = "ignore",
        layout: str = "released",
        images: str | Path = "released",
        transform=None,
        strict: bool = True,
    ) -> None:
        if isinstance(known_classes, str) and known_classes.strip() in CLASS_ORDERS:
            known_classes = CLASS_ORDERS[known_classes.strip()]
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
        if layout not in _LAYOUTS:
            raise ValueError(f"Expected `layout` to be one of {', '.join(_LAYOUTS)}, but got {layout!r}.")
        self.layout = layout
        self.images = images
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
        folder = _LAYOUTS[self.layout]
        label_dir = require_dir(self.root / folder / self.split, "the label directory", fix)
        found = pair_by_stem(
            image_dir, ".jpg", label_dir, ".png", f"Extract stuffthingmaps_trainval2017.zip into ROOT/{folder}/."
        )
        wanted = self._image_ids()
        if wanted is not None:
            found.frames = [frame for frame in found.frames if _image_id(frame.name) in wanted]
        elif self.images == "released" and self.split == "val2017":
            found.frames = [f for f in found.frames if _image_id(f.name) not in VAL2017_WITHOUT_INSTANCES]
        return found

    def _image_ids(self) -> set[int | str] | None:
        """The ids of an ``images`` list file; None for ``"released"`` and ``"all"``."""
        if str(self.images) in _IMAGE_SETS:
            return None
        path = Path(self.images)
        if not path.is_file():
            raise ValueError(
                f"Expected `images` to be one of {', '.join(_IMAGE_SETS)} or an image list file, but {str(path)!r} "
                "is not a file."
            )
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return {_image_id(Path(name).stem) for name in names}

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        return "Use the COCO-Stuff stuffthingmaps PNGs (ids 0..181 and 255), not panoptic or colour PNGs."


def _image_id(stem: str) -> int | str:
    """``000000000139`` -> 139; other names stay as they are."""
    return int(stem) if stem.isdigit() else stem

"""ADE20K scene parsing (Zhou et al., CVPR 2017; ``ADEChallengeData2016``): DenseHybrid's negative dataset.

DenseHybrid pastes ADE20K content into inlier images as real negatives (training only); the class masks select
the pasted region. Annotation PNGs hold 0 = "other"/unlabelled and 1..150 = classes; targets here are the usual
semantic encoding ``0..149`` with "other" as void (255).
"""

from __future__ import annotations

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, pair_by_stem, require_dir
from densehybrid.data.datasets._io import lookup_table

ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

_NUM_RAW = 150


class ADE20K(BenchmarkDataset):
    """ADE20K as extracted from ``ADEChallengeData2016.zip``.

    Args:
        root: ``ADEChallengeData2016`` or the directory holding it.
        split: ``"training"`` (20210 images, the negatives DenseHybrid pastes; the default) or ``"validation"``
            (2000).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "semantic"
    num_classes = _NUM_RAW
    class_names = ADE20K_CLASSES
    splits = ("training", "validation")
    default_split = "training"
    raw_label_values = frozenset(range(_NUM_RAW + 1))
    benchmark_name = "ade20k"
    expected_tree = (
        "  ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_{8 digits}.jpg\n"
        "  ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_{8 digits}.png   (0 other, 1..150)"
    )
    download = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip, extracted into ROOT"
    label_table = lookup_table({raw: raw - 1 for raw in range(1, _NUM_RAW + 1)})

    def discover(self) -> Discovery:
        base = self.root / "ADEChallengeData2016" if (self.root / "ADEChallengeData2016").is_dir() else self.root
        fix = self.how_to_fix()
        image_dir = require_dir(base / "images" / self.split, "the image directory", fix)
        label_dir = require_dir(base / "annotations" / self.split, "the annotation directory", fix)
        return pair_by_stem(image_dir, ".jpg", label_dir, ".png", "Re-extract ADEChallengeData2016.zip.")

"""RoadAnomaly (Lis et al., "Detecting the Unexpected via Image Resynthesis", ICCV 2019): 60 road images with
unusual objects (animals, vehicles, cones), labelled 0 = normal and 2 = anomaly, without void.
"""

from __future__ import annotations

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, Frame, PairingIssue, require_dir
from densehybrid.data.datasets._io import IMAGE_SUFFIXES, lookup_table
from densehybrid.labels import ANOMALY, INLIER

_ANOMALY_RAW = 2
_LABEL_DIR_SUFFIX = ".labels"
_LABEL_NAME = "labels_semantic.png"


class RoadAnomaly(BenchmarkDataset):
    """RoadAnomaly as extracted from ``RoadAnomaly_jpg.zip``.

    Raw ids 0 (normal) -> 0 and 2 (anomaly) -> 1; any other id becomes void (255) and is reported by
    ``densehybrid doctor``. Frames are named by their file stem.

    Args:
        root: ``RoadAnomaly_jpg`` (the folder holding ``frames/``) or the directory holding it.
        split: ``"test"``.
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "anomaly"
    splits = ("test",)
    default_split = "test"
    raw_label_values = frozenset({INLIER, _ANOMALY_RAW})
    benchmark_name = "road-anomaly"
    expected_tree = (
        "  RoadAnomaly_jpg/frames/{name}.jpg\n"
        "  RoadAnomaly_jpg/frames/{name}.labels/labels_semantic.png    (0 normal, 2 anomaly)"
    )
    download = "https://datasets-cvlab.epfl.ch/2019-road-anomaly/RoadAnomaly_jpg.zip, extracted into ROOT"
    label_table = lookup_table({INLIER: INLIER, _ANOMALY_RAW: ANOMALY})

    def discover(self) -> Discovery:
        base = self.root / "RoadAnomaly_jpg" if (self.root / "RoadAnomaly_jpg").is_dir() else self.root
        frames_dir = require_dir(base / "frames", "the frames directory", self.how_to_fix())
        discovery = Discovery()
        images = sorted(p for p in frames_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        stems = set()
        for image in images:
            stems.add(image.stem)
            label = frames_dir / f"{image.stem}{_LABEL_DIR_SUFFIX}" / _LABEL_NAME
            if label.is_file():
                discovery.frames.append(Frame(image.stem, image, label))
            else:
                discovery.issues.append(
                    PairingIssue(
                        image, f"image {str(image)!r} has no label {str(label)!r}", "Re-extract RoadAnomaly_jpg.zip."
                    )
                )
        for label_dir in sorted(p for p in frames_dir.glob(f"*{_LABEL_DIR_SUFFIX}") if p.is_dir()):
            stem = label_dir.name[: -len(_LABEL_DIR_SUFFIX)]
            if stem not in stems:
                discovery.issues.append(
                    PairingIssue(
                        label_dir,
                        f"label folder {str(label_dir)!r} has no image {str(frames_dir / (stem + '.jpg'))!r}",
                        "Re-extract RoadAnomaly_jpg.zip.",
                    )
                )
        return discovery

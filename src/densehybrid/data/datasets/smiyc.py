"""SegmentMeIfYouCan (Chan et al., NeurIPS 2021 Datasets and Benchmarks): RoadAnomaly21, RoadObstacle21 and the
LostAndFound test set with its NoKnown subset, read from the trees the SMIYC toolkit (``road_anomaly_benchmark``)
expects.

Frame ids, splits and the persistence dataset names follow the toolkit, so that anomaly maps written with
:mod:`densehybrid.smiyc_export` land where the toolkit and the Codabench server look for them:

* RoadAnomaly21: ``dataset_AnomalyTrack/images/{fid}.jpg``; public labels for the 10 ``validation*`` frames;
  outputs stored under ``AnomalyTrack-all``.
* RoadObstacle21: ``dataset_ObstacleTrack/images/{fid}.webp``, scene = ``fid.split("_")[0]``; public labels for
  the 30 frames of scene ``validation`` (minus the toolkit's excluded prefixes); outputs under ``ObstacleTrack-all``.
* LostAndFound: Cityscapes-style ``leftImg8bit/{split}/{scene}/`` and ``gtCoarse/{split}/{scene}/`` with labelIds
  0 = outside the road (void), 1 = road (inlier), 2..200 = obstacles (anomaly); outputs under
  ``LostAndFound-{train,test}``.

All targets are binary: 0 inlier, 1 anomaly, 255 void. Frames without public labels (``split="test"`` or
``"all"``) get an all-void target, so they can be exported but contribute nothing to a metric.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from densehybrid.data.datasets._base import (
    BenchmarkDataset,
    Discovery,
    Frame,
    PairingIssue,
    files_with_suffix,
    pair_by_suffix,
    require_dir,
)
from densehybrid.data.datasets._io import IMAGE_SUFFIXES, lookup_table, read_label
from densehybrid.labels import ANOMALY, IGNORE_INDEX, INLIER

_BINARY_TABLE = lookup_table({INLIER: INLIER, ANOMALY: ANOMALY, IGNORE_INDEX: IGNORE_INDEX})
_LABEL_SUFFIX = "_labels_semantic.png"

SMIYC_TOOLKIT = "https://github.com/SegmentMeIfYouCan/road-anomaly-benchmark"


class _SmiycTrack(BenchmarkDataset):
    """Shared reader of ``dataset_{Anomaly,Obstacle}Track/{images,labels_masks}``."""

    target_kind = "anomaly"
    splits = ("validation", "test", "all")
    default_split = "validation"
    raw_label_values = frozenset({INLIER, ANOMALY, IGNORE_INDEX})
    label_table = _BINARY_TABLE
    directory: str = ""
    persistence: str = ""

    @abstractmethod
    def in_split(self, fid: str) -> bool:
        """Whether frame ``fid`` belongs to ``self.split`` (by the toolkit's rule for this track)."""

    def discover(self) -> Discovery:
        track_root = self.root / self.directory if (self.root / self.directory).is_dir() else self.root
        fix = self.how_to_fix()
        image_dir = require_dir(track_root / "images", "the image directory", fix)
        label_dir = track_root / "labels_masks"
        if self.split == "validation":
            require_dir(label_dir, "the label directory", fix)
        discovery = Discovery()
        images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        fids = set()
        for image in images:
            fid = image.stem
            if not self.in_split(fid):
                continue
            fids.add(fid)
            label = label_dir / f"{fid}{_LABEL_SUFFIX}"
            if label.is_file():
                discovery.frames.append(Frame(fid, image, label, self.persistence))
            elif self.split == "validation":
                discovery.issues.append(
                    PairingIssue(
                        image,
                        f"validation image {str(image)!r} has no label {str(label)!r}",
                        f"Re-extract the {self.directory} archive; its labels_masks/ holds the public labels.",
                    )
                )
            else:
                discovery.frames.append(Frame(fid, image, None, self.persistence))
        if label_dir.is_dir():
            for label in files_with_suffix(label_dir, _LABEL_SUFFIX, recursive=False):
                fid = label.name[: -len(_LABEL_SUFFIX)]
                if self.in_split(fid) and fid not in fids:
                    discovery.issues.append(
                        PairingIssue(
                            label,
                            f"label {str(label)!r} has no image {str(image_dir / fid)!r}.*",
                            f"Re-extract the {self.directory} archive.",
                        )
                    )
        return discovery


class RoadAnomaly21(_SmiycTrack):
    """SMIYC RoadAnomaly21 (AnomalyTrack): 110 images, public labels for the 10 validation frames.

    Args:
        root: ``dataset_AnomalyTrack`` or the directory holding it.
        split: ``"validation"`` (10 labelled frames, the default), ``"test"`` (100, labels hidden) or ``"all"`` (110,
            what the toolkit's ``AnomalyTrack-all`` runs inference on for a submission).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    directory = "dataset_AnomalyTrack"
    persistence = "AnomalyTrack-all"
    benchmark_name = "smiyc-anomaly"
    expected_tree = (
        "  dataset_AnomalyTrack/images/{fid}.jpg                          (110 images)\n"
        "  dataset_AnomalyTrack/labels_masks/{fid}_labels_semantic.png    (validation0000..0009, 0/1/255)"
    )
    download = (
        "https://uni-wuppertal.sciebo.de/s/TVR7VxukVrV7fUH/download (dataset_AnomalyTrack.zip; mirror "
        "https://zenodo.org/record/5270237/files/dataset_AnomalyTrack.zip), extracted into ROOT"
    )

    def in_split(self, fid: str) -> bool:
        is_validation = fid.startswith("validation")
        return self.split == "all" or is_validation == (self.split == "validation")


class RoadObstacle21(_SmiycTrack):
    """SMIYC RoadObstacle21 (ObstacleTrack): road obstacles; the road is the region of interest (rest void).

    Args:
        root: ``dataset_ObstacleTrack`` or the directory holding it.
        split: ``"validation"`` (30 labelled frames of scene ``validation``, the default), ``"test"`` (327 frames of
            the toolkit's ``ObstacleTrack-test`` scenes) or ``"all"`` (every image, the toolkit's
            ``ObstacleTrack-all``).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    directory = "dataset_ObstacleTrack"
    persistence = "ObstacleTrack-all"
    benchmark_name = "smiyc-obstacle"
    #: Scenes of the toolkit's ObstacleTrack-test (no night, no snowstorm, no validation).
    TEST_SCENES = frozenset(
        {"curvy-street", "one-way-street", "gravel", "greyasphalt", "motorway", "paving", "darkasphalt", "darkasphalt2"}
    )
    #: Frames of scene "validation" the toolkit leaves out of ObstacleTrack-validation (prefix match, as there).
    EXCLUDED_VALIDATION_PREFIXES = ("validation_19",) + tuple(f"validation_{i}" for i in range(21, 30))
    expected_tree = (
        "  dataset_ObstacleTrack/images/{scene}_{...}.webp\n"
        "  dataset_ObstacleTrack/labels_masks/{fid}_labels_semantic.png   (validation_* frames, 0/1/255)"
    )
    download = (
        "https://uni-wuppertal.sciebo.de/s/wQQq2saipS339QA/download (dataset_ObstacleTrack.zip; mirror "
        "https://zenodo.org/record/5281633/files/dataset_ObstacleTrack.zip), extracted into ROOT"
    )

    def in_split(self, fid: str) -> bool:
        scene = fid.split("_")[0]
        if self.split == "all":
            return True
        if self.split == "test":
            return scene in self.TEST_SCENES
        return scene == "validation" and not fid.startswith(self.EXCLUDED_VALIDATION_PREFIXES)


_LAF_IMAGE_SUFFIXES = tuple(f"_leftImg8bit{suffix}" for suffix in IMAGE_SUFFIXES)
_LAF_LABEL_SUFFIX = "_gtCoarse_labelIds.png"
_LAF_OBSTACLE_MAX = 200


class LostAndFound(BenchmarkDataset):
    """LostAndFound (Pinggera et al., IROS 2016) as used by SMIYC: obstacles on the road, road = inlier.

    labelIds 0 (outside the free-space region of interest) -> void 255, 1 (road) -> 0, 2..200 (obstacles) -> 1, as
    the toolkit's ``LostAndFound-{train,test}``.

    Args:
        root: the LostAndFound root holding ``leftImg8bit/`` and ``gtCoarse/``.
        split: ``"test"`` (1203 frames, the default) or ``"train"`` (1036).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "anomaly"
    splits = ("test", "train")
    default_split = "test"
    raw_label_values = frozenset(range(_LAF_OBSTACLE_MAX + 1))
    benchmark_name = "laf-test"
    expected_tree = (
        "  leftImg8bit/{train,test}/{scene}/{scene}_{seq:06d}_{time:06d}_leftImg8bit.png   (or .webp / .jpg)\n"
        "  gtCoarse/{train,test}/{scene}/{scene}_{seq:06d}_{time:06d}_gtCoarse_labelIds.png"
    )
    download = (
        "http://wwwlehre.dhbw-stuttgart.de/~sgehrig/lostAndFoundDataset/leftImg8bit.zip and gtCoarse.zip, both "
        "extracted into ROOT"
    )
    label_table = lookup_table({0: IGNORE_INDEX, 1: INLIER, **dict.fromkeys(range(2, _LAF_OBSTACLE_MAX + 1), ANOMALY)})

    def discover(self) -> Discovery:
        fix = self.how_to_fix()
        image_dir = require_dir(self.root / "leftImg8bit" / self.split, "the image directory", fix)
        label_dir = require_dir(self.root / "gtCoarse" / self.split, "the label directory", fix)
        discovery = pair_by_suffix(
            image_dir,
            _LAF_IMAGE_SUFFIXES,
            label_dir,
            _LAF_LABEL_SUFFIX,
            label_fix="Extract gtCoarse.zip into ROOT next to leftImg8bit/.",
            smiyc_dataset=f"LostAndFound-{self.split}",
        )
        discovery.frames.sort(key=lambda frame: frame.name)
        return discovery

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        if 255 in unexpected:
            return "255 is not a LostAndFound labelId: use the *_gtCoarse_labelIds.png files, not labelTrainIds."
        return ""


class LostAndFoundNoKnown(LostAndFound):
    """SMIYC's LostAndFound-testNoKnown: the test frames without known classes (children, bicycles) and without
    the frames whose label map is empty.

    The toolkit removes the 17 empty-label frames by their index in the sorted 1203-frame list; this loader does the
    same on a complete test split and, on a partial one, removes the frames whose labelIds are all 0 (the
    toolkit's definition of those 17). Then it drops the frame-id prefixes of :attr:`KNOWN_PREFIXES`. The full set
    has 1043 frames; outputs go to ``LostAndFound-test``.

    Args:
        root: the LostAndFound root holding ``leftImg8bit/test`` and ``gtCoarse/test``.
        split: ``"test"``.
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    splits = ("test",)
    default_split = "test"
    benchmark_name = "laf-noknown"
    #: Sorted-index positions of the empty-label frames in the full 1203-frame test split (SMIYC toolkit).
    EMPTY_LABEL_INDICES = (17, 37, 55, 72, 91, 110, 129, 153, 174, 197, 218, 353, 490, 618, 686, 792, 793)
    FULL_TEST_SIZE = 1203
    #: Frame-id prefixes with known object classes: children (scene 15) and bicycles.
    KNOWN_PREFIXES = (
        "15_Rechbergstr_Deckenpfronn",
        "01_Hanns_Klemm_Str_45_000006",
        "01_Hanns_Klemm_Str_45_000007",
        "10_Schlossberg_9_000004",
    )

    def discover(self) -> Discovery:
        discovery = super().discover()
        frames = discovery.frames
        if len(frames) == self.FULL_TEST_SIZE and not discovery.issues:
            empty = set(self.EMPTY_LABEL_INDICES)
            frames = [frame for i, frame in enumerate(frames) if i not in empty]
        else:
            frames = [frame for frame in frames if np.count_nonzero(read_label(frame.label)) > 0]
        discovery.frames = [frame for frame in frames if not frame.name.startswith(self.KNOWN_PREFIXES)]
        return discovery

"""Tiny fake benchmark trees in the official on-disk layouts, for the loader, doctor and CLI tests.

Every builder writes a few small images (default 16x32) with label files in the benchmark's *raw* encoding into
``root`` and returns the path to pass to the loader as its ``root``. Label maps cycle through every raw id the
encoding defines (see :func:`pattern`), so a test can check each id's mapping. Builders are deterministic.

Example:
    >>> from tests.datasets.fake_trees import make_fake_streethazards
    >>> root = make_fake_streethazards(tmp_path, n_per_town=2)          # doctest: +SKIP
    >>> StreetHazards(root, split="test")                               # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Size = tuple[int, int]

CITYSCAPES_LABEL_IDS = tuple(range(34))
STREETHAZARDS_TEST_IDS = tuple(range(1, 15))
STREETHAZARDS_TRAIN_IDS = tuple(range(1, 14))
BINARY_IDS = (0, 1, 255)
LAF_IDS = (0, 1, 2, 17, 200)
ROAD_ANOMALY_IDS = (0, 2)
ADE20K_IDS = (0, 1, 2, 75, 150)
# COCO-Stuff stuffthingmaps: person(0), bicycle(1), car(2), giraffe(24), tv(71), stuff 91 and 181, unlabelled 255
COCO_IDS = (0, 1, 2, 24, 71, 91, 181, 255)
FOLDER_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "light",
    "sign",
    "tree",
    "grass",
    "sky",
    "car",
)

LAF_TRAIN_SCENE = "01_Hanns_Klemm_Str_45"
LAF_TEST_SCENES = ("02_Hanns_Klemm_Str_44", "04_Maurener_Weg_8", "15_Rechbergstr_Deckenpfronn")


def pattern(size: Size, values: Sequence[int], shift: int = 0) -> np.ndarray:
    """(H, W) array cycling through ``values`` in raster order, starting at ``values[shift]``."""
    height, width = size
    table = np.asarray(values, dtype=np.int64)
    return table[(np.arange(height * width) + shift) % len(table)].reshape(height, width)


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(key.encode()))


def write_image(path: Path, size: Size, mode: str = "RGB") -> Path:
    """A random image of ``size`` (H, W); the format follows the suffix (png, jpg, webp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 4 if mode == "RGBA" else 3
    pixels = _rng(str(path.name)).integers(0, 256, size=(*size, channels), dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 255
    options = {"lossless": True} if path.suffix == ".webp" else {}
    Image.fromarray(pixels, mode).save(path, **options)
    return path


def write_label(path: Path, label: np.ndarray) -> Path:
    """A single-channel 8-bit PNG of raw ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(label, dtype=np.uint8), "L").save(path)
    return path


def make_fake_cityscapes(
    root: Path,
    splits: Sequence[str] = ("val",),
    cities: Sequence[str] = ("frankfurt", "lindau"),
    n_per_city: int = 2,
    size: Size = (16, 32),
) -> Path:
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png`` (ids 0..33)."""
    root = Path(root)
    for split in splits:
        for city in cities:
            for i in range(n_per_city):
                frame_id = f"{city}_{i:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{frame_id}_leftImg8bit.png", size)
                label = pattern(size, CITYSCAPES_LABEL_IDS, shift=i)
                write_label(root / "gtFine" / split / city / f"{frame_id}_gtFine_labelIds.png", label)
    return root


def make_fake_streethazards(
    root: Path, n_per_town: int = 2, size: Size = (16, 32), splits: Sequence[str] = ("test",)
) -> Path:
    """RGBA PNGs and raw-id annotations (1..14 in test towns t5/t6, 1..13 in t1-t4) under ``train/`` and ``test/``."""
    root = Path(root)
    towns = {
        "train": ("train", "training", ("t1", "t2", "t3")),
        "validation": ("train", "validation", ("t4",)),
        "test": ("test", "test", ("t5", "t6")),
    }
    for split in splits:
        top, sub, split_towns = towns[split]
        ids = STREETHAZARDS_TEST_IDS if split == "test" else STREETHAZARDS_TRAIN_IDS
        for town in split_towns:
            for i in range(n_per_town):
                name = f"{300 + i}.png"
                write_image(root / top / "images" / sub / town / name, size, mode="RGBA")
                write_label(root / top / "annotations" / sub / town / name, pattern(size, ids, shift=i))
    return root


def _laf_id(scene: str, seq: int, time: int = 30) -> str:
    return f"{scene}_{seq:06d}_{time:06d}"


def make_fake_fs_laf(root: Path, n: int = 3, size: Size = (16, 32), layout: str = "official") -> Path:
    """Fishyscapes LAF val: ``n`` frames alternating between a LAF train and a LAF test scene.

    ``layout="official"``: ``fishyscapes_lostandfound/{i:04d}_{laf_id}_labels.png`` (0/1/255) and LAF images in
    ``leftImg8bit/{train,test}/{scene}/`` plus one LAF image that Fishyscapes does not use.
    ``layout="densehybrid"``: ``ood/{split}/{scene}/{id}_ood_segmentation.png`` (0/1, void 2) next to
    ``leftImg8bit/{split}/{scene}/{id}_leftImg8bit.png``.
    """
    root = Path(root)
    for i in range(n):
        laf_split, scene = ("train", LAF_TRAIN_SCENE) if i % 2 == 0 else ("test", LAF_TEST_SCENES[1])
        frame_id = _laf_id(scene, i)
        write_image(root / "leftImg8bit" / laf_split / scene / f"{frame_id}_leftImg8bit.png", size)
        if layout == "official":
            write_label(
                root / "fishyscapes_lostandfound" / f"{i:04d}_{frame_id}_labels.png", pattern(size, BINARY_IDS, i)
            )
        elif layout == "densehybrid":
            label = pattern(size, (0, 1, 2), i)
            write_label(root / "ood" / laf_split / scene / f"{frame_id}_ood_segmentation.png", label)
        else:
            raise ValueError(f"Expected `layout` to be official or densehybrid, but got {layout!r}.")
    if layout == "official":
        write_image(root / "leftImg8bit" / "test" / LAF_TEST_SCENES[0] / "unused_leftImg8bit.png", size)
    return root


def make_fake_fs_static(root: Path, n: int = 3, size: Size = (16, 32), layout: str = "official") -> Path:
    """Fishyscapes Static val.

    ``layout="official"``: ``{i:04d}_{cityscapes_id}_rgb.npz`` overlays (signed int16 ``rgb``) and ``_labels.png``
    (0/1/255) directly in ``root``, and the Cityscapes val images in ``root/leftImg8bit/val/{city}/`` (one extra
    Cityscapes image has no overlay, as in a full Cityscapes download).
    ``layout="densehybrid"``: composed ``frames/{i:04d}_{cityscapes_id}_rgb.jpg`` next to ``_labels.png``.
    """
    root = Path(root)
    for i in range(n):
        city = ("frankfurt", "lindau", "munster")[i % 3]
        cityscapes_id = f"{city}_{i:06d}_000019"
        prefix = f"{i:04d}_{cityscapes_id}"
        label = pattern(size, BINARY_IDS, i)
        if layout == "official":
            write_image(root / "leftImg8bit" / "val" / city / f"{cityscapes_id}_leftImg8bit.png", size)
            overlay = _rng(prefix).integers(-80, 80, size=(*size, 3)).astype(np.int16)
            np.savez(root / f"{prefix}_rgb.npz", rgb=overlay)
            write_label(root / f"{prefix}_labels.png", label)
        elif layout == "densehybrid":
            write_image(root / "frames" / f"{prefix}_rgb.jpg", size)
            write_label(root / "frames" / f"{prefix}_labels.png", label)
        else:
            raise ValueError(f"Expected `layout` to be official or densehybrid, but got {layout!r}.")
    if layout == "official":
        write_image(root / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000999_000019_leftImg8bit.png", size)
    return root


def make_fake_smiyc_anomaly(root: Path, n_validation: int = 2, n_test: int = 2, size: Size = (16, 32)) -> Path:
    """``dataset_AnomalyTrack/images/*.jpg``; labels (0/1/255) and colour visualisations for ``validation*``."""
    base = Path(root) / "dataset_AnomalyTrack"
    for i in range(n_validation):
        fid = f"validation{i:04d}"
        write_image(base / "images" / f"{fid}.jpg", size)
        write_label(base / "labels_masks" / f"{fid}_labels_semantic.png", pattern(size, BINARY_IDS, i))
        write_image(base / "labels_masks" / f"{fid}_labels_semantic_color.png", size)
    for i in range(n_test):
        write_image(base / "images" / f"cow{i:04d}.jpg", size)
    return Path(root)


def make_fake_smiyc_obstacle(root: Path, n_validation: int = 2, n_test: int = 2, size: Size = (16, 32)) -> Path:
    """``dataset_ObstacleTrack/images/*.webp``: ``validation_{k}`` frames with labels, one frame of an excluded
    validation prefix (``validation_25``, labelled), ``gravel_*`` test frames and one snowstorm frame."""
    base = Path(root) / "dataset_ObstacleTrack"
    for i in range(n_validation):
        fid = f"validation_{i + 1}"
        write_image(base / "images" / f"{fid}.webp", size)
        write_label(base / "labels_masks" / f"{fid}_labels_semantic.png", pattern(size, BINARY_IDS, i))
    write_image(base / "images" / "validation_25.webp", size)
    write_label(base / "labels_masks" / "validation_25_labels_semantic.png", pattern(size, BINARY_IDS))
    for i in range(n_test):
        write_image(base / "images" / f"gravel_bag_{i + 1}.webp", size)
    write_image(base / "images" / "snowstorm1_00_00_01.000.webp", size)
    return Path(root)


def make_fake_lost_and_found(
    root: Path,
    split: str = "test",
    n_per_scene: int = 2,
    size: Size = (16, 32),
    scenes: Sequence[str] | None = None,
    empty_label_frames: int = 1,
) -> Path:
    """``leftImg8bit/{split}/{scene}/*_leftImg8bit.png`` + ``gtCoarse/.../*_gtCoarse_labelIds.png`` (ids 0, 1, 2..200).

    The first ``empty_label_frames`` frames of the first scene get an all-zero label map (the frames SMIYC drops).
    Default test scenes include ``15_Rechbergstr_Deckenpfronn`` (children, dropped from NoKnown).
    """
    root = Path(root)
    scenes = tuple(scenes) if scenes is not None else (LAF_TEST_SCENES if split == "test" else (LAF_TRAIN_SCENE,))
    for s, scene in enumerate(scenes):
        for i in range(n_per_scene):
            frame_id = _laf_id(scene, i, 30 + 10 * s)
            write_image(root / "leftImg8bit" / split / scene / f"{frame_id}_leftImg8bit.png", size)
            empty = s == 0 and i < empty_label_frames
            label = np.zeros(size, dtype=np.int64) if empty else pattern(size, LAF_IDS, i)
            write_label(root / "gtCoarse" / split / scene / f"{frame_id}_gtCoarse_labelIds.png", label)
    return root


def make_fake_road_anomaly(root: Path, n: int = 3, size: Size = (16, 32)) -> Path:
    """``RoadAnomaly_jpg/frames/{name}.jpg`` + ``frames/{name}.labels/labels_semantic.png`` (0 normal, 2 anomaly)."""
    frames = Path(root) / "RoadAnomaly_jpg" / "frames"
    for i in range(n):
        name = f"animals{i:02d}_scene"
        write_image(frames / f"{name}.jpg", size)
        write_label(frames / f"{name}.labels" / "labels_semantic.png", pattern(size, ROAD_ANOMALY_IDS, i))
    return Path(root)


def make_fake_ade20k(root: Path, n: int = 2, splits: Sequence[str] = ("training",), size: Size = (16, 32)) -> Path:
    """``ADEChallengeData2016/{images,annotations}/{split}/ADE_*`` with ids 0 (other) and 1..150."""
    base = Path(root) / "ADEChallengeData2016"
    for split in splits:
        tag = "train" if split == "training" else "val"
        for i in range(n):
            stem = f"ADE_{tag}_{i + 1:08d}"
            write_image(base / "images" / split / f"{stem}.jpg", size)
            write_label(base / "annotations" / split / f"{stem}.png", pattern(size, ADE20K_IDS, i))
    return Path(root)


def make_fake_coco(
    root: Path, n: int = 2, split: str = "val2017", size: Size = (16, 32), labels: str = "labels", first_id: int = 139
) -> Path:
    """``images/{split}/{id:012d}.jpg`` + ``{labels}/{split}/{id:012d}.png`` (stuffthingmaps: id - 1, 255); the
    released layout (``labels``) or COCO-Stuff's (``annotations``)."""
    root = Path(root)
    for i in range(n):
        stem = f"{first_id + i:012d}"
        write_image(root / "images" / split / f"{stem}.jpg", size)
        write_label(root / labels / split / f"{stem}.png", pattern(size, COCO_IDS, i))
    return root


def make_fake_folder(
    root: Path,
    n_train: int = 2,
    n_val: int = 3,
    classes: Sequence[str] = FOLDER_CLASSES,
    size: Size = (16, 32),
    anomaly_id: int | None = None,
) -> Path:
    """A user's tree: ``classes.txt``, ``images``/``labels`` (ids 0..K-1, 255) and ``val/`` whose labels also hold
    the anomaly value (``anomaly_id``, default K; another value is written to ``dataset.toml``)."""
    root = Path(root)
    k = len(classes)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    if anomaly_id is not None:
        (root / "dataset.toml").write_text(f"anomaly_id = {anomaly_id}\n")
    for base, n, extra in ((root, n_train, ()), (root / "val", n_val, (k if anomaly_id is None else anomaly_id,))):
        for i in range(n):
            write_image(base / "images" / f"scene{i:02d}.png", size)
            write_label(base / "labels" / f"scene{i:02d}.png", pattern(size, (*range(k), 255, *extra), shift=i))
    return root


def make_fake_roadscene(root: Path) -> Path:
    """A tiny generated RoadScene benchmark (it has no download: the generator is the tree's source)."""
    from densehybrid.data import RoadSceneBenchmark

    RoadSceneBenchmark(root / "roadscene", image_size=(48, 64), sizes={"train": 2, "val": 1, "test": 2}).prepare()
    return root / "roadscene"


#: benchmark name -> builder with default arguments, returning the root to pass to the loader (default split).
FAKE_TREES: dict[str, Callable[[Path], Path]] = {
    "cityscapes": make_fake_cityscapes,
    "streethazards": make_fake_streethazards,
    "fs-laf": make_fake_fs_laf,
    "fs-static": make_fake_fs_static,
    "smiyc-anomaly": make_fake_smiyc_anomaly,
    "smiyc-obstacle": make_fake_smiyc_obstacle,
    "laf-test": make_fake_lost_and_found,
    "laf-noknown": make_fake_lost_and_found,
    "road-anomaly": make_fake_road_anomaly,
    "coco20": make_fake_coco,
    "ade20k": make_fake_ade20k,
    "folder": make_fake_folder,
    "roadscene": make_fake_roadscene,
}

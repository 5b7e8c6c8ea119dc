"""RoadScene: the built-in open-set road-scene benchmark, generated from a seed with no download.

Street scenes in perspective with :data:`ROADSCENE_NUM_CLASSES` known classes, textured with photographs that ship
inside scikit-image, with train / val / test splits. Val and test scenes hold 1-3 anomalies on or beside the road
from two families: ``real`` objects cut out of photographs (cat, coffee cup, astronaut, rocket, horse, coins,
motorcycle) and ``procedural`` shapes with synthetic colours and patterns. :class:`RoadSceneNegatives` provides the
training negatives (the ADE20K role of the paper) from a disjoint set of photographs. The dataset card is
``docs/roadscene.md``.

Every scene is a pure function of ``(seed, split, index, image_size)``: :func:`generate_scene` seeds a fresh
``numpy.random.Generator`` from those values, so the same arguments give byte-identical arrays, and any one scene can
be regenerated alone. :class:`RoadSceneBenchmark` generates whole splits, in memory or cached on disk as compressed
``.npz`` files with a JSON manifest (configuration, generator version, SHA-256 of every array).

Example:
    >>> bench = RoadSceneBenchmark(sizes={"train": 2, "val": 1, "test": 1}, image_size=(64, 128))  # in memory
    >>> sample = RoadSceneDataset(bench, "test")[0]
    >>> sample["image"].shape, sample["target"].dtype, int(sample["target"].max()) == ROADSCENE_ANOMALY_ID
    (torch.Size([3, 64, 128]), torch.int64, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densehybrid.data import _roadscene_sources as _sources
from densehybrid.data._roadscene_render import (
    ANOMALY_ID,
    MIN_ANOMALY_PIXELS,
    NUM_CLASSES,
    PROCEDURAL_FILLS,
    PROCEDURAL_SHAPES,
    AnomalyRecord,
    Scene,
    render_scene,
)
from densehybrid.data._roadscene_sources import NEGATIVE_SOURCES, REAL_ANOMALY_SOURCES, TEXTURE_SOURCES
from densehybrid.errors import DatasetError
from densehybrid.labels import IGNORE_INDEX

__all__ = [
    "ANOMALY_FAMILIES",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_SIZES",
    "GENERATOR_VERSION",
    "MIN_ANOMALY_PIXELS",
    "NEGATIVE_JITTER_SCALE",
    "NEGATIVE_OBJECTS",
    "NEGATIVE_RESIZE_FACTOR",
    "NEGATIVE_SOURCES",
    "PROCEDURAL_FILLS",
    "PROCEDURAL_SHAPES",
    "REAL_ANOMALY_SOURCES",
    "ROADSCENE_ANOMALY_ID",
    "ROADSCENE_CLASSES",
    "ROADSCENE_NUM_CLASSES",
    "ROADSCENE_PALETTE",
    "ROADSCENE_SPLITS",
    "TEXTURE_SOURCES",
    "AnomalyRecord",
    "RoadSceneBenchmark",
    "RoadSceneDataset",
    "RoadSceneNegatives",
    "RoadSceneSplit",
    "Scene",
    "benchmark_digest",
    "colorize_roadscene",
    "generate_negative",
    "generate_scene",
    "save_example_grid",
]

ROADSCENE_CLASSES: tuple[str, ...] = (
    "road",
    "lane marking",
    "sidewalk",
    "terrain",
    "building",
    "vegetation",
    "sky",
    "pole",
    "person",
    "car",
)
ROADSCENE_NUM_CLASSES = NUM_CLASSES
ROADSCENE_ANOMALY_ID = ANOMALY_ID
# One RGB colour per class id 0..K-1 (Cityscapes colours where Cityscapes has the class), then the anomaly id K.
ROADSCENE_PALETTE: np.ndarray = np.array(
    [
        (128, 64, 128),  # road
        (255, 255, 255),  # lane marking
        (244, 35, 232),  # sidewalk
        (152, 251, 152),  # terrain
        (70, 70, 70),  # building
        (107, 142, 35),  # vegetation
        (70, 130, 180),  # sky
        (153, 153, 153),  # pole
        (220, 20, 60),  # person
        (0, 0, 142),  # car
        (255, 165, 0),  # anomaly
    ],
    dtype=np.uint8,
)
ROADSCENE_PALETTE.setflags(write=False)
ANOMALY_FAMILIES: tuple[str, ...] = ("none", "real", "procedural")
ROADSCENE_SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_IMAGE_SIZE: tuple[int, int] = (128, 256)
DEFAULT_SIZES: Mapping[str, int] = {"train": 400, "val": 100, "test": 100}
# Bump whenever a change alters any generated array; caches with another version are regenerated.
GENERATOR_VERSION = 1

_FORMAT = "densehybrid-roadscene"
_MIN_SIDE = 48
_MAX_ANOMALIES = 3
# The first entropy word keeps these streams apart from any other use of the same user seed.
_SALT = 0x0D5E_4B1D
_STREAMS = {"train": 1, "val": 2, "test": 3, "negatives": 4}


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"Expected `seed` to be a non-negative int, but got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"Expected `seed` to be a non-negative int, but got {seed}.")
    return int(seed)


def _check_split(split: object) -> str:
    if split not in ROADSCENE_SPLITS:
        raise ValueError(f"Expected `split` to be one of {', '.join(ROADSCENE_SPLITS)}, but got {split!r}.")
    return str(split)


def _check_index(index: object, name: str = "index") -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"Expected `{name}` to be a non-negative int, but got {type(index).__name__}.")
    if index < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative int, but got {index}.")
    return int(index)


def _check_size(size: object, name: str, minimum: int) -> tuple[int, int]:
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    )
    if not ok:
        raise TypeError(f"Expected `{name}` to be a pair of ints (height, width), but got {size!r}.")
    if min(size) < minimum:
        raise ValueError(f"Expected `{name}` to be at least {minimum} pixels on each side, but got {tuple(size)}.")
    return int(size[0]), int(size[1])


def _check_sizes(sizes: object) -> dict[str, int]:
    if not isinstance(sizes, Mapping):
        raise TypeError(f"Expected `sizes` to be a mapping split -> count, but got {type(sizes).__name__}.")
    unknown = set(sizes) - set(ROADSCENE_SPLITS)
    if unknown:
        raise ValueError(
            f"Expected `sizes` keys among {', '.join(ROADSCENE_SPLITS)}, but got {', '.join(map(repr, unknown))}."
        )
    out = dict(DEFAULT_SIZES)
    for split, count in sizes.items():
        out[split] = _check_index(count, f"sizes[{split!r}]")
    return {split: out[split] for split in ROADSCENE_SPLITS}


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SALT, seed, _STREAMS[stream], index]))


# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------


def generate_scene(seed: int, split: str, index: int, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> Scene:
    """Generate one scene of the benchmark.

    Train scenes hold only the known classes; val and test scenes also hold 1-3 anomalies (id
    :data:`ROADSCENE_ANOMALY_ID`), each of at least :data:`MIN_ANOMALY_PIXELS` visible pixels.

    Args:
        seed: the benchmark seed (non-negative int).
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: the scene's index in its split.
        image_size: (H, W) in pixels, each at least 48.

    Returns:
        A :class:`Scene`: ``image`` (H, W, 3) uint8, ``target`` (H, W) uint8 ids in ``0..K`` (K only in val/test),
        ``family`` (H, W) uint8 (0 none, 1 real, 2 procedural, see :data:`ANOMALY_FAMILIES`) and ``anomalies``,
        one :class:`AnomalyRecord` per anomaly.

    Raises:
        ValueError: for a negative seed or index, an unknown split or too small an image.

    Example:
        >>> scene = generate_scene(0, "val", 3, image_size=(64, 128))
        >>> scene.image.shape, scene.target.shape, len(scene.anomalies) >= 1
        ((64, 128, 3), (64, 128), True)
    """
    seed = _check_seed(seed)
    split = _check_split(split)
    index = _check_index(index)
    height, width = _check_size(image_size, "image_size", _MIN_SIDE)
    rng = _rng(seed, split, index)
    count = 0 if split == "train" else int(rng.integers(1, _MAX_ANOMALIES + 1))
    scene = render_scene(rng, height, width, count)
    if count and not scene.anomalies:
        # Cannot happen at supported sizes (the first anomaly has many tries); never return a val/test scene
        # without an anomaly silently.
        raise RuntimeError(f"No anomaly could be placed in {split} scene {index} of size {image_size}.")
    return scene


class RoadSceneSplit(NamedTuple):
    """The arrays of one split.

    Attributes:
        images: (N, H, W, 3) uint8 RGB.
        targets: (N, H, W) uint8 class ids ``0..K-1``, anomaly id K.
        families: (N, H, W) uint8 anomaly family per pixel (0 none, 1 real, 2 procedural).
        anomalies: per image, the list of its :class:`AnomalyRecord` (empty for train).
    """

    images: np.ndarray
    targets: np.ndarray
    families: np.ndarray
    anomalies: list[list[AnomalyRecord]]


def _generate_split(seed: int, split: str, count: int, image_size: tuple[int, int]) -> RoadSceneSplit:
    height, width = image_size
    images = np.empty((count, height, width, 3), dtype=np.uint8)
    targets = np.empty((count, height, width), dtype=np.uint8)
    families = np.empty((count, height, width), dtype=np.uint8)
    anomalies = []
    for i in range(count):
        scene = generate_scene(seed, split, i, image_size)
        images[i], targets[i], families[i] = scene.image, scene.target, scene.family
        anomalies.append(list(scene.anomalies))
    return RoadSceneSplit(images, targets, families, anomalies)


def _sha256(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _split_hashes(data: RoadSceneSplit) -> dict[str, str]:
    return {"images": _sha256(data.images), "targets": _sha256(data.targets), "families": _sha256(data.families)}


class RoadSceneBenchmark:
    """The benchmark's configuration and its generated splits, in memory or cached under ``root``.

    With ``root=None`` every split is generated in memory on first use. With a ``root``, :meth:`prepare` writes
    ``<split>.npz`` (``images``, ``targets``, ``families``), ``anomalies.json`` and ``manifest.json`` (format,
    generator version, configuration, classes, SHA-256 of every array); an existing cache is reused only when its
    manifest matches this configuration and generator version, otherwise it is regenerated. Files are written to a
    temporary name and renamed, so an interrupted run never leaves a half-written split behind a valid manifest.

    Args:
        root: cache directory, or None to stay in memory.
        seed: the benchmark seed. The published benchmark uses 0; it was fixed before any method was run on it.
        image_size: (H, W) of every image.
        sizes: scenes per split; missing splits take :data:`DEFAULT_SIZES` (train 400, val 100, test 100).

    Example:
        >>> bench = RoadSceneBenchmark(image_size=(64, 128), sizes={"train": 2, "val": 0, "test": 1})
        >>> bench.split("test").images.shape
        (1, 64, 128, 3)
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        seed: int = 0,
        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.root = None if root is None else Path(root)
        self.seed = _check_seed(seed)
        self.image_size = _check_size(image_size, "image_size", _MIN_SIDE)
        self.sizes = _check_sizes({} if sizes is None else sizes)
        self._splits: dict[str, RoadSceneSplit] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The configuration recorded in the manifest (JSON types)."""
        return {
            "seed": self.seed,
            "image_size": list(self.image_size),
            "sizes": dict(self.sizes),
            "version": GENERATOR_VERSION,
        }

    @property
    def manifest_path(self) -> Path | None:
        """``root / "manifest.json"``, or None in memory."""
        return None if self.root is None else self.root / "manifest.json"

    def __repr__(self) -> str:
        where = "memory" if self.root is None else str(self.root)
        return f"RoadSceneBenchmark(root={where!r}, seed={self.seed}, image_size={self.image_size}, sizes={self.sizes})"

    @classmethod
    def from_root(cls, root: str | os.PathLike[str]) -> RoadSceneBenchmark:
        """The benchmark cached under ``root``, with the configuration its manifest records.

        Raises:
            DatasetError: when ``root`` holds no readable RoadScene manifest.
        """
        manifest = _read_manifest(Path(root))
        if manifest is None:
            raise DatasetError(
                f"Expected {str(root)!r} to hold a RoadScene benchmark (manifest.json), but it is missing or "
                "unreadable. Create it with `RoadSceneBenchmark(root).prepare()`."
            )
        config = manifest["config"]
        return cls(root, seed=config["seed"], image_size=tuple(config["image_size"]), sizes=config["sizes"])

    def is_prepared(self) -> bool:
        """Whether ``root`` holds a complete cache for this configuration (always False in memory)."""
        if self.root is None:
            return False
        manifest = _read_manifest(self.root)
        if manifest is None or manifest.get("config") != self.config:
            return False
        return (
            all((self.root / f"{split}.npz").is_file() for split in ROADSCENE_SPLITS)
            and (self.root / "anomalies.json").is_file()
        )

    def prepare(self, force: bool = False) -> RoadSceneBenchmark:
        """Generate every split (and write the cache when there is a ``root``); returns ``self``.

        Args:
            force: regenerate even when a matching cache exists.
        """
        if self.root is None:
            for split in ROADSCENE_SPLITS:
                self.split(split)
            return self
        if self.is_prepared() and not force:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        old = _read_manifest(self.root, must_be_ours=True)
        if old is not None:
            # Invalidate first: a crash half-way must not leave the old manifest describing new files.
            self.manifest_path.unlink()
        self._splits = {}
        files: dict[str, Any] = {}
        anomalies: dict[str, Any] = {}
        for split in ROADSCENE_SPLITS:
            data = _generate_split(self.seed, split, self.sizes[split], self.image_size)
            path = self.root / f"{split}.npz"
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, images=data.images, targets=data.targets, families=data.families)
            os.replace(tmp, path)
            files[split] = {"file": path.name, "count": self.sizes[split], "sha256": _split_hashes(data)}
            anomalies[split] = [[asdict(r) for r in recs] for recs in data.anomalies]
            self._splits[split] = data
        _write_json(self.root / "anomalies.json", anomalies)
        manifest = {
            "format": _FORMAT,
            "config": self.config,
            "classes": list(ROADSCENE_CLASSES),
            "anomaly_id": ROADSCENE_ANOMALY_ID,
            "ignore_index": IGNORE_INDEX,
            "families": list(ANOMALY_FAMILIES),
            "sources": {
                "textures": list(TEXTURE_SOURCES),
                "real_anomalies": list(REAL_ANOMALY_SOURCES),
                "negatives": list(NEGATIVE_SOURCES),
            },
            "files": files,
        }
        _write_json(self.manifest_path, manifest)
        return self

    def split(self, split: str) -> RoadSceneSplit:
        """The arrays of one split (generated, or read from the cache and checked against its SHA-256).

        Raises:
            ValueError: for an unknown split.
            DatasetError: when a cached file does not match the manifest's hashes.
        """
        split = _check_split(split)
        if split in self._splits:
            return self._splits[split]
        if self.root is None:
            self._splits[split] = _generate_split(self.seed, split, self.sizes[split], self.image_size)
            return self._splits[split]
        if not self.is_prepared():
            self.prepare()
            return self._splits[split]
        manifest = _read_manifest(self.root)
        path = self.root / f"{split}.npz"
        remedy = f"Delete {str(self.root)!r} or call `prepare(force=True)` to regenerate it."
        try:
            with np.load(path) as npz:
                arrays = {key: npz[key] for key in ("images", "targets", "families")}
            with open(self.root / "anomalies.json", encoding="utf-8") as fh:
                records = json.load(fh)[split]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            from densehybrid.data.datasets._io import describe_npz_error

            raise DatasetError(
                f"Expected {str(path)!r} to be a readable RoadScene split, but {describe_npz_error(err)}. {remedy}"
            ) from err
        data = RoadSceneSplit(
            arrays["images"],
            arrays["targets"],
            arrays["families"],
            [[AnomalyRecord(**{**r, "bbox": tuple(r["bbox"])}) for r in recs] for recs in records],
        )
        expected = manifest["files"][split]["sha256"]
        if _split_hashes(data) != expected:
            raise DatasetError(f"Expected {str(path)!r} to match the SHA-256 in its manifest, but it differs. {remedy}")
        self._splits[split] = data
        return data


def benchmark_digest(root: str | os.PathLike[str]) -> str:
    """A short fingerprint of the benchmark cached under ``root``: SHA-256 of its manifest's configuration and array
    hashes (16 hex digits). Two folders have the same digest exactly when they hold the same scenes.

    Raises:
        DatasetError: when ``root`` holds no readable RoadScene manifest.
    """
    manifest = _read_manifest(Path(root))
    if manifest is None:
        raise DatasetError(f"Expected {str(root)!r} to hold a RoadScene benchmark (manifest.json), but it is missing.")
    content = json.dumps({"config": manifest["config"], "files": manifest["files"]}, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _read_manifest(root: Path, must_be_ours: bool = False) -> dict[str, Any] | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        if must_be_ours:
            raise DatasetError(
                f"Expected {str(path)!r} to be a RoadScene manifest, but it is not. Choose an empty directory as "
                "the benchmark root."
            )
        return None
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


class RoadSceneDataset(Dataset):
    """One split of the benchmark as a torch dataset.

    Every item is a dict:

    * ``image``: (3, H, W) float32 in [0, 1];
    * ``target``: (H, W) int64, class ids ``0..K-1`` and the anomaly id K = :data:`ROADSCENE_ANOMALY_ID` (val/test);
    * ``family``: (H, W) int64 anomaly family, 0 none, 1 real, 2 procedural (all 0 in train);
    * ``name``: ``"<split>/<index:05d>"``.

    Args:
        source: a :class:`RoadSceneBenchmark`, or the root of a cached one (see :meth:`RoadSceneBenchmark.from_root`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: callable applied to each sample dict, returning a sample dict.

    Attributes:
        num_classes: K = :data:`ROADSCENE_NUM_CLASSES`.
        class_names: :data:`ROADSCENE_CLASSES`.
        palette: (K, 3) their colours (:data:`ROADSCENE_PALETTE`), recorded in the checkpoints of runs on it.
        anomalies: per item, its :class:`AnomalyRecord` list.
    """

    num_classes = ROADSCENE_NUM_CLASSES
    class_names = ROADSCENE_CLASSES
    palette = ROADSCENE_PALETTE[:ROADSCENE_NUM_CLASSES]

    def __init__(
        self,
        source: RoadSceneBenchmark | str | os.PathLike[str],
        split: str = "train",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if isinstance(source, RoadSceneBenchmark):
            self.benchmark = source
        elif isinstance(source, (str, os.PathLike)):
            self.benchmark = RoadSceneBenchmark.from_root(source)
        else:
            raise TypeError(
                f"Expected `source` to be a RoadSceneBenchmark or a directory path, but got {type(source).__name__}."
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"Expected `transform` to be callable, but got {type(transform).__name__}.")
        self.split = _check_split(split)
        self.transform = transform
        self._data = self.benchmark.split(self.split)
        self.anomalies = self._data.anomalies

    def __len__(self) -> int:
        return len(self._data.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Expected `index` in [0, {len(self)}), but got {index}.")
        index = index % len(self)
        sample = {
            "image": torch.from_numpy(self._data.images[index]).permute(2, 0, 1).float().div_(255.0),
            "target": torch.from_numpy(self._data.targets[index].astype(np.int64)),
            "family": torch.from_numpy(self._data.families[index].astype(np.int64)),
            "name": f"{self.split}/{index:05d}",
        }
        return self.transform(sample) if self.transform is not None else sample


#: Shorter side of a negative photograph before the jitter crop, in crop sides (the released code resizes ADE20K
#: images to a shorter side of 384 and crops 192: a factor of 2).
NEGATIVE_RESIZE_FACTOR = 2
#: Range of the jitter crop's scale factor (the released ``JitterRandomCrop(scale=(0.5, 2))``).
NEGATIVE_JITTER_SCALE = (0.5, 2.0)
#: Range of the number of object shapes in a negative's segment map.
NEGATIVE_OBJECTS = (2, 4)


def _object_segments(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w) segment map of 2-4 overlapping object shapes (ids 1..k, painted back to front) on background 0.

    Each shape is star-shaped around a random centre: its radius varies with the angle as a sum of three random
    harmonics, which gives rounded, lobed outlines like the objects of a scene rather than superpixels.
    """
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    segments = np.zeros((h, w), dtype=np.int64)
    count = int(rng.integers(NEGATIVE_OBJECTS[0], NEGATIVE_OBJECTS[1] + 1))
    short = min(h, w)
    for obj in range(1, count + 1):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        radius = rng.uniform(0.15, 0.4) * short
        stretch = np.exp(rng.uniform(-0.4, 0.4))  # elongated objects, either way
        dy, dx = (rows - cy) / stretch, (cols - cx) * stretch
        angle, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
        edge = np.ones_like(angle)
        for k in (2, 3, 5):
            edge += rng.uniform(0.0, 0.3) / k * 2 * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
        inside = dist <= radius * edge
        if not inside.any():  # a tiny crop: keep at least the centre pixel
            inside[min(int(cy), h - 1), min(int(cx), w - 1)] = True
        segments[inside] = obj
    return segments


def generate_negative(seed: int, index: int, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """One training negative: a jitter crop of a :data:`NEGATIVE_SOURCES` photograph and an object segment map.

    As the released pipeline does for ADE20K (``JointResize(384)`` then ``JitterRandomCrop(192, scale=(0.5, 2))``),
    the photograph is resized to a shorter side of :data:`NEGATIVE_RESIZE_FACTOR` times the crop side, rescaled by a
    factor drawn uniformly from :data:`NEGATIVE_JITTER_SCALE`, and cropped to ``size`` at a uniform position. The
    segment map plays the role of the ADE20K class map (the pasting code unites the pixels of two random ids):
    2-4 object shapes (ids 1..k) on a background id 0, which, like ADE's "other", can be drawn too. The masks are
    our own choice: the photographs have no object annotations.

    Args:
        seed: the benchmark seed.
        index: the negative's index.
        size: (h, w) of the crop, each at least 16.

    Returns:
        ``image`` (h, w, 3) float32 in [0, 1] and ``segments`` (h, w) int64.
    """
    seed = _check_seed(seed)
    index = _check_index(index)
    h, w = _check_size(size, "size", 16)
    rng = _rng(seed, "negatives", index)
    name = NEGATIVE_SOURCES[int(rng.integers(len(NEGATIVE_SOURCES)))]
    base = _negative_base(name, NEGATIVE_RESIZE_FACTOR * max(h, w))
    scale = rng.uniform(*NEGATIVE_JITTER_SCALE)
    bh, bw = base.shape[:2]
    ch, cw = min(bh, max(2, round(h / scale))), min(bw, max(2, round(w / scale)))
    top, left = int(rng.integers(0, bh - ch + 1)), int(rng.integers(0, bw - cw + 1))
    crop = np.ascontiguousarray(base[top : top + ch, left : left + cw])
    resized = Image.fromarray(crop).resize((w, h), Image.BILINEAR)
    image = np.ascontiguousarray(np.asarray(resized, dtype=np.float32) / 255.0)
    return image, _object_segments(rng, h, w)


_NEGATIVE_BASES: dict[tuple[str, int], np.ndarray] = {}


def _negative_base(name: str, shorter_side: int) -> np.ndarray:
    """A negative photograph as uint8 RGB resized to ``shorter_side`` (cached per process)."""
    key = (name, shorter_side)
    if key not in _NEGATIVE_BASES:
        picture = _sources.load_source(name)
        ph, pw = picture.shape[:2]
        factor = shorter_side / min(ph, pw)
        size = (max(1, round(pw * factor)), max(1, round(ph * factor)))
        image = Image.fromarray(np.rint(picture * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
        _NEGATIVE_BASES[key] = np.asarray(image)
    return _NEGATIVE_BASES[key]


class RoadSceneNegatives(Dataset):
    """Training negatives for the benchmark (the ADE20K role), generated on the fly and deterministic.

    Every item is a tuple ``(image, segments)``: (3, h, w) float32 in [0, 1] and the (h, w) int64 object segment
    map of :func:`generate_negative`, ready for :func:`densehybrid.negatives.paste_negatives` (``negatives``,
    ``negative_segments``). The photographs are :data:`NEGATIVE_SOURCES`, disjoint from the anomaly sources.

    Args:
        seed: the benchmark seed.
        size: (h, w) of every negative.
        length: number of distinct negatives.
        cache: keep generated negatives in memory (``length * h * w * 16`` bytes): drawing a negative again
            would cost a fair share of a CPU training step.
    """

    def __init__(self, seed: int = 0, size: tuple[int, int] = (64, 64), length: int = 1000, cache: bool = True) -> None:
        self.seed = _check_seed(seed)
        self.size = _check_size(size, "size", 16)
        self.length = _check_index(length, "length")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None  # index -> arrays

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"Expected `index` in [0, {self.length}), but got {index}.")
        index %= self.length
        if self._cache is not None and index in self._cache:
            image, segments = self._cache[index]
        else:
            image, segments = generate_negative(self.seed, index, self.size)
            if self._cache is not None:
                self._cache[index] = (image, segments.astype(np.int32))
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(segments.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Visualisation
# ----------------------------------------------------------------------------------------------------------------


def colorize_roadscene(target: np.ndarray | torch.Tensor) -> np.ndarray:
    """Colour a label map with :data:`ROADSCENE_PALETTE` (ignore and unknown ids are black).

    Args:
        target: (..., H, W) integer ids.

    Returns:
        (..., H, W, 3) uint8 RGB.
    """
    ids = target.cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"Expected `target` to hold integer ids, but got dtype {ids.dtype}.")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(ROADSCENE_PALETTE)] = ROADSCENE_PALETTE
    inside = (ids >= 0) & (ids < 256)
    return np.where(inside[..., None], lut[np.clip(ids, 0, 255)], 0).astype(np.uint8)


def save_example_grid(
    path: str | os.PathLike[str],
    seed: int = 0,
    rows: int = 4,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    split: str = "test",
) -> Path:
    """Write a PNG of example scenes: image, colour-coded labels and anomaly families per row, plus negatives.

    Families are drawn white (real) and magenta (procedural) on black.

    Args:
        path: output ``.png`` file.
        seed: benchmark seed.
        rows: number of scenes (the first ``rows`` of ``split``).
        image_size: (H, W) of the scenes.
        split: the split the scenes come from.

    Returns:
        The written path.
    """
    rows = _check_index(rows, "rows")
    if rows == 0:
        raise ValueError("Expected `rows` to be at least 1, but got 0.")
    height, width = _check_size(image_size, "image_size", _MIN_SIDE)
    family_colours = np.array([(0, 0, 0), (255, 255, 255), (255, 0, 255)], dtype=np.uint8)
    lines = []
    for i in range(rows):
        scene = generate_scene(seed, split, i, (height, width))
        lines.append(np.concatenate([scene.image, colorize_roadscene(scene.target), family_colours[scene.family]], 1))
    gap = np.full((4, width * 3, 3), 255, dtype=np.uint8)
    negatives = []
    per_row = 6
    side = (width * 3) // per_row
    for j in range(per_row):
        image, segments = generate_negative(seed, j, (side, side))
        negatives.append(np.rint(image * 255).astype(np.uint8))
    strip = np.concatenate(negatives, 1)
    strip = np.pad(strip, ((0, 0), (0, width * 3 - strip.shape[1]), (0, 0)), constant_values=255)
    grid = np.concatenate([x for line in lines for x in (line, gap)] + [strip], 0)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return out

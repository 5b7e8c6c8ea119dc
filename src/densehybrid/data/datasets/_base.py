"""The common shape of every benchmark loader: discover frames in the official tree, then read and encode them.

A loader subclasses :class:`BenchmarkDataset` and provides two things: :meth:`~BenchmarkDataset.discover`, which
walks the tree on disk and pairs images with label files (reporting unpaired files as :class:`PairingIssue`), and a
``label_table`` that turns the raw ids of its label files into the library's encoding.
Reading, size checks, the sample dict and the optional transform are shared here, and ``densehybrid doctor`` reuses
the same discovery and readers, so the doctor and the loaders can never disagree about a tree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from densehybrid.data.datasets._io import (
    DatasetFileError,
    apply_table,
    check_same_size,
    exif_orientation,
    image_size,
    orient_label,
    read_image,
    read_label,
)
from densehybrid.errors import DatasetError
from densehybrid.labels import IGNORE_INDEX

TARGET_KINDS = ("semantic", "anomaly")
_LISTED = 5
_LISTED_IDS = 10


@dataclass(frozen=True)
class Frame:
    """One frame of a benchmark as found on disk.

    Attributes:
        name: frame id, unique within the dataset; it names the SMIYC output file.
        image: image file (for Fishyscapes Static overlays: the Cityscapes base image).
        label: label file, or None where the split has no public labels.
        smiyc_dataset: the SMIYC toolkit dataset this frame is stored under, if any (e.g. ``"AnomalyTrack-all"``).
        extra: loader-specific paths (e.g. the overlay of a Fishyscapes Static frame).
    """

    name: str
    image: Path
    label: Path | None
    smiyc_dataset: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairingIssue:
    """A file that has no partner: an image without its label, or a label without its image.

    Attributes:
        path: the file that was found.
        problem: what is missing.
        fix: how to repair the tree.
    """

    path: Path
    problem: str
    fix: str


@dataclass
class Discovery:
    """What :meth:`BenchmarkDataset.discover` found: the usable frames and the unpaired files."""

    frames: list[Frame] = field(default_factory=list)
    issues: list[PairingIssue] = field(default_factory=list)


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Raise :class:`DatasetFileError` unless ``path`` is a directory."""
    if not path.is_dir():
        raise DatasetFileError(path, f"Expected {what} {str(path)!r} to be a directory, but it is missing.", fix)
    return path


def first_existing(stem_path: Path, suffixes: Sequence[str]) -> Path | None:
    """``stem_path`` + the first suffix for which a file exists, or None."""
    for suffix in suffixes:
        candidate = stem_path.with_name(stem_path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def files_with_suffix(directory: Path, suffix: str, recursive: bool = True) -> list[Path]:
    """Files under ``directory`` whose name ends with ``suffix``, sorted (so frame order is reproducible)."""
    pattern = f"*{suffix}"
    found = directory.rglob(pattern) if recursive else directory.glob(pattern)
    return sorted(p for p in found if p.is_file())


def _id_ranges(values) -> str:
    """Sorted ids as compact ranges: ``[0, 1, 2, 5, 255] -> "0..2, 5, 255"``."""
    ids = sorted({int(v) for v in values})
    parts, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


class BenchmarkDataset(Dataset, ABC):
    """Base class of the benchmark loaders.

    Every item is a dict:

    * ``image``: (3, H, W) float32 in [0, 1];
    * ``target``: (H, W) int64 in the library's encoding (see :attr:`target_kind`);
    * ``name``: the frame id (str);
    * ``path``: the image file (str).

    Class attributes:
        target_kind: ``"semantic"`` (ids ``0..K-1``, anomaly id K where the set labels anomalies, ignore 255) or
            ``"anomaly"`` (0 inlier, 1 anomaly, 255 ignore).
        num_classes: K for semantic sets, None for anomaly sets.
        class_names: the K class names of a semantic set.
        splits: the accepted ``split`` values; ``default_split`` is used when ``split`` is None.
        raw_label_values: the ids a label file of the official encoding may contain. Every label file read is
            checked against them (:meth:`check_label_ids`); ``densehybrid doctor`` checks a sample up front.
        void_unknown_ids: instance switch of that check: False (default) raises on ids outside the encoding, True
            makes them void knowingly (``--void-unknown-ids``).
        label_table: raw id -> library id lookup (:func:`~densehybrid.data.datasets._io.lookup_table`).
        expected_tree: the expected tree, shown in error messages and the docs.
        download: where to get the data.

    Args:
        root: the dataset root as described by :attr:`expected_tree`.
        split: one of :attr:`splits`.
        transform: callable applied to each sample dict, returning a sample dict.
        strict: raise a :class:`~densehybrid.errors.DatasetError` when some files are unpaired (an image without
            its label or the reverse). ``densehybrid doctor`` passes False to list them all instead; the dataset then
            holds the paired frames (possibly none) and ``issues`` lists the rest.

    Raises:
        ValueError: an unknown ``split`` or option.
        DatasetError: the root or a required directory is missing, no frame is found, or (with ``strict``) some
            files are unpaired. The message names the path and says how to fix the tree.
    """

    target_kind: ClassVar[str]
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    splits: ClassVar[tuple[str, ...]] = ()
    default_split: ClassVar[str] = ""
    raw_label_values: frozenset[int] = frozenset()
    void_unknown_ids: bool = False
    label_table: np.ndarray
    expected_tree: ClassVar[str] = ""
    download: ClassVar[str] = ""
    benchmark_name: ClassVar[str] = ""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Callable[[dict], dict] | None = None,
        strict: bool = True,
    ) -> None:
        split = self.default_split if split is None else split
        if split not in self.splits:
            raise ValueError(f"Expected `split` to be one of {', '.join(self.splits)}, but got {split!r}.")
        if transform is not None and not callable(transform):
            raise TypeError(f"Expected `transform` to be callable or None, but got {type(transform).__name__}.")
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        if not self.root.is_dir():
            found = "is a file" if self.root.exists() else "does not exist"
            raise DatasetFileError(
                self.root,
                f"Expected `root` {str(self.root)!r} to be the {self.benchmark_name or type(self).__name__} "
                f"directory, but it {found}.",
                self.how_to_fix(),
            )
        discovery = self.discover()
        self.frames: list[Frame] = discovery.frames
        self.issues: list[PairingIssue] = discovery.issues
        if strict and self.issues:
            listed = "; ".join(f"{issue.problem}" for issue in self.issues[:_LISTED])
            more = f" (and {len(self.issues) - _LISTED} more)" if len(self.issues) > _LISTED else ""
            split_option = "" if split == self.default_split else f" --split {split}"
            raise DatasetFileError(
                self.root,
                f"Expected every file under {str(self.root)!r} to have its partner, but {len(self.issues)} "
                f"are unpaired: {listed}{more}.",
                f"Run `densehybrid doctor {self.benchmark_name} {self.root}{split_option}` for the full list and fixes.",
            )
        if not self.frames and (strict or not self.issues):
            raise DatasetFileError(
                self.root,
                f"Expected frames of split {split!r} under {str(self.root)!r}, but found none.",
                self.how_to_fix(),
            )

    # -- to implement -------------------------------------------------------------------------------------------
    @abstractmethod
    def discover(self) -> Discovery:
        """Walk the tree under ``self.root`` for ``self.split`` and pair images with labels.

        Raises:
            DatasetError: a required directory is missing (fatal); unpaired files go into ``Discovery.issues``.
        """

    def encode_target(self, raw: np.ndarray, frame: Frame) -> np.ndarray:
        """Map raw label ids (H, W) int64 to the library's encoding (H, W) int64 through :attr:`label_table`.

        Ids the table does not cover become void (255). A loader whose encoding is not a per-id lookup overrides this.
        """
        del frame
        return apply_table(raw, self.label_table)

    # -- shared -------------------------------------------------------------------------------------------------
    def how_to_fix(self) -> str:
        """The remedy shown when the tree is missing or empty: the expected layout and where to download it."""
        parts = []
        if self.expected_tree:
            parts.append(f"Expected tree under ROOT:\n{self.expected_tree}")
        if self.download:
            parts.append(f"Download: {self.download}")
        return "\n".join(parts)

    def load_image(self, frame: Frame) -> torch.Tensor:
        """The (3, H, W) float32 image of ``frame`` in [0, 1]."""
        return read_image(frame.image)

    def load_raw_label(self, frame: Frame) -> np.ndarray | None:
        """The (H, W) int64 raw ids of ``frame``'s label file, or None when the frame has no label."""
        return None if frame.label is None else read_label(frame.label)

    def unexpected_values(self, raw: np.ndarray) -> list[int]:
        """Raw ids in ``raw`` that the official encoding does not define (sorted)."""
        values = np.unique(raw)
        return [int(v) for v in values if int(v) not in self.raw_label_values]

    def check_label_ids(self, raw: np.ndarray, path: Path) -> None:
        """Refuse a label file holding ids outside :attr:`raw_label_values`, unless :attr:`void_unknown_ids`.

        Silently voiding them would drop the pixels from every metric: a tree in another encoding would give a
        number for the wrong pixels. The check is one table lookup per pixel.

        Raises:
            DatasetFileError: naming the file, the offending ids, the allowed ones and the remedy.
        """
        if self.void_unknown_ids or not self.raw_label_values:
            return
        known = self._known_ids()
        low, high = int(raw.min(initial=0)), int(raw.max(initial=0))
        if low >= 0 and high < known.size and bool(known[raw].all()):
            return
        unexpected = self.unexpected_values(raw)
        if not unexpected:
            return
        shown = ", ".join(str(v) for v in unexpected[:_LISTED_IDS])
        more = f" (and {len(unexpected) - _LISTED_IDS} more)" if len(unexpected) > _LISTED_IDS else ""
        hint = self.label_hint(unexpected, raw)
        raise DatasetFileError(
            path,
            f"Expected label ids of the {self.benchmark_name or type(self).__name__} encoding in {str(path)!r}, but "
            f"it holds {shown}{more}, which the encoding does not define (it defines {_id_ranges(self.raw_label_values)}).",
            (hint + " " if hint else "")
            + "Use the label files of the official archive, or pass --void-unknown-ids to treat these ids as void "
            "(their pixels are then left out of every metric).",
        )

    def _known_ids(self) -> np.ndarray:
        cached = getattr(self, "_known_id_table", None)
        if cached is None:
            cached = np.zeros(max(self.raw_label_values) + 1, dtype=bool)
            cached[sorted(self.raw_label_values)] = True
            self._known_id_table = cached
        return cached

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        """A dataset-specific guess at why a label file holds ``unexpected`` ids (empty when there is none)."""
        del unexpected, raw
        return ""

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        if not -len(self.frames) <= index < len(self.frames):
            raise IndexError(f"Expected `index` in [0, {len(self.frames)}), but got {index}.")
        frame = self.frames[index]
        image = self.load_image(frame)
        size = tuple(image.shape[-2:])
        target = self.load_target(frame, size)
        sample = {"image": image, "target": torch.from_numpy(target), "name": frame.name, "path": str(frame.image)}
        sample.update(self.extra_maps(frame, size))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def extra_maps(self, frame: Frame, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Further per-pixel maps of a frame added to its sample (e.g. Cityscapes instance ids); none by default."""
        return {}

    def load_target(self, frame: Frame, image_hw: tuple[int, int]) -> np.ndarray:
        """The (H, W) int64 target of ``frame`` in the library's encoding (void when it has no label).

        The label map is turned by its image's EXIF orientation like the image (:func:`orient_label`), then its size
        and ids are checked.

        Raises:
            DatasetFileError: the label is unreadable, of another size than the image, or holds unknown ids.
        """
        raw = self.load_raw_label(frame)
        if raw is None:
            return np.full(image_hw, IGNORE_INDEX, dtype=np.int64)
        raw = orient_label(raw, exif_orientation(frame.image))
        check_same_size(frame.image, image_hw, frame.label, raw.shape)
        self.check_label_ids(raw, frame.label)
        return self.encode_target(raw, frame)

    def check_frame(self, index: int) -> np.ndarray:
        """Check frame ``index``'s files as :meth:`__getitem__` reads them, without decoding the image's pixels: the
        image's structure and size, and the whole label map (size, ids, encoding); returns the (H, W) target.

        Raises:
            DatasetFileError: naming the damaged or mismatched file.
        """
        frame = self.frames[index]
        return self.load_target(frame, image_size(frame.image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, frames={len(self.frames)})"


def pair_by_suffix(
    image_dir: Path,
    image_suffixes: str | Sequence[str],
    label_dir: Path,
    label_suffix: str,
    label_fix: str,
    smiyc_dataset: str | None = None,
) -> Discovery:
    """Pair ``{id}{image_suffix}`` files with ``{id}{label_suffix}`` files at the same relative folder.

    Used by the Cityscapes-style trees (Cityscapes, LostAndFound): images and labels live in parallel folder
    hierarchies and share the frame id prefix.

    Args:
        image_dir: root of the image hierarchy.
        image_suffixes: the image file suffix, or several accepted ones (e.g. LostAndFound in png, webp or jpg).
        label_dir: root of the label hierarchy.
        label_suffix: the label file suffix.
        label_fix: remedy shown for an image without its label.
        smiyc_dataset: recorded on every frame (see :class:`Frame`).

    Returns:
        the paired frames sorted by path, and one issue per unpaired image or label.
    """
    suffixes = (image_suffixes,) if isinstance(image_suffixes, str) else tuple(image_suffixes)
    discovery = Discovery()
    images = sorted((image, suffix) for suffix in suffixes for image in files_with_suffix(image_dir, suffix))
    wanted = set()
    for image, suffix in images:
        frame_id = image.name[: -len(suffix)]
        label = label_dir / image.parent.relative_to(image_dir) / f"{frame_id}{label_suffix}"
        wanted.add(label)
        if label.is_file():
            discovery.frames.append(Frame(frame_id, image, label, smiyc_dataset))
        else:
            discovery.issues.append(
                PairingIssue(image, f"image {str(image)!r} has no label file {str(label)!r}", label_fix)
            )
    for label in files_with_suffix(label_dir, label_suffix):
        if label not in wanted:
            discovery.issues.append(
                PairingIssue(
                    label,
                    f"label {str(label)!r} has no image in {str(image_dir)!r}",
                    "Extract the images of the same split next to the labels, or delete the stray label.",
                )
            )
    return discovery


def pair_by_stem(image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str, fix: str) -> Discovery:
    """Pair ``image_dir/{stem}{image_suffix}`` with ``label_dir/{stem}{label_suffix}`` in two flat folders.

    Used by the trees with one folder of images and one of annotations (ADE20K, COCO-Stuff).
    """
    discovery = Discovery()
    images = files_with_suffix(image_dir, image_suffix, recursive=False)
    stems = set()
    for image in images:
        stem = image.name[: -len(image_suffix)]
        stems.add(stem)
        label = label_dir / f"{stem}{label_suffix}"
        if label.is_file():
            discovery.frames.append(Frame(stem, image, label))
        else:
            discovery.issues.append(PairingIssue(image, f"image {str(image)!r} has no label {str(label)!r}", fix))
    for label in files_with_suffix(label_dir, label_suffix, recursive=False):
        if label.name[: -len(label_suffix)] not in stems:
            discovery.issues.append(
                PairingIssue(label, f"label {str(label)!r} has no image in {str(image_dir)!r}", fix)
            )
    return discovery


def check_dataset_files(dataset: Any, what: str, progress: bool = True, count_id: int | None = None) -> int:
    """Check every file of ``dataset`` before a run starts (labels decoded and checked, images and negatives checked
    for structure and size), so that a damaged file fails with its name before the first step, not an epoch later.

    Args:
        dataset: a :class:`BenchmarkDataset`, :class:`~densehybrid.data.datasets.ImageFolder` or any dataset with a
            ``check_frame(index)`` method (others are not checked).
        what: what the files are, for the progress bar (``"training labels"``).
        progress: show a progress bar on stderr.
        count_id: a target value to count on the way (e.g. the anomaly id K of a validation split).

    Returns:
        the pixels of value ``count_id`` in the checked targets (0 without ``count_id``).

    Raises:
        DatasetFileError: the first damaged or mismatched file in dataset order.
    """
    check = getattr(dataset, "check_frame", None)
    if check is None or len(dataset) == 0:
        return 0
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from densehybrid.engine.resources import usable_cpu_count

    pool = ThreadPoolExecutor(max_workers=min(8, usable_cpu_count()))  # decoding releases the GIL
    try:
        results = pool.map(_checked, [check] * len(dataset), range(len(dataset)), [count_id] * len(dataset))
        counted = 0
        for result in tqdm(results, total=len(dataset), desc=f"checking {what}", disable=not progress, leave=False):
            if isinstance(result, BaseException):
                raise result
            counted += result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on the first error or Ctrl-C, the rest is not checked
    return counted


def _checked(check: Any, index: int, count_id: int | None) -> BaseException | int:
    """``check(index)``'s error, or the pixels of value ``count_id`` in the target it returns."""
    try:
        target = check(index)
    except DatasetError as error:
        return error
    if count_id is None or not isinstance(target, np.ndarray):
        return 0
    return int((target == count_id).sum())

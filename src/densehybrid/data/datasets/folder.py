"""A user's own segmentation data in a plain folder tree (``densehybrid train --recipe generic``).

Layout::

    DIR/classes.txt            one class name per line; label value = line index (0..K-1), 255 = ignore
    DIR/images/NAME.png|jpg    training images
    DIR/labels/NAME.png        training labels, same stem, single channel
    DIR/val/images/...         optional validation split, same layout (labels may also hold K = anomaly)
    DIR/val/labels/...
    DIR/dataset.toml           optional: ``anomaly_id = N``, the label value of anomaly pixels in val (default K)

As the ``folder`` benchmark (``densehybrid evaluate|calibrate|evaluate-open-set|export-smiyc --benchmark folder``),
the ``val`` split is evaluated: known classes ``0..K-1``, 255 ignored, anomaly pixels marked by ``anomaly_id``
(``--option anomaly_id=N`` overrides ``dataset.toml``) and encoded as K, the library's anomaly id.

:class:`ImageFolder` reads negatives for pasting from any folder of images (``DIR/images`` or ``DIR`` itself), with
class masks from ``DIR/labels`` when present.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, Frame, PairingIssue, require_dir
from densehybrid.data.datasets._io import IMAGE_SUFFIXES, DatasetFileError, image_size, read_image, read_label
from densehybrid.labels import IGNORE_INDEX

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The optional settings file of a folder tree and the keys it may hold.
SETTINGS_FILE = "dataset.toml"
SETTINGS_KEYS = ("anomaly_id",)
_TREE = (
    "  classes.txt                  one class name per line (label value = line index, 255 = ignore)\n"
    "  images/{name}.png|jpg        labels/{name}.png\n"
    "  val/images/{name}.png|jpg    val/labels/{name}.png      (validation split, needed for evaluation; label K =\n"
    "                                                           anomaly, or anomaly_id = N in dataset.toml)\n"
    "  (see docs/own-data.md)"
)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt`` (UTF-8, a byte-order mark is dropped; blank lines at the end ignored).

    Raises:
        DatasetFileError: the file is missing, not UTF-8 text, empty, holds blank or repeated names or more than 255
            classes.
    """
    fix = f"Write one class name per line into {str(path)!r}; label value = line index, 255 = ignore."
    if not path.is_file():
        raise DatasetFileError(path, f"Expected the class list {str(path)!r}, but it is missing.", fix)
    try:
        names = path.read_text(encoding="utf-8-sig").rstrip("\n\r ").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetFileError(
            path, f"Expected the class list {str(path)!r} to be UTF-8 text, but byte {exc.start} is not UTF-8.", fix
        ) from None
    names = [name.strip() for name in names]
    if not names or not names[0]:
        raise DatasetFileError(path, f"Expected class names in {str(path)!r}, but it is empty.", fix)
    if any(not name for name in names):
        raise DatasetFileError(
            path,
            f"Expected one non-empty class name per line in {str(path)!r}, but line {names.index('') + 1} is blank.",
            fix,
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetFileError(
            path,
            f"Expected each class name once in {str(path)!r}, but these occur more than once: "
            f"{', '.join(repr(n) for n in repeated)} (the line index is the label value).",
            fix,
        )
    if len(names) >= IGNORE_INDEX:
        raise DatasetFileError(path, f"Expected fewer than 255 classes in {str(path)!r}, but got {len(names)}.", fix)
    return tuple(names)


def read_settings(root: Path) -> dict[str, Any]:
    """The keys of ``root/dataset.toml`` (empty when the file does not exist).

    Raises:
        DatasetFileError: the file does not parse or holds keys other than :data:`SETTINGS_KEYS`.
    """
    path = root / SETTINGS_FILE
    if not path.is_file():
        return {}
    fix = f"Write {SETTINGS_FILE} as TOML with only these keys: {', '.join(SETTINGS_KEYS)} (e.g. `anomaly_id = 254`)."
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problem = f"Expected {str(path)!r} to be valid TOML, but it does not parse ({exc})."
        raise DatasetFileError(path, problem, fix) from exc
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise DatasetFileError(
            path, f"Expected only the keys {', '.join(SETTINGS_KEYS)} in {str(path)!r}, but got {unknown}.", fix
        )
    return settings


def _anomaly_id(value: Any, num_classes: int, source: str) -> int:
    """``value`` as a label value that marks anomalies: an integer in [K, 255) (K = the number of classes)."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not num_classes <= value < IGNORE_INDEX:
        raise ValueError(
            f"Expected `anomaly_id` ({source}) to be an integer in [{num_classes}, 254] (not a class of classes.txt, "
            f"not 255 = ignore), but got {value!r}."
        )
    return value


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FolderDataset(BenchmarkDataset):
    """Images and labels from a plain folder tree (see the module docstring).

    Targets are semantic: classes ``0..K-1`` from ``classes.txt``, void 255, and in the ``val`` split the label
    value ``anomaly_id`` (default K) marks anomalies, encoded as K. Any other label value is an error naming the file
    and the value.

    Args:
        root: the tree's root ``DIR``.
        split: ``"train"`` (``DIR/images``) or ``"val"`` (``DIR/val/images``).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
        anomaly_id: the label value of anomaly pixels in ``val`` (an integer in [K, 254]); default the
            ``anomaly_id`` of ``DIR/dataset.toml``, else K.

    Raises:
        ValueError: a bad ``anomaly_id``.
        DatasetError: a missing or broken tree, ``classes.txt`` or ``dataset.toml``.
    """

    target_kind = "semantic"
    splits = ("train", "val")
    default_split = "train"
    benchmark_name = "folder"
    expected_tree = _TREE
    download = ""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform=None,
        strict: bool = True,
        anomaly_id: int | str | None = None,
    ) -> None:
        root_path = Path(root).expanduser()
        if root_path.is_dir():
            self.class_names = read_class_names(root_path / "classes.txt")
            self.num_classes = len(self.class_names)
            if anomaly_id is None:
                settings = read_settings(root_path)
                source = f"in {str(root_path / SETTINGS_FILE)!r}"
                anomaly_id = settings.get("anomaly_id", self.num_classes)
            else:
                source = "--option anomaly_id"
            self.anomaly_id = _anomaly_id(anomaly_id, self.num_classes, source)
            allowed = set(range(self.num_classes)) | {IGNORE_INDEX}
            if (split or self.default_split) == "val":
                allowed.add(self.anomaly_id)
            self.raw_label_values = frozenset(allowed)
        super().__init__(root, split, transform, strict)

    def discover(self) -> Discovery:
        if self.split == "val" and not (self.root / "val").is_dir():
            raise DatasetFileError(
                self.root / "val",
                f"Expected the validation split {str(self.root / 'val')!r} (val/images and val/labels) to evaluate "
                "or calibrate on, but it is missing.",
                f"Move some labelled images into val/images and val/labels, with anomaly pixels marked by label value "
                f"{self.anomaly_id}, or pass --split train to look at the training images (which have no anomalies)."
                f"\n{self.how_to_fix()}",
            )
        base = self.root if self.split == "train" else self.root / "val"
        fix = self.how_to_fix()
        image_dir = require_dir(base / "images", "the image directory", fix)
        label_dir = require_dir(base / "labels", "the label directory", fix)
        discovery = Discovery()
        stems = set()
        for image in _images(image_dir):
            stems.add(image.stem)
            label = label_dir / f"{image.stem}.png"
            if label.is_file():
                discovery.frames.append(Frame(image.stem, image, label, smiyc_dataset=f"folder-{self.split}"))
            else:
                discovery.issues.append(
                    PairingIssue(
                        image,
                        f"image {str(image)!r} has no label {str(label)!r}",
                        "Add the label PNG with the image's stem, or remove the image.",
                    )
                )
        for label in sorted(label_dir.glob("*.png")):
            if label.stem not in stems:
                discovery.issues.append(
                    PairingIssue(
                        label,
                        f"label {str(label)!r} has no image in {str(image_dir)!r}",
                        "Add the image with the label's stem, or remove the label.",
                    )
                )
        return discovery

    def label_hint(self, unexpected, raw) -> str:
        del unexpected, raw
        anomaly = (
            f" and {self.anomaly_id} for anomaly pixels (val only; another value with anomaly_id = N in "
            f"{SETTINGS_FILE} or --option anomaly_id=N)"
            if self.split == "val"
            else " (anomaly pixels belong in val/labels only)"
        )
        return (
            f"Map the label values to line indices of classes.txt (0..{self.num_classes - 1}), 255 for pixels to "
            f"ignore{anomaly}."
        )

    def check_label_ids(self, raw: np.ndarray, path: Path) -> None:
        """Refuse label values outside classes.txt, 255 and (val) ``anomaly_id``, unless ``void_unknown_ids``.

        Raises:
            DatasetFileError: naming the file, the values found and the ones allowed.
        """
        if self.void_unknown_ids:
            return
        unexpected = self.unexpected_values(raw)
        if unexpected:
            k = self.num_classes
            anomaly = f", {self.anomaly_id} (anomaly)" if self.split == "val" else ""
            raise DatasetFileError(
                path,
                f"Expected the label values of the {k} classes of classes.txt in {str(path)!r}: 0..{k - 1}, 255 "
                f"(ignore){anomaly}, but it holds {', '.join(str(v) for v in unexpected[:10])}.",
                self.label_hint(unexpected, raw) + " Or pass --void-unknown-ids to leave those pixels out.",
            )

    def encode_target(self, raw: np.ndarray, frame: Frame) -> np.ndarray:
        target = raw.astype(np.int64)
        unknown = ~np.isin(target, sorted(self.raw_label_values))
        if unknown.any():  # only with void_unknown_ids: check_label_ids refused them otherwise
            target[unknown] = IGNORE_INDEX
        if self.split == "val" and self.anomaly_id != self.num_classes:
            target[raw == self.anomaly_id] = self.num_classes
        return target


class ImageFolder(Dataset):
    """Negatives for pasting from any folder of images: ``DIR/images`` when it exists, else ``DIR`` itself.

    Class masks come from ``DIR/labels/{stem}.png`` when that folder exists (any non-negative ids); without them
    every pasted region is a rectangle. Items are ``(image (3, H, W) float, segments (H, W) int64)``.

    Raises:
        DatasetFileError: the folder is missing or holds no image.
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        fix = "Point --neg-root at a folder of .png/.jpg images (optionally DIR/images and DIR/labels)."
        if not root.is_dir():
            raise DatasetFileError(root, f"Expected the negative image folder {str(root)!r}, but it is missing.", fix)
        self.image_dir = root / "images" if (root / "images").is_dir() else root
        self.label_dir = root / "labels" if (root / "labels").is_dir() else None
        self.images = _images(self.image_dir)
        if not self.images:
            raise DatasetFileError(
                self.image_dir, f"Expected images (.png, .jpg) in {str(self.image_dir)!r}, but found none.", fix
            )

    def __len__(self) -> int:
        return len(self.images)

    def check_frame(self, index: int) -> None:
        """Check negative ``index``'s image structure (without decoding its pixels) and its class mask, if any.

        Raises:
            DatasetFileError: naming the damaged file.
        """
        path = self.images[index]
        image_size(path)
        label = None if self.label_dir is None else self.label_dir / f"{path.stem}.png"
        if label is not None and label.is_file():
            read_label(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.images[index]
        image = read_image(path)
        label = None if self.label_dir is None else self.label_dir / f"{path.stem}.png"
        if label is not None and label.is_file():
            segments = torch.from_numpy(read_label(label).astype(np.int64))
        else:
            segments = torch.zeros(image.shape[-2:], dtype=torch.int64)
        return image, segments

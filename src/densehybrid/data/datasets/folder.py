"""A user's own segmentation data in a plain folder tree (``densehybrid train --recipe generic``).

Layout::

    DIR/classes.txt            one class name per line; label value = line index (0..K-1), 255 = ignore
    DIR/images/NAME.png|jpg    training images
    DIR/labels/NAME.png        training labels, same stem, single channel
    DIR/val/images/...         optional validation split, same layout (labels may also hold K = anomaly)
    DIR/val/labels/...

:class:`ImageFolder` reads negatives for pasting from any folder of images (``DIR/images`` or ``DIR`` itself), with
class masks from ``DIR/labels`` when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from densehybrid.data.datasets._base import BenchmarkDataset, Discovery, Frame, PairingIssue, require_dir
from densehybrid.data.datasets._io import DatasetFileError, read_image, read_label
from densehybrid.labels import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_TREE = (
    "  classes.txt                  one class name per line (label value = line index, 255 = ignore)\n"
    "  images/{name}.png|jpg        labels/{name}.png\n"
    "  val/images/{name}.png|jpg    val/labels/{name}.png      (optional validation split; label K = anomaly)"
)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt`` (blank lines at the end ignored).

    Raises:
        DatasetFileError: the file is missing, empty, holds blank names in the middle or more than 255 classes.
    """
    fix = f"Write one class name per line into {str(path)!r}; label value = line index, 255 = ignore."
    if not path.is_file():
        raise DatasetFileError(path, f"Expected the class list {str(path)!r}, but it is missing.", fix)
    names = path.read_text(encoding="utf-8").rstrip("\n\r ").splitlines()
    names = [name.strip() for name in names]
    if not names or not names[0]:
        raise DatasetFileError(path, f"Expected class names in {str(path)!r}, but it is empty.", fix)
    if any(not name for name in names):
        raise DatasetFileError(
            path,
            f"Expected one non-empty class name per line in {str(path)!r}, but line {names.index('') + 1} is blank.",
            fix,
        )
    if len(names) >= IGNORE_INDEX:
        raise DatasetFileError(path, f"Expected fewer than 255 classes in {str(path)!r}, but got {len(names)}.", fix)
    return tuple(names)


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FolderDataset(BenchmarkDataset):
    """Images and labels from a plain folder tree (see the module docstring).

    Targets are semantic: classes ``0..K-1`` from ``classes.txt``, void 255, and in the ``val`` split id K marks
    anomalies. Any other label value is an error naming the file and the value.

    Args:
        root: the tree's root ``DIR``.
        split: ``"train"`` (``DIR/images``) or ``"val"`` (``DIR/val/images``).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "semantic"
    splits = ("train", "val")
    default_split = "train"
    benchmark_name = "folder"
    expected_tree = _TREE
    download = "your own data (see docs/training.md)"

    def __init__(self, root: str | Path, split: str | None = None, transform=None, strict: bool = True) -> None:
        root_path = Path(root).expanduser()
        if root_path.is_dir():
            self.class_names = read_class_names(root_path / "classes.txt")
            self.num_classes = len(self.class_names)
            allowed = set(range(self.num_classes)) | {IGNORE_INDEX}
            if (split or self.default_split) == "val":
                allowed.add(self.num_classes)
            self.raw_label_values = frozenset(allowed)
        super().__init__(root, split, transform, strict)

    def discover(self) -> Discovery:
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
                discovery.frames.append(Frame(image.stem, image, label))
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

    def encode_target(self, raw: np.ndarray, frame: Frame) -> np.ndarray:
        unexpected = self.unexpected_values(raw)
        if unexpected:
            k = self.num_classes
            anomaly = f", {k} (anomaly, val only)" if self.split == "val" else ""
            raise DatasetFileError(
                frame.label,
                f"Expected label values in [0, {k}) or 255 (ignore){anomaly} for the {k} classes of classes.txt, but "
                f"{str(frame.label)!r} holds {', '.join(str(v) for v in unexpected[:10])}.",
                "Map the label values to line indices of classes.txt (255 for pixels to ignore).",
            )
        return raw.astype(np.int64)


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.images[index]
        image = read_image(path)
        label = None if self.label_dir is None else self.label_dir / f"{path.stem}.png"
        if label is not None and label.is_file():
            segments = torch.from_numpy(read_label(label).astype(np.int64))
        else:
            segments = torch.zeros(image.shape[-2:], dtype=torch.int64)
        return image, segments

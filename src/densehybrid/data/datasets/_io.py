"""Robust reading of the files benchmark trees are made of: images, label maps and Fishyscapes overlays.

Every reader turns a missing, truncated or mis-encoded file into a :class:`DatasetFileError` that names the file,
says what was expected and what was found, and how to repair it, so that neither a loader nor ``densehybrid doctor``
ever stops on a bare PIL or NumPy traceback.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from densehybrid.errors import DatasetError

#: The package's one set of image file suffixes (datasets, folders of negatives, ``predict``), in the order a loader
#: tries them when a tree allows several.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")

_REDOWNLOAD = "Replace this file with an intact copy (a benchmark's: from its archive)."
_REPLACE = "Replace or remove this file (re-extract it if it came from an archive)."


class DatasetFileError(DatasetError):
    """A file or directory of a dataset tree is missing, unreadable, or encoded differently than expected.

    Attributes:
        path: the offending file or directory.
        problem: what is wrong, in one sentence.
        fix: what the user can do about it.
    """

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}".strip())

    def __reduce__(self):
        # DataLoader workers pickle exceptions back to the main process: rebuild from the same three fields.
        return (type(self), (str(self.path), self.problem, self.fix))


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DatasetFileError(
            path, f"Expected {what} {str(path)!r} to exist, but it is missing.", "Check the dataset tree."
        )
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetFileError(
            path, f"Expected {what} {str(path)!r} to be a readable image, but decoding failed ({err}).", _REDOWNLOAD
        ) from err
    return image


def _integer_depth(values: np.ndarray, mode: str) -> int:
    # 16-bit modes are explicit; a 32-bit "I" image (how Pillow opens some 16-bit PNGs) is read by its largest value.
    if mode.startswith("I;16"):
        return 16
    top = int(values.max(initial=0))
    return 8 if top <= 255 else 16 if top <= 65535 else 32


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to RGB bytes, upright.

    The EXIF orientation is applied. 16-bit and 32-bit integer images are scaled to 8 bits by their bit depth
    (not clipped); float images in [0, 1] are scaled by 255, others clipped to [0, 255]; greyscale, palette, CMYK,
    YCbCr and LAB images are converted; the alpha channel of RGBA/LA/PA images is dropped.

    Returns:
        (H, W, 3) uint8 array.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        depth = _integer_depth(values, mode)
        grey = np.clip(np.rint(values / (2**depth - 1) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode != "RGB":
        image = image.convert("RGBA" if "A" in mode or mode == "P" else "RGB").convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB bytes, whatever its PIL mode (see :func:`image_to_rgb`).

    Greyscale, palette and RGBA files (StreetHazards stores RGBA PNGs) are converted to RGB; the alpha channel is
    dropped; 16-bit files are scaled to 8 bits, not clipped; the EXIF orientation is applied.

    Args:
        path: image file (PNG, JPEG, WebP, ...).

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        DatasetFileError: the file is missing or cannot be decoded.
    """
    path = Path(path)
    return image_to_rgb(_open(path, "image"))


#: EXIF orientation tag -> the PIL transpose that shows the stored pixels upright (what ``ImageOps.exif_transpose``
#: applies to an image).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1: upright or no tag), read from its header only."""
    try:
        with Image.open(path) as image:
            value = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1
    return int(value) if isinstance(value, int) and value in _EXIF_TRANSPOSE else 1


def orient_label(raw: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a label map (H, W) stored in its image's pixel grid the way the image's EXIF ``orientation`` turns the
    image, so both stay aligned (:func:`read_rgb` shows images upright).

    The rule: a label map is drawn on its image's stored pixels; the image's orientation applies to both.
    """
    method = _EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return raw
    # the same PIL transpose as the image; int32 holds every label id
    turned = Image.fromarray(np.ascontiguousarray(raw, dtype=np.int32), mode="I").transpose(method)
    return np.asarray(turned).astype(np.int64)


def image_size(path: str | Path) -> tuple[int, int]:
    """The upright (H, W) of an image file from its header (EXIF orientation applied), checking the file's structure
    (:meth:`PIL.Image.Image.verify`) without decoding its pixels.

    Raises:
        DatasetFileError: the file is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(path, f"Expected image {str(path)!r} to exist, but it is missing.", "Check the tree.")
    try:
        with Image.open(path) as image:
            image.verify()  # must come directly after open; the file is opened again for its size
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetFileError(
            path, f"Expected image {str(path)!r} to be a readable image, but it is damaged ({err}).", _REPLACE
        ) from err
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1] (see :func:`read_rgb`)."""
    return rgb_to_tensor(read_rgb(path))


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label map with its raw ids.

    Palette PNGs give their palette indices (the ids), not colours; 16-bit and 32-bit integer PNGs keep their
    values.

    Args:
        path: label file.

    Returns:
        (H, W) int64 array of raw ids.

    Raises:
        DatasetFileError: the file is missing, cannot be decoded, or is a colour image (for instance a
            ``*_color.png`` visualisation passed instead of the id image).
    """
    path = Path(path)
    image = _open(path, "label map")
    if image.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(image).astype(np.int64)
    raise DatasetFileError(
        path,
        f"Expected label map {str(path)!r} to be a single-channel id image (PIL mode L, P or I), "
        f"but got mode {image.mode}.",
        "A colour file is a visualisation, not the label ids: use the id image of the benchmark's archive "
        "(e.g. *_labelIds.png, *_labels_semantic.png, not *_color.png).",
    )


def read_overlay(path: str | Path, key: str = "rgb") -> np.ndarray:
    """Read a Fishyscapes Static overlay: the additive RGB difference stored under ``key`` in an ``.npz`` file.

    Returns:
        (H, W, 3) int32 array (signed: the overlay may darken pixels).

    Raises:
        DatasetFileError: the file is missing, is not a readable ``.npz``, lacks ``key`` or has the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(path, f"Expected overlay {str(path)!r} to exist, but it is missing.")
    try:
        with np.load(path) as archive:
            if key not in archive.files:
                raise DatasetFileError(
                    path,
                    f"Expected overlay {str(path)!r} to hold the array {key!r}, but it holds {archive.files}.",
                    _REDOWNLOAD,
                )
            overlay = np.asarray(archive[key])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DatasetFileError(
            path,
            f"Expected overlay {str(path)!r} to be a readable .npz file, but {describe_npz_error(err)}.",
            _REDOWNLOAD,
        ) from err
    if overlay.ndim != 3 or overlay.shape[2] != 3:
        raise DatasetFileError(
            path,
            f"Expected overlay {str(path)!r} to have shape (H, W, 3), but got {overlay.shape}.",
            _REDOWNLOAD,
        )
    return overlay.astype(np.int32)


def describe_npz_error(err: BaseException) -> str:
    """What a failed ``np.load`` of an ``.npz`` file means, without NumPy's advice to unpickle unknown data."""
    text = str(err)
    if "pickle" in text.lower() or isinstance(err, zipfile.BadZipFile):
        return "it is not a NumPy .npz archive (damaged, or another kind of file under this name)"
    if isinstance(err, EOFError) or "truncated" in text.lower():
        return "it is truncated"
    return f"reading failed ({text})"


def lookup_table(mapping: dict[int, int], size: int = 256, default: int = 255) -> np.ndarray:
    """A dense remapping table: ``table[raw] = mapping.get(raw, default)`` for raw ids ``0..size-1``."""
    table = np.full(size, default, dtype=np.int64)
    for raw, value in mapping.items():
        table[raw] = value
    return table


def apply_table(raw: np.ndarray, table: np.ndarray, default: int = 255) -> np.ndarray:
    """Remap raw ids through ``table``; ids outside the table (negative or too large) become ``default``.

    Args:
        raw: (H, W) int64 raw ids.
        table: 1-D int64 table from :func:`lookup_table`.
        default: value for ids the table does not cover.

    Returns:
        (H, W) int64 remapped ids.
    """
    inside = (raw >= 0) & (raw < table.size)
    out = np.full(raw.shape, default, dtype=np.int64)
    out[inside] = table[raw[inside]]
    return out


def check_same_size(image_path: Path, image_hw: tuple[int, int], label_path: Path, label_hw: tuple[int, int]) -> None:
    """Raise :class:`DatasetFileError` unless an image and its label map have the same (H, W)."""
    if tuple(image_hw) != tuple(label_hw):
        raise DatasetFileError(
            label_path,
            f"Expected label map {str(label_path)!r} to have the size of its image {str(image_path)!r} "
            f"(H, W) = {tuple(image_hw)}, but got {tuple(label_hw)}.",
            "The image and the label come from different frames or versions: pair them again (a benchmark's: "
            "re-extract both from its archive).",
        )

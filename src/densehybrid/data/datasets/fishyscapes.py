"""Fishyscapes validation sets (Blum et al., IJCV 2021): Lost & Found and Static, with binary anomaly targets.

Both public validation sets label pixels 0 = inlier, 1 = anomaly, 255 = void, the library's binary encoding. Each
exists in two layouts, selected by ``layout`` (``"auto"`` detects it):

* ``"official"``: what the Fishyscapes website distributes. Lost & Found val is 100 label PNGs
  (``fishyscapes_lostandfound.zip``) whose images come from the LostAndFound ``leftImg8bit`` archive; Static val is
  ``.npz`` overlays (``fs_val_v{1,2,3}.zip``) added to Cityscapes val images.
* ``"densehybrid"``: the repacks linked from the DenseHybrid README. FS LAF: ``ood/**/*_ood_segmentation.png``
  next to ``leftImg8bit/**/*_leftImg8bit.png``, with void stored as 2 (the released evaluation drops label 2);
  FS Static: pre-composed ``*_rgb.jpg`` next to ``*_labels.png``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from densehybrid.data.datasets._base import (
    BenchmarkDataset,
    Discovery,
    Frame,
    PairingIssue,
    files_with_suffix,
    first_existing,
    require_dir,
)
from densehybrid.data.datasets._io import (
    IMAGE_SUFFIXES,
    DatasetFileError,
    lookup_table,
    read_overlay,
    read_rgb,
    rgb_to_tensor,
)
from densehybrid.data.datasets.cityscapes import cityscapes_image
from densehybrid.labels import ANOMALY, IGNORE_INDEX, INLIER

LAYOUTS = ("auto", "official", "densehybrid")
_BINARY = {INLIER: INLIER, ANOMALY: ANOMALY, IGNORE_INDEX: IGNORE_INDEX}
_FS_LAF_LABEL = re.compile(r"(\d+)_(.+)_labels\.png")
_LAF_FRAME = re.compile(r"(\d{2}_.+)_(\d{6})_(\d{6})")
_FS_STATIC_PREFIX = re.compile(r"(\d+)_(.+)")


def laf_scene(frame_id: str) -> str | None:
    """The LostAndFound scene folder of a frame id: ``04_Maurener_Weg_8_000000_000030`` -> ``04_Maurener_Weg_8``."""
    match = _LAF_FRAME.fullmatch(frame_id)
    return match.group(1) if match else None


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"Expected `layout` to be one of {', '.join(LAYOUTS)}, but got {layout!r}.")


class FishyscapesLAF(BenchmarkDataset):
    """Fishyscapes Lost & Found validation: 100 LostAndFound frames relabelled with 0/1/255 anomaly masks.

    Args:
        root: for ``layout="official"``, the directory holding ``fishyscapes_lostandfound/`` (and, unless
            ``laf_root`` is given, the LostAndFound ``leftImg8bit/``); for ``"densehybrid"``, the repack's root
            holding ``ood/`` and ``leftImg8bit/``.
        split: ``"val"``.
        layout: ``"auto"``, ``"official"`` or ``"densehybrid"``.
        laf_root: the LostAndFound root holding ``leftImg8bit/{train,test}/`` (official layout only).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.

    Frames are named by their LostAndFound id (``04_Maurener_Weg_8_000000_000030``) and record the SMIYC toolkit
    dataset (``LostAndFound-train`` or ``-test``) their image belongs to, which is where the toolkit's
    ``FishyLAFAnomaly-val`` looks for saved outputs.
    """

    target_kind = "anomaly"
    splits = ("val",)
    default_split = "val"
    raw_label_values = frozenset(_BINARY)
    benchmark_name = "fs-laf"
    expected_tree = (
        "  official:\n"
        "    fishyscapes_lostandfound/{index:04d}_{laf_id}_labels.png        (100 files, 0/1/255)\n"
        "    leftImg8bit/{train,test}/{scene}/{laf_id}_leftImg8bit.png       (LostAndFound images; or laf_root=DIR)\n"
        "  densehybrid (repack from the DenseHybrid README):\n"
        "    ood/**/{id}_ood_segmentation.png                               (0/1, void 2)\n"
        "    leftImg8bit/**/{id}_leftImg8bit.png"
    )
    download = (
        "labels: http://robotics.ethz.ch/~asl-datasets/Fishyscapes/fishyscapes_lostandfound.zip (extract into "
        "ROOT/fishyscapes_lostandfound/); images: http://wwwlehre.dhbw-stuttgart.de/~sgehrig/lostAndFoundDataset/"
        "leftImg8bit.zip (extract into ROOT or laf_root); or the authors' repack linked from "
        "https://github.com/matejgrcic/DenseHybrid"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        layout: str = "auto",
        laf_root: str | Path | None = None,
        transform=None,
        strict: bool = True,
    ) -> None:
        _check_layout(layout)
        self.layout_name = layout
        self.laf_root = None if laf_root is None else Path(laf_root).expanduser()
        super().__init__(root, split, transform, strict)

    def _resolve_layout(self) -> str:
        if self.layout_name != "auto":
            return self.layout_name
        if (self.root / "ood").is_dir():
            return "densehybrid"
        if (self.root / "fishyscapes_lostandfound").is_dir():
            return "official"
        raise DatasetFileError(
            self.root,
            f"Expected {str(self.root)!r} to hold fishyscapes_lostandfound/ (official layout) or ood/ (DenseHybrid "
            "repack), but found neither.",
            self.how_to_fix(),
        )

    def discover(self) -> Discovery:
        self.resolved_layout = self._resolve_layout()
        if self.resolved_layout == "densehybrid":
            self.raw_label_values = frozenset({INLIER, ANOMALY, 2, IGNORE_INDEX})
            self.label_table = lookup_table(
                {INLIER: INLIER, ANOMALY: ANOMALY, 2: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX}
            )
            return self._discover_repack()
        self.label_table = lookup_table(_BINARY)
        return self._discover_official()

    def _discover_official(self) -> Discovery:
        fix = self.how_to_fix()
        label_dir = require_dir(self.root / "fishyscapes_lostandfound", "the Fishyscapes label directory", fix)
        laf_root = self.laf_root or self.root
        image_root = require_dir(
            laf_root / "leftImg8bit",
            "the LostAndFound image directory",
            "Extract the LostAndFound leftImg8bit.zip into ROOT, or pass laf_root=DIR (the folder holding "
            "leftImg8bit/). " + fix,
        )
        discovery = Discovery()
        for label in sorted(label_dir.glob("*.png")):
            match = _FS_LAF_LABEL.fullmatch(label.name)
            scene = laf_scene(match.group(2)) if match else None
            if match is None or scene is None:
                discovery.issues.append(
                    PairingIssue(
                        label,
                        f"file {str(label)!r} is not named like 0000_04_Maurener_Weg_8_000000_000030_labels.png",
                        "Keep the file names of fishyscapes_lostandfound.zip; remove foreign files.",
                    )
                )
                continue
            frame_id = match.group(2)
            image, laf_split = None, None
            for candidate_split in ("train", "test"):
                image = first_existing(image_root / candidate_split / scene / f"{frame_id}_leftImg8bit", IMAGE_SUFFIXES)
                if image is not None:
                    laf_split = candidate_split
                    break
            if image is None:
                discovery.issues.append(
                    PairingIssue(
                        label,
                        f"label {str(label)!r} has no LostAndFound image "
                        f"{str(image_root / '{train,test}' / scene / (frame_id + '_leftImg8bit.png'))!r}",
                        "Extract the full LostAndFound leftImg8bit.zip (train and test) into ROOT or laf_root.",
                    )
                )
                continue
            discovery.frames.append(Frame(frame_id, image, label, f"LostAndFound-{laf_split}"))
        return discovery

    def _discover_repack(self) -> Discovery:
        fix = self.how_to_fix()
        label_dir = require_dir(self.root / "ood", "the label directory", fix)
        image_dir = require_dir(self.root / "leftImg8bit", "the image directory", fix)
        suffix = "_ood_segmentation.png"
        discovery = Discovery()
        for label in files_with_suffix(label_dir, suffix):
            relative = label.parent.relative_to(label_dir)
            frame_id = label.name[: -len(suffix)]
            image = image_dir / relative / f"{frame_id}_leftImg8bit.png"
            if not image.is_file():
                discovery.issues.append(
                    PairingIssue(
                        label,
                        f"label {str(label)!r} has no image {str(image)!r}",
                        "Re-extract the DenseHybrid FS LAF archive.",
                    )
                )
                continue
            laf_split = next((p for p in relative.parts if p in ("train", "test")), None)
            smiyc = None if laf_split is None else f"LostAndFound-{laf_split}"
            discovery.frames.append(Frame(frame_id, image, label, smiyc))
        return discovery

    def label_hint(self, unexpected: Sequence[int], raw: np.ndarray) -> str:
        if self.resolved_layout == "official" and list(unexpected) == [2]:
            return "Void stored as 2 is the DenseHybrid repack's encoding: pass layout=densehybrid."
        return ""


class FishyscapesStatic(BenchmarkDataset):
    """Fishyscapes Static validation: anomalous objects blended into Cityscapes val images, 0/1/255 masks.

    With the official layout the image is composed on the fly as ``clip(cityscapes + overlay, 0, 255)`` from the
    ``{index}_{cityscapes_id}_rgb.npz`` overlay (array ``rgb``), as the Fishyscapes benchmark code does; the
    DenseHybrid repack ships the composed ``*_rgb.jpg`` instead. Frames are named ``{index}_{cityscapes_id}``.

    Args:
        root: for ``layout="official"``, the extracted ``fs_val_v{1,2,3}.zip`` (overlays and labels directly in
            it); for ``"densehybrid"``, the repack's root (searched recursively).
        split: ``"val"``.
        layout: ``"auto"``, ``"official"`` or ``"densehybrid"``.
        cityscapes_root: the Cityscapes root holding ``leftImg8bit/val/`` (official layout; default ``root``).
        transform, strict: see :class:`~densehybrid.data.datasets.BenchmarkDataset`.
    """

    target_kind = "anomaly"
    splits = ("val",)
    default_split = "val"
    raw_label_values = frozenset(_BINARY)
    label_table = lookup_table(_BINARY)
    benchmark_name = "fs-static"
    expected_tree = (
        "  official (fs_val_v3.zip; v1 and v2 alike):\n"
        "    {index:04d}_{city}_{seq}_{frame}_rgb.npz      (overlay, array 'rgb')\n"
        "    {index:04d}_{city}_{seq}_{frame}_labels.png   (0/1/255)\n"
        "    + Cityscapes leftImg8bit/val/{city}/... in ROOT or cityscapes_root=DIR\n"
        "  densehybrid (repack from the DenseHybrid README):\n"
        "    **/{id}_rgb.jpg and **/{id}_labels.png"
    )
    download = (
        "http://robotics.ethz.ch/~asl-datasets/Fishyscapes/fs_val_v3.zip (extract into ROOT) plus the Cityscapes "
        "leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/; or the authors' repack "
        "linked from https://github.com/matejgrcic/DenseHybrid"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        layout: str = "auto",
        cityscapes_root: str | Path | None = None,
        transform=None,
        strict: bool = True,
    ) -> None:
        _check_layout(layout)
        self.layout_name = layout
        self.cityscapes_root = None if cityscapes_root is None else Path(cityscapes_root).expanduser()
        super().__init__(root, split, transform, strict)

    def _resolve_layout(self) -> str:
        if self.layout_name != "auto":
            return self.layout_name
        if any(self.root.glob("*_rgb.npz")):
            return "official"
        if any(self.root.rglob("*_rgb.jpg")):
            return "densehybrid"
        nested = sorted({p.parent for p in self.root.rglob("*_rgb.npz")})
        hint = (
            f" Overlays were found in {', '.join(repr(str(p)) for p in nested[:3])}: pass that as ROOT."
            if nested
            else ""
        )
        raise DatasetFileError(
            self.root,
            f"Expected {str(self.root)!r} to hold *_rgb.npz overlays (official layout) or *_rgb.jpg images "
            f"(DenseHybrid repack), but found neither.{hint}",
            self.how_to_fix(),
        )

    def discover(self) -> Discovery:
        self.resolved_layout = self._resolve_layout()
        if self.resolved_layout == "densehybrid":
            return self._discover_repack()
        return self._discover_official()

    def _discover_official(self) -> Discovery:
        cityscapes_root = self.cityscapes_root or self.root
        require_dir(
            cityscapes_root / "leftImg8bit" / "val",
            "the Cityscapes val image directory",
            "The overlays are added to Cityscapes val images: pass cityscapes_root=DIR (the Cityscapes root holding "
            "leftImg8bit/val/), or extract leftImg8bit_trainvaltest.zip into ROOT.",
        )
        discovery = Discovery()
        overlays = sorted(self.root.glob("*_rgb.npz"))
        prefixes = set()
        for overlay in overlays:
            prefix = overlay.name[: -len("_rgb.npz")]
            prefixes.add(prefix)
            label = overlay.with_name(f"{prefix}_labels.png")
            match = _FS_STATIC_PREFIX.fullmatch(prefix)
            if match is None:
                discovery.issues.append(
                    PairingIssue(
                        overlay,
                        f"file {str(overlay)!r} is not named like 0000_frankfurt_000000_000294_rgb.npz",
                        "Keep the file names of the Fishyscapes archive.",
                    )
                )
                continue
            image = cityscapes_image(cityscapes_root, "val", match.group(2))
            if not label.is_file():
                discovery.issues.append(
                    PairingIssue(
                        overlay,
                        f"overlay {str(overlay)!r} has no label {str(label)!r}",
                        "Re-extract the Fishyscapes archive.",
                    )
                )
            elif not image.is_file():
                discovery.issues.append(
                    PairingIssue(
                        overlay,
                        f"overlay {str(overlay)!r} has no Cityscapes image {str(image)!r}",
                        "Extract the full Cityscapes leftImg8bit val split into cityscapes_root.",
                    )
                )
            else:
                discovery.frames.append(Frame(prefix, image, label, extra={"overlay": overlay}))
        for label in sorted(self.root.glob("*_labels.png")):
            if label.name[: -len("_labels.png")] not in prefixes:
                discovery.issues.append(
                    PairingIssue(
                        label, f"label {str(label)!r} has no overlay *_rgb.npz", "Re-extract the Fishyscapes archive."
                    )
                )
        return discovery

    def _discover_repack(self) -> Discovery:
        discovery = Discovery()
        images = files_with_suffix(self.root, "_rgb.jpg")
        for image in images:
            prefix = image.name[: -len("_rgb.jpg")]
            label = image.with_name(f"{prefix}_labels.png")
            if label.is_file():
                discovery.frames.append(Frame(prefix, image, label))
            else:
                discovery.issues.append(
                    PairingIssue(
                        image, f"image {str(image)!r} has no label {str(label)!r}", "Re-extract the FS Static archive."
                    )
                )
        image_set = set(images)
        for label in files_with_suffix(self.root, "_labels.png"):
            if label.with_name(label.name[: -len("_labels.png")] + "_rgb.jpg") not in image_set:
                discovery.issues.append(
                    PairingIssue(
                        label, f"label {str(label)!r} has no image *_rgb.jpg", "Re-extract the FS Static archive."
                    )
                )
        return discovery

    def load_image(self, frame: Frame) -> torch.Tensor:
        overlay_path = frame.extra.get("overlay")
        if overlay_path is None:
            return super().load_image(frame)
        base = read_rgb(frame.image).astype(np.int32)
        overlay = read_overlay(overlay_path)
        if overlay.shape != base.shape:
            raise DatasetFileError(
                overlay_path,
                f"Expected overlay {str(overlay_path)!r} to have the shape of its Cityscapes image "
                f"{str(frame.image)!r} {base.shape}, but got {overlay.shape}.",
                "Check that cityscapes_root points at the original Cityscapes val images (2048x1024).",
            )
        return rgb_to_tensor(np.clip(base + overlay, 0, 255).astype(np.uint8))

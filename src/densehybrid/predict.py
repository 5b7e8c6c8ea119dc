"""Open-set prediction on one's own images: the :class:`Predictor` and the ``densehybrid predict`` workflow.

A :class:`Predictor` bundles a model, an anomaly score, the open-set threshold and the heatmap's display range.
``Predictor.from_checkpoint(path)`` reads all of them from a checkpoint (``densehybrid calibrate`` stores the
threshold and range under :data:`CALIBRATION_KEY`), and ``predict(image)`` returns a :class:`PredictionResult`:
the (H, W) score map, the open-set label map (known classes ``0..K-1``, unknown = K) and the threshold.

Images larger than ``max_pixels`` run at full resolution in overlapping tiles; each pixel is taken from the tile
in which it lies farthest from a border (the middle of every overlap is the seam), so memory grows with the tile,
not the image. ``input_scale`` resizes the model input instead; the maps are returned at the image's size.

:func:`predict_files` is the library side of ``densehybrid predict``: it expands files, folders and globs, runs
the predictor over them in batches, writes a heatmap (one display range for the whole run), the colour open-set
segmentation, an overlay and optionally the raw maps per image, one ``predictions.jsonl`` line per image and a
``summary.json``. A file that cannot be read is reported in one line, skipped and counted; it never stops the run
unless ``strict``. The output folder follows the output-path policy of :mod:`densehybrid.engine.outputs`
(:func:`check_output_plan`): an earlier run's results are replaced only with ``overwrite``, an output that would
overwrite an input image is refused (that image is skipped and counted), and every file is written atomically.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from densehybrid.engine.evaluate import check_finite_outputs
from densehybrid.engine.outputs import atomic_path, check_output_dir
from densehybrid.engine.runtime import select_device
from densehybrid.errors import CheckpointError, DenseHybridError
from densehybrid.models.output import output_as_float32, output_fields
from densehybrid.scores import SCORES, check_score_inputs, compute_score, default_score, get_score

__all__ = [
    "CALIBRATION_KEY",
    "Calibration",
    "PredictionResult",
    "PredictionSummary",
    "Predictor",
    "check_output_plan",
    "check_prediction_out",
    "default_palette",
    "discover_images",
    "load_checkpoint_model",
    "predict_files",
    "render_heatmap",
    "render_overlay",
    "render_segmentation",
]

#: Checkpoint entry holding the open-set calibration written by ``densehybrid calibrate``.
CALIBRATION_KEY = "open_set"
#: File suffixes picked up when a folder is scanned (explicit files and globs are tried whatever their suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm")
#: Percentiles of the first image's scores used as the display range when no calibration gives one.
FALLBACK_PERCENTILES = (1.0, 99.0)
HEATMAP_COLORMAP = "inferno"
OVERLAY_ALPHA = 0.5
DEFAULT_TILE_OVERLAP = 64
# Keyword arguments recorded with a model that point at weight files used only to initialise training.
# Cityscapes train-id colours: the first colours of the default palette (no cyan, the unknown colour).
_CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Calibration stored in a checkpoint


@dataclass
class Calibration:
    """The open-set calibration a checkpoint carries (written by ``densehybrid calibrate``).

    Attributes:
        score: the registered score the threshold applies to.
        threshold: pixels with ``score > threshold`` are unknown.
        display_range: (low, high) score mapped to the ends of the heatmap's colour scale.
        method: ``"tpr"`` or ``"f1"``.
        target_tpr: the TPR of ``method="tpr"`` (None for ``"f1"``).
        benchmark, split, num_images: the labelled data it was computed on.
        class_names: the K class names of that data (may be empty).
        palette: (K, 3) colours of the known classes (may be empty).
    """

    score: str
    threshold: float
    display_range: tuple[float, float]
    method: str = "tpr"
    target_tpr: float | None = 0.95
    benchmark: str = ""
    split: str = ""
    num_images: int = 0
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, so the checkpoint still loads with ``torch.load(weights_only=True)``."""
        return {
            "score": self.score,
            "threshold": float(self.threshold),
            "display_range": [float(v) for v in self.display_range],
            "method": self.method,
            "target_tpr": None if self.target_tpr is None else float(self.target_tpr),
            "benchmark": self.benchmark,
            "split": self.split,
            "num_images": int(self.num_images),
            "class_names": [str(name) for name in self.class_names],
            "palette": [[int(c) for c in colour] for colour in self.palette],
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], source: str = "the checkpoint") -> Calibration:
        """Rebuild what :meth:`to_dict` gave; raises :class:`CheckpointError` for a malformed entry."""
        try:
            threshold = float(state["threshold"])
            low, high = (float(v) for v in state["display_range"])
            score = str(state["score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"Expected the {CALIBRATION_KEY!r} entry of {source} to hold score, threshold and display_range, but "
                f"it is malformed ({exc!r}). Re-run `densehybrid calibrate`."
            ) from exc
        if not (math.isfinite(threshold) and math.isfinite(low) and math.isfinite(high) and high > low):
            raise CheckpointError(
                f"Expected a finite threshold and display range low < high in {source}, but got threshold "
                f"{threshold} and range ({low}, {high}). Re-run `densehybrid calibrate`."
            )
        return cls(
            score=score,
            threshold=threshold,
            display_range=(low, high),
            method=str(state.get("method", "tpr")),
            target_tpr=state.get("target_tpr"),
            benchmark=str(state.get("benchmark", "")),
            split=str(state.get("split", "")),
            num_images=int(state.get("num_images", 0)),
            class_names=list(state.get("class_names") or []),
            palette=[list(c) for c in state.get("palette") or []],
        )


def load_checkpoint_model(
    path: str | os.PathLike[str],
    model_name: str | None = None,
    num_classes: int | None = None,
    default_num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint needs, load it, and return the checkpoint's metadata, reading the file once.

    The architecture is ``model_name`` or the one the checkpoint records (with its recorded ``model_kwargs`` when
    the names agree; weight files used only to initialise training are dropped). K is ``num_classes``, else the
    checkpoint's, else ``default_num_classes``. The rules are those of ``densehybrid evaluate``.

    Returns:
        ``(model, metadata)``: the model in eval mode on the CPU, and every checkpoint entry besides the state dict
        (``model_name``, :data:`CALIBRATION_KEY`, ...).

    Raises:
        CheckpointError: unreadable file, no state dict, or weights that do not fit.
        ValueError: no architecture or no K can be determined.
    """
    from densehybrid.models.checkpoint import model_from_checkpoint, read_checkpoint_file

    return model_from_checkpoint(read_checkpoint_file(path), path, model_name, num_classes, default_num_classes)


def read_calibration(metadata: Mapping[str, Any], source: str = "the checkpoint") -> Calibration | None:
    """The :class:`Calibration` stored in checkpoint metadata, or None when the checkpoint has none."""
    entry = metadata.get(CALIBRATION_KEY)
    return None if entry is None else Calibration.from_dict(entry, source)


# --------------------------------------------------------------------------------------------------------------------
# Rendering


def default_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 class colours: the Cityscapes colours first, then seeded random colours away from cyan."""
    colours = list(_CITYSCAPES_COLOURS[:num_classes])
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if abs(colour[0] - 0) + abs(colour[1] - 255) + abs(colour[2] - 255) > 120:  # keep clear of the unknown cyan
            colours.append(colour)
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


_COLORMAP_TABLES: dict[str, np.ndarray] = {}


def _colormap_table(name: str) -> np.ndarray:
    if name not in _COLORMAP_TABLES:
        from matplotlib import colormaps

        _COLORMAP_TABLES[name] = (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    return _COLORMAP_TABLES[name]


def render_heatmap(
    scores: np.ndarray, display_range: tuple[float, float], colormap: str = HEATMAP_COLORMAP
) -> np.ndarray:
    """Colour a score map on a fixed scale: ``low`` and below -> the colormap's first colour, ``high`` and above ->
    its last. Using one range for every image of a run makes heatmaps comparable (a per-image stretch would not).

    Args:
        scores: (H, W) float scores.
        display_range: (low, high), low < high.
        colormap: a matplotlib colormap name.

    Returns:
        (H, W, 3) uint8.
    """
    low, high = display_range
    scaled = (np.asarray(scores, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    index = np.clip(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0).astype(np.uint8)
    return _colormap_table(colormap)[index]


def render_segmentation(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Colour an open-set label map: known classes from ``palette`` (K, 3), unknown (id K) in cyan.

    Returns:
        (H, W, 3) uint8.
    """
    from densehybrid.report.figures import UNKNOWN_COLOUR

    palette = np.asarray(palette, dtype=np.uint8)
    table = np.concatenate([palette, UNKNOWN_COLOUR[None]], axis=0)
    return table[np.asarray(labels)]


def render_overlay(rgb: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a colour segmentation over the photo: ``(1 - alpha) * photo + alpha * colours`` (uint8 arithmetic)."""
    weight = int(round(alpha * 256))
    blended = (rgb.astype(np.uint16) * (256 - weight) + colours.astype(np.uint16) * weight) >> 8
    return blended.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# The predictor


@dataclass
class PredictionResult:
    """What :meth:`Predictor.predict` gives for one image.

    Attributes:
        scores: (H, W) float32 anomaly scores, higher = more anomalous.
        labels: (H, W) int64 open-set labels: classes ``0..K-1``, unknown = K (only where ``threshold`` is set).
        closed_set: (H, W) int64 closed-set argmax over the K classes.
        threshold: the threshold applied (``scores > threshold`` is unknown), or None.
        num_classes: K.
    """

    scores: np.ndarray
    labels: np.ndarray
    closed_set: np.ndarray
    threshold: float | None
    num_classes: int

    @property
    def unknown(self) -> np.ndarray:
        """(H, W) bool mask of the pixels labelled unknown."""
        return self.labels == self.num_classes

    @property
    def anomalous_fraction(self) -> float | None:
        """Fraction of pixels labelled unknown (None without a threshold)."""
        return None if self.threshold is None else float(self.unknown.mean())

    def num_components(self) -> int:
        """Number of 8-connected regions of unknown pixels (0 without a threshold)."""
        if self.threshold is None:
            return 0
        from scipy import ndimage

        return int(ndimage.label(self.unknown, structure=np.ones((3, 3), dtype=bool))[1])


def _check_threshold(threshold: object) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"Expected `threshold` to be a finite number or None, but got {threshold!r}.")
    return float(threshold)


def _check_range(display_range: object) -> tuple[float, float] | None:
    if display_range is None:
        return None
    values = tuple(display_range) if isinstance(display_range, (tuple, list)) else ()
    if len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"Expected `display_range` to be two finite numbers (low, high), but got {display_range!r}.")
    if not values[0] < values[1]:
        raise ValueError(f"Expected `display_range` low < high, but got {display_range!r}.")
    return float(values[0]), float(values[1])


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """Overlapping tiles along one axis, each with the part of it that is kept.

    Args:
        length: the image's size along the axis.
        tile: the tile's size (clipped to ``length``).
        overlap: pixels two neighbouring tiles share at least.

    Returns:
        ``(start, keep_start, keep_stop)`` per tile: the tile covers ``[start, start + tile)`` and contributes
        ``[keep_start, keep_stop)``; the kept parts partition ``[0, length)`` with seams in the middle of overlaps.
    """
    tile = min(tile, length)
    if tile == length:
        return [(0, 0, length)]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride)) + [length - tile]
    spans = []
    for i, start in enumerate(starts):
        keep_start = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        keep_stop = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        spans.append((start, keep_start, keep_stop))
    return spans


class Predictor:
    """A model, its anomaly score, the open-set threshold and the heatmap range, for inference on any image.

    Args:
        model: a DenseHybrid model (``forward(images, output_size) -> HybridOutput``, images in [0, 1]).
        score: registered score name (see ``densehybrid scores``).
        threshold: ``scores > threshold`` becomes the unknown class K; None gives closed-set labels only.
        display_range: (low, high) score range of heatmaps (None: chosen by the caller, e.g. per run).
        score_options: keyword options of the score (``statistics`` for ``sml``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        max_pixels: images with more (model-input) pixels run in overlapping tiles of at most this many pixels.
        tile_overlap: pixels shared by neighbouring tiles.
        input_scale: resize factor of the model input; the maps keep the image's size.
        amp: bfloat16 autocast on CUDA.
        class_names: the K class names (for reports); palette: (K, 3) uint8 class colours.

    Example:
        >>> from densehybrid.models import create_model
        >>> predictor = Predictor(create_model("ladder_mobilenetv3", num_classes=3), threshold=0.0, device="cpu")
        >>> result = predictor.predict(np.zeros((64, 96, 3), dtype=np.uint8))
        >>> result.scores.shape, result.labels.max() <= 3
        ((64, 96), True)
    """

    def __init__(
        self,
        model: nn.Module,
        score: str = "densehybrid",
        threshold: float | None = None,
        *,
        display_range: tuple[float, float] | None = None,
        score_options: Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        max_pixels: int | None = None,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        input_scale: float = 1.0,
        amp: bool = False,
        class_names: Sequence[str] = (),
        palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    ) -> None:
        get_score(score)
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)):
            raise ValueError(f"Expected `max_pixels` to be a positive int or None, but got {max_pixels!r}.")
        if max_pixels is not None and max_pixels < 64 * 64:
            raise ValueError(f"Expected `max_pixels` to be at least {64 * 64} (a 64x64 tile), but got {max_pixels}.")
        if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
            raise ValueError(f"Expected `tile_overlap` to be an int >= 0, but got {tile_overlap!r}.")
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not input_scale > 0:
            raise ValueError(f"Expected `input_scale` to be a positive number, but got {input_scale!r}.")
        check_score_inputs(
            [score], output_fields(model), f"model {getattr(model, 'model_name', type(model).__name__)!r}"
        )
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        self.score = score
        self.threshold = _check_threshold(threshold)
        self.display_range = _check_range(display_range)
        self.score_options = dict(score_options or {})
        self.max_pixels = max_pixels
        self.tile_overlap = tile_overlap
        self.input_scale = float(input_scale)
        self.amp = bool(amp) and self.device.type == "cuda"
        k = self.num_classes
        self.class_names = list(class_names)
        palette = default_palette(k) if palette is None or len(palette) == 0 else np.asarray(palette, dtype=np.uint8)
        if palette.shape != (k, 3):
            raise ValueError(f"Expected `palette` to have shape ({k}, 3), but got {palette.shape}.")
        self.palette = palette

    @property
    def num_classes(self) -> int:
        """K, the model's number of known classes."""
        k = getattr(self.model, "num_classes", None)
        if not isinstance(k, int):
            raise ValueError(
                "Expected the model to record `num_classes` (models from create_model do), but it has none."
            )
        return k

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        *,
        model: str | None = None,
        num_classes: int | None = None,
        score: str | None = None,
        threshold: float | None = None,
        **options: Any,
    ) -> Predictor:
        """Load a checkpoint with everything it carries: architecture, K, and the calibration when present.

        Args:
            path: a checkpoint written by ``densehybrid`` (training, the demo, ``calibrate``) or a released file.
            device: where to run.
            model: registered model name, for checkpoints that do not record it.
            num_classes: K, for checkpoints that do not record it.
            score: the anomaly score; default the calibrated one, else the model's own (``densehybrid`` for a
                DenseHybrid model, ``dicnet`` for a DiCNet model; :func:`densehybrid.scores.default_score`).
            threshold: overrides the calibrated threshold.
            **options: further :class:`Predictor` options (``max_pixels``, ``input_scale``, ``display_range``, ...).

        Raises:
            CheckpointError: an unreadable or ill-fitting checkpoint, or a malformed calibration.
            ValueError: a score other than the calibrated one while the calibrated threshold would be used.
        """
        net, metadata = load_checkpoint_model(path, model, num_classes)
        calibration = read_calibration(metadata, f"checkpoint {str(path)!r}")
        if calibration is not None and score is not None and score != calibration.score and threshold is None:
            raise ValueError(
                f"Expected `score` {score!r} to be the calibrated score {calibration.score!r} of checkpoint "
                f"{str(path)!r}: its threshold belongs to that score. Pass a threshold for {score!r} or calibrate it."
            )
        if calibration is not None and calibration.score not in SCORES:
            raise CheckpointError(f"Checkpoint {str(path)!r} is calibrated for an unknown score {calibration.score!r}.")
        chosen = score or (calibration.score if calibration else default_score(output_fields(net)))
        uses_calibration = calibration is not None and chosen == calibration.score
        range_source = "argument" if options.get("display_range") is not None else "checkpoint"
        options.setdefault("display_range", calibration.display_range if uses_calibration else None)
        options.setdefault("class_names", calibration.class_names if calibration else metadata.get("class_names", ()))
        options.setdefault("palette", calibration.palette if calibration else metadata.get("palette"))
        predictor = cls(
            net,
            chosen,
            threshold if threshold is not None else (calibration.threshold if uses_calibration else None),
            device=device,
            **options,
        )
        predictor.calibration = calibration
        predictor.threshold_source = (
            "argument" if threshold is not None else "checkpoint" if uses_calibration else "none"
        )
        predictor.display_range_source = range_source
        return predictor

    #: the checkpoint's calibration (set by :meth:`from_checkpoint`)
    calibration: Calibration | None = None
    #: where ``threshold`` and ``display_range`` came from: ``argument``, ``checkpoint`` (``none``: no threshold)
    threshold_source: str = "argument"
    display_range_source: str = "argument"

    # ---- forward -------------------------------------------------------------------------------------------------

    def _output(self, images: torch.Tensor, output_size: tuple[int, int]) -> Any:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(images, output_size=output_size)
        check_finite_outputs(out)
        return output_as_float32(out)

    def _maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W) scores and closed-set ids at the model input's size, tiled when it exceeds ``max_pixels``."""
        n, _, h, w = images.shape
        if self.max_pixels is None or h * w <= self.max_pixels:
            out = self._output(images, (h, w))
            return compute_score(self.score, out, **self.score_options), out.logits.max(dim=1).indices
        side = max(int(math.isqrt(self.max_pixels)), 64)
        tile_h = min(h, side)
        tile_w = min(w, self.max_pixels // tile_h)
        overlap = min(self.tile_overlap, max(min(tile_h, tile_w) - 1, 0))
        scores = torch.empty((n, h, w), dtype=torch.float32, device=images.device)
        closed = torch.empty((n, h, w), dtype=torch.int64, device=images.device)
        for top, keep_top, keep_bottom in tile_spans(h, tile_h, overlap):
            for left, keep_left, keep_right in tile_spans(w, tile_w, overlap):
                tile = images[:, :, top : top + tile_h, left : left + tile_w]
                out = self._output(tile, tuple(tile.shape[-2:]))
                rows = slice(keep_top - top, keep_bottom - top)
                cols = slice(keep_left - left, keep_right - left)
                tile_scores = compute_score(self.score, out, **self.score_options)
                scores[:, keep_top:keep_bottom, keep_left:keep_right] = tile_scores[:, rows, cols]
                closed[:, keep_top:keep_bottom, keep_left:keep_right] = out.logits.max(dim=1).indices[:, rows, cols]
        return scores, closed

    @torch.no_grad()
    def predict_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, open-set labels and closed-set ids of a batch, on the predictor's device.

        Args:
            images: (N, 3, H, W) float in [0, 1], or uint8 in [0, 255].

        Returns:
            ``(scores, labels, closed_set)``, each (N, H, W): float32, int64 (unknown = K), int64.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Expected `images` to have shape (N, 3, H, W), but got {shape}.")
        images = images.to(self.device, non_blocking=True)
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        h, w = images.shape[-2:]
        if self.input_scale != 1.0:
            images = F.interpolate(
                images, scale_factor=self.input_scale, mode="bilinear", align_corners=False,
                antialias=self.input_scale < 1,
            ).clamp_(0.0, 1.0)  # fmt: skip
        scores, closed = self._maps(images)
        if tuple(scores.shape[-2:]) != (h, w):
            scores = F.interpolate(scores[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            closed = F.interpolate(closed[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        labels = closed.clone()
        if self.threshold is not None:
            # the rule of densehybrid.openset.predict_open_set: strictly above the threshold is unknown
            labels[scores > self.threshold] = self.num_classes
        return scores, labels, closed

    def predict_batch(self, images: torch.Tensor) -> list[PredictionResult]:
        """:meth:`predict_tensor` as one :class:`PredictionResult` per image (NumPy arrays on the CPU)."""
        scores, labels, closed = (t.cpu().numpy() for t in self.predict_tensor(images))
        return [
            PredictionResult(scores[i], labels[i], closed[i], self.threshold, self.num_classes)
            for i in range(scores.shape[0])
        ]

    def predict(self, image: Any) -> PredictionResult:
        """Predict one image.

        Args:
            image: a file path, a PIL image (any mode; EXIF orientation applied), an (H, W, 3) or (H, W) uint8 array
                or float array in [0, 1], or a (3, H, W) float tensor in [0, 1].

        Returns:
            :class:`PredictionResult` with maps at the image's (H, W).
        """
        return self.predict_batch(image_tensor(image)[None])[0]


def image_tensor(image: Any) -> torch.Tensor:
    """(3, H, W) tensor (uint8, or float in [0, 1]) from a path, PIL image, NumPy array or tensor."""
    from densehybrid.data.datasets._io import image_to_rgb, read_rgb

    if isinstance(image, (str, os.PathLike)):
        image = read_rgb(image)
    elif isinstance(image, Image.Image):
        image = image_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"Expected an image array of shape (H, W, 3) or (H, W), but got {image.shape}.")
        image = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(f"Expected a uint8 or float image array, but got dtype {image.dtype}.")
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"Expected an image tensor of shape (3, H, W), but got {tuple(image.shape)}.")
        return image
    raise TypeError(f"Expected an image path, PIL image, NumPy array or tensor, but got {type(image).__name__}.")


# --------------------------------------------------------------------------------------------------------------------
# Files, folders and globs


@dataclass(frozen=True)
class ImageJob:
    """One input file and the name its outputs derive from (its path relative to the input it came from)."""

    path: Path
    relative: Path


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [part for part in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def discover_images(
    inputs: Iterable[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None
) -> tuple[list[ImageJob], list[tuple[str, str]]]:
    """Expand files, folders (recursive, image suffixes only) and globs into image jobs.

    Args:
        inputs: what the user named.
        exclude: a folder whose files are not inputs when it lies inside a scanned folder (the output folder, so a
            re-run does not read its own outputs); when it is the scanned folder or above it, everything is scanned
            and :func:`check_output_plan` refuses outputs that would overwrite inputs.

    Returns:
        ``(jobs, problems)``: jobs in input order, folders and globs sorted; ``problems`` holds
        ``(input, reason)`` for inputs that name nothing readable.
    """
    excluded = Path(exclude) if exclude is not None else None
    jobs: list[ImageJob] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            # outputs written inside a scanned folder are not read back, unless they go into that folder itself
            skip = excluded if excluded is not None and not _inside(path, excluded) else None
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not _inside(p, skip))
            found = [p for p in found if p.is_file() or p.is_symlink()]
            if not found:
                problems.append((text, "folder holds no image files (" + ", ".join(IMAGE_SUFFIXES[:4]) + ", ...)"))
            jobs.extend(ImageJob(p, p.relative_to(path)) for p in found)
        elif glob.has_magic(text):
            base = _glob_base(text)
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            skip = excluded if excluded is not None and not _inside(base, excluded) else None
            found = [p for p in found if not p.is_dir() and not _inside(p, skip)]
            if not found:
                problems.append((text, "pattern matches no file"))
            jobs.extend(ImageJob(p, p.relative_to(base) if _inside(p, base) else Path(p.name)) for p in found)
        elif path.exists() or path.is_symlink():
            jobs.append(ImageJob(path, Path(path.name)))
        else:
            problems.append((text, "no such file or folder"))
    return jobs, problems


OUTPUT_KINDS = ("heatmap", "segmentation", "overlay")
RAW_KINDS = ("scores", "labels")


def output_paths(out_dir: Path, relative: Path, save_raw: bool) -> dict[str, Path]:
    """The files written for one image: ``<name>_heatmap.png``, ``_segmentation.png``, ``_overlay.png`` and, with
    ``save_raw``, ``_scores.npy`` and ``_labels.png`` (under the input's relative folder)."""
    stem = out_dir / relative.parent / relative.stem
    paths = {kind: stem.with_name(f"{stem.name}_{kind}.png") for kind in OUTPUT_KINDS}
    if save_raw:
        paths["scores"] = stem.with_name(f"{stem.name}_scores.npy")
        paths["labels"] = stem.with_name(f"{stem.name}_labels.png")
    return paths


#: Files one run writes at the top of the output folder; their presence marks the results of an earlier run.
RESULT_FILES = ("predictions.jsonl", "summary.json")


def check_output_plan(
    jobs: Sequence[ImageJob],
    out_dir: Path,
    save_raw: bool,
    *,
    overwrite: bool = False,
    read_files: Iterable[str | os.PathLike[str] | None] = (),
) -> dict[int, str]:
    """Check the planned outputs before any work, with the output-path policy of
    :mod:`densehybrid.engine.outputs`: the output folder is a writable folder and holds none of ``read_files``, no
    output of an earlier run (``predictions.jsonl``, ``summary.json``, an image's outputs) is replaced unless
    ``overwrite``, no two images share an output, and no output would overwrite an input image.

    Returns:
        job index -> reason, for the jobs whose outputs would overwrite an input image (they are skipped and counted
        like unreadable files).

    Raises:
        OutputError: ``out_dir`` is a file, cannot be written, holds an input file, or holds an earlier result and
            ``overwrite`` is false.
        ValueError: two inputs would write the same output file.
    """
    out_dir = Path(out_dir)
    inputs = {job.path.resolve(): job.path for job in jobs}
    owners: dict[Path, Path] = {}
    refused: dict[int, str] = {}
    planned: list[str] = list(RESULT_FILES)
    for index, job in enumerate(jobs):
        paths = output_paths(out_dir, job.relative, save_raw).values()
        for path in paths:
            resolved = path.resolve()
            if resolved in inputs:
                refused[index] = f"its output {str(path)!r} would overwrite the input {str(inputs[resolved])!r}"
            if resolved in owners and owners[resolved] != job.path:
                raise ValueError(
                    f"Expected every input to have its own outputs, but {str(owners[resolved])!r} and "
                    f"{str(job.path)!r} would both write {str(path)!r}. Predict them into separate --out folders."
                )
            owners[resolved] = job.path
        if index not in refused:
            planned.extend(str(path.relative_to(out_dir)) for path in paths)
    check_output_dir(out_dir, inputs=read_files, outputs=planned, overwrite=overwrite)
    return refused


def check_prediction_out(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    save_raw: bool = False,
    overwrite: bool = False,
    read_files: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """:func:`check_output_plan` for the images of ``inputs``, before a model is loaded (``densehybrid predict``).

    Raises:
        OutputError, ValueError: as :func:`check_output_plan`.
    """
    out = Path(out_dir).expanduser()
    jobs, _ = discover_images(inputs, exclude=out)
    check_output_plan(jobs, out, save_raw, overwrite=overwrite, read_files=read_files)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 or (H, W) uint8/uint16 array as PNG, atomically (fast compression)."""
    image = Image.fromarray(array)
    _atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=1))


def label_png_array(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The raw label map as stored: uint8 when ids ``0..K`` fit, else uint16."""
    return labels.astype(np.uint8 if num_classes <= 255 else np.uint16)


# --------------------------------------------------------------------------------------------------------------------
# The run


class _ImageFiles(torch.utils.data.Dataset):
    """Reads one job per item in the loader's workers; a failure is returned as a reason, never raised."""

    def __init__(self, jobs: Sequence[ImageJob]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from densehybrid.data.datasets._io import DatasetFileError, read_rgb

        start = time.perf_counter()
        path = self.jobs[index].path
        try:
            if path.is_file() and path.stat().st_size == 0:
                return {"index": index, "rgb": None, "error": "empty file (0 bytes)", "read_time": 0.0}
            rgb = read_rgb(path)
            if rgb.shape[0] == 0 or rgb.shape[1] == 0:
                reason = f"image has no pixels ({rgb.shape[1]}x{rgb.shape[0]})"
                return {"index": index, "rgb": None, "error": reason, "read_time": 0.0}
            return {"index": index, "rgb": rgb, "error": None, "read_time": time.perf_counter() - start}
        except DatasetFileError as exc:
            cause = exc.__cause__
            if cause is None:
                reason = "missing, a broken link or not a file"
            else:  # the decoder's own words, without the path the line already names
                detail = str(cause).replace(repr(str(path)), "").replace(str(path), "").strip()
                reason = f"not a readable image ({detail})"
        except Exception as exc:  # a bad file must never stop the run: report whatever the decoder raised
            reason = f"{type(exc).__name__}: {exc}"
        return {"index": index, "rgb": None, "error": reason, "read_time": time.perf_counter() - start}


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@dataclass
class PredictionSummary:
    """What :func:`predict_files` did.

    Attributes:
        num_images: images predicted.
        failures: ``(input, reason)`` of every input skipped.
        threshold, threshold_source: the threshold used and where it came from (``argument``, ``checkpoint``,
            ``none``).
        display_range, display_range_source: the heatmap range and where it came from (``argument``,
            ``checkpoint``, ``first image``).
        seconds: wall time of the run; images_per_second: ``num_images / seconds``.
        out_dir: where the outputs are.
    """

    num_images: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    threshold: float | None = None
    threshold_source: str = "none"
    display_range: tuple[float, float] | None = None
    display_range_source: str = ""
    score: str = "densehybrid"
    seconds: float = 0.0
    out_dir: str = ""
    stopped: bool = False

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_failed": len(self.failures),
            "failures": [{"input": path, "reason": reason} for path, reason in self.failures],
            "score": self.score,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "display_range": list(self.display_range) if self.display_range else None,
            "display_range_source": self.display_range_source,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second if self.num_images else None,
            "out_dir": self.out_dir,
            "stopped_at_first_failure": self.stopped,
        }

    def lines(self) -> list[str]:
        """The human-readable summary printed at the end of ``densehybrid predict``."""
        low, high = self.display_range if self.display_range else (math.nan, math.nan)
        threshold = (
            f"{self.threshold:.6g} ({self.threshold_source})"
            if self.threshold is not None
            else "none: no pixel is marked unknown (calibrate the checkpoint or pass --threshold)"
        )
        lines = [
            f"predicted {self.num_images} image(s), skipped {len(self.failures)}, in {self.seconds:.1f} s"
            + (f" ({self.images_per_second:.2f} images/s)" if self.num_images else ""),
            f"score: {self.score}; threshold: {threshold}",
            f"heatmap scale: [{low:.6g}, {high:.6g}] ({self.display_range_source}), the same for every image",
            f"outputs: {self.out_dir}",
        ]
        if self.stopped:
            lines.append("stopped at the first failure (--strict)")
        return lines


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    save_raw: bool = False,
    batch_size: int = 1,
    num_workers: int = 0,
    strict: bool = False,
    progress: bool = True,
    report: Callable[[str], None] = print,
    overwrite: bool = False,
    read_files: Iterable[str | os.PathLike[str] | None] = (),
) -> PredictionSummary:
    """Predict every image of ``inputs`` and write the outputs under ``out_dir`` (see the module docstring).

    Args:
        predictor: the predictor (its ``threshold`` and ``display_range`` apply to the whole run).
        inputs: image files, folders (recursive) and glob patterns.
        out_dir: output folder; outputs keep each input's relative path.
        save_raw: also write the float32 score map (``.npy``) and the label map (``.png``, unknown = K).
        batch_size: images per forward pass (images of one size are stacked; others run separately).
        num_workers: DataLoader processes decoding images.
        strict: stop at the first unreadable input.
        progress: show a progress bar.
        report: receives one line per skipped input.
        overwrite: replace the results of an earlier run in ``out_dir``; the outputs that earlier run recorded in
            its ``predictions.jsonl`` and this run does not write again are removed at the end, so the folder holds
            this run's results only. Without it, an earlier result is refused before any work.
        read_files: files the run reads besides the images (checkpoint, statistics); never written.

    Returns:
        :class:`PredictionSummary`; ``summary.json`` and ``predictions.jsonl`` are written as well.

    Raises:
        OutputError: ``out_dir`` is refused by :func:`check_output_plan`.
        DenseHybridError: an output cannot be written.
        ValueError: two inputs would write the same output.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out_dir).expanduser()
    jobs, problems = discover_images(inputs, exclude=out)
    refused = check_output_plan(jobs, out, save_raw, overwrite=overwrite, read_files=read_files)
    earlier = _earlier_outputs(out) if overwrite else set()
    summary = PredictionSummary(
        threshold=predictor.threshold,
        threshold_source=predictor.threshold_source if predictor.threshold is not None else "none",
        display_range=predictor.display_range,
        display_range_source=predictor.display_range_source if predictor.display_range is not None else "",
        score=predictor.score,
        out_dir=str(out),
    )

    def fail(path: str, reason: str) -> bool:
        summary.failures.append((path, reason))
        report(f"skipped {path}: {reason}")
        if strict:
            summary.stopped = True
        return strict

    for path, reason in problems:
        if fail(path, reason):
            break
    records: list[dict[str, Any]] = []
    writes: list[Future] = []
    loader = torch.utils.data.DataLoader(
        _ImageFiles(jobs), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    bar = tqdm(total=len(jobs), desc="predict", unit="image", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=1) as writer:
        for items in [] if summary.stopped else loader:
            good = []
            for item in items:
                job = jobs[item["index"]]
                reason = item["error"] or refused.get(item["index"])
                if reason is not None:
                    if fail(str(job.path), reason):
                        break
                    continue
                good.append(item)
            if summary.stopped:
                break
            # images of one size share a forward pass; the others run on their own
            for size in dict.fromkeys(item["rgb"].shape for item in good):
                group = [item for item in good if item["rgb"].shape == size]
                t0 = time.perf_counter()
                batch = torch.from_numpy(np.stack([item["rgb"] for item in group])).permute(0, 3, 1, 2)
                results = predictor.predict_batch(batch)
                forward = (time.perf_counter() - t0) / len(group)
                if summary.display_range is None:
                    summary.display_range = tuple(
                        float(v) for v in np.percentile(results[0].scores, FALLBACK_PERCENTILES)
                    )
                    if not summary.display_range[1] > summary.display_range[0]:
                        summary.display_range = (summary.display_range[0], summary.display_range[0] + 1.0)
                    summary.display_range_source = (
                        f"percentiles {FALLBACK_PERCENTILES[0]:g}-{FALLBACK_PERCENTILES[1]:g} of the first image"
                    )
                for item, result in zip(group, results):
                    job = jobs[item["index"]]
                    record = {
                        "input": str(job.path),
                        "width": int(result.scores.shape[1]),
                        "height": int(result.scores.shape[0]),
                        "anomalous_fraction": result.anomalous_fraction,
                        "max_score": _json_value(float(np.max(result.scores))),
                        "num_components": result.num_components() if result.threshold is not None else None,
                        "seconds": item["read_time"] + forward,
                        "outputs": [
                            path.relative_to(out).as_posix()
                            for path in output_paths(out, job.relative, save_raw).values()
                        ],
                    }
                    records.append(record)
                    writes.append(
                        writer.submit(
                            _write_outputs, predictor, job, item["rgb"], result, out, save_raw, summary.display_range
                        )
                    )
                    summary.num_images += 1
            bar.update(len(items))
            # surface a write error early instead of at the end of a long run
            while writes and writes[0].done():
                writes.pop(0).result()
        for future in writes:
            future.result()
    bar.close()
    summary.seconds = time.perf_counter() - start
    _remove_outputs(out, earlier - {name for record in records for name in record["outputs"]}, jobs)
    _write_text(out / "predictions.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    _write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2, allow_nan=False) + "\n")
    return summary


def _earlier_outputs(out: Path) -> set[str]:
    """The outputs (relative to ``out``) an earlier run recorded in its ``predictions.jsonl``; unreadable lines and
    paths outside ``out`` are ignored."""
    names: set[str] = set()
    try:
        lines = (out / RESULT_FILES[0]).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return names
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        outputs = record.get("outputs") if isinstance(record, dict) else None
        for name in outputs if isinstance(outputs, list) else []:
            if isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts:
                names.add(Path(name).as_posix())
    return names


def _remove_outputs(out: Path, names: Iterable[str], jobs: Sequence[ImageJob]) -> None:
    """Delete the earlier run's outputs ``names`` (relative to ``out``) that this run did not write again; never an
    input image of this run."""
    inputs = {job.path.resolve() for job in jobs}
    root = out.resolve()
    for name in sorted(names):
        path = out / name
        resolved = path.resolve()
        if resolved in inputs or root not in resolved.parents or not path.is_file():
            continue
        try:
            path.unlink()
        except OSError as exc:
            raise DenseHybridError(
                f"Cannot remove {str(path)!r}, an output of the earlier run being replaced: {exc.strerror or exc}."
            ) from exc


def _write_text(path: Path, text: str) -> None:
    try:
        _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    except OSError as exc:
        raise DenseHybridError(f"Cannot write {str(path)!r}: {exc.strerror or exc}.") from exc


def _write_outputs(
    predictor: Predictor,
    job: ImageJob,
    rgb: np.ndarray,
    result: PredictionResult,
    out: Path,
    save_raw: bool,
    display_range: tuple[float, float],
) -> None:
    paths = output_paths(out, job.relative, save_raw)
    colours = render_segmentation(result.labels, predictor.palette)
    try:
        write_png(paths["heatmap"], render_heatmap(result.scores, display_range))
        write_png(paths["segmentation"], colours)
        write_png(paths["overlay"], render_overlay(rgb, colours))
        if save_raw:
            _atomic_write(paths["scores"], lambda f: np.save(f, result.scores.astype(np.float32)))
            write_png(paths["labels"], label_png_array(result.labels, result.num_classes))
    except OSError as exc:
        raise DenseHybridError(f"Cannot write the outputs of {str(job.path)!r}: {exc.strerror or exc}.") from exc

"""The :class:`Predictor`: tiling, input scaling and NumPy results around :class:`~densehybrid.openset.OpenSetModel`
(or an exported ONNX / TorchScript graph of it), with the open-set threshold and the heatmap's display range.

``Predictor.from_checkpoint(path)`` reads everything from the file: a checkpoint (architecture, K and the calibration
``densehybrid calibrate`` stored) or a file written by ``densehybrid export`` (``.onnx`` runs in ONNX Runtime, a
TorchScript ``.pt`` in TorchScript; score, threshold, classes, palette and display range from its metadata).
``predict(image)`` returns a :class:`PredictionResult`: the (H, W) score map, the open-set label map (known classes
``0..K-1``, unknown = K) and the closed-set map.

Images larger than ``max_pixels`` run at full resolution in overlapping tiles; each pixel is taken from the tile in
which it lies farthest from a border (the middle of every overlap is the seam), so memory grows with the tile, not
the image. ``input_scale`` resizes the model input; the maps are returned at the image's size (scores resized
bilinearly, the label maps by nearest neighbour).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from densehybrid.engine.runtime import select_device
from densehybrid.errors import CheckpointError
from densehybrid.models.output import output_fields
from densehybrid.models.window import SlidingWindow, describe_window
from densehybrid.openset import OpenSetModel, OpenSetOutput, check_threshold
from densehybrid.predict.calibration import Calibration, read_calibration
from densehybrid.predict.rendering import default_palette
from densehybrid.scores import SCORES, default_score, get_score

__all__ = [
    "DEFAULT_TILE_OVERLAP",
    "PredictionResult",
    "Predictor",
    "check_palette",
    "check_pixel_values",
    "image_tensor",
    "tile_spans",
]

DEFAULT_TILE_OVERLAP = 64


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


def _check_range(display_range: object) -> tuple[float, float] | None:
    if display_range is None:
        return None
    values = tuple(display_range) if isinstance(display_range, (tuple, list)) else ()
    if len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"Expected `display_range` to be two finite numbers (low, high), but got {display_range!r}.")
    if not values[0] < values[1]:
        raise ValueError(f"Expected `display_range` low < high, but got {display_range!r}.")
    return float(values[0]), float(values[1])


def check_palette(palette: Any, num_classes: int | None, source: str = "`palette`") -> np.ndarray:
    """The (K, 3) uint8 class colours of ``palette``, whose values must be integers in 0..255 (any K when
    ``num_classes`` is None).

    Raises:
        ValueError: another shape, or a value that is not an integer in 0..255 (named with its row).
    """
    try:
        values = np.asarray(palette, dtype=object)
    except (TypeError, ValueError):  # ragged rows
        values = np.asarray([], dtype=object)
    k = len(values) if num_classes is None and values.ndim == 2 else num_classes
    if values.shape != (k, 3):
        shape = values.shape if values.size else type(palette).__name__
        raise ValueError(f"Expected {source} to be {k or 'K'} RGB colours, shape ({k or 'K'}, 3), but got {shape}.")
    for row, colour in enumerate(values):
        for value in colour:
            integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            if not integral and isinstance(value, (float, np.floating)) and float(value).is_integer():
                integral = True
            if not integral or not 0 <= value <= 255:
                raise ValueError(
                    f"Expected {source} to hold integer colour values in 0..255, but row {row} (class {row}) is "
                    f"{[v.item() if isinstance(v, np.generic) else v for v in colour]}."
                )
    return values.astype(np.int64).astype(np.uint8)


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


def _recorded_palette(metadata: Mapping[str, Any], source: str) -> np.ndarray | None:
    """The palette a checkpoint or exported file records (None when it records none).

    Raises:
        CheckpointError: a malformed palette (e.g. a value of 300), naming the file.
    """
    palette = metadata.get("palette")
    if palette is None or (hasattr(palette, "__len__") and len(palette) == 0):
        return None
    try:
        return check_palette(palette, None, f"the palette of {source}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


class Predictor:
    """Tiling, input scaling and NumPy results around an :class:`~densehybrid.openset.OpenSetModel` (or an exported
    graph of one), with the heatmap range, class names and palette of a run.

    Args:
        model: a DenseHybrid model (``forward(images, output_size) -> HybridOutput``, images in [0, 1]), or an
            :class:`~densehybrid.export.ExportedModel` (its score and threshold are baked in).
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
        window: sliding-window inference of the :class:`~densehybrid.openset.OpenSetModel` (``"auto"``: the model's
            released setting, e.g. the Segmenter's; None: whole image or tile).

    Example:
        >>> from densehybrid.models import create_model
        >>> predictor = Predictor(create_model("ladder_mobilenetv3", num_classes=3), threshold=0.0, device="cpu")
        >>> result = predictor.predict(np.zeros((64, 96, 3), dtype=np.uint8))
        >>> result.scores.shape, result.labels.max() <= 3
        ((64, 96), True)
    """

    def __init__(
        self,
        model: Any,
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
        window: SlidingWindow | str | None = "auto",
    ) -> None:
        from densehybrid.export import ExportedModel

        get_score(score)
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)):
            raise ValueError(f"Expected `max_pixels` to be a positive int or None, but got {max_pixels!r}.")
        if max_pixels is not None and max_pixels < 64 * 64:
            raise ValueError(f"Expected `max_pixels` to be at least {64 * 64} (a 64x64 tile), but got {max_pixels}.")
        if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
            raise ValueError(f"Expected `tile_overlap` to be an int >= 0, but got {tile_overlap!r}.")
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not input_scale > 0:
            raise ValueError(f"Expected `input_scale` to be a positive number, but got {input_scale!r}.")
        threshold = check_threshold(threshold)
        if isinstance(model, ExportedModel):
            model.check_settings(score, threshold, score_options, window)
            self.device = model.place(device)
            self.model: nn.Module | None = None
            self.open_set: Any = model
        else:
            self.device = select_device(device)
            self.model = model.to(self.device).eval()
            self.open_set = OpenSetModel(self.model, score, threshold, score_options, window)
        self.display_range = _check_range(display_range)
        self.max_pixels = max_pixels
        self.tile_overlap = tile_overlap
        self.input_scale = float(input_scale)
        self.amp = bool(amp) and self.device.type == "cuda"
        k = self.num_classes
        self.class_names = list(class_names)
        self.palette = default_palette(k) if palette is None or len(palette) == 0 else check_palette(palette, k)

    @property
    def score(self) -> str:
        """The anomaly score."""
        return self.open_set.score

    @property
    def threshold(self) -> float | None:
        """``scores > threshold`` is unknown (applied by the :class:`~densehybrid.openset.OpenSetModel`)."""
        return self.open_set.threshold

    @property
    def score_options(self) -> dict[str, Any]:
        return self.open_set.score_options

    @score_options.setter
    def score_options(self, options: Mapping[str, Any]) -> None:
        if options and self.model is None:
            raise ValueError("Expected no score options for an exported graph: its score is part of the graph.")
        self.open_set.score_options = dict(options or {})

    @property
    def window(self) -> SlidingWindow | None:
        return self.open_set.window

    @property
    def inference(self) -> str:
        """How the maps are computed, for reports: the runtime and the window."""
        runtime = "PyTorch" if self.model is not None else self.open_set.describe()
        return f"{runtime}, {describe_window(self.window)}"

    @property
    def num_classes(self) -> int:
        """K, the model's number of known classes."""
        return self.open_set.num_classes

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
        """Load a checkpoint, or a file of ``densehybrid export``, with everything it carries: architecture, K, and
        the calibration when present.

        Args:
            path: a checkpoint written by ``densehybrid`` (training, the demo, ``calibrate``) or a released file; or
                an exported ``.onnx`` / TorchScript ``.pt`` file (:meth:`from_exported`).
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
        from densehybrid.export import exported_format
        from densehybrid.models.checkpoint import model_from_checkpoint, read_checkpoint_file

        if exported_format(path) is not None:
            if model is not None or num_classes is not None:
                raise ValueError(
                    f"Expected no `model`/`num_classes` for the exported file {str(path)!r}: it records them itself."
                )
            return cls.from_exported(path, device, score=score, threshold=threshold, **options)
        net, metadata = model_from_checkpoint(read_checkpoint_file(path), path, model, num_classes)
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
        # the checkpoint's classes (the reader falls back to those of the calibration data for older files)
        options.setdefault("class_names", metadata.get("class_names") or ())
        options.setdefault("palette", _recorded_palette(metadata, f"checkpoint {str(path)!r}"))
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

    @classmethod
    def from_exported(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        *,
        score: str | None = None,
        threshold: float | None = None,
        **options: Any,
    ) -> Predictor:
        """Run a file of ``densehybrid export`` (ONNX in ONNX Runtime, TorchScript in TorchScript) with the score,
        threshold, class names, palette and display range its metadata records.

        Raises:
            CheckpointError: an unreadable file or metadata.
            ValueError: a score or threshold other than the ones baked into the graph.
        """
        from densehybrid.export import ExportedModel

        exported = ExportedModel(path)
        meta = exported.metadata
        range_source = "argument" if options.get("display_range") is not None else "exported file"
        if options.get("display_range") is None and meta.get("display_range") is not None:
            options["display_range"] = tuple(meta["display_range"])
        options.setdefault("class_names", meta.get("class_names") or ())
        options.setdefault("palette", _recorded_palette(meta, f"exported file {str(path)!r}"))
        predictor = cls(
            exported,
            score if score is not None else exported.score,
            threshold if threshold is not None else exported.threshold,
            device=device,
            **options,
        )
        predictor.threshold_source = "exported file"
        predictor.display_range_source = range_source
        return predictor

    #: the checkpoint's calibration (set by :meth:`from_checkpoint`)
    calibration: Calibration | None = None
    #: where ``threshold`` and ``display_range`` came from: ``argument``, ``checkpoint``, ``exported file``
    #: (``none``: no threshold)
    threshold_source: str = "argument"
    display_range_source: str = "argument"

    # ---- forward -------------------------------------------------------------------------------------------------

    def _run(self, images: torch.Tensor) -> OpenSetOutput:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.open_set(images)

    def _maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, H, W) scores, open-set and closed-set labels at the model input's size, tiled when it exceeds
        ``max_pixels``."""
        n, _, h, w = images.shape
        if self.max_pixels is None or h * w <= self.max_pixels:
            out = self._run(images)
            return out.scores, out.labels, out.closed_set
        side = max(int(math.isqrt(self.max_pixels)), 64)
        tile_h = min(h, side)
        tile_w = min(w, self.max_pixels // tile_h)
        overlap = min(self.tile_overlap, max(min(tile_h, tile_w) - 1, 0))
        maps = (
            torch.empty((n, h, w), dtype=torch.float32, device=images.device),
            torch.empty((n, h, w), dtype=torch.int64, device=images.device),
            torch.empty((n, h, w), dtype=torch.int64, device=images.device),
        )
        for top, keep_top, keep_bottom in tile_spans(h, tile_h, overlap):
            for left, keep_left, keep_right in tile_spans(w, tile_w, overlap):
                out = self._run(images[:, :, top : top + tile_h, left : left + tile_w])
                rows = slice(keep_top - top, keep_bottom - top)
                cols = slice(keep_left - left, keep_right - left)
                for stitched, part in zip(maps, out[:3]):
                    stitched[:, keep_top:keep_bottom, keep_left:keep_right] = part[:, rows, cols]
        return maps

    #: bytes per model-input pixel that tiling does not bound: the scaled float image and its three maps
    INPUT_BYTES_PER_PIXEL = 3 * 4 + 4 + 8 + 8

    def check_input_size(self, height: int, width: int, count: int = 1) -> None:
        """Refuse ``count`` images of ``height`` x ``width`` that ``input_scale`` leaves without pixels or whose
        resized input and maps need more memory than the machine has.

        Raises:
            ValueError: a side of less than 1 px. ResourceError: more than half the available memory.
        """
        from densehybrid.engine.resources import check_pixels

        if self.input_scale == 1.0:
            return
        scaled_h, scaled_w = math.floor(height * self.input_scale), math.floor(width * self.input_scale)
        if min(scaled_h, scaled_w) < 1:
            raise ValueError(
                f"Expected `input_scale` {self.input_scale:g} to leave at least 1 px per side, but the {width}x{height} "
                f"image would become {scaled_w}x{scaled_h}: use at least {1 / min(height, width):.3g}."
            )
        check_pixels(
            count * scaled_h * scaled_w,
            self.INPUT_BYTES_PER_PIXEL,
            f"the model input of {count} {width}x{height} image(s) at `input_scale` {self.input_scale:g} "
            f"({scaled_w}x{scaled_h} px each)",
            "Use a smaller `input_scale`.",
        )

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
        if images.shape[-1] == 0 or images.shape[-2] == 0:
            raise ValueError(f"Expected `images` to have pixels, but they are {images.shape[-1]}x{images.shape[-2]}.")
        check_pixel_values(images, "`images`")
        self.check_input_size(*images.shape[-2:], count=images.shape[0])
        images = images.to(self.device, non_blocking=True)
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        h, w = images.shape[-2:]
        if self.input_scale != 1.0:
            images = F.interpolate(
                images, scale_factor=self.input_scale, mode="bilinear", align_corners=False,
                antialias=self.input_scale < 1,
            ).clamp_(0.0, 1.0)  # fmt: skip
        scores, labels, closed = self._maps(images)
        if tuple(scores.shape[-2:]) != (h, w):
            scores = F.interpolate(scores[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
            closed = F.interpolate(closed[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
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
            image: a file path, a PIL image (any mode; EXIF orientation applied), an (H, W, 3), (H, W, 4) or (H, W)
                array, or a (3, H, W) tensor: uint8 (0..255), or float with values in [0, 1] (other dtypes, float
                values outside [0, 1] such as 0..255 or normalised images, and NaN are refused).

        Returns:
            :class:`PredictionResult` with maps at the image's (H, W).

        Raises:
            ValueError, TypeError: an image of another kind, shape, dtype or value range (one line naming what was
                expected and what was found).
        """
        return self.predict_batch(image_tensor(image)[None])[0]


def check_pixel_values(images: torch.Tensor, name: str = "`image`") -> None:
    """Refuse pixel values the model would misread: dtypes other than uint8 and float, float values outside [0, 1]
    (0..255 floats, normalised images) and NaN.

    Raises:
        TypeError: another dtype. ValueError: float values outside [0, 1] or NaN.
    """
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise TypeError(
            f"Expected {name} to be uint8 (0..255) or float in [0, 1], but got dtype {str(images.dtype).split('.')[-1]}"
            ": convert it, e.g. to uint8 when it holds 0..255."
        )
    if images.numel() == 0:
        return
    low, high = torch.aminmax(images.detach())
    low, high = float(low), float(high)
    if math.isnan(low) or math.isnan(high) or torch.isnan(images).any():
        raise ValueError(f"Expected {name} to hold float values in [0, 1], but it holds NaN.")
    if low < 0.0 or high > 1.0:
        hint = (
            " (0..255 values: divide by 255 or pass uint8)"
            if high > 1.0 and low >= 0.0
            else " (a normalised image: pass it before normalisation)"
            if low < 0.0
            else ""
        )
        raise ValueError(
            f"Expected {name} to hold float values in [0, 1], but found values in [{low:.4g}, {high:.4g}]{hint}."
        )


def image_tensor(image: Any) -> torch.Tensor:
    """(3, H, W) tensor (uint8, or float in [0, 1]) from a path, PIL image, NumPy array or tensor.

    Raises:
        ValueError, TypeError: another kind, shape, dtype or value range (:func:`check_pixel_values`).
    """
    from densehybrid.data.datasets._io import image_to_rgb, read_rgb

    if isinstance(image, (str, os.PathLike)):
        image = read_rgb(image)
    elif isinstance(image, Image.Image):
        image = image_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None].repeat(3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(
                f"Expected `image` to be an array of shape (H, W, 3), (H, W, 4) or (H, W), but got {image.shape}."
            )
        if image.dtype != np.uint8 and image.dtype.kind != "f":
            raise TypeError(
                f"Expected `image` to be uint8 (0..255) or float in [0, 1], but got dtype {image.dtype}: convert it, "
                "e.g. to uint8 when it holds 0..255."
            )
        image = torch.from_numpy(np.array(image[:, :, :3], copy=True, order="C")).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"Expected `image` to be a tensor of shape (3, H, W), but got {tuple(image.shape)}.")
    else:
        raise TypeError(
            f"Expected `image` to be a path, PIL image, NumPy array or tensor, but got {type(image).__name__}."
        )
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"Expected `image` to have pixels, but it is {image.shape[-1]}x{image.shape[-2]}.")
    check_pixel_values(image)
    return image

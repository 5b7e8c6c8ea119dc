"""Sliding-window inference: a model run over overlapping square windows, its outputs merged where windows overlap.

Every model's ``forward`` returns logits in train and eval mode; a sliding window is an option of inference
(:class:`densehybrid.OpenSetModel`, the evaluation loops and the commands), never part of a model. The procedure
follows the released TPAMI-era COCO20 evaluation of the Segmenter (``evaluate_osr_coco.py``):

1. an image whose shorter side is below ``size`` is resized (bilinearly) so that its shorter side equals ``size``
   (the longer side scaled by the same ratio, truncated to an int), then zero-padded on the bottom/right where a
   side is still shorter than a window;
2. ``size`` × ``size`` windows start at ``0, stride, 2 * stride, ...`` below ``side - size``, plus one aligned with
   the far border;
3. the window logits are summed where windows overlap and divided by the number of windows covering each pixel,
   cropped to the resized image and resized bilinearly to the input size;
4. ``merge="probabilities"`` (released) then applies a softmax over the channels of each output, so every field
   holds probabilities, and the released evaluation computes its anomaly score from these as if they were logits;
   ``merge="logits"`` keeps logits;
5. both outputs are resized to ``output_size`` when that differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from densehybrid.models.hybrid import resolve_output_size

#: Spaces in which overlapping window outputs are merged: averaged logits, softmaxed at the end ("probabilities",
#: the released COCO20 evaluation) or averaged logits kept as logits.
WINDOW_MERGES = ("probabilities", "logits")


@dataclass(frozen=True)
class SlidingWindow:
    """Settings of sliding-window inference (see the module docstring).

    Attributes:
        size: side of the square windows; images whose shorter side is below it are resized up to it.
        stride: step between windows (at most ``size``).
        merge: ``"probabilities"`` or ``"logits"`` (:data:`WINDOW_MERGES`).
    """

    size: int = 512
    stride: int = 320
    merge: str = "probabilities"

    def __post_init__(self) -> None:
        for name in ("size", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected the window `{name}` to be a positive int, but got {value!r}.")
        if self.stride > self.size:
            raise ValueError(f"Expected the window stride to be at most its size ({self.size}), but got {self.stride}.")
        if self.merge not in WINDOW_MERGES:
            raise ValueError(f"Expected the window merge to be one of {WINDOW_MERGES}, but got {self.merge!r}.")

    def describe(self) -> str:
        """One line for command outputs, e.g. ``"512x512 windows, stride 320, merged as probabilities"``."""
        return f"{self.size}x{self.size} windows, stride {self.stride}, merged as {self.merge}"

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "stride": self.stride, "merge": self.merge}


#: The released COCO20 evaluation of the Segmenter: 512x512 windows, stride 320, softmax after merging.
RELEASED_COCO_WINDOW = SlidingWindow(512, 320, "probabilities")


def parse_window(text: str) -> SlidingWindow | None | str:
    """The value of a ``--window`` option: ``"auto"`` (kept as is: the model's own setting), ``"none"``, or
    ``SIZE[:STRIDE[:MERGE]]`` (stride default ``SIZE * 5 // 8``, as 320 of 512; merge default probabilities).

    Raises:
        ValueError: any other text.
    """
    text = str(text).strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    parts = text.split(":")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError(text)
        size = int(parts[0])
        stride = int(parts[1]) if len(parts) > 1 and parts[1] else max(size * 5 // 8, 1)
        merge = parts[2] if len(parts) > 2 else "probabilities"
        return SlidingWindow(size, stride, merge)
    except ValueError as exc:
        raise ValueError(
            f"Expected the window to be auto, none or SIZE[:STRIDE[:MERGE]] (e.g. 512:320:probabilities), but got "
            f"{text!r} ({exc})."
        ) from None


def model_window(model: nn.Module) -> SlidingWindow | None:
    """The sliding window a model was released with (``model.inference_window``; the Segmenter's COCO setting), or
    None for models evaluated in one whole-image pass."""
    window = getattr(model, "inference_window", None)
    return window if isinstance(window, SlidingWindow) else None


def resolve_window(model: nn.Module, window: SlidingWindow | str | None) -> SlidingWindow | None:
    """``"auto"`` -> :func:`model_window`; a :class:`SlidingWindow` or None as given."""
    if isinstance(window, str):
        if window != "auto":
            raise ValueError(f"Expected the window to be 'auto', None or a SlidingWindow, but got {window!r}.")
        return model_window(model)
    if window is not None and not isinstance(window, SlidingWindow):
        raise TypeError(f"Expected the window to be a SlidingWindow or None, but got {type(window).__name__}.")
    return window


def describe_window(window: SlidingWindow | None) -> str:
    """What command outputs state about inference: the window's line, or ``"whole image (no sliding window)"``."""
    return window.describe() if window is not None else "whole image (no sliding window)"


def sliding_window_outputs(
    model: nn.Module,
    images: torch.Tensor,
    window: SlidingWindow,
    output_size: tuple[int, int] | None = None,
) -> NamedTuple:
    """Run ``model`` over sliding windows of ``images`` and merge (see the module docstring).

    Args:
        model: any model whose output fields are dense maps at the input's size (e.g. ``HybridOutput``).
        images: (N, 3, H, W) float in [0, 1].
        window: the settings.
        output_size: (H_out, W_out) of every output; defaults to (H, W).

    Returns:
        the model's output type with every field (N, C, H_out, W_out): logits, or probabilities with
        ``merge="probabilities"``.
    """
    size = resolve_output_size(images, output_size)
    h, w = int(images.shape[-2]), int(images.shape[-1])
    ws, stride = window.size, window.stride
    x = images
    if min(h, w) < ws:
        ratio = max(h, w) / min(h, w)
        long_side = int(ratio * ws)
        resized = (ws, long_side) if h < w else (long_side, ws)
        x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False)
    rh, rw = int(x.shape[-2]), int(x.shape[-1])
    x = F.pad(x, (0, max(ws - rw, 0), 0, max(ws - rh, 0)))
    ph, pw = int(x.shape[-2]), int(x.shape[-1])
    rows = [a for a in range(0, ph, stride) if a < ph - ws] + [ph - ws]
    cols = [a for a in range(0, pw, stride) if a < pw - ws] + [pw - ws]
    sums: list[torch.Tensor] | None = None
    output_type = None
    count = x.new_zeros(1, 1, ph, pw)
    for top in rows:
        for left in cols:
            out = model(x[..., top : top + ws, left : left + ws])
            parts = list(out)
            if sums is None:
                output_type = type(out)
                for name, part in zip(out._fields, parts):
                    if not isinstance(part, torch.Tensor) or part.ndim != 4 or tuple(part.shape[-2:]) != (ws, ws):
                        shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                        raise ValueError(
                            f"Expected every output of a sliding window to be a dense (N, C, {ws}, {ws}) map, but "
                            f"`{name}` of {type(model).__name__} is {shape}: this model cannot run in windows."
                        )
                sums = [part.new_zeros(part.shape[0], part.shape[1], ph, pw) for part in parts]
            for total, part in zip(sums, parts):
                total[..., top : top + ws, left : left + ws] += part
            count[..., top : top + ws, left : left + ws] += 1
    outputs = []
    for total in sums or []:
        merged = (total / count)[..., :rh, :rw]
        if (rh, rw) != (h, w):
            merged = F.interpolate(merged, size=(h, w), mode="bilinear", align_corners=False)
        if window.merge == "probabilities":
            merged = merged.softmax(1)
        if (h, w) != tuple(size):
            merged = F.interpolate(merged, size=size, mode="bilinear", align_corners=False)
        outputs.append(merged)
    return output_type(*outputs)

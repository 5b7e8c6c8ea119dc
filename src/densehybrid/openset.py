"""Open-set prediction: the closed-set argmax, overridden by "unknown" wherever the anomaly score passes a threshold.

``classes = argmax_k s_k(x); classes[score(x) > tau] = K`` (Grcić et al., ECCV 2022, Sec. 3.4; released
``evaluate_osr.py``). The threshold is calibrated on labelled held-out data, either at a target true-positive rate
(0.95 by default, as the released StreetHazards code) or at the best F1 (:func:`calibrate_threshold`).

:class:`OpenSetModel` is the inference object: a model, a score, the threshold and an optional sliding window;
:func:`open_set_labels` is the rule itself, written once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from densehybrid._checks import check_finite, check_ndim
from densehybrid.models.output import check_finite_outputs, output_as_float32, output_fields
from densehybrid.models.window import SlidingWindow, describe_window, resolve_window, sliding_window_outputs
from densehybrid.scores import check_score_inputs, compute_score, get_score, score_info

CALIBRATION_METHODS = ("tpr", "f1")


def open_set_labels(
    closed_set: torch.Tensor, scores: torch.Tensor, threshold: float | None, unknown: int
) -> torch.Tensor:
    """The open-set rule, the only place a threshold is applied: ``score > threshold`` ⇒ unknown.

    Args:
        closed_set: (N, H, W) int64 closed-set ids ``0..K-1``.
        scores: (N, H, W) anomaly scores, higher = more anomalous.
        threshold: pixels with ``scores > threshold`` (strict, as the released code) become ``unknown``; None
            leaves the closed-set ids.
        unknown: the unknown id K.

    Returns:
        (N, H, W) int64 with ids in ``0..K`` (a new tensor; traceable, so exported graphs apply the same rule).
    """
    if threshold is None:
        return closed_set.clone()
    return torch.where(scores > threshold, torch.full_like(closed_set, unknown), closed_set)


def predict_open_set(logits: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Closed-set argmax with anomalous pixels set to the unknown id K (:func:`open_set_labels`).

    Args:
        logits: (N, K, H, W) closed-set logits.
        scores: (N, H, W) anomaly scores, higher = more anomalous.
        threshold: pixels with ``scores > threshold`` (strict, as the released code) become K.

    Returns:
        (N, H, W) int64 with ids in ``0..K``.
    """
    check_ndim("logits", logits, 4, "(N, K, H, W)")
    check_ndim("scores", scores, 3, "(N, H, W)")
    if scores.shape[0] != logits.shape[0] or scores.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"Expected `scores` {tuple(scores.shape)} to match `logits` {tuple(logits.shape)} in N, H and W."
        )
    check_finite("scores", scores)
    closed = logits.max(dim=1).indices  # same ids as argmax, several times faster on CPU
    return open_set_labels(closed, scores, threshold, logits.shape[1])


def check_threshold(threshold: object) -> float | None:
    """``threshold`` as a float, or None; raises ValueError for anything but a finite number or None."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"Expected `threshold` to be a finite number or None, but got {threshold!r}.")
    return float(threshold)


class OpenSetOutput(NamedTuple):
    """What :class:`OpenSetModel` gives for a batch, every map (N, H, W).

    Attributes:
        scores: float32 anomaly scores, higher = more anomalous.
        labels: int64 open-set labels: classes ``0..K-1``, unknown = K where ``scores > threshold`` (no unknown
            without a threshold).
        closed_set: int64 closed-set argmax over the K classes.
        outputs: the model's own output tuple in float32 (merged windows included) when asked for, else None.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    closed_set: torch.Tensor
    outputs: Any = None


class OpenSetModel(nn.Module):
    """A model, an anomaly score, the open-set threshold and the inference window: images -> :class:`OpenSetOutput`.

    The one inference object behind ``predict``, ``export`` (which traces it and checks parity against it),
    ``calibrate``, ``evaluate-open-set`` and ``export-smiyc``; the only place a threshold is applied
    (:func:`open_set_labels`).

    Args:
        model: a DenseHybrid model (``forward(images, output_size) -> HybridOutput`` of logits), or any model whose
            output type the score reads (e.g. DiCNet).
        score: a registered score name (see ``densehybrid scores``).
        threshold: the calibrated threshold; None gives scores and closed-set labels only.
        score_options: keyword options of the score (e.g. ``statistics`` for ``sml``).
        window: a :class:`~densehybrid.models.window.SlidingWindow` to run the model in overlapping windows,
            ``"auto"`` for the model's released one (``model.inference_window``; the Segmenter's COCO setting), or
            None for one whole-image pass.

    Example:
        >>> from densehybrid.models import create_model
        >>> open_set = OpenSetModel(create_model("ladder_mobilenetv3", num_classes=3).eval(), threshold=0.0)
        >>> open_set(torch.rand(1, 3, 64, 64)).labels.shape
        torch.Size([1, 64, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        score: str = "densehybrid",
        threshold: float | None = None,
        score_options: Mapping[str, Any] | None = None,
        window: SlidingWindow | str | None = None,
    ) -> None:
        super().__init__()
        get_score(score)
        name = getattr(model, "model_name", None) or type(model).__name__
        check_score_inputs([score_info(score).name], output_fields(model), f"model {name!r}")
        self.model = model
        self.score = score
        self.threshold = check_threshold(threshold)
        self.score_options = dict(score_options or {})
        self.window = resolve_window(model, window)

    @property
    def num_classes(self) -> int:
        """K, the model's number of known classes (the unknown label)."""
        k = getattr(self.model, "num_classes", None)
        if not isinstance(k, int):
            raise ValueError(
                "Expected the model to record `num_classes` (models from create_model do), but it has none."
            )
        return k

    @property
    def output_type(self) -> type:
        return OpenSetOutput

    def model_outputs(self, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> Any:
        """The model's output tuple in float32 (through the sliding window when one is set), checked for NaN.

        Raises:
            NonFiniteError: NaN or infinite outputs (damaged weights, e.g. from a diverged training run).
        """
        if self.window is not None:
            out = sliding_window_outputs(self.model, images, self.window, output_size)
        else:
            out = self.model(images, output_size=output_size)
        if not torch.jit.is_tracing():
            check_finite_outputs(out)
        return output_as_float32(out)

    def forward(
        self, images: torch.Tensor, output_size: tuple[int, int] | None = None, return_outputs: bool = False
    ) -> OpenSetOutput:
        """Scores, open-set and closed-set labels of a batch.

        Args:
            images: (N, 3, H, W) float in [0, 1].
            output_size: (H_out, W_out) of the maps; defaults to (H, W).
            return_outputs: keep the model's outputs in the result.

        Returns:
            :class:`OpenSetOutput`, maps (N, H_out, W_out).

        Raises:
            NonFiniteError: NaN or infinite model outputs.
        """
        out = self.model_outputs(images, output_size)
        scores = compute_score(self.score, out, **self.score_options).float()
        closed = out.logits.max(dim=1).indices
        labels = open_set_labels(closed, scores, self.threshold, out.logits.shape[1])
        return OpenSetOutput(scores, labels, closed, out if return_outputs else None)

    def extra_repr(self) -> str:
        return f"score={self.score!r}, threshold={self.threshold}, window={describe_window(self.window)!r}"


def calibrate_threshold(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    method: str = "tpr",
    target_tpr: float = 0.95,
    strict: bool = True,
    ignore_index: int = 255,
    drop_intermediate: bool | None = None,
    memory_pixels: int = 1 << 24,
    distributed: bool = False,
) -> float:
    """Choose the open-set threshold on labelled calibration data, exactly, in bounded memory.

    The threshold is the one scikit-learn's ``roc_curve`` gives on the same pixels (scores rounded to float32):
    the distinct scores highest first, with ``drop_intermediate`` its thinned curve. The pixels are kept as 5 bytes
    each, in memory up to ``memory_pixels`` and then in a temporary file; the crossing is found from a coarse
    histogram and resolved exactly by a second pass over the stored pixels near it
    (:class:`densehybrid.metrics._exact.ExactCurve`).

    Args:
        batches: pairs of (scores (N, H, W), binary target (N, H, W) in {0 inlier, 1 anomaly, ignore_index}).
        method: ``"tpr"``: the threshold reaching ``target_tpr`` of the anomaly pixels; ``"f1"``: best pixel F1.
        target_tpr: the true-positive rate for ``method="tpr"`` (0.95 in the released code).
        strict: ``"tpr"`` picks the first threshold with TPR > target (released StreetHazards code) instead of >=.
        ignore_index: target id of void pixels.
        drop_intermediate: skip the collinear points that scikit-learn's ``roc_curve`` drops, as the released code
            that walks it does; default: as ``strict`` (the released COCO20 code uses ``>=`` on ``roc_curve``:
            ``strict=False, drop_intermediate=True``).
        memory_pixels: calibration pixels held in memory before they move to a temporary file.
        distributed: the calibration pixels are spread over the ranks of the default process group (each rank
            passes its own ``batches``): every rank must call this and gets the threshold of all the pixels, exactly
            the single-process one (counts are summed and the pixels near the crossing gathered over the ranks).

    Returns:
        the threshold (one of the scores); apply it as ``scores > threshold``, as the released code does.
    """
    from densehybrid.metrics import _exact
    from densehybrid.metrics._inputs import check_anomaly_inputs
    from densehybrid.metrics._keys import order_keys

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"Expected `method` to be one of {CALIBRATION_METHODS}, but got {method!r}.")
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"Expected `target_tpr` in (0, 1], but got {target_tpr}.")
    store = _exact.PixelStore(memory_pixels)
    try:
        for scores, target in batches:
            check_anomaly_inputs(scores, target, ignore_index, batched=True)
            flat_scores, flat_target = scores.detach().reshape(-1), target.reshape(-1)
            keep = flat_target != ignore_index
            store.add(order_keys(flat_scores[keep]).cpu(), flat_target[keep].cpu())
        curve = _exact.ExactCurve(store.chunks, distributed=distributed)
        if curve.num_pos == 0:
            raise ValueError("Expected anomaly pixels in the calibration data, but found none: cannot set a threshold.")
        if method == "f1":
            threshold, _ = _exact.best_f1(curve.pieces(), curve.num_pos)
        else:
            drop = strict if drop_intermediate is None else drop_intermediate
            start = curve.first_bin_at_tpr(target_tpr, strict)
            threshold, _ = _exact.point_at_tpr(curve.pieces(start), curve.num_pos, target_tpr, strict, drop)
    finally:
        store.close()
    if math.isnan(threshold):
        raise ValueError(f"Expected a point with TPR {'>' if strict else '>='} {target_tpr}, but there is none.")
    return float(threshold)

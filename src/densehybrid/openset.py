"""Open-set prediction: the closed-set argmax, overridden by "unknown" wherever the anomaly score passes a threshold.

``classes = argmax_k s_k(x); classes[score(x) > tau] = K`` (Grcić et al., ECCV 2022, Sec. 3.4; released
``evaluate_osr.py``). The threshold is calibrated on labelled held-out data, either at a target true-positive rate
(0.95 by default, as the released StreetHazards code) or at the best F1 (:func:`calibrate_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from densehybrid._checks import check_finite, check_ndim
from densehybrid.models.output import output_fields
from densehybrid.scores import check_score_inputs, compute_score, get_score, score_info

CALIBRATION_METHODS = ("tpr", "f1")


def predict_open_set(logits: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Closed-set argmax with anomalous pixels set to the unknown id K.

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
    classes = logits.max(dim=1).indices  # same ids as argmax, several times faster on CPU
    classes[scores > threshold] = logits.shape[1]
    return classes


@dataclass
class OpenSetPrediction:
    """Everything one forward pass gives: closed-set ids, anomaly scores and the open-set map (all (N, H, W))."""

    closed_set: torch.Tensor
    scores: torch.Tensor
    open_set: torch.Tensor | None


class OpenSetPredictor:
    """A model, a score and a threshold, bundled for inference.

    Args:
        model: a DenseHybrid model (``forward(images, output_size) -> HybridOutput``).
        score: a registered score name (see ``densehybrid scores``).
        threshold: the calibrated threshold; None gives scores and closed-set ids only.
        score_options: keyword options of the score (e.g. ``statistics`` for ``sml``).

    Example:
        >>> from densehybrid.models import create_model
        >>> predictor = OpenSetPredictor(create_model("ladder_mobilenetv3", num_classes=3).eval(), threshold=0.0)
        >>> predictor(torch.rand(1, 3, 64, 64)).open_set.shape
        torch.Size([1, 64, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        score: str = "densehybrid",
        threshold: float | None = None,
        score_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.score_name = score
        self.score_fn = get_score(score)
        check_score_inputs([score_info(score).name], output_fields(model), f"model {type(model).__name__!r}")
        self.threshold = threshold
        self.score_options = dict(score_options or {})

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> OpenSetPrediction:
        out = self.model(images, output_size=output_size)
        out = out._replace(**{k: v.float() for k, v in out._asdict().items() if isinstance(v, torch.Tensor)})
        scores = compute_score(self.score_name, out, **self.score_options)
        closed = out.logits.argmax(dim=1)
        open_set = None if self.threshold is None else predict_open_set(out.logits, scores, self.threshold)
        return OpenSetPrediction(closed, scores, open_set)


def calibrate_threshold(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    method: str = "tpr",
    target_tpr: float = 0.95,
    strict: bool = True,
    ignore_index: int = 255,
) -> float:
    """Choose the open-set threshold on labelled calibration data, streaming in fixed memory.

    Args:
        batches: pairs of (scores (N, H, W), binary target (N, H, W) in {0 inlier, 1 anomaly, ignore_index}).
        method: ``"tpr"``: the threshold reaching ``target_tpr`` of the anomaly pixels; ``"f1"``: best pixel F1.
        target_tpr: the true-positive rate for ``method="tpr"`` (0.95 in the released code).
        strict: ``"tpr"`` picks the first threshold with TPR > target (released code) instead of >=.
        ignore_index: target id of void pixels.

    Returns:
        the threshold; apply it as ``scores > threshold``.
    """
    from densehybrid.metrics import AnomalyMetrics

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"Expected `method` to be one of {CALIBRATION_METHODS}, but got {method!r}.")
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"Expected `target_tpr` in (0, 1], but got {target_tpr}.")
    metric = AnomalyMetrics(ignore_index=ignore_index)
    for scores, target in batches:
        metric.update(scores, target)
    threshold = metric.best_f1_threshold() if method == "f1" else metric.threshold_at_tpr(target_tpr, strict=strict)
    if math.isnan(threshold):
        raise ValueError("Expected anomaly pixels in the calibration data, but found none: cannot set a threshold.")
    return float(threshold)

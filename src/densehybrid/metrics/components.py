"""SegmentMeIfYouCan component-level metrics: sIoU, PPV and mean F1 (:class:`ComponentMetrics`).

Re-implemented from the description of the SegmentMeIfYouCan toolkit (``road_anomaly_benchmark``,
``metrics/instance_segmentation.py``: ``default_instancer`` and ``segment_metrics``; Chan et al., "SegmentMeIfYouCan:
A Benchmark for Anomaly Segmentation", NeurIPS 2021 Datasets and Benchmarks, Sec. 4).

Per frame:

1. prediction = ``score > threshold`` (strict; the toolkit uses the pixel curve's best-F1 threshold), restricted
   to non-void pixels; ground truth = pixels with target 1;
2. connected components of both with 8-connectivity; predicted components with fewer than
   ``min_segment_size`` pixels are removed; ground-truth components with fewer than ``min_instance_size`` pixels
   become void. The region of interest is every non-void pixel after that;
3. inside the region of interest, for each ground-truth component ``k`` touched by predicted components ``K(k)``:

   .. math:: \\mathrm{sIoU}(k) = \\frac{|k \\cap K(k)|}{|k \\cup K(k)| - |A(k)|}
             = \\frac{|k \\cap K(k)|}{|k| + |K(k) \\cap \\text{inliers}|}

   where ``A(k)`` are the pixels of ``K(k)`` on other ground-truth components; for each predicted component ``j``
   the positive predictive value ``PPV(j) = |j \\cap \\text{anomaly}| / |j|``;
4. for each threshold ``t`` in ``linspace(0.25, 0.75, 11)``: TP = components with sIoU >= t, FN = components with
   sIoU < t, FP = predicted components with PPV < t.

Aggregation over frames: ``siou`` = mean sIoU over all ground-truth components, ``ppv`` = mean PPV over all
predicted components, ``F1_t = 2 TP_t / (2 TP_t + FN_t + FP_t)`` from counts summed over frames, and ``mean_f1`` =
mean of ``F1_t`` over the 11 thresholds. Size limits per track (``SegEval-AnomalyTrack``/``SegEval-ObstacleTrack``):
anomaly 500/100 pixels, obstacle (also LostAndFound-NoKnown) 50/10 pixels. One deliberate difference: the
toolkit's size filters also loop over component id 0 (background), which voids all background pixels of frames
with fewer than ``min_instance_size`` of them; only real components are filtered here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from densehybrid.labels import ANOMALY, IGNORE_INDEX
from densehybrid.metrics._base import SumStateMetric, exact_sum_add, exact_sum_state, exact_sum_value
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index

# (min_segment_size, min_instance_size) of the SMIYC tracks.
COMPONENT_TRACKS = {"anomaly": (500, 100), "obstacle": (50, 10)}
SIOU_THRESHOLDS = np.linspace(0.25, 0.75, 11)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.uint8)


def frame_components(
    prediction: np.ndarray,
    target: np.ndarray,
    ignore_index: int | None,
    min_segment_size: int,
    min_instance_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sIoU of ground-truth components, sIoU and PPV of predicted components of one frame.

    Args:
        prediction: (H, W) bool binarised scores.
        target: (H, W) int ids: 0 inlier, 1 anomaly, ``ignore_index`` void.
        ignore_index: void id, or None.
        min_segment_size: predicted components below this size are removed.
        min_instance_size: ground-truth components below this size become void.

    Returns:
        ``(siou_gt, siou_pred, ppv)`` float64 arrays, one entry per component inside the region of interest.
    """
    void = target == ignore_index if ignore_index is not None else np.zeros(target.shape, dtype=bool)
    gt_labels, num_gt = ndimage.label(target == ANOMALY, structure=_EIGHT_CONNECTED)
    pred_labels, num_pred = ndimage.label(prediction & ~void, structure=_EIGHT_CONNECTED)
    pred_small = np.bincount(pred_labels.ravel(), minlength=num_pred + 1) < min_segment_size
    pred_small[0] = False
    pred_labels[pred_small[pred_labels]] = 0
    gt_small = np.bincount(gt_labels.ravel(), minlength=num_gt + 1) < min_instance_size
    gt_small[0] = False
    roi = ~void & ~gt_small[gt_labels]
    gt_ids, pred_ids = gt_labels[roi].astype(np.int64), pred_labels[roi].astype(np.int64)
    # Joint histogram of (gt component, predicted component) over the region of interest, stored sparsely.
    pairs, pair_counts = np.unique(gt_ids * (num_pred + 1) + pred_ids, return_counts=True)
    pair_gt, pair_pred = pairs // (num_pred + 1), pairs % (num_pred + 1)
    gt_size = np.bincount(pair_gt, weights=pair_counts, minlength=num_gt + 1)
    pred_size = np.bincount(pair_pred, weights=pair_counts, minlength=num_pred + 1)
    on_background = np.zeros(num_pred + 1)  # |j ∩ inliers| per predicted component
    uncovered = np.zeros(num_gt + 1)  # |k ∖ predictions| per ground-truth component
    is_bg, is_unpredicted = pair_gt == 0, pair_pred == 0
    on_background[pair_pred[is_bg]] = pair_counts[is_bg]
    uncovered[pair_gt[is_unpredicted]] = pair_counts[is_unpredicted]
    overlap = ~is_bg & ~is_unpredicted
    gt_hit, pred_hit, hit_counts = pair_gt[overlap], pair_pred[overlap], pair_counts[overlap]
    gt_inter = np.bincount(gt_hit, weights=hit_counts, minlength=num_gt + 1)
    gt_union = gt_size + np.bincount(gt_hit, weights=on_background[pred_hit], minlength=num_gt + 1)
    pred_inter = np.bincount(pred_hit, weights=hit_counts, minlength=num_pred + 1)
    pred_union = pred_size + np.bincount(pred_hit, weights=uncovered[gt_hit], minlength=num_pred + 1)
    gt_present = np.nonzero(gt_size[1:])[0] + 1
    pred_present = np.nonzero(pred_size[1:])[0] + 1
    siou_gt = gt_inter[gt_present] / gt_union[gt_present]
    siou_pred = pred_inter[pred_present] / pred_union[pred_present]
    ppv = pred_inter[pred_present] / pred_size[pred_present]
    return siou_gt, siou_pred, ppv


class ComponentMetrics(SumStateMetric):
    """SegmentMeIfYouCan component-level metrics: sIoU (gt), PPV and mean F1 over sIoU thresholds 0.25..0.75.

    Args:
        threshold: score threshold; pixels with ``score > threshold`` are predicted anomalous. SMIYC uses the
            ``best_f1_threshold`` of :class:`~densehybrid.metrics.SmiycAnomalyMetrics` on the same frames.
        track: ``"anomaly"`` (RoadAnomaly21: components >= 500 px, ground truth >= 100 px) or ``"obstacle"``
            (RoadObstacle21, LostAndFound-NoKnown: 50/10 px).
        min_segment_size: override the track's minimum predicted component size.
        min_instance_size: override the track's minimum ground-truth component size.
        ignore_index: target id of void pixels, or None.
        float16: compare float16-rounded scores with the float16-rounded threshold, as the toolkit does (its
            scores are stored as float16 and numpy 1.23 compares a float16 array with a scalar in float16).
        validate_args: scan every batch for NaN scores and ids outside {0, 1, ``ignore_index``}.

    Example:
        >>> metric = ComponentMetrics(0.5, min_segment_size=1, min_instance_size=1)
        >>> target = torch.zeros(1, 4, 4, dtype=torch.long)
        >>> target[0, :2, :2] = 1
        >>> metric.update(target.float(), target)
        >>> result = metric.compute()
        >>> result["siou"], result["ppv"], result["mean_f1"]
        (1.0, 1.0, 1.0)
    """

    def __init__(
        self,
        threshold: float,
        *,
        track: str = "anomaly",
        min_segment_size: int | None = None,
        min_instance_size: int | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        float16: bool = True,
        validate_args: bool = True,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"Expected `threshold` to be a number, but got {threshold!r}.")
        if track not in COMPONENT_TRACKS:
            raise ValueError(f"Unknown SMIYC track {track!r}. Available: {', '.join(COMPONENT_TRACKS)}.")
        check_ignore_index(ignore_index)
        segment_default, instance_default = COMPONENT_TRACKS[track]
        self.min_segment_size = segment_default if min_segment_size is None else min_segment_size
        self.min_instance_size = instance_default if min_instance_size is None else min_instance_size
        for name in ("min_segment_size", "min_instance_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{name}` to be an int >= 0, but got {value!r}.")
        self.threshold = float(threshold)
        self.track = track
        self.ignore_index = ignore_index
        self.float16 = float16
        self.validate_args = validate_args
        super().__init__(torch.device("cpu"))

    def _config(self) -> tuple:
        return (self.threshold, self.min_segment_size, self.min_instance_size, self.ignore_index, self.float16)

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            # exact sums of sIoU(gt), sIoU(pred) and PPV (see densehybrid.metrics._base)
            "sums": exact_sum_state(3, device),
            # gt components, predicted components
            "components": torch.zeros(2, dtype=torch.int64, device=device),
            # TP, FN, FP per sIoU threshold
            "counts": torch.zeros(3, len(SIOU_THRESHOLDS), dtype=torch.int64, device=device),
        }

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Find and score the components of each frame of the batch.

        Args:
            scores: (N, H, W) floating anomaly scores, higher is more anomalous.
            target: (N, H, W) integer ids: 0 inlier, 1 anomaly, ``ignore_index`` void.

        Raises:
            ValueError: mismatched shapes, NaN scores or ids outside the encoding.
        """
        check_anomaly_inputs(scores, target, self.ignore_index, batched=True, validate_args=self.validate_args)
        scores_np = scores.detach().to("cpu", torch.float64).numpy()
        target_np = target.detach().cpu().numpy()
        if self.float16:
            with np.errstate(over="ignore"):
                scores_np, threshold = scores_np.astype(np.float16), np.float16(self.threshold)
        else:
            threshold = self.threshold
        siou_gt_values, siou_pred_values, ppv_values = [], [], []
        components = [0, 0]
        counts = np.zeros((3, len(SIOU_THRESHOLDS)), dtype=np.int64)
        for frame_scores, frame_target in zip(scores_np, target_np):
            siou_gt, siou_pred, ppv = frame_components(
                frame_scores > threshold, frame_target, self.ignore_index, self.min_segment_size, self.min_instance_size
            )
            siou_gt_values += siou_gt.tolist()
            siou_pred_values += siou_pred.tolist()
            ppv_values += ppv.tolist()
            components[0] += siou_gt.size
            components[1] += ppv.size
            counts[0] += (siou_gt[:, None] >= SIOU_THRESHOLDS).sum(0)
            counts[1] += (siou_gt[:, None] < SIOU_THRESHOLDS).sum(0)
            counts[2] += (ppv[:, None] < SIOU_THRESHOLDS).sum(0)
        state = self._ensure_state(torch.device("cpu"))
        for row, values in enumerate((siou_gt_values, siou_pred_values, ppv_values)):
            exact_sum_add(state["sums"], row, values)
        state["components"] += torch.tensor(components, dtype=torch.int64)
        state["counts"] += torch.from_numpy(counts)

    def compute(self) -> dict[str, Any]:
        """Component metrics over all frames.

        Returns:
            A dict with ``siou`` (mean sIoU of ground-truth components), ``ppv`` (mean PPV of predicted components),
            ``mean_f1``, ``f1_25``, ``f1_50``, ``f1_75``, ``siou_pred``, ``num_gt_components``,
            ``num_pred_components``, ``threshold``, ``min_segment_size`` and ``min_instance_size``. Without
            ground-truth components sIoU and the F1 scores are NaN (with a ``UserWarning``); without predicted
            components PPV is NaN.
        """
        state = self._ensure_state(torch.device("cpu"))
        siou_sum, siou_pred_sum, ppv_sum = (exact_sum_value(row) for row in state["sums"])
        num_gt, num_pred = state["components"].tolist()
        tp, fn, fp = (row.to(torch.float64) for row in state["counts"])
        if num_gt == 0:
            warnings.warn(
                "No ground-truth anomaly components were evaluated: sIoU and F1 are undefined and reported as NaN.",
                UserWarning,
                stacklevel=2,
            )
        denominator = 2 * tp + fn + fp
        f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.full_like(tp, math.nan))
        if num_gt == 0:
            f1 = torch.full_like(tp, math.nan)
        f1_values = f1.tolist()
        return {
            "siou": siou_sum / num_gt if num_gt else math.nan,
            "ppv": ppv_sum / num_pred if num_pred else math.nan,
            "mean_f1": float(f1.mean()),
            "f1_25": f1_values[0],
            "f1_50": f1_values[5],
            "f1_75": f1_values[10],
            "siou_pred": siou_pred_sum / num_pred if num_pred else math.nan,
            "num_gt_components": int(num_gt),
            "num_pred_components": int(num_pred),
            "threshold": self.threshold,
            "min_segment_size": self.min_segment_size,
            "min_instance_size": self.min_instance_size,
        }

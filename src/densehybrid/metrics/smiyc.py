"""SegmentMeIfYouCan pixel-level metrics, binned as the official toolkit bins them (protocol ``smiyc``).

Re-implemented from the description of the SegmentMeIfYouCan toolkit (``road_anomaly_benchmark``,
https://github.com/SegmentMeIfYouCan/road-anomaly-benchmark, ``metrics/pixel_classification.py`` and
``metrics/pixel_classification_curves.py``, configuration ``PixBinaryClass``). The toolkit pins numpy 1.23; the
numeric details below follow that version.

Per frame (pixels with target != ``ignore_index``; the toolkit saves scores as float16 first):

1. bin edges: ``vmin - eps``, ``vmax + eps`` with ``eps = max(0.01 * (vmax - vmin), 0.01)`` (range in float16,
   ``eps`` in float64), plus ``min(384, n)`` linearly interpolated quantiles (numpy's default method, evaluated with
   numpy 1.23 arithmetic) of the anomaly scores and of the inlier scores, sorted and de-duplicated: at most 770
   edges, so at most 769 bins whatever the resolution;
2. histograms of anomaly and inlier scores over these edges (``edge_i <= s < edge_i+1``); each bin is an operating
   point at its lower edge.

Aggregation over frames: all (lower edge, counts) pairs are sorted by decreasing edge and accumulated in float64;
for every repeated edge the last cumulative point is kept, except that the very first entry is always kept (a
partial point when several frames share the highest edge, as in the toolkit; the toolkit's unstable sort makes
its counts depend on tie order, here frames are taken in update order). A point (0, 0) is prepended.
Then ``precision = TP / (TP + FP)`` (1 where nothing is predicted), ``AP = sum(diff(recall) * precision[1:])``,
``AUROC = trapz(TPR, FPR)``, ``FPR95`` at the first point with ``TPR >= 0.95`` and the best F1
``2TP / (2TP + FP + FN)`` with its threshold (``best_f1_threshold`` binarises scores for the component metrics).
Thresholds are reported for the selected operating point itself (the prepended point has threshold ``+inf``).

The state is O(frames x 768) numbers, independent of the image resolution.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics._base import distributed_ready
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index, valid_pixels

SMIYC_NUM_BINS = 768
FLOAT16_MAX = float(np.finfo(np.float16).max)


def numpy_linear_quantiles(sorted_values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """``np.quantile(values, quantiles)`` (method "linear") with the arithmetic of numpy 1.22-1.23.

    The neighbours' difference is taken in the input dtype (float16 for SMIYC outputs) and the interpolation in
    float64: ``a + (b - a) * g`` for ``g < 0.5``, ``b - (b - a) * (1 - g)`` otherwise, at index ``(n - 1) * q``.

    Args:
        sorted_values: (n,) ascending values, n >= 1.
        quantiles: (k,) float64 levels in [0, 1].

    Returns:
        (k,) float64 quantiles.
    """
    count = sorted_values.size
    virtual = (count - 1) * quantiles
    previous = np.floor(virtual)
    above = virtual >= count - 1
    previous_index = np.where(above, count - 1, previous).astype(np.intp)
    next_index = np.where(above, count - 1, previous + 1).astype(np.intp)
    gamma = virtual - np.where(above, -1.0, previous)
    lower, upper = sorted_values[previous_index], sorted_values[next_index]
    difference = upper - lower  # in the input dtype, as numpy does
    result = lower + difference * gamma
    high = gamma >= 0.5
    result[high] = (upper - difference * (1 - gamma))[high]
    return result


def frame_bins(scores: np.ndarray, anomaly: np.ndarray, num_bins: int = SMIYC_NUM_BINS) -> tuple[np.ndarray, ...]:
    """Percentile bins of one frame.

    Args:
        scores: (n,) scores of the evaluated pixels (float16 for the official protocol), finite, n >= 1.
        anomaly: (n,) bool, True for anomaly pixels.
        num_bins: total quantile budget, split evenly between anomaly and inlier scores.

    Returns:
        ``(lower_edges, anomaly_counts, inlier_counts)``, bins ordered from the highest edge down; edges float64,
        counts int64.
    """
    vmin, vmax = scores.min(), scores.max()
    spread = vmax - vmin  # in the score dtype, as the toolkit computes it
    eps = max(float(spread) * 1e-2, 1e-2)
    parts = [np.array([float(vmin) - eps, float(vmax) + eps])]
    sorted_by_class = []
    for values in (scores[anomaly], scores[~anomaly]):
        ordered = np.sort(values)
        sorted_by_class.append(ordered.astype(np.float64))
        if ordered.size:
            levels = np.linspace(0, 1, min(num_bins // 2, ordered.size))
            parts.append(numpy_linear_quantiles(ordered, levels))
    edges = np.unique(np.concatenate(parts))
    counts = []
    for ordered in sorted_by_class:
        # numpy.histogram: [edge_i, edge_i+1) and a closed last bin.
        cut = np.concatenate(
            [np.searchsorted(ordered, edges[:-1], "left"), np.searchsorted(ordered, edges[-1:], "right")]
        )
        counts.append(np.diff(cut))
    return edges[:-1][::-1].copy(), counts[0][::-1].copy(), counts[1][::-1].copy()


def curve_metrics(thresholds: np.ndarray, anomaly_counts: np.ndarray, inlier_counts: np.ndarray) -> dict[str, float]:
    """Aggregate per-frame bins into the SMIYC curve and its summary metrics.

    Args:
        thresholds: (m,) lower bin edges of all frames, concatenated in frame order (each frame descending).
        anomaly_counts: (m,) anomaly pixels per bin.
        inlier_counts: (m,) inlier pixels per bin.

    Returns:
        ``ap``, ``auroc``, ``fpr95``, ``threshold_at_tpr95``, ``best_f1``, ``best_f1_threshold`` (NaN when
        undefined; callers warn).
    """
    nan = {key: math.nan for key in ("ap", "auroc", "fpr95", "threshold_at_tpr95", "best_f1", "best_f1_threshold")}
    num_pos, num_neg = float(anomaly_counts.sum()), float(inlier_counts.sum())
    if thresholds.size == 0 or num_pos == 0:
        return nan
    order = np.argsort(-thresholds, kind="stable")
    edges = thresholds[order]
    tp = np.cumsum(anomaly_counts[order].astype(np.float64))
    fp = np.cumsum(inlier_counts[order].astype(np.float64))
    keep = np.concatenate([[0], np.nonzero(edges[:-1] != edges[1:])[0], [edges.size - 1]])
    tp, fp, edges = tp[keep], fp[keep], edges[keep]
    if tp[0] != 0 or fp[0] != 0:
        tp, fp, edges = np.r_[0.0, tp], np.r_[0.0, fp], np.r_[np.inf, edges]
    fn = num_pos - tp
    tpr = tp / num_pos
    predicted = tp + fp
    precision = np.ones_like(tp)
    precision[predicted > 0] = tp[predicted > 0] / predicted[predicted > 0]
    ap = float(np.sum(np.diff(tpr) * precision[1:]))
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = int(np.nanargmax(f1))
    tpr95 = int(np.searchsorted(tpr, 0.95))
    result = dict(nan, ap=ap, best_f1=float(f1[best]), best_f1_threshold=float(edges[best]))
    result["threshold_at_tpr95"] = float(edges[tpr95])
    if num_neg > 0:
        fpr = fp / num_neg
        result["auroc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        result["fpr95"] = float(fpr[tpr95])
    return result


class SmiycAnomalyMetrics:
    """SegmentMeIfYouCan pixel-level AP, AUROC, FPR95 and best-F1 threshold (protocol ``smiyc``).

    Args:
        ignore_index: target id of void pixels (255 in the SMIYC label files), or None.
        num_bins: quantile budget per frame (768 = the toolkit's ``PixBinaryClass``).
        float16: round scores to float16 first, as the toolkit's ``Evaluation.save_output`` stores them. Scores
            must then fit in float16 (|s| <= 65504); rescale them monotonically otherwise, or pass False.
        validate_args: scan every batch for NaN scores and ids outside {0, 1, ``ignore_index``}.

    Example:
        >>> metric = SmiycAnomalyMetrics()
        >>> metric.update(torch.tensor([[[0.9, 0.8], [0.7, 0.1]]]), torch.tensor([[[1, 0], [1, 0]]]))
        >>> result = metric.compute()
        >>> round(result["ap"], 4), result["fpr95"]
        (0.8333, 0.5)
    """

    protocol = "smiyc"

    def __init__(
        self,
        *,
        ignore_index: int | None = IGNORE_INDEX,
        num_bins: int = SMIYC_NUM_BINS,
        float16: bool = True,
        validate_args: bool = True,
    ) -> None:
        check_ignore_index(ignore_index)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"Expected `num_bins` to be an int >= 2, but got {num_bins!r}.")
        self.ignore_index = ignore_index
        self.num_bins = num_bins
        self.float16 = float16
        self.validate_args = validate_args
        self.reset()

    def _config(self) -> tuple:
        return (self.ignore_index, self.num_bins, self.float16)

    def reset(self) -> SmiycAnomalyMetrics:
        """Forget all frames."""
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._tally = np.zeros(4, dtype=np.int64)  # frames, anomaly, inlier, ignored pixels
        return self

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Bin each frame of the batch.

        Args:
            scores: (N, H, W) floating anomaly scores, higher is more anomalous; finite.
            target: (N, H, W) integer ids: 0 inlier, 1 anomaly, ``ignore_index`` void.

        Raises:
            ValueError: mismatched shapes, NaN or infinite scores, scores outside the float16 range (when
                ``float16``), ids outside the encoding.
        """
        check_anomaly_inputs(scores, target, self.ignore_index, batched=True, validate_args=self.validate_args)
        for frame_scores, frame_target in zip(scores, target):
            values, labels, num_ignored = valid_pixels(frame_scores, frame_target, self.ignore_index)
            values = values.detach().to("cpu", torch.float64 if values.dtype == torch.float64 else torch.float32)
            array = values.numpy()
            if not np.isfinite(array).all():
                raise ValueError("Expected `scores` to be finite for the SMIYC protocol, but got non-finite values.")
            if self.float16:
                if array.size and np.abs(array).max() > FLOAT16_MAX:
                    raise ValueError(
                        f"Expected `scores` to fit in float16 (|s| <= {FLOAT16_MAX:g}) for the SMIYC protocol, which "
                        f"stores scores as float16, but got max |s| = {np.abs(array).max():g}. Rescale them "
                        "monotonically or pass float16=False."
                    )
                array = array.astype(np.float16)
            anomaly = labels.cpu().numpy().astype(bool)
            self._tally += [1, int(anomaly.sum()), int((~anomaly).sum()), num_ignored]
            if array.size:
                self._frames.append(frame_bins(array, anomaly, self.num_bins))

    def merge(self, other: SmiycAnomalyMetrics) -> SmiycAnomalyMetrics:
        """Append the frames of ``other`` (frames of ``self`` first)."""
        if type(other) is not type(self):
            raise TypeError(f"Expected `other` to be a {type(self).__name__}, but got {type(other).__name__}.")
        if other._config() != self._config():
            raise ValueError(
                f"Expected `other` to have the same configuration {self._config()}, but got {other._config()}."
            )
        self._frames.extend(other._frames)
        self._tally = self._tally + other._tally
        return self

    def sync(self, group: Any = None) -> SmiycAnomalyMetrics:
        """Gather the frames of all processes (rank order) with ``all_gather_object``; no-op without a process group.

        The state is a list of per-frame bins, not a sum, so it is gathered rather than all-reduced.
        """
        if not distributed_ready():
            return self
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (self._frames, self._tally), group=group)
        self._frames = [frame for frames, _ in gathered for frame in frames]
        self._tally = np.sum([tally for _, tally in gathered], axis=0)
        return self

    def compute(self) -> dict[str, Any]:
        """SMIYC pixel metrics over all frames.

        Returns:
            A dict with ``ap``, ``auroc``, ``fpr95``, ``threshold_at_tpr95``, ``best_f1``, ``best_f1_threshold``,
            ``num_frames``, ``num_anomaly``, ``num_inlier``, ``num_ignored``, ``protocol`` ("smiyc"),
            ``num_bins`` and ``float16``. Without anomaly pixels every metric is NaN; without inlier pixels AUROC and
            FPR95 are NaN (with a ``UserWarning`` in both cases).
        """
        num_frames, num_pos, num_neg, num_ignored = (int(v) for v in self._tally)
        if self._frames:
            thresholds, anomaly_counts, inlier_counts = (np.concatenate(parts) for parts in zip(*self._frames))
        else:
            thresholds = anomaly_counts = inlier_counts = np.zeros(0)
        if num_pos == 0 or num_neg == 0:
            what = "anomaly" if num_pos == 0 else "inlier"
            warnings.warn(
                f"No {what} pixels were evaluated: undefined SMIYC metrics are reported as NaN.",
                UserWarning,
                stacklevel=2,
            )
        result: dict[str, Any] = {"protocol": self.protocol}
        result.update(curve_metrics(thresholds, anomaly_counts, inlier_counts))
        result.update(
            num_frames=num_frames,
            num_anomaly=num_pos,
            num_inlier=num_neg,
            num_ignored=num_ignored,
            num_bins=self.num_bins,
            float16=self.float16,
        )
        return result

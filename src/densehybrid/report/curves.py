r"""Exact ROC and precision-recall curves of a score sample, in NumPy, for report figures and small experiments.

These functions sort the whole sample, so they are exact but hold every score in memory: use them on the pixel
subsamples a report plots (``ScoreSample``) or on toy data, and the streaming metrics for full benchmarks. Scores
follow the library convention, higher = more anomalous; labels are 0 (inlier) or 1 (anomaly) with no ignore id.

Conventions (the same as scikit-learn's ``roc_curve(drop_intermediate=False)``, ``precision_recall_curve`` and
``average_precision_score``):

* one operating point per distinct score, thresholds in decreasing order, a pixel is flagged when ``score >= t``;
* AP is the step-wise sum :math:`\sum_n (R_n - R_{n-1}) P_n` (no interpolation);
* AUROC is the trapezoidal area under the ROC curve, so ties count one half;
* FPR95 is the FPR of the first operating point (highest threshold) whose TPR reaches 0.95.

A sample with no anomaly or no inlier leaves the curves undefined: the metrics then warn and return NaN.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["auroc", "average_precision", "binary_counts", "fpr_at_tpr", "precision_recall_curve", "roc_curve"]


def _check_sample(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1:
        raise ValueError(f"Expected `scores` to have shape (P,), but got {scores.shape}.")
    if labels.shape != scores.shape:
        raise ValueError(f"Expected `labels` to have shape {scores.shape} like `scores`, but got {labels.shape}.")
    if scores.dtype == bool or not np.issubdtype(scores.dtype, np.number):
        raise TypeError(f"Expected `scores` to be a float array, but got dtype {scores.dtype}.")
    scores = scores.astype(np.float64, copy=False)
    if np.isnan(scores).any():
        raise ValueError(
            f"Expected `scores` to contain no NaN, but got {int(np.isnan(scores).sum())} NaN value(s) of {scores.size}."
        )
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"Expected `labels` to be an integer array of 0/1, but got dtype {labels.dtype}.")
    if labels.size and not np.isin(labels, (0, 1)).all():
        found = np.unique(labels[~np.isin(labels, (0, 1))])[:10].tolist()
        raise ValueError(f"Expected `labels` to hold only 0 (inlier) and 1 (anomaly), but got {found}.")
    return scores, labels.astype(bool)


def binary_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false and true positives at every distinct threshold, highest threshold first.

    Args:
        scores: (P,) float scores, higher = more anomalous; infinities are allowed, NaN is not.
        labels: (P,) int 0 (inlier) / 1 (anomaly).

    Returns:
        ``(fps, tps, thresholds)``, each (T,) with T the number of distinct scores: flagging ``score >= thresholds[i]``
        gives ``fps[i]`` false and ``tps[i]`` true positives.

    Raises:
        ValueError: for mismatched shapes, NaN scores or labels other than 0/1.
        TypeError: for non-numeric scores or non-integer labels.
    """
    scores, positive = _check_sample(scores, labels)
    # Stable sort so equal scores keep a fixed order; only the last index of each run of ties is an operating point.
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1] if scores.size else np.zeros(0, dtype=int)
    # int64 cumulative counts: exact for any sample that fits in memory.
    tps = np.cumsum(positive, dtype=np.int64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return fps, tps, scores[last_of_tie]


def _warn_degenerate(num_pos: int, num_neg: int, what: str) -> bool:
    if num_pos == 0 or num_neg == 0:
        missing = "anomaly" if num_pos == 0 else "inlier"
        warnings.warn(f"The sample has no {missing}, so {what} is undefined; returning NaN.", UserWarning, stacklevel=3)
        return True
    return False


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve of a sample, starting at (0, 0).

    Args:
        scores: (P,) float scores, higher = more anomalous.
        labels: (P,) int 0 (inlier) / 1 (anomaly).

    Returns:
        ``(fpr, tpr, thresholds)``, each (T + 1,): the first point is (0, 0) with threshold ``+inf``. Rates are NaN
        (with a ``UserWarning``) when the sample has no anomaly or no inlier.

    Example:
        >>> fpr, tpr, _ = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    fps, tps, thresholds = binary_counts(scores, labels)
    num_pos = int(tps[-1]) if tps.size else 0
    num_neg = int(fps[-1]) if fps.size else 0
    fps, tps = np.r_[0, fps].astype(np.float64), np.r_[0, tps].astype(np.float64)
    thresholds = np.r_[np.inf, thresholds]
    if _warn_degenerate(num_pos, num_neg, "the ROC curve"):
        nan = np.full_like(fps, np.nan)
        return nan, nan.copy(), thresholds
    return fps / num_neg, tps / num_pos, thresholds


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact precision-recall curve of a sample, in scikit-learn's layout.

    Args:
        scores: (P,) float scores, higher = more anomalous.
        labels: (P,) int 0 (inlier) / 1 (anomaly).

    Returns:
        ``(precision, recall, thresholds)``: precision and recall (T + 1,) in order of increasing threshold, ending at
        precision 1, recall 0; thresholds (T,) increasing. NaN (with a ``UserWarning``) without anomalies.

    Example:
        >>> precision, recall, _ = precision_recall_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        >>> precision.round(3).tolist(), recall.tolist()
        ([0.5, 0.667, 0.5, 1.0, 1.0], [1.0, 1.0, 0.5, 0.5, 0.0])
    """
    fps, tps, thresholds = binary_counts(scores, labels)
    num_pos = int(tps[-1]) if tps.size else 0
    if num_pos == 0:
        warnings.warn(
            "The sample has no anomaly, so the PR curve is undefined; returning NaN.", UserWarning, stacklevel=2
        )
        nan = np.full(tps.size + 1, np.nan)
        return nan, nan.copy(), thresholds[::-1]
    precision = tps / (tps + fps)
    recall = tps / num_pos
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    r"""Average precision :math:`\sum_n (R_n - R_{n-1}) P_n` over the distinct thresholds (no interpolation).

    Args:
        scores: (P,) float scores, higher = more anomalous.
        labels: (P,) int 0 (inlier) / 1 (anomaly).

    Returns:
        AP in [0, 1]; NaN with a ``UserWarning`` when the sample has no anomaly.

    Example:
        >>> round(average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])), 4)
        0.8333
    """
    fps, tps, _ = binary_counts(scores, labels)
    num_pos = int(tps[-1]) if tps.size else 0
    if num_pos == 0:
        warnings.warn("The sample has no anomaly, so AP is undefined; returning NaN.", UserWarning, stacklevel=2)
        return math.nan
    precision = tps / (tps + fps)
    recall_steps = np.diff(np.r_[0, tps]) / num_pos
    return float(np.sum(recall_steps * precision))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, so tied scores count one half).

    Args:
        scores: (P,) float scores, higher = more anomalous.
        labels: (P,) int 0 (inlier) / 1 (anomaly).

    Returns:
        AUROC in [0, 1]; NaN with a ``UserWarning`` when the sample has no anomaly or no inlier.

    Example:
        >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    fps, tps, _ = binary_counts(scores, labels)
    num_pos = int(tps[-1]) if tps.size else 0
    num_neg = int(fps[-1]) if fps.size else 0
    if _warn_degenerate(num_pos, num_neg, "AUROC"):
        return math.nan
    fpr = np.r_[0, fps] / num_neg
    tpr = np.r_[0, tps] / num_pos
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the first operating point (highest threshold) whose TPR reaches ``tpr``.

    Args:
        scores: (P,) float scores, higher = more anomalous.
        labels: (P,) int 0 (inlier) / 1 (anomaly).
        tpr: the true-positive rate to reach, in (0, 1]; 0.95 gives FPR95.

    Returns:
        The FPR in [0, 1]; NaN with a ``UserWarning`` when the sample has no anomaly or no inlier.

    Raises:
        ValueError: if ``tpr`` is not in (0, 1].

    Example:
        >>> fpr_at_tpr(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.5
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"Expected `tpr` to be a number in (0, 1], but got {tpr!r}.")
    fps, tps, _ = binary_counts(scores, labels)
    num_pos = int(tps[-1]) if tps.size else 0
    num_neg = int(fps[-1]) if fps.size else 0
    if _warn_degenerate(num_pos, num_neg, f"FPR at TPR {tpr:g}"):
        return math.nan
    # Compare counts, not rates, so TPR exactly at the target is not lost to rounding.
    index = int(np.argmax(tps >= tpr * num_pos - 1e-9 * num_pos))
    return float(fps[index] / num_neg)

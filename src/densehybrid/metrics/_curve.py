"""Ranking metrics from grouped counts: the shared core of the exact, pooled and per-image metrics.

A :class:`Curve` lists the evaluated pixels grouped by score, highest scores first: group ``i`` holds ``pos[i]``
anomaly and ``neg[i]`` inlier pixels, and ``thresholds[i]`` is its lowest score, so predicting "anomaly" for
``score >= thresholds[i]`` yields the cumulative counts ``tps[i] = pos[:i + 1].sum()`` and
``fps[i] = neg[:i + 1].sum()``. For exact metrics a group is one distinct score (ties share a group, as in
scikit-learn); for the binned pooled state a group is one histogram bin.

All arithmetic is float64; counts stay exact up to 2**53 pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Curve(NamedTuple):
    """Grouped counts in descending score order; every group is non-empty.

    Attributes:
        pos: (G,) int64 anomaly pixels per group.
        neg: (G,) int64 inlier pixels per group.
        thresholds: (G,) float64 lowest score of each group.
    """

    pos: torch.Tensor
    neg: torch.Tensor
    thresholds: torch.Tensor

    @property
    def num_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def num_neg(self) -> int:
        return int(self.neg.sum())

    def cumulative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(tps, fps)`` as float64 cumulative sums (the ROC/PR operating points)."""
        return self.pos.cumsum(0).to(torch.float64), self.neg.cumsum(0).to(torch.float64)


def average_precision(curve: Curve) -> float:
    r"""Step-wise average precision, scikit-learn's ``average_precision_score``.

    .. math:: \mathrm{AP} = \sum_i (R_i - R_{i-1}) P_i,\quad R_i = \frac{tps_i}{P},\quad P_i = \frac{tps_i}{tps_i + fps_i}

    Returns NaN when there are no anomaly pixels.
    """
    num_pos = curve.num_pos
    if num_pos == 0:
        return math.nan
    tps, fps = curve.cumulative()
    precision = tps / (tps + fps)
    return float((curve.pos.to(torch.float64) * precision).sum() / num_pos)


def auroc(curve: Curve) -> float:
    r"""Area under the ROC curve by the trapezoid rule (scikit-learn's ``roc_auc_score``).

    .. math:: \mathrm{AUROC} = \frac{1}{PN} \sum_i n_i \frac{tps_{i-1} + tps_i}{2}

    Ties inside a group count one half, as the diagonal ROC segment they form. NaN without both classes.
    """
    num_pos, num_neg = curve.num_pos, curve.num_neg
    if num_pos == 0 or num_neg == 0:
        return math.nan
    tps, _ = curve.cumulative()
    previous = tps - curve.pos.to(torch.float64)
    area = (curve.neg.to(torch.float64) * (previous + tps)).sum() / 2
    return float(area / num_pos / num_neg)


def index_at_tpr(curve: Curve, tpr: float, strict: bool = False, drop_intermediate: bool | None = None) -> int:
    """Index of the first operating point with TPR >= ``tpr`` (``strict``: TPR > ``tpr``); -1 if there is none.

    ``strict`` follows the released DenseHybrid Fishyscapes/StreetHazards code (``evaluations/base.py::
    calculate_auroc``): it walks scikit-learn's ``roc_curve`` with ``drop_intermediate=True``, which removes the inner
    points of collinear ROC segments, and stops at the first TPR > ``tpr``. ``drop_intermediate`` (default: as
    ``strict``) emulates those dropped points, so both agree exactly; the released COCO20 calibration takes the first
    TPR >= ``tpr`` on the same ``roc_curve`` (``strict=False, drop_intermediate=True``).
    """
    num_pos = curve.num_pos
    if num_pos == 0:
        return -1
    tps, fps = curve.cumulative()
    rates = tps / num_pos
    drop = strict if drop_intermediate is None else drop_intermediate
    if not drop:
        hits = ((rates > tpr) if strict else (rates >= tpr)).nonzero()
    else:
        keep = torch.ones_like(rates, dtype=torch.bool)
        if rates.numel() > 2:
            # scikit-learn keeps a point when the second difference of fps or tps is non-zero.
            bend = (fps[:-2] - 2 * fps[1:-1] + fps[2:] != 0) | (tps[:-2] - 2 * tps[1:-1] + tps[2:] != 0)
            keep[1:-1] = bend
        hits = (((rates > tpr) if strict else (rates >= tpr)) & keep).nonzero()
    return int(hits[0, 0]) if hits.numel() else -1


def index_closest_tpr(curve: Curve, tpr: float) -> int:
    """Index of the operating point whose TPR is closest to ``tpr`` (the original StreetHazards rule).

    Follows ``anom_utils.fpr_and_fdr_at_recall`` of hendrycks/anomaly-seg: points after the first one reaching
    TPR = 1 are discarded and, among equally close points, the one with the lowest threshold wins. -1 without
    anomaly pixels.
    """
    num_pos = curve.num_pos
    if num_pos == 0:
        return -1
    tps, _ = curve.cumulative()
    last = int(torch.searchsorted(tps, torch.tensor([float(num_pos)], dtype=torch.float64)))
    distance = (tps[: last + 1] / num_pos - tpr).abs()
    closest = (distance == distance.min()).nonzero()
    return int(closest[-1, 0])


def fpr_at_index(curve: Curve, index: int) -> float:
    """False positive rate of operating point ``index`` (NaN for -1 or without inlier pixels)."""
    num_neg = curve.num_neg
    if index < 0 or num_neg == 0:
        return math.nan
    return float(curve.neg[: index + 1].sum()) / num_neg


def threshold_at_index(curve: Curve, index: int) -> float:
    """Score threshold of operating point ``index`` (NaN for -1)."""
    return float(curve.thresholds[index]) if index >= 0 else math.nan


def best_f1_index(curve: Curve) -> tuple[int, float]:
    r"""Operating point with the highest F1 score, the first (highest threshold) on ties.

    .. math:: F_1 = \frac{2\,tps}{2\,tps + fps + fn} = \frac{2\,tps}{tps + fps + P}

    Returns ``(-1, nan)`` without anomaly pixels.
    """
    num_pos = curve.num_pos
    if num_pos == 0:
        return -1, math.nan
    tps, fps = curve.cumulative()
    f1 = 2 * tps / (tps + fps + num_pos)
    index = int(torch.argmax(f1))
    return index, float(f1[index])


def average_precision_bounds(curve: Curve, uncertain: torch.Tensor | None = None) -> tuple[float, float]:
    """Lowest and highest AP over every order of the pixels inside the ``uncertain`` groups.

    Used for the binned pooled state: a bin may merge distinct scores, whose true order inside the bin is unknown.
    The best case ranks a bin's anomalies tied above its inliers; the worst ranks its inliers above its anomalies,
    each anomaly on its own. With ``T, F`` anomalies/inliers above a bin holding ``p, n``:

    .. math:: \\mathrm{hi} = p \\frac{T + p}{T + F + p},\\qquad
              \\mathrm{lo} = \\sum_{j=1}^{p} \\frac{T + j}{D + j} = p - (D - T)\\,(\\psi(D + p + 1) - \\psi(D + 1))

    with ``D = T + F + n`` and the digamma function ``psi`` (harmonic-number differences). Groups that are not
    uncertain (a single distinct score) contribute their tied value to both. Returns NaN bounds without anomalies.

    Args:
        curve: grouped counts.
        uncertain: (G,) bool, True for groups that may hold several distinct scores; None means all groups.
    """
    num_pos = curve.num_pos
    if num_pos == 0:
        return math.nan, math.nan
    tps, fps = curve.cumulative()
    pos, neg = curve.pos.to(torch.float64), curve.neg.to(torch.float64)
    above_pos, above_neg = tps - pos, fps - neg
    has_pos = pos > 0  # groups without anomalies add nothing (and would divide 0 by 0 at the top)
    depth = above_pos + above_neg + neg
    tied = torch.where(has_pos, pos * (above_pos + pos) / (depth + pos).clamp(min=1), 0.0)
    high = torch.where(has_pos, pos * (above_pos + pos) / (above_pos + above_neg + pos).clamp(min=1), 0.0)
    harmonic = torch.special.digamma(depth + pos + 1) - torch.special.digamma(depth + 1)
    low = torch.minimum(pos - (depth - above_pos) * harmonic, tied)  # digamma rounding: never above the tied value
    if uncertain is not None:
        high = torch.where(uncertain, high, tied)
        low = torch.where(uncertain, low, tied)
    return float(low.sum() / num_pos), float(high.sum() / num_pos)

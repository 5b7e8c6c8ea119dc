"""Exact functional metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from densehybrid.metrics import auroc, average_precision, best_f1_threshold, fpr_at_tpr, threshold_at_tpr


def _valid(scores: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    keep = target != 255
    return target[keep].numpy(), scores[keep].double().numpy()


def _first_geq(y: np.ndarray, s: np.ndarray, tpr: float) -> tuple[float, float]:
    fpr, rates, thresholds = roc_curve(y, s, drop_intermediate=False)
    index = int(np.searchsorted(rates, tpr))
    return fpr[index], thresholds[index]


def _released_densehybrid(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    # The loop of DenseHybrid's evaluations/base.py::calculate_auroc, written against scikit-learn.
    fpr, rates, thresholds = roc_curve(y, s)
    for rate, false_rate, threshold in zip(rates, fpr, thresholds):
        if rate > 0.95:
            return false_rate, threshold
    raise AssertionError("TPR never exceeded 0.95")


def test_against_sklearn(case):
    kind, scores, target = case
    y, s = _valid(scores, target)
    if kind == "float32_limits":
        s = s.astype(np.float32).astype(np.float64)
    assert average_precision(scores, target) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert auroc(scores, target) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, threshold = _first_geq(y, s, 0.95)
    assert fpr_at_tpr(scores, target) == pytest.approx(fpr, abs=1e-12)
    assert threshold_at_tpr(scores, target) == threshold
    fpr_strict, threshold_strict = _released_densehybrid(y, s)
    assert fpr_at_tpr(scores, target, strict=True) == pytest.approx(fpr_strict, abs=1e-12)
    assert threshold_at_tpr(scores, target, strict=True) == threshold_strict


def test_best_f1_against_sklearn(case):
    _, scores, target = case
    y, s = _valid(scores, target)
    precision, recall, thresholds = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    threshold, best = best_f1_threshold(scores, target)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert threshold == thresholds[int(np.flatnonzero(f1 == f1.max())[-1])]  # sklearn lists thresholds ascending


def test_hand_computed_example():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    target = torch.tensor([1, 0, 1, 0])
    # AP = (1/2) * 1/1 + (1/2) * 2/3; AUROC = 3 of 4 pairs ranked correctly; TPR 1 reached after one inlier.
    assert average_precision(scores, target) == pytest.approx(5 / 6)
    assert auroc(scores, target) == 0.75
    assert fpr_at_tpr(scores, target) == 0.5
    assert threshold_at_tpr(scores, target) == pytest.approx(0.7)
    assert best_f1_threshold(scores, target) == (pytest.approx(0.7), pytest.approx(0.8))


def test_infinite_scores_rank_first_and_last():
    scores = torch.tensor([float("inf"), 3.0, 2.0, -float("inf")])
    target = torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, target) == pytest.approx(5 / 6)
    assert threshold_at_tpr(scores, target) == 2.0
    assert auroc(torch.tensor([float("inf"), -float("inf")]), torch.tensor([1, 0])) == 1.0


def test_smallest_subnormals_are_distinct_scores():
    scores = torch.tensor([3e-45, 1e-45, 0.0, -0.0, -1e-45])  # 2, 1, 0, 0, -1 ulps of zero
    target = torch.tensor([1, 0, 1, 0, 0])
    y, s = target.numpy(), scores.double().numpy()
    assert average_precision(scores, target) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert auroc(scores, target) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert threshold_at_tpr(scores, target) == 0.0


def test_ignore_index_none_and_bool_target():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    labels = torch.tensor([0, 1, 0, 1])
    expected = average_precision_score(labels.numpy(), scores.numpy())
    assert average_precision(scores, labels, ignore_index=None) == pytest.approx(expected)
    assert average_precision(scores, labels.bool()) == pytest.approx(expected)


def test_custom_ignore_index_drops_its_pixels():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 5.0])
    target = torch.tensor([0, 1, 0, 1, 2])
    assert auroc(scores, target, ignore_index=2) == roc_auc_score([0, 1, 0, 1], [0.3, 0.9, 0.1, 0.5])


def test_float64_scores_keep_full_precision():
    # Distinct in float64, equal in float32: the functional metrics must not round them.
    scores = torch.tensor([1.0 + 1e-12, 1.0, 0.5], dtype=torch.float64)
    target = torch.tensor([1, 0, 0])
    assert average_precision(scores, target) == 1.0
    assert auroc(scores, target) == 1.0


def test_no_anomaly_warns_and_returns_nan():
    scores, target = torch.rand(10), torch.zeros(10, dtype=torch.long)
    for metric in (average_precision, auroc, fpr_at_tpr, threshold_at_tpr):
        with pytest.warns(UserWarning, match="No anomaly pixels"):
            assert math.isnan(metric(scores, target))
    with pytest.warns(UserWarning, match="No anomaly pixels"):
        assert all(math.isnan(v) for v in best_f1_threshold(scores, target))


def test_no_inlier_warns_for_rates_but_keeps_ap():
    scores, target = torch.rand(10), torch.ones(10, dtype=torch.long)
    assert average_precision(scores, target) == 1.0
    with pytest.warns(UserWarning, match="No inlier pixels"):
        assert math.isnan(auroc(scores, target))
    with pytest.warns(UserWarning, match="No inlier pixels"):
        assert math.isnan(fpr_at_tpr(scores, target))


def test_only_ignored_pixels_warns():
    with pytest.warns(UserWarning, match="No anomaly pixels"):
        assert math.isnan(average_precision(torch.rand(4), torch.full((4,), 255)))


@pytest.mark.parametrize(
    ("scores", "target", "error", "match"),
    [
        (torch.rand(4), torch.zeros(5, dtype=torch.long), ValueError, "same shape"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), ValueError, "NaN"),
        (torch.rand(3), torch.tensor([0, 1, 7]), ValueError, r"\[7\]"),
        (torch.tensor([1, 2]), torch.tensor([0, 1]), TypeError, "floating"),
        (torch.rand(2), torch.tensor([0.0, 1.0]), TypeError, "integer"),
        ([0.1, 0.2], torch.tensor([0, 1]), TypeError, "torch.Tensor"),
    ],
)
def test_invalid_inputs_raise(scores, target, error, match):
    with pytest.raises(error, match=match):
        average_precision(scores, target)


@pytest.mark.parametrize(("tpr", "strict"), [(0.0, False), (1.5, False), (1.0, True), (True, False)])
def test_invalid_tpr_raises(tpr, strict):
    with pytest.raises(ValueError, match="`tpr`"):
        fpr_at_tpr(torch.rand(4), torch.tensor([0, 1, 0, 1]), tpr, strict=strict)


def test_ignore_index_colliding_with_classes_raises():
    with pytest.raises(ValueError, match="ignore_index"):
        auroc(torch.rand(4), torch.tensor([0, 1, 0, 1]), ignore_index=1)


def test_tpr_one_reaches_every_anomaly():
    scores = torch.tensor([0.9, 0.2, 0.5, 0.1])
    target = torch.tensor([1, 1, 0, 0])
    # TPR = 1 needs threshold 0.2, which also flags the inlier at 0.5.
    assert fpr_at_tpr(scores, target, 1.0) == 0.5
    assert threshold_at_tpr(scores, target, 1.0) == pytest.approx(0.2)


def test_strict_rule_skips_collinear_points_like_sklearn():
    # Each threshold adds one anomaly and one inlier: sklearn's ROC keeps only the end points of that segment.
    scores = torch.arange(20, 0, -1).float().repeat_interleave(2)
    target = torch.tensor([1, 0]).repeat(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, s = target.numpy(), scores.numpy()
        fpr, threshold = _released_densehybrid(y, s)
    assert fpr == 1.0  # the first kept point above TPR 0.95 is the last one
    assert fpr_at_tpr(scores, target, strict=True) == fpr
    assert threshold_at_tpr(scores, target, strict=True) == threshold
    assert fpr_at_tpr(scores, target) == 0.95  # the >= rule sees every point


@pytest.mark.parametrize("budget", [1, 7, 1 << 23])
def test_piecewise_exact_curve_equals_the_whole_sorted_curve(budget):
    # Pieces of at most `budget` pixels (and oversized single bins counted key by key) give the very same metrics.
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    from densehybrid.metrics import _exact

    g = torch.Generator().manual_seed(0)
    scores = (torch.randint(0, 40, (400,), generator=g).float() * 0.75 + 5).float()
    scores[:50] = 12.5  # one large tie
    target = (torch.rand(400, generator=g) < 0.3).long()
    target[::13] = 255
    curve = _exact.ExactCurve(_exact.tensor_chunks(scores, target, 255, chunk=64), budget=budget)
    keep = target != 255
    y, s = target[keep].numpy(), scores[keep].numpy()
    assert (curve.num_pos, curve.num_neg) == (int(y.sum()), int((y == 0).sum()))
    assert _exact.average_precision(curve.pieces(), curve.num_pos) == pytest.approx(average_precision_score(y, s))
    assert _exact.auroc(curve.pieces(), curve.num_pos, curve.num_neg) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, thresholds = roc_curve(y, s)
    for strict in (True, False):
        hit = (tpr > 0.95) if strict else (tpr >= 0.95)
        start = curve.first_bin_at_tpr(0.95, strict)
        threshold, fps = _exact.point_at_tpr(curve.pieces(start), curve.num_pos, 0.95, strict, True)
        assert threshold == thresholds[hit][0] and fps / curve.num_neg == fpr[hit][0]

"""SegmentMeIfYouCan binned pixel metrics against hand-computed cases, numpy and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from densehybrid.metrics import SmiycAnomalyMetrics
from densehybrid.metrics.smiyc import frame_bins, numpy_linear_quantiles


def _frame(scores: list[float], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(scores).reshape(1, 1, -1), torch.tensor(labels).reshape(1, 1, -1)


def test_frame_bins_hand_computed():
    # vmin 0.5, vmax 1, eps = max(0.01 * 0.5, 0.01) = 0.01; one quantile per class (the value itself).
    edges, anomaly, inlier = frame_bins(np.array([1.0, 0.5], dtype=np.float16), np.array([True, False]))
    assert edges.tolist() == [1.0, 0.5, 0.49]  # lower edges, highest first; 1.01 closes the top bin
    assert anomaly.tolist() == [1, 0, 0]
    assert inlier.tolist() == [0, 1, 0]


def test_eps_uses_the_float16_range_in_float64():
    # Range 2.0 -> eps = 0.02, computed in float64 (numpy 1.23 promotes the float16 range times a Python float).
    edges, _, _ = frame_bins(np.array([3.0, 1.0], dtype=np.float16), np.array([True, False]))
    assert edges[-1] == 1.0 - 0.02


def test_two_frames_sharing_the_top_edge_keep_the_partial_first_point():
    # Frame A: anomaly 1.0, inlier 0.5. Frame B: inlier 1.0, anomaly 0.25. Both frames' top edge is 1.0.
    # Sorted points (frame order on ties): A's top bin alone is kept as a first point (TP 1, FP 0), then
    # (1, 1), (1, 2) [edge 0.5], (1, 2) [0.49], (2, 2) [0.25], (2, 2) [0.24]; (0, 0) is prepended.
    # AP = 0.5 * 1 + 0.5 * 0.5 = 0.75; AUROC = 0.5; FPR95 = 1 at edge 0.25; best F1 2/3 first at edge 1.0.
    metric = SmiycAnomalyMetrics()
    metric.update(*_frame([1.0, 0.5], [1, 0]))
    metric.update(*_frame([1.0, 0.25], [0, 1]))
    result = metric.compute()
    assert result["ap"] == pytest.approx(0.75)
    assert result["auroc"] == pytest.approx(0.5)
    assert result["fpr95"] == 1.0
    assert result["threshold_at_tpr95"] == 0.25
    assert result["best_f1"] == pytest.approx(2 / 3)
    assert result["best_f1_threshold"] == 1.0
    # In the other frame order the partial point is an inlier (precision 0) and adds no recall: AP = 0.5.
    swapped = SmiycAnomalyMetrics()
    swapped.update(*_frame([1.0, 0.25], [0, 1]))
    swapped.update(*_frame([1.0, 0.5], [1, 0]))
    assert swapped.compute()["ap"] == pytest.approx(0.5)


def test_numpy_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32, np.float64):
        for size in (1, 2, 7, 500):
            values = np.sort(rng.normal(size=size).astype(dtype))
            levels = np.linspace(0, 1, min(384, size))
            expected = np.quantile(values, levels)
            assert np.array_equal(numpy_linear_quantiles(values, levels), expected), (dtype, size)


@pytest.mark.parametrize("seed", range(3))
def test_equals_exact_metrics_when_every_score_has_its_own_bin(seed):
    # Fewer than 384 distinct scores per class: every score becomes an edge and the binned curve is exact.
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(1, 10, 30, generator=g) < 0.3).long()
    scores = torch.round(torch.randn(1, 10, 30, generator=g) * 20) / 8 + target
    target[0, 0, :5] = 255
    metric = SmiycAnomalyMetrics(float16=False)
    metric.update(scores, target)
    result = metric.compute()
    keep = target != 255
    y, s = target[keep].numpy(), scores[keep].double().numpy()
    assert result["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert result["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert result["num_ignored"] == 5


def test_float16_rounding_is_applied_before_binning():
    # The anomaly (1.0001) outranks the inlier (1.0) in float32 but ties with it in float16.
    scores, target = _frame([1.0, 1.0001], [0, 1])
    as_float16 = SmiycAnomalyMetrics()
    as_float16.update(scores, target)
    assert as_float16.compute()["ap"] == pytest.approx(0.5)
    as_float32 = SmiycAnomalyMetrics(float16=False)
    as_float32.update(scores, target)
    assert as_float32.compute()["ap"] == 1.0


def test_state_does_not_depend_on_resolution():
    metric = SmiycAnomalyMetrics()
    g = torch.Generator().manual_seed(0)
    metric.update(torch.rand(1, 200, 300, generator=g), (torch.rand(1, 200, 300, generator=g) < 0.1).long())
    edges, anomaly, inlier = metric._frames[0]
    assert edges.size <= 769 and anomaly.size == edges.size and inlier.size == edges.size


def test_merge_and_chunks_equal_single_pass():
    g = torch.Generator().manual_seed(3)
    scores, target = torch.rand(3, 20, 20, generator=g), (torch.rand(3, 20, 20, generator=g) < 0.2).long()
    single = SmiycAnomalyMetrics()
    single.update(scores, target)
    left, right = SmiycAnomalyMetrics(), SmiycAnomalyMetrics()
    left.update(scores[:1], target[:1])
    right.update(scores[1:], target[1:])
    assert left.merge(right).compute() == single.compute()


def test_degenerate_and_invalid_inputs():
    metric = SmiycAnomalyMetrics()
    metric.update(torch.rand(1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.warns(UserWarning, match="No anomaly pixels"):
        assert math.isnan(metric.compute()["ap"])
    with pytest.raises(ValueError, match="float16"):
        SmiycAnomalyMetrics().update(torch.full((1, 2, 2), 1e6), torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        SmiycAnomalyMetrics().update(torch.full((1, 2, 2), float("inf")), torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_bins"):
        SmiycAnomalyMetrics(num_bins=1)
    with pytest.raises(ValueError, match="same configuration"):
        SmiycAnomalyMetrics().merge(SmiycAnomalyMetrics(float16=False))

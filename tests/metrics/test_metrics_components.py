"""SegmentMeIfYouCan component metrics against hand-computed frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densehybrid.metrics import COMPONENT_TRACKS, ComponentMetrics
from densehybrid.metrics.components import SIOU_THRESHOLDS


def _run(prediction: torch.Tensor, target: torch.Tensor, **kwargs) -> dict:
    kwargs.setdefault("min_segment_size", 1)
    kwargs.setdefault("min_instance_size", 1)
    metric = ComponentMetrics(0.5, **kwargs)
    metric.update(prediction.float()[None], target[None])
    return metric.compute()


def test_hand_computed_frame():
    target = torch.zeros(6, 8, dtype=torch.long)
    target[0:2, 0:2] = 1  # ground truth A, 4 px
    target[0:2, 5:7] = 1  # ground truth B, 4 px, missed
    prediction = torch.zeros(6, 8)
    prediction[0:2, 0:3] = 1  # covers A and 2 inlier px
    prediction[4:6, 4:6] = 1  # false positive, 4 inlier px
    result = _run(prediction, target)
    # sIoU(A) = 4 / (4 + 2), sIoU(B) = 0; PPV = 4/6 and 0.
    assert result["siou"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["ppv"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["siou_pred"] == pytest.approx((4 / 6 + 0) / 2)
    # t <= 0.65: TP 1, FN 1, FP 1 -> F1 1/2; t in {0.70, 0.75}: TP 0, FN 2, FP 2 -> F1 0.
    assert result["f1_25"] == pytest.approx(0.5) and result["f1_50"] == pytest.approx(0.5)
    assert result["f1_75"] == 0.0
    assert result["mean_f1"] == pytest.approx(9 * 0.5 / 11)
    assert result["num_gt_components"] == 2 and result["num_pred_components"] == 2


def test_prediction_spanning_two_instances_is_adjusted():
    target = torch.zeros(4, 9, dtype=torch.long)
    target[0:2, 0:3] = 1  # 6 px
    target[0:2, 6:9] = 1  # 6 px
    prediction = torch.zeros(4, 9)
    prediction[0:2, 1:8] = 1  # 4 px of the first, 4 of the second, 6 inlier px in between
    result = _run(prediction, target)
    # The other instance's pixels are removed from the union: sIoU = 4 / (6 + 6) for both.
    assert result["siou"] == pytest.approx(4 / 12)
    # One prediction of 14 px, 8 on anomalies; its union adds the 2 + 2 uncovered anomaly px.
    assert result["ppv"] == pytest.approx(8 / 14)
    assert result["siou_pred"] == pytest.approx(8 / 18)


def test_components_are_eight_connected():
    target = torch.zeros(4, 4, dtype=torch.long)
    target[0, 0] = target[1, 1] = 1  # diagonal neighbours: one component
    result = _run(target.clone(), target)
    assert result["num_gt_components"] == 1 and result["siou"] == 1.0


def test_size_limits_remove_small_predictions_and_void_small_instances():
    target = torch.zeros(10, 10, dtype=torch.long)
    target[0:3, 0:3] = 1  # 9 px instance, kept
    target[8, 8] = 1  # 1 px instance, below min_instance_size -> void
    prediction = torch.zeros(10, 10)
    prediction[0:3, 0:3] = 1
    prediction[5, 0:2] = 1  # 2 px false positive, below min_segment_size -> removed
    prediction[8, 8] = 1  # lies on the voided instance only -> not evaluated
    result = _run(prediction, target, min_segment_size=3, min_instance_size=2)
    assert result["num_gt_components"] == 1 and result["num_pred_components"] == 1
    assert result["siou"] == 1.0 and result["ppv"] == 1.0 and result["mean_f1"] == 1.0


def test_void_pixels_are_outside_the_region_of_interest():
    target = torch.zeros(4, 6, dtype=torch.long)
    target[0:2, 0:2] = 1
    target[:, 4:] = 255
    prediction = torch.zeros(4, 6)
    prediction[0:2, 0:2] = 1
    prediction[:, 4:] = 1  # void: ignored
    assert _run(prediction, target)["ppv"] == 1.0


def test_threshold_is_strict_and_rounded_to_float16():
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    target[..., :2] = 1
    scores = torch.tensor([[[0.5, 0.53005, 0.0, 0.0]]])
    # 0.53005 rounds to the float16 0.5303 (as does the threshold): not strictly above it.
    at_float16 = ComponentMetrics(0.53005, min_segment_size=1, min_instance_size=1)
    at_float16.update(scores, target)
    assert at_float16.compute()["num_pred_components"] == 0
    at_float64 = ComponentMetrics(0.53, min_segment_size=1, min_instance_size=1, float16=False)
    at_float64.update(scores, target)
    assert at_float64.compute()["num_pred_components"] == 1


def test_track_presets():
    assert COMPONENT_TRACKS == {"anomaly": (500, 100), "obstacle": (50, 10)}
    metric = ComponentMetrics(0.0, track="obstacle")
    assert (metric.min_segment_size, metric.min_instance_size) == (50, 10)
    assert np.allclose(SIOU_THRESHOLDS, [0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75])


def test_merge_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 24, 24, generator=g)
    target = (torch.rand(3, 24, 24, generator=g) < 0.3).long()
    single = ComponentMetrics(0.7, min_segment_size=2, min_instance_size=2)
    single.update(scores, target)
    left = ComponentMetrics(0.7, min_segment_size=2, min_instance_size=2)
    right = ComponentMetrics(0.7, min_segment_size=2, min_instance_size=2)
    left.update(scores[:2], target[:2])
    right.update(scores[2:], target[2:])
    merged = left.merge(right).compute()
    for key, value in single.compute().items():
        assert merged[key] == pytest.approx(value, abs=1e-12), key


def test_no_ground_truth_warns_and_returns_nan():
    metric = ComponentMetrics(0.5, min_segment_size=1, min_instance_size=1)
    metric.update(torch.ones(1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.warns(UserWarning, match="No ground-truth anomaly components"):
        result = metric.compute()
    assert math.isnan(result["siou"]) and math.isnan(result["mean_f1"])
    assert result["ppv"] == 0.0


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="Available: anomaly, obstacle"):
        ComponentMetrics(0.5, track="lost_and_found")
    with pytest.raises(ValueError, match="threshold"):
        ComponentMetrics(float("nan"))
    with pytest.raises(ValueError, match="min_segment_size"):
        ComponentMetrics(0.5, min_segment_size=-1)

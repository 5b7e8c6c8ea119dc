"""Protocol options on hand-made inputs where the conventions give different numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_curve

from densehybrid.metrics import AnomalyMetrics, ConfusionMatrix, PerImageAnomalyMetrics, open_miou
from densehybrid.openset import calibrate_threshold


def _ranked(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores n-1, ..., 0 for the labels in rank order (highest score first), as (1, 1, n) tensors."""
    n = len(labels)
    scores = torch.arange(n - 1, -1, -1, dtype=torch.float32)
    return scores.view(1, 1, n), torch.tensor(labels).view(1, 1, n)


# 20 anomalies: TPR reaches exactly 0.95 after the 19th; three inliers rank between the 19th and the 20th.
LABELS = [1] * 10 + [0] + [1] * 9 + [0, 0, 0] + [1] + [0] * 6


def test_fpr95_rules_differ_and_match_their_references():
    scores, target = _ranked(LABELS)
    y, s = target.flatten().numpy(), scores.flatten().numpy()
    results = {}
    for rule in ("at_least", "above"):
        metric = AnomalyMetrics(fpr95_rule=rule)
        metric.update(scores, target)
        results[rule] = metric.compute()
        assert results[rule]["fpr95_rule"] == rule and results[rule]["exact"]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert results["at_least"]["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)]) == 1 / 10
    fpr, tpr, _ = roc_curve(y, s)  # the released Fishyscapes code walks the default (dropped) curve
    assert results["above"]["fpr95"] == pytest.approx(fpr[np.argmax(tpr > 0.95)]) == 4 / 10
    # AP and AUROC do not depend on the rule
    assert results["at_least"]["ap"] == results["above"]["ap"] == pytest.approx(average_precision_score(y, s))


def test_fpr95_rule_is_checked_and_part_of_the_merge_config():
    with pytest.raises(ValueError, match="fpr95_rule"):
        AnomalyMetrics(fpr95_rule=">=")
    with pytest.raises(ValueError):
        AnomalyMetrics(fpr95_rule="above").merge(AnomalyMetrics(fpr95_rule="at_least"))


def test_calibration_at_least_on_the_dropped_roc_curve_is_the_released_coco_rule():
    # 20 anomalies ranked first, one per score: their ROC points are collinear (FPR 0), so scikit-learn's roc_curve
    # keeps only the last, and the released ">= 0.95" lands on the 20th anomaly instead of the 19th.
    labels = [1] * 20 + [0] * 5
    scores, target = _ranked(labels)
    y, s = target.flatten().numpy(), scores.flatten().numpy()
    _, tpr, thresholds = roc_curve(y, s)
    released = float(thresholds[np.argmax(tpr >= 0.95)])
    full = calibrate_threshold([(scores, target)], target_tpr=0.95, strict=False, drop_intermediate=False)
    dropped = calibrate_threshold([(scores, target)], target_tpr=0.95, strict=False, drop_intermediate=True)
    assert dropped == released and full != dropped


def test_per_image_ap_of_frames_without_anomalies_by_name():
    scores = torch.tensor([[[0.9, 0.8, 0.7, 0.1]], [[0.5, 0.4, 0.3, 0.2]]])
    target = torch.tensor([[[1, 0, 1, 0]], [[0, 0, 0, 0]]])  # the second frame has no anomaly
    first_ap = average_precision_score([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    values = {}
    for convention in ("zero", "skip"):
        metric = PerImageAnomalyMetrics(no_anomaly_ap=convention)
        metric.update(scores, target)
        values[convention] = metric.compute()
        assert values[convention]["no_anomaly_ap"] == convention
    assert values["zero"]["ap"] == pytest.approx(first_ap / 2)  # scikit-learn >= 1.1: AP 0 counted
    assert values["skip"]["ap"] == pytest.approx(first_ap)  # scikit-learn < 1.1: NaN, skipped by nanmean
    for name in ("auroc", "fpr95"):  # the other metrics do not depend on it
        assert values["zero"][name] == values["skip"][name]
    with pytest.raises(ValueError, match="no_anomaly_ap"):
        PerImageAnomalyMetrics(no_anomaly_ap="nan")


def test_open_miou_nan_iou_conventions():
    # K = 3; class 2 never appears in targets or predictions: its IoU is NaN.
    pred = torch.tensor([[[0, 0, 1, 3]]])
    target = torch.tensor([[[0, 1, 1, 3]]])
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(pred, target)
    skip, zero = matrix.compute(nan_iou="skip"), matrix.compute(nan_iou="zero")
    assert math.isnan(skip["open_iou"][2]) and math.isnan(zero["open_iou"][2])
    assert skip["open_miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # ECCV nanmean over the present classes
    assert zero["open_miou"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)  # TPAMI-era scripts: NaN -> 0
    assert skip["miou"] == zero["miou"]  # the closed-set mean is not affected
    assert open_miou(pred, target, 3, nan_iou="zero") == zero["open_miou"]
    with pytest.raises(ValueError, match="nan_iou"):
        matrix.compute(nan_iou="nan")

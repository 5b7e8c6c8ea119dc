"""Per-image protocol against scikit-learn re-statements of the two reference evaluations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, roc_auc_score, roc_curve

from densehybrid.metrics import PerImageAnomalyMetrics


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six 12x16 images: normal ones, one without anomalies, one only anomalies, one fully ignored, heavy ties."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(6, 12, 16, generator=g) < 0.2).long()
    scores = torch.randn(6, 12, 16, generator=g) + target
    target[1] = 0  # no anomaly
    target[2] = 1  # only anomalies
    target[3] = 255  # nothing evaluated
    scores[4] = torch.round(scores[4])  # ties
    target[:, 0, :4] = torch.where(torch.arange(6)[:, None] == 3, 255, target[:, 0, :4])
    target[0, 1, :3] = 255
    return scores, target


def _densehybrid_reference(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    # evaluations/base.py::calculate_ood_scores_per_image: sklearn per image, nanmean over images.
    aps, aurocs, fprs = [], [], []
    for image_scores, image_target in zip(scores, target):
        keep = image_target != 255
        y, s = image_target[keep].numpy(), image_scores[keep].double().numpy()
        if y.size == 0:
            continue  # the released code would fail here; the library skips the image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aps.append(average_precision_score(y, s))
            fpr, tpr, _ = roc_curve(y, s)
            aurocs.append(auc(fpr, tpr))
            fpr_best = 0
            for rate, false_rate in zip(tpr, fpr):
                if rate > 0.95:
                    fpr_best = false_rate
                    break
            fprs.append(fpr_best)
    return {"ap": np.nanmean(aps), "auroc": np.nanmean(aurocs), "fpr95": np.nanmean(fprs)}


def _streethazards_reference(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    # hendrycks/anomaly-seg: skip images lacking a class; FPR at the recall closest to 0.95.
    aps, aurocs, fprs = [], [], []
    for image_scores, image_target in zip(scores, target):
        keep = image_target != 255
        y, s = image_target[keep].numpy(), image_scores[keep].double().numpy()
        if y.sum() == 0 or y.sum() == y.size:
            continue
        aps.append(average_precision_score(y, s))
        aurocs.append(roc_auc_score(y, s))
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        last = int(np.argmax(tpr == 1.0))  # first point reaching every anomaly
        distance = np.abs(tpr[1 : last + 1] - 0.95)
        candidates = np.flatnonzero(distance == distance.min()) + 1
        fprs.append(fpr[candidates[-1]])  # lowest threshold among the closest
    return {"ap": np.mean(aps), "auroc": np.mean(aurocs), "fpr95": np.mean(fprs)}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("variant", "reference"),
    [("densehybrid", _densehybrid_reference), ("streethazards", _streethazards_reference)],
)
def test_matches_reference(seed, variant, reference):
    scores, target = _batch(seed)
    metric = PerImageAnomalyMetrics(variant=variant)
    metric.update(scores, target)
    result = metric.compute()
    expected = reference(scores, target)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["num_images"] == 6
    assert result["num_images_without_anomaly"] == 2  # the empty-ish image and the fully ignored one
    assert result["num_images_skipped"] == (1 if variant == "densehybrid" else 3)


def test_densehybrid_counts_images_without_anomalies_as_zero_ap():
    scores = torch.tensor([[[0.9, 0.1]], [[0.3, 0.2]]])
    target = torch.tensor([[[1, 0]], [[0, 0]]])
    metric = PerImageAnomalyMetrics()
    metric.update(scores, target)
    result = metric.compute()
    assert result["ap"] == 0.5  # (1 + 0) / 2
    assert result["fpr95"] == 0.0  # (0 + 0) / 2
    assert result["auroc"] == 1.0  # the second image is skipped
    streethazards = PerImageAnomalyMetrics(variant="streethazards")
    streethazards.update(scores, target)
    assert streethazards.compute()["ap"] == 1.0


def test_closest_rule_prefers_the_lower_threshold_on_ties():
    # Ranking: 9 anomalies, 2 inliers, 1 anomaly, 2 inliers. TPR 0.9 (three points, FPR 0, 1/4, 2/4) is closer to
    # 0.95 than TPR 1.0 in float64; among the three the original code takes the lowest threshold.
    scores = torch.tensor([20.0, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7]).reshape(1, 1, -1)
    target = torch.tensor([1] * 9 + [0, 0, 1, 0, 0]).reshape(1, 1, -1)
    metric = PerImageAnomalyMetrics(variant="streethazards")
    metric.update(scores, target)
    assert metric.compute()["fpr95"] == 0.5
    expected = _streethazards_reference(scores, target)["fpr95"]
    assert expected == 0.5


def test_chunks_and_merge_equal_single_pass():
    scores, target = _batch(1)
    single = PerImageAnomalyMetrics()
    single.update(scores, target)
    left, right = PerImageAnomalyMetrics(), PerImageAnomalyMetrics()
    left.update(scores[:2], target[:2])
    right.update(scores[2:4], target[2:4])
    right.update(scores[4:], target[4:])
    merged = left.merge(right).compute()
    expected = single.compute()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value), key


def test_no_anomaly_anywhere_warns_and_returns_nan():
    metric = PerImageAnomalyMetrics()
    metric.update(torch.rand(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.warns(UserWarning, match="No anomaly pixels"):
        result = metric.compute()
    assert math.isnan(result["ap"]) and math.isnan(result["fpr95"])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="Available: densehybrid, streethazards"):
        PerImageAnomalyMetrics(variant="hendrycks")
    with pytest.raises(ValueError, match="same shape"):
        PerImageAnomalyMetrics().update(torch.rand(1, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="same configuration"):
        PerImageAnomalyMetrics().merge(PerImageAnomalyMetrics(variant="streethazards"))


def test_dicnet_variant_counts_void_pixels_as_inliers_as_released():
    # The released DiCNet evaluation has no ignore label; ids voided by --void-unknown-ids are inliers there too.
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 16, 16, generator=g)
    target = (torch.rand(2, 16, 16, generator=g) < 0.2).long()
    target[:, :4] = 255
    scores[:, :4] += 3.0  # void pixels score high: dropping them or counting them as inliers differs
    released = PerImageAnomalyMetrics(variant="dicnet")
    released.update(scores, target)
    inliers = PerImageAnomalyMetrics(variant="dicnet")
    inliers.update(scores, target.masked_fill(target == 255, 0))
    dropped = PerImageAnomalyMetrics(variant="streethazards")
    dropped.update(scores, target)
    result, expected = released.compute(), inliers.compute()
    assert result["num_ignored"] == 0
    assert all(result[key] == expected[key] for key in ("ap", "auroc", "fpr95"))
    assert result["ap"] != dropped.compute()["ap"]

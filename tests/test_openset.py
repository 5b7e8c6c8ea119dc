from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_curve

from densehybrid.models import create_model
from densehybrid.openset import OpenSetModel, calibrate_threshold, open_set_labels, predict_open_set


def test_predict_open_set_overrides_only_pixels_above_the_threshold():
    logits = torch.randn(2, 3, 4, 5)
    scores = torch.randn(2, 4, 5)
    pred = predict_open_set(logits, scores, threshold=0.3)
    closed = logits.argmax(1)
    assert torch.equal(pred[scores > 0.3], torch.full_like(pred[scores > 0.3], 3))
    assert torch.equal(pred[scores <= 0.3], closed[scores <= 0.3])


def test_predict_open_set_rejects_mismatched_and_nan_scores():
    with pytest.raises(ValueError, match="scores"):
        predict_open_set(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 5), 0.0)
    bad = torch.zeros(1, 4, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        predict_open_set(torch.randn(1, 3, 4, 4), bad, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_tpr_calibration_matches_sklearn_roc_curve(seed):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(3, 20, 20, generator=g) < 0.2).long()
    target[0, :2] = 255
    scores = torch.randn(3, 20, 20, generator=g) + 1.5 * target.clamp(max=1)
    batches = [(scores[i : i + 1], target[i : i + 1]) for i in range(3)]
    valid = target.flatten() != 255
    y, s = target.flatten()[valid].numpy(), scores.flatten()[valid].numpy()
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    expected_ge = thresholds[np.argmax(tpr >= 0.95)]
    assert calibrate_threshold(batches, target_tpr=0.95, strict=False) == pytest.approx(expected_ge, abs=1e-5)
    # the released code's rule: first point with TPR strictly above the target
    fpr, tpr, thresholds = roc_curve(y, s)
    expected_gt = thresholds[np.argmax(tpr > 0.95)]
    assert calibrate_threshold(batches, target_tpr=0.95, strict=True) == pytest.approx(expected_gt, abs=1e-5)


def _sklearn_threshold(y: np.ndarray, s: np.ndarray, strict: bool) -> float:
    """The released rules on scikit-learn's roc_curve: first TPR > 0.95 (StreetHazards) or >= 0.95 (COCO)."""
    _, tpr, thresholds = roc_curve(y, s)
    return float(thresholds[(tpr > 0.95) if strict else (tpr >= 0.95)][0])


def _hand_made_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cases = {}
    # Ties at every score, DenseHybrid-like magnitudes.
    s = np.repeat(np.array([40.0, 31.5, 22.25, 17.0, 12.5, 9.0, 5.0], np.float32), 20)
    y = np.zeros(s.size, np.int64)
    y[::3] = 1
    cases["ties"] = (s, y)
    # Collinear runs: one anomaly per distinct score across the crossing (scikit-learn drops the inner points), then
    # equal (1 anomaly, 1 inlier) steps, then inliers only.
    run = np.linspace(39.0, 20.0, 40, dtype=np.float32)
    pairs = np.repeat(np.linspace(19.5, 10.0, 20, dtype=np.float32), 2)
    low = np.linspace(9.5, 5.0, 30, dtype=np.float32)
    s = np.concatenate([run, pairs, low])
    y = np.concatenate([np.ones(40, np.int64), np.tile([1, 0], 20), np.zeros(30, np.int64)])
    cases["collinear"] = (s, y)
    # Collinear runs exactly where TPR reaches 0.95: 60 anomalies one per score, the 57th is the crossing.
    s = np.concatenate([np.linspace(40.0, 10.0, 60, dtype=np.float32), np.linspace(9.0, 5.0, 10, dtype=np.float32)])
    y = np.concatenate([np.ones(60, np.int64), np.zeros(10, np.int64)])
    cases["collinear_at_crossing"] = (s, y)
    # Many close float32 scores of magnitude 5-40 with ties (what the binned state could not tell apart).
    rng = np.random.default_rng(0)
    s = (5 + 35 * rng.random(60_000)).astype(np.float32)
    s[::7] = s[1::7][: s[::7].size]
    y = (rng.random(s.size) < 0.1 + 0.8 * (s > 30)).astype(np.int64)
    cases["dense_5_40"] = (s, y)
    return cases


@pytest.mark.parametrize("name", ["ties", "collinear", "collinear_at_crossing", "dense_5_40"])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("memory_pixels", [1 << 24, 50])
def test_tpr_calibration_equals_sklearn_roc_curve_rule_exactly(name, strict, memory_pixels):
    s, y = _hand_made_cases()[name]
    y = y.copy()
    target = torch.from_numpy(y.copy())
    target[::11] = 255  # void pixels are left out
    keep = target.numpy() != 255
    expected = _sklearn_threshold(y[keep], s[keep], strict)
    scores = torch.from_numpy(s)
    batches = [(scores[i : i + 997][None, None], target[i : i + 997][None, None]) for i in range(0, s.size, 997)]
    # StreetHazards: strict=True (drop_intermediate follows); COCO: >= on the same thinned roc_curve.
    threshold = calibrate_threshold(
        batches, target_tpr=0.95, strict=strict, drop_intermediate=True, memory_pixels=memory_pixels
    )
    assert threshold == expected  # exactly: the same float32 score


def test_f1_calibration_maximises_pixel_f1():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(1, 30, 30, generator=g) < 0.3).long()
    scores = torch.randn(1, 30, 30, generator=g) + 2 * target
    threshold = calibrate_threshold([(scores, target)], method="f1")
    y, s = target.flatten().numpy(), scores.flatten().numpy()
    best = max(f1_score(y, s >= t) for t in np.unique(s))
    assert f1_score(y, s >= threshold) == pytest.approx(best)


def test_calibration_errors():
    with pytest.raises(ValueError, match="method"):
        calibrate_threshold([], method="auc")
    with pytest.raises(ValueError, match="anomaly pixels"):
        calibrate_threshold([(torch.randn(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))])


def test_open_set_model_bundles_model_score_and_threshold():
    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        result = OpenSetModel(model, "densehybrid", threshold=-1e30)(images, return_outputs=True)
        none = OpenSetModel(model, "msp")(images)
    assert result.scores.shape == (1, 64, 64) and result.scores.dtype == torch.float32
    assert torch.all(result.labels == 3)  # every finite score passes the threshold
    assert torch.equal(result.closed_set, result.outputs.logits.argmax(1))
    assert torch.equal(none.labels, none.closed_set) and none.outputs is None
    with pytest.raises(ValueError, match="finite number"):
        OpenSetModel(model, threshold=float("nan"))


def test_the_open_set_rule_is_strictly_above_the_threshold():
    closed = torch.tensor([[[0, 1, 2]]])
    scores = torch.tensor([[[0.5, 1.0, 1.5]]])
    assert open_set_labels(closed, scores, 1.0, 3).tolist() == [[[0, 1, 3]]]
    assert open_set_labels(closed, scores, None, 3).tolist() == [[[0, 1, 2]]]

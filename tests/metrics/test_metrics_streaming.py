"""Pooled streaming metrics (AnomalyMetrics) against the exact functional metrics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from densehybrid.metrics import (
    PROTOCOLS,
    AnomalyMetrics,
    ComponentMetrics,
    ConfusionMatrix,
    PerImageAnomalyMetrics,
    SmiycAnomalyMetrics,
    anomaly_metrics,
    auroc,
    average_precision,
    best_f1_threshold,
    fpr_at_tpr,
    threshold_at_tpr,
)

TOLERANCE = 1e-4


def _exact(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    scores = scores.float()  # the pooled state ranks float32 values
    return {
        "ap": average_precision(scores, target),
        "auroc": auroc(scores, target),
        "fpr95": fpr_at_tpr(scores, target),
        "threshold_at_tpr95": threshold_at_tpr(scores, target),
        "best_f1": best_f1_threshold(scores, target)[1],
    }


def _pooled(scores: torch.Tensor, target: torch.Tensor, **kwargs) -> dict:
    metric = AnomalyMetrics(**kwargs)
    metric.update(scores, target)
    return metric.compute()


@pytest.fixture(scope="module")
def shared_metric() -> AnomalyMetrics:
    # One default-size (2**24 bins) metric reused across cases: allocation dominates the cost of a fresh one.
    return AnomalyMetrics()


def test_agrees_with_exact_within_tolerance(case, shared_metric):
    _, scores, target = case
    shared_metric.reset()
    shared_metric.update(scores, target)
    result = shared_metric.compute()
    exact = _exact(scores, target)
    for key in ("ap", "auroc", "fpr95", "best_f1"):
        assert abs(result[key] - exact[key]) <= TOLERANCE, key
    for key in ("ap", "auroc", "fpr95"):
        assert abs(result[key] - exact[key]) <= result[f"{key}_error_bound"] + 1e-12, key
    assert result["num_anomaly"] == int((target == 1).sum())
    assert result["num_inlier"] == int((target == 0).sum())
    assert result["num_ignored"] == int((target == 255).sum())


@pytest.mark.parametrize("kind", ["ties", "all_equal", "signed_zeros", "float16"])
def test_tied_and_half_precision_scores_are_exact(case_factory, kind):
    scores, target = case_factory(kind, seed=7)
    result = _pooled(scores, target)
    exact = _exact(scores, target)
    for key, value in exact.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["exact"] is True
    assert result["ap_error_bound"] == result["auroc_error_bound"] == result["fpr95_error_bound"] == 0.0


def test_float32_scores_in_separate_bins_are_reported_exact():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(1, 30, 40, generator=g) < 0.3).long()
    scores = (torch.round(torch.randn(1, 30, 40, generator=g) * 100) + 100 * target) / 100  # float32 k / 100
    result = _pooled(scores, target)
    assert result["exact"] is True and result["ap_error_bound"] == 0.0
    assert result["ap"] == pytest.approx(average_precision(scores, target), abs=1e-12)
    assert result["fpr95"] == pytest.approx(fpr_at_tpr(scores, target), abs=1e-12)


def test_bfloat16_is_exact_with_sixteen_bits(case_factory):
    scores, target = case_factory("continuous", seed=3)
    scores = scores.bfloat16()
    result = _pooled(scores, target, bits=16)
    assert result["exact"] is True
    assert result["ap_error_bound"] == 0.0
    assert result["ap"] == pytest.approx(average_precision(scores.float(), target), abs=1e-12)
    assert result["threshold_at_tpr95"] == threshold_at_tpr(scores.float(), target)


@pytest.mark.parametrize("seed", range(6))
def test_error_bounds_hold_when_bins_are_coarse(case_factory, seed):
    # 12-bit bins are 2**-3 wide relative to the score: many distinct scores share a bin.
    scores, target = case_factory("continuous", seed=seed, shape=(1, 40, 50))
    scores = 1.0 + scores * 1e-3
    result = _pooled(scores, target, bits=12)
    exact = _exact(scores, target)
    assert result["exact"] is False
    moved = 0.0
    for key in ("ap", "auroc", "fpr95"):
        error = abs(result[key] - exact[key])
        assert error <= result[f"{key}_error_bound"] + 1e-12, key
        moved = max(moved, error)
    assert moved > TOLERANCE  # the case really is coarse: the bounds are exercised, not trivially zero


def test_threshold_reproduces_the_reported_operating_point(case_factory):
    scores, target = case_factory("continuous", seed=11, shape=(1, 64, 64))
    result = _pooled(scores, target, bits=14)
    valid = target != 255
    predicted = scores >= result["threshold_at_tpr95"]
    tpr = int((predicted & (target == 1)).sum()) / int((target == 1).sum())
    fpr = int((predicted & (target == 0)).sum()) / int((target == 0).sum())
    assert tpr >= 0.95
    assert fpr == pytest.approx(result["fpr95"], abs=1e-12)
    assert bool((scores[valid] == result["threshold_at_tpr95"]).any())  # an evaluated score, not a bin edge


def test_chunked_updates_equal_one_shot(case_factory):
    scores, target = case_factory("continuous", seed=5, shape=(6, 20, 30))
    one_shot = _pooled(scores, target, bits=20)
    chunked = AnomalyMetrics(bits=20)
    for index in range(6):
        chunked.update(scores[index : index + 1], target[index : index + 1])
    assert chunked.compute() == one_shot


def test_merge_equals_single_pass(case_factory):
    scores, target = case_factory("ties", seed=2, shape=(4, 20, 30))
    single = _pooled(scores, target, bits=20)
    left, right = AnomalyMetrics(bits=20), AnomalyMetrics(bits=20)
    left.update(scores[:1], target[:1])
    right.update(scores[1:], target[1:])
    assert left.merge(right).compute() == single
    empty = AnomalyMetrics(bits=20)
    assert empty.merge(left).compute() == single


def test_large_batch_uses_several_cpu_chunks(case_factory):
    # More pixels than several vectorised CPU steps (2**15 each) to cover the chunk loop.
    scores, target = case_factory("float16", seed=1, shape=(1, 300, 400))
    result = _pooled(scores, target, bits=19)
    assert result["exact"] is True
    assert result["ap"] == pytest.approx(average_precision(scores, target), abs=1e-12)
    assert result["fpr95"] == pytest.approx(fpr_at_tpr(scores, target), abs=1e-12)


def test_state_size_is_fixed():
    metric = AnomalyMetrics(bits=16)
    sizes = None
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        metric.update(torch.randn(2, 50, 60, generator=g), torch.randint(0, 2, (2, 50, 60), generator=g))
        current = {name: tensor.numel() for name, tensor in metric._state.items()}
        assert sizes in (None, current)
        sizes = current
    assert sizes["bins"] == 4 * ((1 << 16) + 1)
    assert metric.compute()["num_anomaly"] + metric.compute()["num_inlier"] == 3 * 2 * 50 * 60


@pytest.mark.parametrize(
    "metric",
    [
        AnomalyMetrics(bits=16),
        PerImageAnomalyMetrics(),
        SmiycAnomalyMetrics(),
        ComponentMetrics(0.5, min_segment_size=1, min_instance_size=1),
        ConfusionMatrix(num_classes=2),
    ],
    ids=lambda metric: type(metric).__name__,
)
def test_update_does_not_modify_its_inputs(case_factory, metric):
    scores, target = case_factory("continuous", seed=8)
    scores_copy, target_copy = scores.clone(), target.clone()
    if isinstance(metric, ConfusionMatrix):
        metric.update(target.clamp(max=2), target)
    else:
        metric.update(scores, target)
    assert torch.equal(scores, scores_copy) and torch.equal(target, target_copy)


def test_int32_counts_are_flushed_before_they_could_overflow(case_factory, monkeypatch):
    import densehybrid.metrics.streaming as streaming

    scores, target = case_factory("ties", seed=3, shape=(3, 20, 30))
    expected = _pooled(scores, target, bits=16)
    monkeypatch.setattr(streaming, "_INT32_MAX", 700)  # flush after (almost) every 600-pixel frame
    monkeypatch.setattr(streaming, "_CPU_CHUNK", 600)
    metric = AnomalyMetrics(bits=16)
    for index in range(3):
        metric.update(scores[index : index + 1], target[index : index + 1])
        assert int(metric._state["pending"]) <= 700
    assert metric.compute() == expected


def test_reset_forgets_updates(case_factory):
    scores, target = case_factory("continuous", seed=0)
    metric = AnomalyMetrics(bits=16)
    metric.update(scores, target)
    metric.reset()
    metric.update(scores[:1], target[:1])
    assert metric.compute() == _pooled(scores[:1], target[:1], bits=16)


def test_validate_args_off_gives_the_same_result(case_factory):
    scores, target = case_factory("continuous", seed=4)
    assert _pooled(scores, target, bits=16, validate_args=False) == _pooled(scores, target, bits=16)


def test_custom_ignore_index_and_uint8_target(case_factory):
    scores, target = case_factory("continuous", seed=6)
    expected = _pooled(scores, target, bits=16)
    relabelled = torch.where(target == 255, 2, target)
    result = _pooled(scores, relabelled, bits=16, ignore_index=2)
    assert result == expected
    assert _pooled(scores, target.to(torch.uint8), bits=16) == expected
    valid = target != 255
    as_bool = _pooled(scores[valid].reshape(1, 1, -1), (target[valid] == 1).reshape(1, 1, -1), bits=16)
    assert as_bool["ap"] == expected["ap"] and as_bool["num_ignored"] == 0


def test_no_anomaly_warns_and_returns_nan():
    metric = AnomalyMetrics(bits=16)
    metric.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.warns(UserWarning, match="No anomaly pixels"):
        result = metric.compute()
    assert all(math.isnan(result[key]) for key in ("ap", "auroc", "fpr95", "threshold_at_tpr95"))
    assert result["num_inlier"] == 16


def test_nothing_seen_warns_and_returns_nan():
    with pytest.warns(UserWarning, match="No anomaly pixels"):
        result = AnomalyMetrics(bits=16).compute()
    assert math.isnan(result["ap"]) and result["num_anomaly"] == 0


def test_no_inlier_keeps_ap_and_warns_for_auroc():
    metric = AnomalyMetrics(bits=16)
    metric.update(torch.rand(1, 3, 3), torch.ones(1, 3, 3, dtype=torch.long))
    with pytest.warns(UserWarning, match="No inlier pixels"):
        result = metric.compute()
    assert result["ap"] == 1.0
    assert math.isnan(result["auroc"]) and math.isnan(result["fpr95"])


@pytest.mark.parametrize(
    ("scores", "target", "error", "match"),
    [
        (torch.rand(1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), ValueError, "same shape"),
        (torch.rand(4, 4), torch.zeros(4, 4, dtype=torch.long), ValueError, r"\(N, H, W\)"),
        (torch.full((1, 2, 2), float("nan")), torch.zeros(1, 2, 2, dtype=torch.long), ValueError, "NaN"),
        (torch.rand(1, 2, 2), torch.full((1, 2, 2), 3), ValueError, r"\[3\]"),
        (torch.rand(1, 2, 2), torch.full((1, 2, 2), -3, dtype=torch.int32), ValueError, r"\[-3\]"),
    ],
)
def test_invalid_inputs_raise(scores, target, error, match):
    with pytest.raises(error, match=match):
        AnomalyMetrics(bits=16).update(scores, target)


def test_invalid_input_leaves_state_untouched():
    metric = AnomalyMetrics(bits=16)
    metric.update(torch.tensor([[[0.9, 0.1]]]), torch.tensor([[[1, 0]]]))
    before = metric.compute()
    with pytest.raises(ValueError):
        metric.update(torch.tensor([[[0.5, float("nan")]]]), torch.tensor([[[1, 0]]]))
    assert metric.compute() == before


@pytest.mark.parametrize("bits", [11, 29, 20.0, True])
def test_invalid_bits_raise(bits):
    with pytest.raises(ValueError, match="`bits`"):
        AnomalyMetrics(bits=bits)


def test_merge_rejects_other_kinds_and_configurations():
    with pytest.raises(ValueError, match="same configuration"):
        AnomalyMetrics(bits=16).merge(AnomalyMetrics(bits=18))
    with pytest.raises(TypeError, match="AnomalyMetrics"):
        AnomalyMetrics(bits=16).merge(PerImageAnomalyMetrics())


def test_sync_without_process_group_is_a_no_op(case_factory):
    scores, target = case_factory("continuous", seed=9)
    metric = AnomalyMetrics(bits=16)
    metric.update(scores, target)
    assert metric.sync().compute() == _pooled(scores, target, bits=16)


def test_protocol_factory():
    assert set(PROTOCOLS) == {"pooled", "per_image", "smiyc"}
    assert isinstance(anomaly_metrics(), AnomalyMetrics)
    assert anomaly_metrics("pooled", bits=16).bits == 16
    assert anomaly_metrics("per_image", variant="streethazards").variant == "streethazards"
    assert isinstance(anomaly_metrics("smiyc"), SmiycAnomalyMetrics)
    with pytest.raises(ValueError, match="Available: per_image, pooled, smiyc"):
        anomaly_metrics("fishyscapes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu(case_factory):
    scores, target = case_factory("continuous", seed=12, shape=(2, 64, 64))
    metric = AnomalyMetrics(bits=20)
    metric.update(scores.cuda(), target.cuda())
    assert metric.device.type == "cuda"
    assert metric.compute() == _pooled(scores, target, bits=20)


def test_threshold_methods_equal_the_functional_ones():
    from densehybrid.metrics import AnomalyMetrics, best_f1_threshold, threshold_at_tpr

    g = torch.Generator().manual_seed(5)
    target = (torch.rand(2, 16, 16, generator=g) < 0.25).long()
    scores = torch.randn(2, 16, 16, generator=g) + target
    metric = AnomalyMetrics()
    metric.update(scores, target)
    for strict in (False, True):
        assert metric.threshold_at_tpr(0.9, strict=strict) == threshold_at_tpr(scores, target, 0.9, strict=strict)
    assert metric.best_f1_threshold() == best_f1_threshold(scores, target)[0]


def test_coarse_bins_warn_instead_of_returning_a_silently_inexact_number():
    from densehybrid.metrics import AnomalyMetrics

    g = torch.Generator().manual_seed(0)
    target = (torch.rand(1, 200, 200, generator=g) < 0.3).long()
    # probabilities crowded just below 1: many distinct float32 values per 2**-12-wide bin
    scores = torch.sigmoid(torch.randn(1, 200, 200, generator=g) + 12 + 0.5 * target)
    metric = AnomalyMetrics(bits=12)
    metric.update(scores, target)
    with pytest.warns(UserWarning, match="differ from the exact ones"):
        result = metric.compute()
    assert not result["exact"] and result["ap_error_bound"] > 1e-4
    exact = AnomalyMetrics()
    exact.update(scores.half(), target)  # float16 scores are binned exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert exact.compute()["exact"]

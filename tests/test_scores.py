"""Tests for densehybrid.scores and the ``densehybrid scores`` command: formulas against float64 SciPy references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.special as sp
import torch

from densehybrid import scores as S
from densehybrid.cli import main

K = 5


def _ref(name: str, logits: torch.Tensor, ood_logits: torch.Tensor, **options) -> np.ndarray:
    """Float64 SciPy reference of every score, written from the formulas (not from the implementation)."""
    s = logits.double().numpy()
    g = ood_logits.double().numpy()
    lse = sp.logsumexp(s, axis=1)
    if name == "densehybrid":
        return sp.log_softmax(g, axis=1)[:, 1] - lse
    if name == "discriminative":
        return sp.log_softmax(g, axis=1)[:, 1]
    if name == "generative":
        return -lse
    if name == "msp":
        return 1.0 - sp.softmax(s, axis=1).max(axis=1)
    if name == "max_logit":
        return -s.max(axis=1)
    if name == "energy":
        t = options.get("temperature", 1.0)
        return -t * sp.logsumexp(s / t, axis=1)
    if name == "entropy":
        return sp.entr(sp.softmax(s, axis=1)).sum(axis=1)
    if name == "sml":
        stats = options["statistics"]
        c = s.argmax(axis=1)
        return -(s.max(axis=1) - stats.means.numpy()[c]) / stats.stds.numpy()[c]
    raise AssertionError(name)


def _stats(num_classes: int = K) -> S.SMLStatistics:
    gen = torch.Generator().manual_seed(3)
    return S.SMLStatistics(
        means=torch.randn(num_classes, generator=gen, dtype=torch.float64),
        stds=torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5,
        counts=torch.ones(num_classes, dtype=torch.int64),
    )


def _options(name: str) -> dict:
    return {"statistics": _stats()} if name == "sml" else {}


def _inputs(*shape_tail: int, scale: float = 3.0, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, K, *shape_tail, generator=gen, dtype=torch.float64) * scale).to(dtype)
    ood_logits = (torch.randn(2, 2, *shape_tail, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return logits, ood_logits


@pytest.mark.parametrize("name", S.list_scores())
@pytest.mark.parametrize("tail", [(6, 7), ()], ids=["dense", "vector"])
def test_score_matches_formula(name, tail):
    logits, ood_logits = _inputs(*tail)
    out = S.get_score(name)(logits, ood_logits, **_options(name))
    assert out.shape == (2, *tail)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(
        out.double().numpy(), _ref(name, logits, ood_logits, **_options(name)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", S.list_scores())
def test_score_is_stable_at_magnitude_1e4(name):
    logits, ood_logits = _inputs(4, 4, scale=1e4, seed=1)
    out = S.get_score(name)(logits, ood_logits, **_options(name))
    ref = _ref(name, logits, ood_logits, **_options(name))
    assert torch.isfinite(out).all()
    # float32 carries ~7 digits of values of size 1e4: compare relative to that magnitude.
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("name", S.list_scores())
def test_score_bfloat16_is_computed_in_float32(name):
    logits, ood_logits = _inputs(4, 4, scale=30.0, seed=2, dtype=torch.bfloat16)
    out = S.get_score(name)(logits, ood_logits, **_options(name))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The reference uses the same bfloat16 values in float64, so only float32 rounding separates them.
    np.testing.assert_allclose(
        out.double().numpy(), _ref(name, logits, ood_logits, **_options(name)), rtol=1e-5, atol=1e-5
    )


def test_float64_input_keeps_float64():
    logits, ood_logits = _inputs(3, 3, dtype=torch.float64)
    assert S.densehybrid(logits, ood_logits).dtype == torch.float64


def test_densehybrid_is_sum_of_its_components():
    logits, ood_logits = _inputs(5, 5)
    torch.testing.assert_close(
        S.densehybrid(logits, ood_logits), S.discriminative(logits, ood_logits) + S.generative(logits)
    )


def test_densehybrid_finite_where_softmax_log_underflows():
    logits = torch.zeros(1, K, 1, 1)
    ood_logits = torch.tensor([200.0, -200.0]).view(1, 2, 1, 1)  # P(d_out|x) = exp(-400) underflows in float32
    assert torch.isinf(torch.softmax(ood_logits, 1)[:, 1].log()).all()
    out = S.densehybrid(logits, ood_logits)
    torch.testing.assert_close(out, torch.tensor([[[-400.0 - math.log(K)]]]))


def test_msp_keeps_resolution_near_certainty():
    # 1 - max softmax is ~exp(-30) here; computing 1 - softmax.max() in float32 would return exactly 0.
    logits = torch.tensor([[30.0, 0.0], [31.0, 0.0]])
    out = S.msp(logits)
    assert (out > 0).all() and out[0] > out[1]
    np.testing.assert_allclose(out.numpy(), -np.expm1(-np.logaddexp(0, -np.array([30.0, 31.0]))), rtol=1e-5)


def test_entropy_keeps_resolution_near_certainty():
    logits = torch.tensor([[30.0, 0.0, 0.0], [31.0, 0.0, 0.0]])
    ref = sp.entr(sp.softmax(logits.double().numpy(), axis=1)).sum(axis=1)
    out = S.entropy(logits)
    assert out[0] > out[1] > 0
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-3)


def test_energy_temperature_and_generative_equivalence():
    logits, _ = _inputs(3, 3)
    torch.testing.assert_close(S.energy(logits), S.generative(logits))
    ref = _ref("energy", logits, torch.zeros(2, 2, 3, 3), temperature=2.5)
    np.testing.assert_allclose(S.energy(logits, temperature=2.5).double().numpy(), ref, rtol=1e-5)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="`temperature`"):
            S.energy(logits, temperature=bad)


def test_entropy_handles_minus_inf_logits():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    torch.testing.assert_close(S.entropy(logits), torch.tensor([math.log(2.0)]))


def test_higher_means_more_anomalous():
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    uniform = torch.tensor([[1.0, 1.0, 1.0]])
    for name in ("msp", "entropy", "max_logit", "energy", "generative"):
        fn = S.get_score(name)
        assert fn(uniform) > fn(confident), name
    ood_in, ood_out = torch.tensor([[3.0, -3.0]]), torch.tensor([[-3.0, 3.0]])
    assert S.discriminative(uniform, ood_out) > S.discriminative(uniform, ood_in)


@pytest.mark.parametrize("name", [n for n in S.list_scores() if S.requires_ood_logits(n)])
def test_missing_ood_logits_raises(name):
    with pytest.raises(ValueError, match="`ood_logits`.*None"):
        S.get_score(name)(torch.randn(1, K, 2, 2))


@pytest.mark.parametrize("name", S.list_scores())
def test_shape_errors_name_the_argument(name):
    fn = S.get_score(name)
    opts = _options(name)
    with pytest.raises(ValueError, match="`logits`"):
        fn(torch.randn(1, K, 2), torch.randn(1, 2, 2), **opts)
    with pytest.raises(ValueError, match="`ood_logits`"):
        fn(torch.randn(1, K, 2, 2), torch.randn(1, 1, 2, 2), **opts)
    with pytest.raises(ValueError, match="`ood_logits`"):
        fn(torch.randn(1, K, 2, 2), torch.randn(1, 2, 2, 3), **opts)
    with pytest.raises(ValueError, match="`ood_logits`"):
        fn(torch.randn(1, K, 2, 2), torch.randn(2, 2, 2, 2), **opts)
    with pytest.raises(ValueError, match="`ood_logits`"):
        fn(torch.randn(2, K, 2, 2), torch.randn(2, 2), **opts)
    with pytest.raises(TypeError, match="`logits`"):
        fn(torch.ones(1, K, 2, 2, dtype=torch.long), torch.randn(1, 2, 2, 2), **opts)
    with pytest.raises(TypeError, match="`logits`"):
        fn(np.zeros((1, K, 2, 2)), **opts)


@pytest.mark.parametrize("name", S.list_scores())
def test_nan_is_rejected(name):
    logits, ood_logits = _inputs(2, 2)
    used = "ood_logits" if name == "discriminative" else "logits"
    if used == "logits":
        logits[0, 1, 0, 0] = float("nan")
    else:
        ood_logits[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=f"`{used}` to contain no NaN"):
        S.get_score(name)(logits, ood_logits, **_options(name))
    if S.requires_ood_logits(name):
        logits, ood_logits = _inputs(2, 2)
        ood_logits[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="`ood_logits` to contain no NaN"):
            S.get_score(name)(logits, ood_logits)


def test_registry_and_metadata():
    assert (
        set(S.SCORES)
        == set(S.SCORE_INFO)
        == {
            "densehybrid",
            "discriminative",
            "generative",
            "msp",
            "max_logit",
            "energy",
            "entropy",
            "sml",
            "dicnet",
        }
    )
    assert S.list_scores(None) == sorted(S.SCORES)
    assert S.list_scores() == sorted(set(S.SCORES) - {"dicnet"})  # default: what a DenseHybrid output supports
    assert S.list_scores(("logits", "teacher_features", "student_features")) == [
        "dicnet",
        "energy",
        "entropy",
        "generative",
        "max_logit",
        "msp",
        "sml",
    ]
    assert S.score_info("dicnet").inputs == ("teacher_features", "student_features")
    assert S.score_info("densehybrid").inputs == ("logits", "ood_logits")
    assert S.score_info("msp").inputs == ("logits",)
    assert [n for n in S.list_scores() if S.requires_ood_logits(n)] == ["densehybrid", "discriminative"]
    assert [n for n in S.list_scores() if S.requires_fit(n)] == ["sml"]
    assert S.score_info("energy").description
    with pytest.raises(
        ValueError, match="Unknown score 'enrgy'. Available: densehybrid, dicnet, discriminative, energy"
    ):
        S.get_score("enrgy")
    with pytest.raises(ValueError, match="Unknown score"):
        S.requires_ood_logits("nope")


def _sml_reference(logits_batches, targets=None, ignore_index=255):
    values, classes = [], []
    for i, logits in enumerate(logits_batches):
        m, c = logits.double().max(dim=1)
        m, c = m.reshape(-1), c.reshape(-1)
        if targets is not None:
            keep = targets[i].reshape(-1) != ignore_index
            m, c = m[keep], c[keep]
        values.append(m.numpy())
        classes.append(c.numpy())
    values, classes = np.concatenate(values), np.concatenate(classes)
    return values, classes


def test_fit_sml_statistics_matches_one_shot_numpy():
    gen = torch.Generator().manual_seed(5)
    batches = [
        torch.randn(2, 3, 5, 4, generator=gen) * 2 + torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1) for _ in range(4)
    ]
    targets = [torch.randint(0, 3, (2, 5, 4), generator=gen) for _ in range(4)]
    for t in targets:
        t[0, :2] = 255
    stats = S.fit_sml_statistics(zip(batches, targets))
    values, classes = _sml_reference(batches, targets)
    for c in range(3):
        np.testing.assert_allclose(stats.means[c].item(), values[classes == c].mean(), rtol=1e-6)
        np.testing.assert_allclose(stats.stds[c].item(), values[classes == c].std(), rtol=1e-6)
        assert stats.counts[c].item() == (classes == c).sum()
    # Streaming is independent of how the pixels are split into batches.
    one_batch = S.fit_sml_statistics([(torch.cat(batches), torch.cat(targets))])
    torch.testing.assert_close(one_batch.means, stats.means)
    torch.testing.assert_close(one_batch.stds, stats.stds)
    # Logits-only batches use every pixel.
    stats_all = S.fit_sml_statistics(iter(batches))
    values, classes = _sml_reference(batches)
    np.testing.assert_allclose(stats_all.means.numpy(), [values[classes == c].mean() for c in range(3)], rtol=1e-6)


def test_fit_sml_statistics_unseen_class_and_errors():
    logits = torch.tensor([[5.0, 0.0, -1.0], [4.0, 1.0, 0.0], [0.0, 3.0, 1.0]])  # class 2 never predicted
    with pytest.warns(UserWarning, match=r"Classes \[2\]"):
        stats = S.fit_sml_statistics([logits])
    values = np.array([5.0, 4.0, 3.0])
    np.testing.assert_allclose(stats.means.numpy(), [4.5, 3.0, values.mean()])
    np.testing.assert_allclose(stats.stds[2].item(), values.std())
    assert stats.stds[1].item() == pytest.approx(1e-6)  # one sample: std 0 clamped to min_std
    assert torch.isfinite(S.sml(torch.randn(2, 3), statistics=stats)).all()
    with pytest.raises(ValueError, match="`batches`"):
        S.fit_sml_statistics([])
    with pytest.raises(ValueError, match="`batches`"):
        S.fit_sml_statistics([(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 255))])
    with pytest.raises(ValueError, match="3 classes"):
        S.fit_sml_statistics([torch.randn(1, 3), torch.randn(1, 4)])
    with pytest.raises(ValueError, match="`target` ids"):
        S.fit_sml_statistics([(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))])
    with pytest.raises(ValueError, match="`target`"):
        S.fit_sml_statistics([(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long))])
    with pytest.raises(TypeError, match="`batches`"):
        S.fit_sml_statistics([(torch.randn(1, 3),)])


def test_sml_statistics_round_trip_and_validation(tmp_path):
    stats = _stats()
    path = tmp_path / "sml.pt"
    torch.save(stats.to_dict(), path)
    loaded = S.SMLStatistics.from_dict(torch.load(path))
    torch.testing.assert_close(loaded.means, stats.means)
    torch.testing.assert_close(loaded.stds, stats.stds)
    from_lists = S.SMLStatistics.from_dict({k: v.tolist() for k, v in stats.to_dict().items()})
    torch.testing.assert_close(from_lists.means, stats.means)
    with pytest.raises(ValueError, match="`state`"):
        S.SMLStatistics.from_dict({"means": [0.0]})
    with pytest.raises(ValueError, match="`stds`"):
        S.SMLStatistics(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="same non-empty shape"):
        S.SMLStatistics(torch.zeros(2), torch.ones(3), torch.ones(2, dtype=torch.long))


def test_sml_requires_matching_statistics():
    with pytest.raises(ValueError, match="`statistics`.*fit_sml_statistics"):
        S.sml(torch.randn(1, K, 2, 2))
    with pytest.raises(ValueError, match="`statistics` for 5 classes"):
        S.sml(torch.randn(1, K, 2, 2), statistics=_stats(3))


def test_cli_lists_every_score(capsys):
    assert main(["scores"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == S.list_scores(None)
    assert "needs features" in next(line for line in lines if line.startswith("dicnet"))
    assert "needs ood head" in next(line for line in lines if line.startswith("densehybrid"))
    assert "needs fit" in next(line for line in lines if line.startswith("sml"))
    assert main(["scores", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["name"]: row["requires_ood_logits"] for row in rows}["discriminative"] is True
    assert {row["name"]: row["inputs"] for row in rows}["dicnet"] == ["teacher_features", "student_features"]


@pytest.mark.parametrize("name", S.list_scores())
def test_compute_score_equals_the_function_on_a_hybrid_output(name):
    from densehybrid.models import HybridOutput

    logits, ood_logits = _inputs(3, 5)
    expected = S.get_score(name)(logits, ood_logits, **_options(name))
    assert torch.equal(S.compute_score(name, HybridOutput(logits, ood_logits), **_options(name)), expected)


def test_score_contract_says_what_each_score_needs():
    from densehybrid.models import DistillationOutput, HybridOutput

    features = torch.randn(2, 8, 3, 4)
    out = DistillationOutput(torch.randn(2, K, 12, 16), features, features + 1.0)
    assert torch.allclose(S.compute_score("dicnet", out), torch.ones(2, 12, 16))  # at the logits' (output) size
    assert S.compute_score("dicnet", out, size=(6, 8)).shape == (2, 6, 8)
    torch.testing.assert_close(S.compute_score("msp", out), S.msp(out.logits))
    with pytest.raises(ValueError, match="dataset-posterior logits of a DenseHybrid model.*gives logits, "):
        S.compute_score("densehybrid", out)
    with pytest.raises(ValueError, match=r"teacher and student features of a DiCNet model \(teacher_features, "):
        S.compute_score("dicnet", HybridOutput(*_inputs(2, 2)))
    S.check_score_inputs(["msp", "dicnet"], DistillationOutput._fields)
    with pytest.raises(ValueError, match="but model 'x' gives logits, ood_logits. Scores for this model: densehybrid"):
        S.check_score_inputs(["msp", "dicnet"], HybridOutput._fields, "model 'x'")
    with pytest.raises(ValueError, match="Unknown score"):
        S.compute_score("nope", out)

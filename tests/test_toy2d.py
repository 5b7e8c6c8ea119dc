"""Tests of the 2-D toy experiment (densehybrid.toy2d) and its command (densehybrid toy2d)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from densehybrid.cli import main
from densehybrid.toy2d import (
    BORDER_ANOMALIES,
    CENTRE_RADIUS,
    INLIER_STD,
    NEGATIVE_RADII,
    NEGATIVE_SECTORS,
    NEGATIVES,
    ONE_SIDED_BORDER_STDS,
    ONE_SIDED_NEGATIVE_STDS,
    ONE_SIDED_UNREACHED_RADII,
    ONE_SIDED_UNREACHED_SECTOR,
    SECTOR_WIDTH,
    UNREACHED_ANOMALIES,
    UNREACHED_RADII,
    UNREACHED_SECTORS,
    ToyModel,
    _balance,
    _evaluate,
    _rank_correlation,
    _scores,
    fitted_base_measure,
    make_toy_data,
    run_toy2d,
    true_inlier_log_density,
)

TINY = {"steps": 3, "pretrain_steps": 3, "resolution": 16, "seeds": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_toy2d(tmp_path_factory.mktemp("toy"), seed=3, **TINY)


def _centres() -> np.ndarray:
    angles = np.deg2rad([90.0, 210.0, 330.0])
    return CENTRE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_one_sided_data_follows_the_construction() -> None:
    data = make_toy_data(0)  # the default construction
    assert data["train_x"].shape == (1500, 2) and data["train_x"].dtype == np.float32
    assert sorted(np.unique(data["train_y"]).tolist()) == [0, 1, 2]
    centres = _centres()

    def upper_border(points: np.ndarray, stds: tuple[float, float]) -> None:
        offsets = points[:, None] - centres[None]  # (P, 3, 2)
        distance = np.linalg.norm(offsets, axis=2) / INLIER_STD
        assert distance.min() >= stds[0] - 1e-4  # never closer than stds[0] to any centre
        # ... and within stds of a centre, above it (an upward direction from that centre)
        above = (distance <= stds[1] + 1e-4) & (offsets[..., 1] >= -1e-5)
        assert above.any(axis=1).all()

    negatives = data["negatives"]
    assert negatives.shape == (NEGATIVES, 2)
    upper_border(negatives, ONE_SIDED_NEGATIVE_STDS)
    assert data["border"].shape == (BORDER_ANOMALIES, 2)
    upper_border(data["border"], ONE_SIDED_BORDER_STDS)
    # Unreached anomalies lie far below the inliers, in the sector where no negative was drawn.
    unreached = data["unreached"]
    assert unreached.shape == (UNREACHED_ANOMALIES, 2)
    radius = np.linalg.norm(unreached, axis=1)
    assert radius.min() >= ONE_SIDED_UNREACHED_RADII[0] - 1e-5 and radius.max() <= ONE_SIDED_UNREACHED_RADII[1] + 1e-5
    angle = np.degrees(np.arctan2(unreached[:, 1], unreached[:, 0])) % 360.0
    assert angle.min() >= ONE_SIDED_UNREACHED_SECTOR[0] - 1e-3 and angle.max() <= ONE_SIDED_UNREACHED_SECTOR[1] + 1e-3
    assert negatives[:, 1].min() >= centres[:, 1].min() - 1e-5  # no negative below the lowest centre
    assert np.linalg.norm(unreached[:, None] - negatives[None], axis=2).min() > 1.0
    np.testing.assert_array_equal(make_toy_data(0, construction="one-sided")["unreached"], unreached)
    assert not np.array_equal(make_toy_data(1)["unreached"], unreached)
    with pytest.raises(ValueError, match="Expected `construction` to be one of 'one-sided', 'sectors', but got 'x'"):
        make_toy_data(0, construction="x")


def test_fitted_base_measure_is_the_maximum_likelihood_gaussian() -> None:
    points = np.random.default_rng(0).normal(size=(400, 2)) * [1.0, 2.0] + [3.0, -1.0]
    mean, covariance = fitted_base_measure(points)
    np.testing.assert_allclose(mean, points.mean(0))
    np.testing.assert_allclose(covariance, (points - mean).T @ (points - mean) / len(points))
    # The model's log base measure is the Gaussian's log density up to a constant.
    model = ToyModel(hidden=4, activation="tanh", base_mean=mean, base_covariance=covariance)
    query = np.array([[0.0, 0.0], [3.0, -1.0], [5.0, 4.0]])
    with torch.no_grad():
        log_base = model.log_base_measure(torch.tensor(query, dtype=torch.float32))[:, 0].double().numpy()
    centred = query - mean
    expected = -0.5 * np.einsum("pi,ij,pj->p", centred, np.linalg.inv(covariance), centred)
    np.testing.assert_allclose(log_base, expected, rtol=1e-5, atol=1e-5)


def test_sectors_data_follows_the_construction() -> None:
    data = make_toy_data(0, construction="sectors")
    assert data["train_x"].shape == (1500, 2) and data["train_x"].dtype == np.float32
    assert sorted(np.unique(data["train_y"]).tolist()) == [0, 1, 2]
    negatives = data["negatives"]
    assert negatives.shape == (NEGATIVES, 2)
    radius = np.linalg.norm(negatives, axis=1)
    assert radius.min() >= NEGATIVE_RADII[0] - 1e-5 and radius.max() <= NEGATIVE_RADII[1] + 1e-5

    def sector(points: np.ndarray) -> np.ndarray:
        angle = np.degrees(np.arctan2(points[:, 1], points[:, 0])) % 360.0
        return (angle // SECTOR_WIDTH).astype(int)

    # Negatives cover only half of the sectors around the inliers; every one of those sectors holds some.
    covered = {int(a // SECTOR_WIDTH) for a in NEGATIVE_SECTORS}
    assert set(sector(negatives).tolist()) == covered
    # The unreached anomalies lie in the other sectors, where no negative was drawn, outside the inlier circle.
    unreached = data["unreached"]
    assert unreached.shape == (UNREACHED_ANOMALIES, 2)
    assert set(sector(unreached).tolist()) == {int(a // SECTOR_WIDTH) for a in UNREACHED_SECTORS}
    assert not set(sector(unreached).tolist()) & covered
    assert np.linalg.norm(unreached, axis=1).min() >= UNREACHED_RADII[0] - 1e-5
    # Border anomalies are 3 to 4 inlier standard deviations from their nearest centre.
    centres = _centres()
    nearest = np.linalg.norm(data["border"][:, None] - centres[None], axis=2).min(axis=1) / INLIER_STD
    assert data["border"].shape == (BORDER_ANOMALIES, 2)
    assert nearest.min() >= 3.0 - 1e-4 and nearest.max() <= 4.0 + 1e-4
    np.testing.assert_array_equal(make_toy_data(0, construction="sectors")["unreached"], unreached)
    assert not np.array_equal(make_toy_data(1, construction="sectors")["unreached"], unreached)


@pytest.mark.parametrize("construction", ["one-sided", "sectors"])
def test_validation_draw_is_independent_of_the_test_draw(construction: str) -> None:
    test, val = make_toy_data(5, construction=construction), make_toy_data(5, split="val", construction=construction)
    # The same training points: a setting chosen on the validation draw is evaluated on the same model's test draw.
    for key in ("train_x", "train_y", "negatives"):
        np.testing.assert_array_equal(val[key], test[key])
    # Other evaluation points, drawn the same way: same shapes, same regions, none shared with the test draw.
    for key in ("test_x", "unreached", "border"):
        assert val[key].shape == test[key].shape and val[key].dtype == test[key].dtype
        assert not np.isin(val[key][:, 0], test[key][:, 0]).any()
    radii = UNREACHED_RADII if construction == "sectors" else ONE_SIDED_UNREACHED_RADII
    radius = np.linalg.norm(val["unreached"], axis=1)
    assert radius.min() >= radii[0] - 1e-5 and radius.max() <= radii[1] + 1e-5
    np.testing.assert_array_equal(make_toy_data(5, split="val", construction=construction)["border"], val["border"])
    # The test draw is the one the documented numbers were measured on: unchanged by the validation split.
    np.testing.assert_array_equal(make_toy_data(5, split="test", construction=construction)["border"], test["border"])
    with pytest.raises(ValueError, match="Expected `split` to be one of 'test', 'val', but got 'train'"):
        make_toy_data(0, split="train")


def test_balance_measures_the_spread_and_the_ranking_of_the_terms() -> None:
    rng = np.random.default_rng(0)
    inliers, anomalies = 100, 50
    discriminative = rng.uniform(-3.0, 0.0, inliers + anomalies)
    generative = 20.0 * rng.standard_normal(inliers + anomalies)
    scores = {"discriminative": discriminative, "generative": generative, "densehybrid": discriminative + generative}
    balance = _balance(scores, inliers)
    spread = balance["inlier_spread"]
    expected = np.percentile(generative[:inliers], 95) - np.percentile(generative[:inliers], 5)
    assert spread["generative"] == pytest.approx(expected)
    assert 2.0 < spread["discriminative"] < 3.0 and spread["generative"] > 40.0
    # A term whose spread dwarfs the other's decides the sum's ranking.
    corr = balance["hybrid_rank_correlation"]
    assert corr["generative"] > 0.99 and corr["discriminative"] < 0.3
    assert _rank_correlation(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


def test_true_inlier_log_density_is_the_generating_mixture() -> None:
    # It integrates to 1 over the plane and peaks at the class centres.
    coords = np.linspace(-6.0, 6.0, 601)
    gx, gy = np.meshgrid(coords, coords)
    density = np.exp(true_inlier_log_density(np.stack([gx.ravel(), gy.ravel()], axis=1)))
    assert density.sum() * (coords[1] - coords[0]) ** 2 == pytest.approx(1.0, abs=1e-3)
    centre = np.array([[0.0, CENTRE_RADIUS]])
    expected = math.log(1 / (3 * 2 * math.pi * INLIER_STD**2))  # the other two components add ~e^-37 there
    assert true_inlier_log_density(centre)[0] == pytest.approx(expected, abs=1e-6)
    # Far away it stays finite (log-sum-exp, no underflow to -inf).
    assert np.isfinite(true_inlier_log_density(np.array([[60.0, -60.0]]))).all()


def test_toy_model_shapes() -> None:
    logits, ood_logits = ToyModel(hidden=8)(torch.zeros(5, 2))
    assert logits.shape == (5, 3) and ood_logits.shape == (5, 2)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_generative_cue_has_density_like_tails(activation: str) -> None:
    # Far from the data the log-density -score must fall without bound, whatever the (random) network.
    torch.manual_seed(0)
    base = {} if activation == "relu" else fitted_base_measure(make_toy_data(0)["train_x"])
    base = dict(zip(("base_mean", "base_covariance"), base))
    model = ToyModel(hidden=16, activation=activation, **base)
    directions = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-0.6, 0.8]])
    with torch.no_grad():
        for radius_a, radius_b in ((5.0, 10.0), (10.0, 20.0), (20.0, 40.0)):
            near, _ = model(radius_a * directions)
            far, _ = model(radius_b * directions)
            assert (far.logsumexp(1) < near.logsumexp(1)).all()
    # The base measure is the same for every class: class posteriors are those of the network alone.
    points = torch.randn(7, 2)
    with torch.no_grad():
        logits, _ = model(points)
        plain = model.classifier(model.trunk(points))
    torch.testing.assert_close(logits.softmax(1), plain.softmax(1))


def test_tiny_run_writes_figure_and_metrics(tiny_run: dict) -> None:
    assert tiny_run["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(Path(tiny_run["json"]).read_text())
    assert set(saved["metrics"]) == {"discriminative", "generative", "densehybrid"}
    for families in saved["metrics"].values():
        assert set(families) == {"unreached", "border", "all"}
        for values in families.values():
            assert set(values) == {"ap", "fpr95", "auroc"}
            assert all(0.0 <= v <= 1.0 for v in values.values())
    assert len(saved["rows"]) == 9
    assert all(row["seeds"] == 2 and "ap_std" in row and "fpr95_std" in row for row in saved["rows"])
    assert saved["config"]["steps"] == 3 and saved["config"]["pretrain_steps"] == 3
    assert saved["config"]["seeds"] == [3, 4] and set(saved["per_seed"]) == {"3", "4"}
    assert "densehybrid" in saved["table"] and "border AP" in saved["table"] and "unreached AP" in saved["table"]
    assert " ± " in saved["table"]
    # the rows hold the mean over the seeds
    seeds = [saved["per_seed"][s]["densehybrid"]["all"]["ap"] for s in ("3", "4")]
    assert saved["metrics"]["densehybrid"]["all"]["ap"] == pytest.approx(np.mean(seeds))
    assert saved["metrics_std"]["densehybrid"]["all"]["ap"] == pytest.approx(np.std(seeds, ddof=1))
    assert 0.0 <= saved["accuracy"] <= 1.0
    assert saved["config"]["split"] == "test"
    assert set(saved["balance"]["inlier_spread"]) == {"discriminative", "generative", "densehybrid"}
    assert set(saved["balance"]["hybrid_rank_correlation"]) == {"discriminative", "generative"}
    assert all(v >= 0.0 for v in saved["balance"]["inlier_spread"].values())
    assert -1.0 <= saved["balance"]["generative_vs_true_density"]["inlier_correlation"] <= 1.0
    assert set(saved["reference"]) == {"true_density", "discriminative+true_density", "base_measure"}
    assert saved["config"]["construction"]["name"] == "one-sided" and saved["config"]["activation"] == "tanh"
    assert saved["config"]["classifier_decay"] == 30.0 and saved["config"]["likelihood"] == "negatives"
    assert saved["config"]["base_measure"] == "fitted"
    # The generating density separates this toy's anomalies almost perfectly, whatever the (tiny) training did.
    assert saved["reference"]["true_density"]["all"]["ap"] > 0.98


def test_metrics_match_sklearn_on_the_model_scores() -> None:
    data = make_toy_data(3)
    torch.manual_seed(0)
    model = ToyModel(hidden=8)
    inliers = data["test_x"]
    scores = _scores(model, np.r_[inliers, data["unreached"], data["border"]], torch.device("cpu"))
    rows, metrics = _evaluate(scores, inliers.shape[0])
    labels = np.r_[np.zeros(len(inliers)), np.ones(UNREACHED_ANOMALIES + BORDER_ANOMALIES)]
    for name in scores:
        assert metrics[name]["all"]["ap"] == pytest.approx(skm.average_precision_score(labels, scores[name]))
        assert metrics[name]["all"]["auroc"] == pytest.approx(skm.roc_auc_score(labels, scores[name]))
    # The hybrid is the sum of its components.
    np.testing.assert_allclose(scores["densehybrid"], scores["discriminative"] + scores["generative"], atol=1e-5)
    assert [row["family"] for row in rows[:3]] == ["unreached", "border", "all"]


def test_seeded_runs_are_deterministic(tiny_run: dict, tmp_path: Path) -> None:
    state = torch.get_rng_state()
    again = run_toy2d(tmp_path / "again", seed=3, **TINY)
    assert again["metrics"] == tiny_run["metrics"]
    assert again["final_loss"] == tiny_run["final_loss"]
    # The caller's global RNG stream is left alone.
    assert torch.equal(torch.get_rng_state(), state)
    other = run_toy2d(tmp_path / "other", seed=4, **TINY)
    assert other["metrics"] != tiny_run["metrics"]


def test_run_toy2d_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected `steps` to be a positive integer, but got 0"):
        run_toy2d(tmp_path, steps=0)
    with pytest.raises(ValueError, match="Expected `lr` to be a finite positive number"):
        run_toy2d(tmp_path, lr=math.nan)
    with pytest.raises(ValueError, match="Expected `likelihood` to be one of"):
        run_toy2d(tmp_path, likelihood="both")
    with pytest.raises(ValueError, match="Expected `split` to be one of 'test', 'val'"):
        run_toy2d(tmp_path, split="train")
    with pytest.raises(ValueError, match="Expected `construction` to be one of 'one-sided', 'sectors'"):
        run_toy2d(tmp_path, construction="rings")
    with pytest.raises(ValueError, match="Expected `classifier_decay` to be a finite number >= 0, but got -1.0"):
        run_toy2d(tmp_path, classifier_decay=-1.0)
    with pytest.raises(ValueError, match="Expected `activation` to be one of 'relu', 'tanh', but got 'gelu'"):
        run_toy2d(tmp_path, activation="gelu")
    with pytest.raises(ValueError, match="Expected `base_measure` to be one of 'fitted', 'isotropic'"):
        run_toy2d(tmp_path, base_measure="uniform")


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["toy2d", "--out", str(out), "--steps", "2", "--pretrain-steps", "2", "--resolution", "12", "--seed", "1",
            "--seeds", "1", "--split", "val", "--construction", "sectors", "--classifier-decay", "0.5"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("discriminative", "generative", "densehybrid", "border AP", "hybrid better than both",
                 "spread over val inliers", "hybrid's rank correlation"):  # fmt: skip
        assert name in printed
    assert (out / "toy2d.png").is_file()
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["seed"] == 1 and config["split"] == "val"
    # The construction's own choices, except what the command line overrode.
    assert config["construction"]["name"] == "sectors" and config["classifier_decay"] == 0.5
    assert config["activation"] == "relu" and config["base_measure"] == "isotropic" and config["likelihood"] == "paired"


def test_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # a malformed option value is a usage error (exit 2)
        main(["toy2d", "--out", str(tmp_path), "--hidden", "0"])
    assert exc.value.code == 2 and "--hidden: expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["toy2d", "--out", str(tmp_path), "--construction", "rings"])
    assert exc.value.code == 2 and "--construction: invalid choice: 'rings'" in capsys.readouterr().err


def test_the_generative_term_outweighs_the_discriminative_one_in_the_sectors_construction(tmp_path: Path) -> None:
    # The documented reason why the hybrid does not beat both components in the first construction (docs/toy2d.md):
    # among the inliers the generative term spreads over several times more nats than the discriminative one, so the
    # sum ranks the points almost as the generative term alone does and lands next to it.
    result = run_toy2d(
        tmp_path, seed=0, seeds=1, steps=300, pretrain_steps=300, resolution=8, device="cpu", construction="sectors"
    )
    spread = result["balance"]["inlier_spread"]
    corr = result["balance"]["hybrid_rank_correlation"]
    assert spread["generative"] > 4 * spread["discriminative"]
    assert corr["generative"] > 0.95 and corr["generative"] > corr["discriminative"] + 0.2
    ap = {name: result["metrics"][name]["all"]["ap"] for name in result["metrics"]}
    assert abs(ap["densehybrid"] - ap["generative"]) < abs(ap["densehybrid"] - ap["discriminative"])


def test_the_hybrid_beats_both_components_in_the_one_sided_construction(tmp_path: Path) -> None:
    # The default construction at its full budget on one validation seed (docs/toy2d.md): the caption of TPAMI
    # Figure 2. The discriminative score misses the anomalies where no negative reached, the generative one errs
    # along the inlier border but not far away, the two terms spread over comparable nats among the inliers, and
    # their sum beats both on all anomalies (AP and FPR95) and on the border.
    result = run_toy2d(tmp_path, seed=100, seeds=1, split="val", resolution=8, device="cpu")
    m = result["metrics"]
    ap = {name: {family: m[name][family]["ap"] for family in m[name]} for name in m}
    fpr = {name: {family: m[name][family]["fpr95"] for family in m[name]} for name in m}
    assert ap["discriminative"]["unreached"] < 0.5 and ap["generative"]["unreached"] > 0.95
    assert ap["generative"]["border"] + 0.05 < ap["discriminative"]["border"]
    spread = result["balance"]["inlier_spread"]
    assert max(spread["generative"], spread["discriminative"]) < 4 * min(spread["generative"], spread["discriminative"])
    for family in ("border", "all"):
        assert ap["densehybrid"][family] > max(ap["discriminative"][family], ap["generative"][family])
        assert fpr["densehybrid"][family] < min(fpr["discriminative"][family], fpr["generative"][family])
    assert result["hybrid_beats_both"]["all"] == {"ap": True, "fpr95": True, "auroc": True}

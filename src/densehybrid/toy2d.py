"""The 2-D toy experiment of Figure 2 of the TPAMI paper: discriminative vs generative vs hybrid anomaly scores.

The paper's figure contrasts three anomaly scores of one model on a toy problem: the discriminative score
:math:`s_D = \\ln P(d_{out} \\mid x)` is learned from a *finite* set of negatives and is unreliable where the
negatives never reached; the generative score :math:`s_G = -\\ln \\hat p(x)` decays like a density away from the
inliers but errs along the border of the inlier manifold; the hybrid :math:`s_H = s_D + s_G` combines both. We
rebuilt the setup from that description (the appendix with the exact construction was not available); the numbers
below were fixed before the first run and are not tuned to any outcome:

* **Inliers**: K = 3 classes, isotropic Gaussians (std 0.4) centred on a circle of radius 2 at 90, 210 and 330
  degrees; 500 training and 500 test points per class.
* **Training negatives** (finite, covering only part of the space around the inliers): 600 points uniform (by
  area) on the annulus of radius 2.9 to 6 around the origin, but only in the four 45-degree sectors starting at
  0, 90, 180 and 270 degrees; the other four sectors get none.
* **Test anomalies**, two kinds, 500 points each:

  - ``unreached``: uniform (by area) on the same annulus (radius 3.5 to 6) inside the four sectors without
    negatives, where the negatives never reached;
  - ``border``: uniform on rings 3 to 4 inlier standard deviations (1.2 to 1.6) around a random inlier centre,
    i.e. along the border of the inlier manifold in every direction.

* **Model**: an MLP trunk 2 -> H -> H (ReLU) whose shared features feed K class logits and a 2-way
  dataset-posterior head. The logits read as an unnormalised log joint density ``ln p(x, y) = s_y(x)``; to give
  that density tails (a ReLU network alone grows at most linearly, so its ``logsumexp`` can *rise* far from the
  data), every class logit carries the log of a fixed broad Gaussian base measure,
  ``s_y(x) = f_y(h(x)) - |x|^2 / (2 * 3^2)``. The term is shared by all classes, so the classifier and the
  discriminative head are unchanged. Each point is one "pixel"; negatives carry the ignore id and
  ``negative_mask``.
* **Training**, as DenseHybrid is used on real models: closed-set pre-training (cross-entropy on the inliers,
  full-batch Adam, lr 3e-3), then fine-tuning of the whole model with :class:`densehybrid.losses.DenseHybridLoss`
  (the released loss weights beta = 0.03, lambda = 0.3), full-batch Adam whose lr decays from 3e-4 to 0 on a cosine.
  The likelihood term is the ``paired`` one (lower the negatives' ``logsumexp``, raise the inliers'): the released
  code's term only lowers it on negatives, and then nothing makes ``logsumexp`` a density of the inliers, which the
  figure's generative cue is; ``likelihood="negatives"`` runs the released term.

Each run repeats this over several seeds (data and initialisation) and reports the mean and standard deviation of
AP, AUROC and FPR95 of every score on every anomaly kind; the figure shows the first seed. ``split="val"`` evaluates
on a second draw of the evaluation points, independent of the test draw, for choosing settings. Two diagnostics
explain the result (docs/toy2d.md): the spread of each score over the inliers with the hybrid's rank correlation
to each component, and reference scores computed from the generating density, which no model sees. Metrics come from
:func:`densehybrid.scores.get_score` and the exact metrics of :mod:`densehybrid.metrics` (FPR95: first operating point
with TPR >= 95%).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from densehybrid import metrics as anomaly_metrics
from densehybrid.engine.outputs import atomic_path, atomic_write_text
from densehybrid.engine.resources import check_memory
from densehybrid.engine.runtime import select_device
from densehybrid.labels import IGNORE_INDEX
from densehybrid.losses import DenseHybridLoss
from densehybrid.report import format_table
from densehybrid.scores import get_score

__all__ = [
    "SCORE_NAMES",
    "FAMILIES",
    "SPLITS",
    "REFERENCE_NAMES",
    "true_inlier_log_density",
    "ToyData",
    "ToyModel",
    "make_toy_data",
    "run_toy2d",
]

SCORE_NAMES = ("discriminative", "generative", "densehybrid")
FAMILIES = ("unreached", "border", "all")
SPLITS = ("test", "val")
_TITLES = {
    "discriminative": "discriminative  s_D = ln P(d_out|x)",
    "generative": "generative  s_G = -ln p(x)",
    "densehybrid": "hybrid  s_H = s_D + s_G",
}

# The construction (see the module docstring); fixed before the first run.
NUM_CLASSES = 3
CENTRE_RADIUS = 2.0
CENTRE_ANGLES = (90.0, 210.0, 330.0)
INLIER_STD = 0.4
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 500
NEGATIVES = 600
NEGATIVE_RADII = (2.9, 6.0)
SECTOR_WIDTH = 45.0
NEGATIVE_SECTORS = (0.0, 90.0, 180.0, 270.0)  # start angles of the sectors that hold negatives
UNREACHED_SECTORS = (45.0, 135.0, 225.0, 315.0)  # the sectors between them
UNREACHED_ANOMALIES = 500
UNREACHED_RADII = (3.5, 6.0)
BORDER_ANOMALIES = 500
BORDER_STDS = (3.0, 4.0)
BASE_MEASURE_STD = 3.0
EXTENT = 6.5  # the plotted window is [-EXTENT, EXTENT]^2


class ToyData(dict):
    """The toy point sets, as float32 arrays of shape (P, 2) plus labels.

    Keys: ``train_x`` (P, 2), ``train_y`` (P,) class ids, ``negatives`` (Q, 2), ``test_x`` (T, 2),
    ``test_y`` (T,) class ids, ``unreached`` (U, 2), ``border`` (B, 2).
    """


def _centres() -> np.ndarray:
    angles = np.deg2rad(np.asarray(CENTRE_ANGLES))
    return CENTRE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _sectors(rng: np.random.Generator, count: int, radii: tuple[float, float], starts: tuple[float, ...]) -> np.ndarray:
    """Points uniform by area on the annulus ``radii`` inside the sectors ``[start, start + SECTOR_WIDTH)``."""
    r = np.sqrt(rng.uniform(radii[0] ** 2, radii[1] ** 2, count))  # uniform by area: the squared radius is uniform
    start = np.asarray(starts)[rng.integers(0, len(starts), count)]
    theta = np.deg2rad(start + rng.uniform(0.0, SECTOR_WIDTH, count))
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _inliers(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    points = _centres()[labels] + INLIER_STD * rng.standard_normal((labels.size, 2))
    return points, labels


def make_toy_data(seed: int = 0, split: str = "test") -> ToyData:
    """Sample the toy point sets (see the module docstring for the construction).

    Args:
        seed: seed of the NumPy generator; the same seed gives the same points.
        split: ``"test"`` or ``"val"``: which draw of the evaluation points (``test_x``, ``test_y``, ``unreached``,
            ``border``). The training points are the same for both; the validation draw comes from its own
            generator (seeded with ``(seed, 1)``), independent of the test draw, for choosing settings.

    Returns:
        A :class:`ToyData` dict of float32 (P, 2) point arrays and int64 labels.
    """
    if split not in SPLITS:
        raise ValueError(f"Expected `split` to be one of {', '.join(map(repr, SPLITS))}, but got {split!r}.")
    rng = np.random.default_rng(seed)
    train_x, train_y = _inliers(rng, TRAIN_PER_CLASS)
    negatives = _sectors(rng, NEGATIVES, NEGATIVE_RADII, NEGATIVE_SECTORS)
    if split == "val":
        rng = np.random.default_rng([seed, 1])
    test_x, test_y = _inliers(rng, TEST_PER_CLASS)
    unreached = _sectors(rng, UNREACHED_ANOMALIES, UNREACHED_RADII, UNREACHED_SECTORS)
    which = rng.integers(0, NUM_CLASSES, BORDER_ANOMALIES)
    distance = INLIER_STD * rng.uniform(*BORDER_STDS, BORDER_ANOMALIES)
    theta = rng.uniform(0.0, 2 * math.pi, BORDER_ANOMALIES)
    border = _centres()[which] + distance[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    data = ToyData(
        train_x=train_x,
        train_y=train_y,
        negatives=negatives,
        test_x=test_x,
        test_y=test_y,
        unreached=unreached,
        border=border,
    )
    for key, value in data.items():
        data[key] = value.astype(np.int64 if key.endswith("_y") else np.float32)
    return data


class ToyModel(nn.Module):
    """An MLP with a shared trunk, K class logits and a 2-way dataset-posterior head.

    Args:
        hidden: width H of the two hidden layers.
        num_classes: K.

    ``forward(points)`` maps (N, 2) float points to ``(logits (N, K), ood_logits (N, 2))``. Every logit includes
    the log of the Gaussian base measure ``-|x|^2 / (2 * base_std^2)`` (the same for all classes), which gives the
    density ``exp(logsumexp(logits))`` Gaussian tails.
    """

    def __init__(self, hidden: int = 64, num_classes: int = NUM_CLASSES, base_std: float = BASE_MEASURE_STD) -> None:
        super().__init__()
        self.base_std = float(base_std)
        self.trunk = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)
        self.posterior = nn.Linear(hidden, 2)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(points)
        log_base = -points.square().sum(dim=1, keepdim=True) / (2 * self.base_std**2)
        return self.classifier(features) + log_base, self.posterior(features)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
    return int(value)


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a finite positive number, but got {value!r}.")
    return float(value)


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the tiny CPU training on one thread, then restore the caller's setting.

    The tensors are a few thousand points: splitting them across threads costs more in synchronisation than it
    saves, and on a busy machine it made each step several times slower.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _scores(model: ToyModel, points: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    logits, ood_logits = model(torch.from_numpy(points).to(device))
    return {name: get_score(name)(logits, ood_logits).double().cpu().numpy() for name in SCORE_NAMES}


def _evaluate(
    test: dict[str, np.ndarray], inlier_count: int, names: tuple[str, ...] = SCORE_NAMES
) -> tuple[list[dict], dict]:
    """Metric rows and ``metrics[score][family]`` for test points ordered inliers, unreached, border anomalies."""
    rows, metrics = [], {}
    for name in names:
        scores = torch.from_numpy(test[name])
        inlier = scores[:inlier_count]
        unreached = scores[inlier_count : inlier_count + UNREACHED_ANOMALIES]
        border = scores[inlier_count + UNREACHED_ANOMALIES :]
        metrics[name] = {}
        for family, anomalies in (
            ("unreached", unreached),
            ("border", border),
            ("all", torch.cat([unreached, border])),
        ):
            sample = torch.cat([inlier, anomalies])
            labels = torch.cat(
                [torch.zeros(inlier.numel(), dtype=torch.int64), torch.ones(anomalies.numel(), dtype=torch.int64)]
            )
            values = {
                "ap": anomaly_metrics.average_precision(sample, labels),
                "fpr95": anomaly_metrics.fpr_at_tpr(sample, labels, 0.95),
                "auroc": anomaly_metrics.auroc(sample, labels),
            }
            metrics[name][family] = values
            rows.append({"model": "toy2d-mlp", "score": name, "family": family, **values})
    return rows, metrics


def true_inlier_log_density(points: np.ndarray) -> np.ndarray:
    """ln p(x) of the inlier distribution that generated the data (equal mixture of the K Gaussians), (P, 2) -> (P,)."""
    points = np.asarray(points, dtype=np.float64)
    squared = ((points[:, None, :] - _centres()[None]) ** 2).sum(axis=2) / (2 * INLIER_STD**2)
    log_components = -squared - math.log(2 * math.pi * INLIER_STD**2)
    top = log_components.max(axis=1)
    return top + np.log(np.exp(log_components - top[:, None]).mean(axis=1))


REFERENCE_NAMES = ("true_density", "discriminative+true_density")


def _reference_scores(test: dict[str, np.ndarray], points: np.ndarray) -> dict[str, np.ndarray]:
    """Scores with the generating density in place of the learned one: what a perfect generative term would do."""
    true_score = -true_inlier_log_density(points)
    return {"true_density": true_score, "discriminative+true_density": test["discriminative"] + true_score}


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors (ties broken by order; the scores are continuous)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def _balance(test: dict[str, np.ndarray], inlier_count: int) -> dict[str, dict[str, float]]:
    """How the hybrid's two terms weigh against each other on the test points.

    ``inlier_spread[score]``: the 5th-to-95th percentile range of the score over the test inliers, in nats (what one
    term's ranking noise among inliers is worth in the sum); ``hybrid_rank_correlation[component]``: Spearman
    correlation of the hybrid with that component over all test points (1 = the hybrid ranks like it).
    """
    spread = {name: float(np.subtract(*np.percentile(test[name][:inlier_count], (95.0, 5.0)))) for name in SCORE_NAMES}
    corr = {name: _rank_correlation(test["densehybrid"], test[name]) for name in ("discriminative", "generative")}
    balance = {"inlier_spread": spread, "hybrid_rank_correlation": corr}
    if "true_density" in test:  # how well -logsumexp follows the generating density among the inliers
        inlier_corr = np.corrcoef(test["generative"][:inlier_count], test["true_density"][:inlier_count])[0, 1]
        balance["generative_vs_true_density"] = {"inlier_correlation": float(inlier_corr)}
    return balance


def _plot(
    path: Path,
    data: ToyData,
    grid_scores: dict[str, np.ndarray],
    thresholds: dict[str, float],
    metrics: dict,
    resolution: int,
    seeds: int,
    split: str = "test",
) -> Path:
    fig = Figure(figsize=(15.5, 5.6))
    axes = fig.subplots(1, 3)
    rng = np.random.default_rng(0)  # which points are drawn does not affect any number

    def subset(points: np.ndarray, count: int = 250) -> np.ndarray:
        return points[rng.choice(points.shape[0], min(count, points.shape[0]), replace=False)]

    inliers, negatives = subset(data["test_x"], 300), subset(data["negatives"])
    unreached, border = subset(data["unreached"], 150), subset(data["border"], 150)
    coords = np.linspace(-EXTENT, EXTENT, resolution)
    for ax, name in zip(axes, SCORE_NAMES):
        values = grid_scores[name].reshape(resolution, resolution)
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, (1.0, 99.0)) if finite.size else (0.0, 1.0)
        ax.imshow(values, origin="lower", extent=(-EXTENT, EXTENT, -EXTENT, EXTENT), cmap="YlOrRd", vmin=low, vmax=high)
        if np.nanmin(values) < thresholds[name] < np.nanmax(values):
            ax.contour(
                coords, coords, values, levels=[thresholds[name]], colors="k", linewidths=1.0, linestyles="solid"
            )
        ax.scatter(*inliers.T, s=7, c="tab:blue", edgecolors="white", linewidths=0.3, label=f"inliers ({split})")
        ax.scatter(*negatives.T, s=7, c="limegreen", edgecolors="black", linewidths=0.3, label="train negatives")
        ax.scatter(*unreached.T, s=9, c="red", marker="^", edgecolors="black", linewidths=0.3,
                   label=f"anomalies where no negative reached ({split})")  # fmt: skip
        ax.scatter(*border.T, s=9, c="magenta", marker="s", edgecolors="black", linewidths=0.3,
                   label=f"anomalies along the inlier border ({split})")  # fmt: skip
        m = metrics[name]
        ax.set_title(
            f"{_TITLES[name]}\nAP all {100 * m['all']['ap']:.1f} | unreached {100 * m['unreached']['ap']:.1f} | "
            f"border {100 * m['border']['ap']:.1f}",
            fontsize=10,
        )
        ax.set_xlim(-EXTENT, EXTENT)
        ax.set_ylim(-EXTENT, EXTENT)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="lower left", fontsize=7, framealpha=0.85)
    fig.text(
        0.5,
        0.01,
        "Toy 2-D problem after TPAMI Figure 2 (our construction), first of "
        f"{seeds} seed(s); AP in the titles is this seed's. Heatmap: anomaly score, red = higher (colours scaled per "
        "panel to the 1st-99th percentile over the window). Black line: the threshold that detects 95% of the "
        f"{split} anomalies.",
        ha="center",
        fontsize=9,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    return path


def _run_seed(
    seed: int, steps: int, pretrain_steps: int, hidden: int, lr: float, pretrain_lr: float,
    criterion: DenseHybridLoss, torch_device: torch.device, resolution: int | None, split: str = "test",
) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate the toy model for one seed; the grid scores only when ``resolution`` is given."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = make_toy_data(int(seed), split)
    points = torch.from_numpy(np.r_[data["train_x"], data["negatives"]]).to(torch_device)
    negative_mask = torch.zeros(points.shape[0], dtype=torch.bool, device=torch_device)
    negative_mask[data["train_x"].shape[0] :] = True
    target = torch.full((points.shape[0],), IGNORE_INDEX, dtype=torch.int64, device=torch_device)
    target[: data["train_x"].shape[0]] = torch.from_numpy(data["train_y"]).to(torch_device)

    # Seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        model = ToyModel(hidden).to(torch_device)
    inlier = ~negative_mask
    with _single_cpu_thread(torch_device):
        optimizer = torch.optim.Adam(model.parameters(), lr=pretrain_lr)
        for _ in range(pretrain_steps):
            optimizer.zero_grad(set_to_none=True)
            logits, _ = model(points)
            nn.functional.cross_entropy(logits[inlier], target[inlier]).backward()
            optimizer.step()
        timings["pretrain"] = time.perf_counter() - start
        start = time.perf_counter()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            logits, ood_logits = model(points)
            loss = criterion(logits, ood_logits, target, negative_mask)
            loss.total.backward()
            optimizer.step()
            schedule.step()
    final_loss = {key: float(value.detach()) for key, value in loss._asdict().items()}
    timings["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    inliers = data["test_x"]
    test_points = np.r_[inliers, data["unreached"], data["border"]]
    test_scores = _scores(model, test_points, torch_device)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(inliers).to(torch_device))
        accuracy = float((logits.argmax(1).cpu().numpy() == data["test_y"]).mean())
    rows, metrics = _evaluate(test_scores, inliers.shape[0])
    reference_scores = _reference_scores(test_scores, test_points)
    _, reference = _evaluate(reference_scores, inliers.shape[0], REFERENCE_NAMES)
    balance = _balance({**test_scores, **reference_scores}, inliers.shape[0])
    test_labels = torch.from_numpy((np.arange(test_points.shape[0]) >= inliers.shape[0]).astype(np.int64))
    thresholds = {
        name: anomaly_metrics.threshold_at_tpr(torch.from_numpy(values), test_labels, 0.95)
        for name, values in test_scores.items()
    }
    grid_scores = None
    if resolution is not None:
        coords = np.linspace(-EXTENT, EXTENT, resolution, dtype=np.float32)
        gx, gy = np.meshgrid(coords, coords)
        grid_scores = _scores(model, np.stack([gx.ravel(), gy.ravel()], axis=1), torch_device)
    timings["evaluate"] = time.perf_counter() - start
    return {
        "data": data,
        "rows": rows,
        "metrics": metrics,
        "reference": reference,
        "accuracy": accuracy,
        "balance": balance,
        "final_loss": final_loss,
        "thresholds": thresholds,
        "grid_scores": grid_scores,
        "timings": timings,
    }


_BETTER = {"ap": lambda a, b: a > b, "fpr95": lambda a, b: a < b, "auroc": lambda a, b: a > b}


def run_toy2d(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 1000,
    device: str = "auto",
    *,
    seeds: int = 5,
    pretrain_steps: int = 1000,
    hidden: int = 64,
    lr: float = 3e-4,
    pretrain_lr: float = 3e-3,
    likelihood: str = "paired",
    resolution: int = 200,
    split: str = "test",
) -> dict[str, Any]:
    """Train the toy model over several seeds, score a grid and the test points, write the figure and metrics JSON.

    Args:
        out_dir: output folder; receives ``toy2d.png`` and ``metrics.json``.
        seed: the first seed; seeds ``seed .. seed + seeds - 1`` each draw their own data and initialisation (the
            global torch RNG state is restored afterwards).
        steps: full-batch Adam steps of DenseHybrid fine-tuning.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.
        seeds: how many seeds.
        pretrain_steps: full-batch Adam steps of closed-set pre-training (cross-entropy on the inliers).
        hidden: width of the MLP's hidden layers.
        lr: initial fine-tuning learning rate, decayed to 0 on a cosine over ``steps``.
        pretrain_lr: constant pre-training learning rate.
        likelihood: ``likelihood`` of :class:`~densehybrid.losses.DenseHybridLoss`: ``"paired"`` (default here: the
            inlier likelihood is raised as the negatives' is lowered, which makes ``logsumexp`` a density) or
            ``"negatives"`` (the released code's term).
        resolution: heatmap grid points per axis.
        split: ``"test"`` (the reported numbers) or ``"val"``: evaluate on the validation draw of every seed (same
            training points, evaluation points drawn independently of the test draw), for choosing settings.

    Returns:
        ``{"rows", "metrics", "metrics_std", "per_seed", "hybrid_beats_both", "hybrid_wins", "accuracy", "balance",
        "final_loss", "config", "timings", "figure", "json"}``: ``rows`` are report-table rows with the mean over
        seeds (``ap``, ``fpr95``, ``auroc``) and, with several seeds, the standard deviations ``ap_std``, ...;
        ``metrics[score][family]`` the means, ``metrics_std`` the standard deviations (ddof=1), ``per_seed`` the
        metrics of every seed; ``hybrid_beats_both[family][metric]`` says whether the hybrid's mean is strictly
        better than both components' means and ``hybrid_wins[family][metric]`` in how many seeds it was;
        ``accuracy`` is the mean closed-set accuracy on test inliers; ``balance`` (means over seeds) holds
        ``inlier_spread[score]``, the 5th-95th percentile range of each score over the test inliers in nats,
        ``hybrid_rank_correlation[component]``, the Spearman correlation of the hybrid with each component over the
        test points, and ``generative_vs_true_density["inlier_correlation"]``, the Pearson correlation of the
        generative score with the generating density's ``-ln p(x)`` over the test inliers; ``reference[name][family]``
        (means) are the metrics of two scores that use the generating density, which no model sees:
        ``true_density`` = ``-ln p(x)`` and ``discriminative+true_density``; ``final_loss`` and the figure are the
        first seed's.

    Raises:
        ValueError: for non-positive ``steps``/``pretrain_steps``/``hidden``/``resolution``/``seeds``/learning rates,
            an unknown ``likelihood`` or ``split``, or an unavailable device.

    Example:
        >>> result = run_toy2d(tmp_dir, steps=5, pretrain_steps=5, resolution=20, seeds=1)  # doctest: +SKIP
        >>> sorted(result["metrics"])
        ['densehybrid', 'discriminative', 'generative']
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Expected `seed` to be a non-negative integer, but got {seed!r}.")
    steps = _check_positive_int("steps", steps)
    seeds = _check_positive_int("seeds", seeds)
    hidden = _check_positive_int("hidden", hidden)
    resolution = _check_positive_int("resolution", resolution)
    pretrain_steps = _check_positive_int("pretrain_steps", pretrain_steps)
    lr = _check_positive_float("lr", lr)
    pretrain_lr = _check_positive_float("pretrain_lr", pretrain_lr)
    criterion = DenseHybridLoss(likelihood=likelihood)  # validates `likelihood`
    if split not in SPLITS:
        raise ValueError(f"Expected `split` to be one of {', '.join(map(repr, SPLITS))}, but got {split!r}.")
    points = 2 * NUM_CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS) + NEGATIVES + BORDER_ANOMALIES + UNREACHED_ANOMALIES
    check_memory(  # float32: parameters with Adam's two moments and gradients; activations; the heatmap grid
        4 * (4 * hidden * (hidden + 8) + 6 * points * hidden + resolution**2 * (3 * hidden + 16)),
        f"the toy model (--hidden {hidden}) and its heatmap (--resolution {resolution})",
        "Lower --hidden or --resolution.",
    )
    torch_device = select_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    seed_list = [int(seed) + i for i in range(seeds)]
    runs = [
        _run_seed(s, steps, pretrain_steps, hidden, lr, pretrain_lr, criterion, torch_device,
                  resolution if i == 0 else None, split)
        for i, s in enumerate(seed_list)
    ]  # fmt: skip
    timings = {key: sum(run["timings"][key] for run in runs) for key in runs[0]["timings"]}

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    metrics_std: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for name in SCORE_NAMES:
        metrics[name], metrics_std[name] = {}, {}
        for family in FAMILIES:
            values = {m: [run["metrics"][name][family][m] for run in runs] for m in _BETTER}
            metrics[name][family] = {m: float(np.mean(v)) for m, v in values.items()}
            metrics_std[name][family] = {
                m: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for m, v in values.items()
            }
            row = {"model": "toy2d-mlp", "score": name, "family": family, **metrics[name][family]}
            if seeds > 1:
                row.update({f"{m}_std": metrics_std[name][family][m] for m in _BETTER})
                row["seeds"] = seeds
            rows.append(row)

    def beats(values: dict, family: str, metric: str) -> bool:
        mine = values["densehybrid"][family][metric]
        return all(_BETTER[metric](mine, values[c][family][metric]) for c in ("discriminative", "generative"))

    hybrid_beats_both = {f: {m: bool(beats(metrics, f, m)) for m in _BETTER} for f in FAMILIES}
    hybrid_wins = {f: {m: sum(beats(run["metrics"], f, m) for run in runs) for m in _BETTER} for f in FAMILIES}

    start = time.perf_counter()
    first = runs[0]
    figure = _plot(
        out_dir / "toy2d.png", first["data"], first["grid_scores"], first["thresholds"], first["metrics"],
        resolution, seeds, split,
    )  # fmt: skip
    timings["figure"] = time.perf_counter() - start

    config = {
        "seed": int(seed),
        "seeds": seed_list,
        "split": split,
        "pretrain_steps": pretrain_steps,
        "pretrain_lr": pretrain_lr,
        "steps": steps,
        "lr": lr,
        "lr_schedule": "cosine to 0",
        "hidden": hidden,
        "likelihood": likelihood,
        "beta": criterion.beta,
        "lambda": criterion.lambda_,
        "device": str(torch_device),
        "resolution": resolution,
        "construction": {
            "classes": NUM_CLASSES,
            "centre_radius": CENTRE_RADIUS,
            "centre_angles_deg": list(CENTRE_ANGLES),
            "inlier_std": INLIER_STD,
            "train_per_class": TRAIN_PER_CLASS,
            "test_per_class": TEST_PER_CLASS,
            "negatives": NEGATIVES,
            "negative_radii": list(NEGATIVE_RADII),
            "negative_sectors_deg": [[a, a + SECTOR_WIDTH] for a in NEGATIVE_SECTORS],
            "unreached_anomalies": UNREACHED_ANOMALIES,
            "unreached_radii": list(UNREACHED_RADII),
            "unreached_sectors_deg": [[a, a + SECTOR_WIDTH] for a in UNREACHED_SECTORS],
            "border_anomalies": BORDER_ANOMALIES,
            "border_stds": list(BORDER_STDS),
            "base_measure_std": BASE_MEASURE_STD,
        },
    }
    json_path = out_dir / "metrics.json"
    result: dict[str, Any] = {
        "rows": rows,
        "metrics": metrics,
        "metrics_std": metrics_std,
        "per_seed": {str(s): run["metrics"] for s, run in zip(seed_list, runs)},
        "hybrid_beats_both": hybrid_beats_both,
        "hybrid_wins": hybrid_wins,
        "accuracy": float(np.mean([run["accuracy"] for run in runs])),
        "balance": {
            part: {key: float(np.mean([run["balance"][part][key] for run in runs])) for key in runs[0]["balance"][part]}
            for part in runs[0]["balance"]
        },
        "reference": {
            name: {
                family: {m: float(np.mean([run["reference"][name][family][m] for run in runs])) for m in _BETTER}
                for family in FAMILIES
            }
            for name in REFERENCE_NAMES
        },
        "final_loss": first["final_loss"],
        "thresholds_tpr95": first["thresholds"],
        "config": config,
        "timings": timings,
        "figure": figure,
        "json": json_path,
    }
    serialisable = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}
    serialisable["table"] = format_table(rows, list(FAMILIES), bold=False)
    atomic_write_text(json_path, json.dumps(serialisable, indent=2) + "\n")
    return result

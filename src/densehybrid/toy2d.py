"""The 2-D toy experiment of Figure 2 of the TPAMI paper: discriminative vs generative vs hybrid anomaly scores.

The paper's figure contrasts three anomaly scores of one model on a toy problem: the discriminative score
:math:`s_D = \\ln P(d_{out} \\mid x)` is learned from a *finite* set of negatives and is unreliable where the
negatives never reached; the generative score :math:`s_G = -\\ln \\hat p(x)` decays like a density away from the
inliers but errs along the border of the inlier manifold; the hybrid :math:`s_H = s_D + s_G` combines both. We
rebuilt the setup from that description (the appendix with the exact construction was not available). Two
constructions share the inliers, K = 3 classes, isotropic Gaussians (std 0.4) centred on a circle of radius 2 at 90,
210 and 330 degrees, 500 training and 500 test points per class, and two kinds of test anomalies, 500 points each:

* ``"one-sided"`` (the default; chosen on the validation draw, docs/toy2d.md):

  - **training negatives**: 600 points 2.5 to 4.5 inlier standard deviations from a random class centre in an
    upward direction (0 to 180 degrees) and at least 2.5 from every centre: the upper side of the inlier border;
  - ``border`` anomalies: the same, 3 to 4 standard deviations away: where the negatives reached;
  - ``unreached`` anomalies: uniform (by area) on the annulus of radius 4 to 6 in the sector 225 to 315 degrees,
    far below the inliers, where no negative reached;
  - **model**: an MLP trunk 2 -> H -> H (tanh); the class logits carry the log of a Gaussian base measure fitted to
    the training inliers by maximum likelihood, ``s_y(x) = f_y(h(x)) - (x - m)^T S^-1 (x - m) / 2``, and the
    class-logit layer ``f`` has a decoupled weight decay of 30 in both phases. Bounded (tanh) features and a small
    ``f`` keep the learned part of ``logsumexp`` bounded, so the generative score is a density: the base measure
    sets its tails and its scale (a few nats over the inliers, like the discriminative score's), the learned part
    corrects it near the data. The loss is the released one (``likelihood="negatives"``).

* ``"sectors"`` (the first construction, kept for comparison):

  - **training negatives**: 600 points uniform (by area) on the annulus of radius 2.9 to 6, only in the four
    45-degree sectors starting at 0, 90, 180 and 270 degrees;
  - ``unreached`` anomalies: uniform (by area) on the annulus of radius 3.5 to 6 inside the four other sectors;
  - ``border`` anomalies: uniform on rings 3 to 4 inlier standard deviations around a random class centre, in every
    direction;
  - **model**: an MLP trunk 2 -> H -> H (ReLU), a fixed broad base measure ``-|x|^2 / (2 * 3^2)``, no weight decay,
    and the ``paired`` likelihood term (lower the negatives' ``logsumexp``, raise the inliers').

The base measure is shared by all classes, so the classifier and the discriminative head do not see it. Each point
is one "pixel"; negatives carry the ignore id and ``negative_mask``. **Training**, as DenseHybrid is used on real
models: closed-set pre-training (cross-entropy on the inliers, full-batch AdamW, lr 3e-3), then fine-tuning of the
whole model with :class:`densehybrid.losses.DenseHybridLoss` (the released loss weights beta = 0.03, lambda = 0.3),
full-batch AdamW whose lr decays from 3e-4 to 0 on a cosine. ``run_toy2d``'s ``likelihood``, ``classifier_decay``,
``activation`` and ``base_measure`` override the construction's choices.

Each run repeats this over several seeds (data and initialisation) and reports the mean and standard deviation of
AP, AUROC and FPR95 of every score on every anomaly kind; the figure shows the first seed. ``split="val"`` evaluates
on a second draw of the evaluation points, independent of the test draw, for choosing settings. Two diagnostics
explain the result (docs/toy2d.md): the spread of each score over the inliers with the hybrid's rank correlation
to each component, and reference scores: the generating density, which no model sees, and the model's base measure
alone. Metrics come from :func:`densehybrid.scores.get_score` and the exact metrics of :mod:`densehybrid.metrics`
(FPR95: first operating point with TPR >= 95%).
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
    "CONSTRUCTIONS",
    "CONSTRUCTION_SETTINGS",
    "BASE_MEASURES",
    "REFERENCE_NAMES",
    "true_inlier_log_density",
    "ToyData",
    "ToyModel",
    "make_toy_data",
    "fitted_base_measure",
    "run_toy2d",
]

SCORE_NAMES = ("discriminative", "generative", "densehybrid")
FAMILIES = ("unreached", "border", "all")
SPLITS = ("test", "val")
CONSTRUCTIONS = ("one-sided", "sectors")
BASE_MEASURES = ("fitted", "isotropic")
_TITLES = {
    "discriminative": "discriminative  s_D = ln P(d_out|x)",
    "generative": "generative  s_G = -ln p(x)",
    "densehybrid": "hybrid  s_H = s_D + s_G",
}

# The inliers of both constructions and the "sectors" construction (see the module docstring); fixed before the
# first run.
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

# The "one-sided" construction (the default; chosen on the validation draw, see docs/toy2d.md): the same inliers,
# negatives only along the upper side of the inlier border, anomalies along that border and far below the inliers.
ONE_SIDED_NEGATIVE_STDS = (2.5, 4.5)  # negatives: 2.5 to 4.5 inlier stds from a centre, upward directions
ONE_SIDED_BORDER_STDS = (3.0, 4.0)  # border anomalies: 3 to 4 inlier stds from a centre, upward directions
ONE_SIDED_UNREACHED_RADII = (4.0, 6.0)  # unreached anomalies: annulus below the inliers ...
ONE_SIDED_UNREACHED_SECTOR = (225.0, 315.0)  # ... in this sector (degrees)

# What each construction trains: the MLP's activation, the base measure of the class logits, the weight decay of
# the class-logit layer and the likelihood term of the DenseHybrid loss (overridable by run_toy2d's arguments).
CONSTRUCTION_SETTINGS: dict[str, dict[str, Any]] = {
    "one-sided": {"activation": "tanh", "base_measure": "fitted", "classifier_decay": 30.0, "likelihood": "negatives"},
    "sectors": {"activation": "relu", "base_measure": "isotropic", "classifier_decay": 0.0, "likelihood": "paired"},
}


class ToyData(dict):
    """The toy point sets, as float32 arrays of shape (P, 2) plus labels.

    Keys: ``train_x`` (P, 2), ``train_y`` (P,) class ids, ``negatives`` (Q, 2), ``test_x`` (T, 2),
    ``test_y`` (T,) class ids, ``unreached`` (U, 2), ``border`` (B, 2).
    """


def _centres() -> np.ndarray:
    angles = np.deg2rad(np.asarray(CENTRE_ANGLES))
    return CENTRE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _sectors(
    rng: np.random.Generator, count: int, radii: tuple[float, float], starts: tuple[float, ...],
    width: float = SECTOR_WIDTH,
) -> np.ndarray:  # fmt: skip
    """Points uniform by area on the annulus ``radii`` inside the sectors ``[start, start + width)`` (degrees)."""
    r = np.sqrt(rng.uniform(radii[0] ** 2, radii[1] ** 2, count))  # uniform by area: the squared radius is uniform
    start = np.asarray(starts)[rng.integers(0, len(starts), count)]
    theta = np.deg2rad(start + rng.uniform(0.0, width, count))
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _upper_border(rng: np.random.Generator, count: int, stds: tuple[float, float]) -> np.ndarray:
    """Points ``stds`` inlier standard deviations from a random class centre, in an upward direction (0 to 180
    degrees), and at least ``stds[0]`` standard deviations from every centre (other draws are rejected)."""
    chunks, found = [], 0
    for _ in range(100):  # each round keeps most of its draws; 100 rounds are never needed
        which = rng.integers(0, NUM_CLASSES, 2 * count)
        distance = INLIER_STD * rng.uniform(*stds, 2 * count)
        theta = rng.uniform(0.0, math.pi, 2 * count)
        points = _centres()[which] + distance[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        nearest = np.linalg.norm(points[:, None] - _centres()[None], axis=2).min(axis=1)
        chunks.append(points[nearest >= INLIER_STD * stds[0]])
        found += chunks[-1].shape[0]
        if found >= count:
            break
    return np.concatenate(chunks)[:count]


def _inliers(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    points = _centres()[labels] + INLIER_STD * rng.standard_normal((labels.size, 2))
    return points, labels


def _check_construction(construction: object) -> str:
    if construction not in CONSTRUCTIONS:
        raise ValueError(
            f"Expected `construction` to be one of {', '.join(map(repr, CONSTRUCTIONS))}, but got {construction!r}."
        )
    return str(construction)


def make_toy_data(seed: int = 0, split: str = "test", construction: str = "one-sided") -> ToyData:
    """Sample the toy point sets (see the module docstring for the constructions).

    Args:
        seed: seed of the NumPy generator; the same seed gives the same points.
        split: ``"test"`` or ``"val"``: which draw of the evaluation points (``test_x``, ``test_y``, ``unreached``,
            ``border``). The training points are the same for both; the validation draw comes from its own
            generator (seeded with ``(seed, 1)``), independent of the test draw, for choosing settings.
        construction: ``"one-sided"`` (default) or ``"sectors"`` (the first construction).

    Returns:
        A :class:`ToyData` dict of float32 (P, 2) point arrays and int64 labels.
    """
    if split not in SPLITS:
        raise ValueError(f"Expected `split` to be one of {', '.join(map(repr, SPLITS))}, but got {split!r}.")
    construction = _check_construction(construction)
    rng = np.random.default_rng(seed)
    train_x, train_y = _inliers(rng, TRAIN_PER_CLASS)
    if construction == "sectors":
        negatives = _sectors(rng, NEGATIVES, NEGATIVE_RADII, NEGATIVE_SECTORS)
    else:
        negatives = _upper_border(rng, NEGATIVES, ONE_SIDED_NEGATIVE_STDS)
    if split == "val":
        rng = np.random.default_rng([seed, 1])
    test_x, test_y = _inliers(rng, TEST_PER_CLASS)
    if construction == "sectors":
        unreached = _sectors(rng, UNREACHED_ANOMALIES, UNREACHED_RADII, UNREACHED_SECTORS)
        which = rng.integers(0, NUM_CLASSES, BORDER_ANOMALIES)
        distance = INLIER_STD * rng.uniform(*BORDER_STDS, BORDER_ANOMALIES)
        theta = rng.uniform(0.0, 2 * math.pi, BORDER_ANOMALIES)
        border = _centres()[which] + distance[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    else:
        start, stop = ONE_SIDED_UNREACHED_SECTOR
        unreached = _sectors(rng, UNREACHED_ANOMALIES, ONE_SIDED_UNREACHED_RADII, (start,), stop - start)
        border = _upper_border(rng, BORDER_ANOMALIES, ONE_SIDED_BORDER_STDS)
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


def fitted_base_measure(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The maximum-likelihood Gaussian of ``points`` (P, 2): its mean (2,) and covariance (2, 2)."""
    points = np.asarray(points, dtype=np.float64)
    return points.mean(axis=0), np.cov(points, rowvar=False, bias=True)


class ToyModel(nn.Module):
    """An MLP with a shared trunk, K class logits and a 2-way dataset-posterior head.

    Args:
        hidden: width H of the two hidden layers.
        num_classes: K.
        base_std: standard deviation of the isotropic Gaussian base measure centred at the origin (used when
            ``base_covariance`` is None).
        activation: ``"relu"`` or ``"tanh"``: the trunk's nonlinearity. Tanh features are bounded, so the learned
            part of every logit is bounded and the base measure alone sets the density's tails.
        base_mean, base_covariance: a Gaussian base measure (2,) and (2, 2) instead of the isotropic one, e.g. the
            one :func:`fitted_base_measure` fits to the training inliers.

    ``forward(points)`` maps (N, 2) float points to ``(logits (N, K), ood_logits (N, 2))``. Every logit includes
    the log of the Gaussian base measure up to a constant, ``-(x - m)^T S^-1 (x - m) / 2`` (the same for all classes),
    which gives the density ``exp(logsumexp(logits))`` Gaussian tails.
    """

    def __init__(
        self,
        hidden: int = 64,
        num_classes: int = NUM_CLASSES,
        base_std: float = BASE_MEASURE_STD,
        *,
        activation: str = "relu",
        base_mean: np.ndarray | None = None,
        base_covariance: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"Expected `activation` to be one of {', '.join(map(repr, _ACTIVATIONS))}, but got {activation!r}."
            )
        self.base_std = float(base_std)
        act = _ACTIVATIONS[activation]
        self.trunk = nn.Sequential(nn.Linear(2, hidden), act(), nn.Linear(hidden, hidden), act())
        self.classifier = nn.Linear(hidden, num_classes)
        self.posterior = nn.Linear(hidden, 2)
        self.base_mean: torch.Tensor | None
        self.base_precision: torch.Tensor | None
        if base_covariance is None:
            self.register_buffer("base_mean", None)
            self.register_buffer("base_precision", None)
        else:
            mean = np.zeros(2) if base_mean is None else np.asarray(base_mean, dtype=np.float64)
            precision = np.linalg.inv(np.asarray(base_covariance, dtype=np.float64))
            self.register_buffer("base_mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("base_precision", torch.as_tensor(precision, dtype=torch.float32))

    def log_base_measure(self, points: torch.Tensor) -> torch.Tensor:
        """ln of the base measure up to a constant, (N, 2) -> (N, 1)."""
        if self.base_precision is None:
            return -points.square().sum(dim=1, keepdim=True) / (2 * self.base_std**2)
        centred = points - self.base_mean
        return -0.5 * ((centred @ self.base_precision) * centred).sum(dim=1, keepdim=True)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(points)
        return self.classifier(features) + self.log_base_measure(points), self.posterior(features)


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


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


REFERENCE_NAMES = ("true_density", "discriminative+true_density", "base_measure")


def _reference_scores(test: dict[str, np.ndarray], points: np.ndarray, log_base: np.ndarray) -> dict[str, np.ndarray]:
    """Scores with the generating density in place of the learned one (what a perfect generative term would do),
    and the model's base measure alone, ``-ln b(x)`` (the generative term without its learned part)."""
    true_score = -true_inlier_log_density(points)
    return {
        "true_density": true_score,
        "discriminative+true_density": test["discriminative"] + true_score,
        "base_measure": -log_base,
    }


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
    construction: str = "one-sided", classifier_decay: float = 0.0, activation: str = "tanh",
    base_measure: str = "fitted",
) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate the toy model for one seed; the grid scores only when ``resolution`` is given."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = make_toy_data(int(seed), split, construction)
    points = torch.from_numpy(np.r_[data["train_x"], data["negatives"]]).to(torch_device)
    negative_mask = torch.zeros(points.shape[0], dtype=torch.bool, device=torch_device)
    negative_mask[data["train_x"].shape[0] :] = True
    target = torch.full((points.shape[0],), IGNORE_INDEX, dtype=torch.int64, device=torch_device)
    target[: data["train_x"].shape[0]] = torch.from_numpy(data["train_y"]).to(torch_device)

    # Seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        base = {}
        if base_measure == "fitted":
            base["base_mean"], base["base_covariance"] = fitted_base_measure(data["train_x"])
        model = ToyModel(hidden, activation=activation, **base).to(torch_device)
    inlier = ~negative_mask
    # Decoupled weight decay on the class-logit layer only (none by default for "sectors", where this is Adam).
    classifier = list(model.classifier.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in classifier)]

    def groups() -> list[dict[str, Any]]:  # fresh per optimiser: an optimiser writes its defaults into the groups
        return [{"params": classifier, "weight_decay": classifier_decay}, {"params": rest, "weight_decay": 0.0}]

    with _single_cpu_thread(torch_device):
        optimizer = torch.optim.AdamW(groups(), lr=pretrain_lr)
        for _ in range(pretrain_steps):
            optimizer.zero_grad(set_to_none=True)
            logits, _ = model(points)
            nn.functional.cross_entropy(logits[inlier], target[inlier]).backward()
            optimizer.step()
        timings["pretrain"] = time.perf_counter() - start
        start = time.perf_counter()
        optimizer = torch.optim.AdamW(groups(), lr=lr)
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
    with torch.no_grad():
        log_base = model.log_base_measure(torch.from_numpy(test_points).to(torch_device))[:, 0].double().cpu().numpy()
    reference_scores = _reference_scores(test_scores, test_points, log_base)
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
    likelihood: str | None = None,
    resolution: int = 200,
    split: str = "test",
    construction: str = "one-sided",
    classifier_decay: float | None = None,
    activation: str | None = None,
    base_measure: str | None = None,
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
        likelihood: ``likelihood`` of :class:`~densehybrid.losses.DenseHybridLoss`: ``"negatives"`` (the released
            code's term) or ``"paired"`` (the inlier likelihood is raised as the negatives' is lowered); None takes
            the construction's (``CONSTRUCTION_SETTINGS``: ``"negatives"`` for ``"one-sided"``, ``"paired"`` for
            ``"sectors"``).
        resolution: heatmap grid points per axis.
        split: ``"test"`` (the reported numbers) or ``"val"``: evaluate on the validation draw of every seed (same
            training points, evaluation points drawn independently of the test draw), for choosing settings.
        construction: ``"one-sided"`` (default: negatives along one side of the inlier border, tanh MLP, a base
            measure fitted to the inliers, weight decay on the class-logit layer) or ``"sectors"`` (the first
            construction: negatives in four sectors, ReLU MLP, a broad fixed base measure, no weight decay).
        classifier_decay: decoupled (AdamW) weight decay of the class-logit layer in both phases; None takes the
            construction's (30 for ``"one-sided"``, 0 for ``"sectors"``).
        activation: the trunk's nonlinearity, ``"tanh"`` or ``"relu"``; None takes the construction's (``"tanh"``
            for ``"one-sided"``, ``"relu"`` for ``"sectors"``).
        base_measure: ``"fitted"`` (the maximum-likelihood Gaussian of the training inliers) or ``"isotropic"``
            (centred at the origin, standard deviation 3); None takes the construction's (``"fitted"`` for
            ``"one-sided"``, ``"isotropic"`` for ``"sectors"``).

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
            a negative ``classifier_decay``, an unknown ``likelihood``, ``split``, ``construction``, ``activation`` or
            ``base_measure``, or an unavailable device.

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
    construction = _check_construction(construction)
    settings = CONSTRUCTION_SETTINGS[construction]
    likelihood = settings["likelihood"] if likelihood is None else likelihood
    if classifier_decay is None:
        classifier_decay = settings["classifier_decay"]
    if (
        isinstance(classifier_decay, bool)
        or not isinstance(classifier_decay, (int, float))
        or not (math.isfinite(classifier_decay) and classifier_decay >= 0)
    ):
        raise ValueError(f"Expected `classifier_decay` to be a finite number >= 0, but got {classifier_decay!r}.")
    classifier_decay = float(classifier_decay)
    activation = settings["activation"] if activation is None else activation
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"Expected `activation` to be one of {', '.join(map(repr, _ACTIVATIONS))}, but got {activation!r}."
        )
    base_measure = settings["base_measure"] if base_measure is None else base_measure
    if base_measure not in BASE_MEASURES:
        raise ValueError(
            f"Expected `base_measure` to be one of {', '.join(map(repr, BASE_MEASURES))}, but got {base_measure!r}."
        )
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
                  resolution if i == 0 else None, split, construction, classifier_decay, activation, base_measure)
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

    one_sided = construction == "one-sided"
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
        "activation": activation,
        "base_measure": base_measure,
        **({"base_measure_std": BASE_MEASURE_STD} if base_measure == "isotropic" else {}),
        "classifier_decay": classifier_decay,
        "likelihood": likelihood,
        "beta": criterion.beta,
        "lambda": criterion.lambda_,
        "device": str(torch_device),
        "resolution": resolution,
        "construction": {
            "name": construction,
            "classes": NUM_CLASSES,
            "centre_radius": CENTRE_RADIUS,
            "centre_angles_deg": list(CENTRE_ANGLES),
            "inlier_std": INLIER_STD,
            "train_per_class": TRAIN_PER_CLASS,
            "test_per_class": TEST_PER_CLASS,
            "negatives": NEGATIVES,
            "unreached_anomalies": UNREACHED_ANOMALIES,
            "border_anomalies": BORDER_ANOMALIES,
            **(
                {
                    "negative_stds_upward": list(ONE_SIDED_NEGATIVE_STDS),
                    "unreached_radii": list(ONE_SIDED_UNREACHED_RADII),
                    "unreached_sectors_deg": [list(ONE_SIDED_UNREACHED_SECTOR)],
                    "border_stds_upward": list(ONE_SIDED_BORDER_STDS),
                }
                if one_sided
                else {
                    "negative_radii": list(NEGATIVE_RADII),
                    "negative_sectors_deg": [[a, a + SECTOR_WIDTH] for a in NEGATIVE_SECTORS],
                    "unreached_radii": list(UNREACHED_RADII),
                    "unreached_sectors_deg": [[a, a + SECTOR_WIDTH] for a in UNREACHED_SECTORS],
                    "border_stds": list(BORDER_STDS),
                }
            ),
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

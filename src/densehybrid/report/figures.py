"""Report figures: ROC and precision-recall curves, score histograms and the example grid, written as PNG files.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg), never through
``pyplot``, so writing a report neither needs a display nor changes the caller's matplotlib backend or state.
Curves are exact on the pixel sample (:mod:`densehybrid.report.curves`). Raw anomaly scores are unbounded, so the
example heatmaps are normalised per example for display only (:func:`normalize_for_display`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from densehybrid.report import curves

if TYPE_CHECKING:
    from densehybrid.report.render import Example, ScoreSample

__all__ = [
    "IGNORE_COLOUR",
    "UNKNOWN_COLOUR",
    "colorize",
    "family_masks",
    "normalize_for_display",
    "plot_curves",
    "plot_examples",
    "plot_histograms",
    "sample_metrics",
]

UNKNOWN_COLOUR = np.array([0, 255, 255], dtype=np.uint8)  # cyan, as in the paper's open-set figures
IGNORE_COLOUR = np.array([0, 0, 0], dtype=np.uint8)
DISPLAY_PERCENTILES = (1.0, 99.0)
_DPI = 100
_LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 3)))
# A curve with more points than this is thinned for drawing only; the metrics in the legend stay exact.
_MAX_CURVE_POINTS = 4000


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Colour a label map: known classes from ``palette``, the unknown class K in cyan, ignore in black.

    Args:
        labels: (H, W) int ids in ``[0, K]`` or ``ignore_index``.
        palette: (K, 3) uint8 colours of the known classes.
        ignore_index: the void id.

    Returns:
        (H, W, 3) uint8 colour image.

    Raises:
        ValueError: if an id is outside ``[0, K]`` and not ``ignore_index``.
    """
    labels = np.asarray(labels)
    palette = np.asarray(palette, dtype=np.uint8)
    num_classes = palette.shape[0]
    table = np.zeros((max(num_classes + 1, ignore_index + 1), 3), dtype=np.uint8)
    table[:num_classes] = palette
    table[num_classes] = UNKNOWN_COLOUR
    table[ignore_index] = IGNORE_COLOUR
    bad = ((labels < 0) | (labels > num_classes)) & (labels != ignore_index)
    if bad.any():
        found = np.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"Expected label ids in [0, {num_classes}] or the ignore index {ignore_index}, but got {found}."
        )
    return table[labels]


def normalize_for_display(score: np.ndarray, percentiles: tuple[float, float] = DISPLAY_PERCENTILES) -> np.ndarray:
    """Map a raw score map to [0, 1] by its own percentiles, for display only.

    Values below the low percentile become 0 and above the high one 1; ``+inf`` maps to 1, ``-inf`` and NaN to 0.
    A constant map becomes all zeros.

    Args:
        score: (H, W) float raw anomaly scores (unbounded).
        percentiles: the (low, high) percentiles of the finite values that map to 0 and 1.

    Returns:
        (H, W) float64 in [0, 1].
    """
    score = np.asarray(score, dtype=np.float64)
    finite = np.isfinite(score)
    out = np.zeros(score.shape, dtype=np.float64)
    out[score == np.inf] = 1.0
    if not finite.any():
        return out
    low, high = np.percentile(score[finite], percentiles)
    if high > low:
        out[finite] = np.clip((score[finite] - low) / (high - low), 0.0, 1.0)
    return out


def family_masks(
    family: np.ndarray | None, family_names: Mapping[int, str] | None
) -> list[tuple[str, np.ndarray | None]]:
    """The pixel subsets of one sample that get their own curve panel: ``("all", None)`` first, then one per family.

    Family ids with a name in ``family_names`` get a panel. Pixels whose id has no name (e.g. 0 for pixels of
    anomaly-free images) are shared: they belong to every named family's subset. Without ``family_names`` every id
    present gets a panel named ``"family <id>"`` and nothing is shared.

    Args:
        family: (P,) int family id per pixel, or None.
        family_names: id -> display name.

    Returns:
        ``[(name, mask or None), ...]`` with (P,) bool masks.
    """
    panels: list[tuple[str, np.ndarray | None]] = [("all", None)]
    if family is None:
        return panels
    family = np.asarray(family)
    present = [int(v) for v in np.unique(family)]
    names = dict(family_names or {})
    if not names:
        return panels + [(f"family {fid}", family == fid) for fid in present]
    shared = ~np.isin(family, list(names))
    return panels + [(names[fid], (family == fid) | shared) for fid in sorted(names) if fid in present]


def _quiet(fn, *args) -> float:
    # Degenerate subsets are reported as NaN ("n/a") in the figures; their warning would only repeat that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


def sample_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AP, AUROC and FPR95 of one pixel sample (NaN where undefined, without warnings).

    Args:
        scores: (P,) float scores, higher = more anomalous.
        labels: (P,) int 0 / 1.

    Returns:
        ``{"pixels", "anomaly_fraction", "ap", "auroc", "fpr95"}``; fractions in [0, 1].
    """
    labels = np.asarray(labels)
    return {
        "pixels": int(labels.size),
        "anomaly_fraction": float(labels.mean()) if labels.size else math.nan,
        "ap": _quiet(curves.average_precision, scores, labels),
        "auroc": _quiet(curves.auroc, scores, labels),
        "fpr95": _quiet(curves.fpr_at_tpr, scores, labels),
    }


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= _MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, _MAX_CURVE_POINTS).round().astype(int))
    return x[keep], y[keep]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def _grid(count: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, count))
    return math.ceil(max(count, 1) / cols), cols


def plot_curves(
    samples: Mapping[str, ScoreSample],
    path: str | Path,
    kind: str,
    family_names: Mapping[int, str] | None = None,
) -> Path:
    """Draw ROC (``kind="roc"``) or precision-recall (``kind="pr"``) curves: one line per score.

    One panel for all pixels, plus one per family when the samples carry family ids (see :func:`family_masks`).
    The legend gives each score's AP and AUROC on that panel's pixels.

    Args:
        samples: score name -> :class:`~densehybrid.report.render.ScoreSample`.
        path: the PNG file to write.
        kind: ``"roc"`` or ``"pr"``.
        family_names: family id -> display name.

    Returns:
        The written path.
    """
    if kind not in ("roc", "pr"):
        raise ValueError(f"Expected `kind` to be 'roc' or 'pr', but got {kind!r}.")
    panel_names: list[str] = ["all"]
    for sample in samples.values():
        for name, _ in family_masks(sample.family, family_names)[1:]:
            if name not in panel_names:
                panel_names.append(name)
    rows, cols = _grid(len(panel_names), 3)
    fig = Figure(figsize=(4.6 * cols, 4.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panel_names):
        drawn = 0
        baseline = math.nan
        for index, (score_name, sample) in enumerate(samples.items()):
            masks = dict(family_masks(sample.family, family_names))
            if panel not in masks:
                continue
            mask = masks[panel]
            scores = sample.scores if mask is None else sample.scores[mask]
            labels = sample.labels if mask is None else sample.labels[mask]
            metrics = sample_metrics(scores, labels)
            label = f"{score_name} (AP {_pct(metrics['ap'])}, AUROC {_pct(metrics['auroc'])})"
            if kind == "roc":
                x, y, _ = _quiet(curves.roc_curve, scores, labels)
            else:
                y, x, _ = _quiet(curves.precision_recall_curve, scores, labels)
                baseline = metrics["anomaly_fraction"]
            if np.isfinite(x).any():
                # distinct dashes and widths, wide first: scores with equal values (energy and generative) stay visible
                style = _LINE_STYLES[index % len(_LINE_STYLES)]
                ax.plot(*_thin(x, y), lw=max(3.0 - 0.3 * index, 1.0), ls=style, label=label)
                drawn += 1
            else:
                ax.plot([], [], label=label + " - undefined")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
            ax.axhline(0.95, color="0.5", lw=0.8, ls="--")
            ax.set_xlabel("false-positive rate")
            ax.set_ylabel("true-positive rate")
        else:
            if math.isfinite(baseline):
                ax.axhline(baseline, color="0.7", lw=0.8, ls=":")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{'ROC' if kind == 'roc' else 'precision-recall'}: {panel}")
        if samples:
            ax.legend(loc="lower right" if kind == "roc" else "upper right", fontsize=7)
        if not drawn:
            ax.text(0.5, 0.5, "no curve: the sample lacks inliers or anomalies", ha="center", va="center", fontsize=8)
    for ax in axes[len(panel_names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_histograms(samples: Mapping[str, ScoreSample], path: str | Path, bins: int = 60) -> Path:
    """One panel per score: density-normalised histograms of inlier and anomaly scores, log-scaled density axis.

    Infinite scores are clipped to the finite range so they stay visible in the outermost bins.

    Args:
        samples: score name -> :class:`~densehybrid.report.render.ScoreSample`.
        path: the PNG file to write.
        bins: bins per panel, shared by the two classes.

    Returns:
        The written path.
    """
    rows, cols = _grid(len(samples), 3)
    fig = Figure(figsize=(4.4 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, sample) in zip(axes, samples.items()):
        scores = np.asarray(sample.scores, dtype=np.float64)
        finite = scores[np.isfinite(scores)]
        ax.set_title(name)
        ax.set_xlabel("anomaly score (raw)")
        ax.set_ylabel("density (log)")
        if finite.size == 0:
            ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
            continue
        low, high = float(finite.min()), float(finite.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
        clipped = np.clip(scores, low, high)
        for label, colour, text in ((0, "tab:blue", "inlier"), (1, "tab:red", "anomaly")):
            values = clipped[sample.labels == label]
            if values.size:
                ax.hist(
                    values,
                    bins=edges,
                    density=True,
                    histtype="stepfilled",
                    alpha=0.45,
                    color=colour,
                    label=f"{text} ({values.size})",
                )
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(samples) :]:
        ax.set_visible(False)
    if not samples:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no score samples", ha="center", va="center")
        axes[0].set_axis_off()
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_examples(
    examples: Sequence[Example],
    palette: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    overlay_alpha: float = 0.55,
) -> Path:
    """The example grid: one row per example; image, ground truth, anomaly heatmap, open-set prediction overlay.

    Ground truth and prediction use ``palette`` for known classes, cyan for the unknown class K (anomalies) and black
    for ignore. Each heatmap is the raw score map normalised to its own 1st-99th percentile, for display only: colours
    are not comparable between rows; a label in each heatmap gives the raw range.

    Args:
        examples: the :class:`~densehybrid.report.render.Example` rows.
        palette: (K, 3) uint8 class colours.
        class_names: K class names, for the legend.
        path: the PNG file to write.
        overlay_alpha: opacity of the prediction colours over the image.

    Returns:
        The written path.
    """
    count = max(len(examples), 1)
    aspect = 1.0
    if examples:
        height, width = examples[0].target.shape
        aspect = height / max(width, 1)
    cell_w = 3.2
    height = count * cell_w * aspect + 0.7
    fig = Figure(figsize=(4 * cell_w, height))
    axes = fig.subplots(count, 4, squeeze=False)
    columns = (
        "image",
        "ground truth (cyan = anomaly)",
        "anomaly score (normalised per example)",
        "open-set prediction (cyan = unknown)",
    )
    for row, example in enumerate(examples):
        gt = colorize(example.target, palette)
        pred = colorize(example.prediction, palette)
        blend = (1 - overlay_alpha) * example.image.astype(np.float64) + overlay_alpha * pred.astype(np.float64)
        finite = example.score[np.isfinite(example.score)]
        if finite.size:
            low, high = np.percentile(finite, DISPLAY_PERCENTILES)
            heat_range = f"raw p1..p99: {low:.3g}..{high:.3g}"
        else:
            heat_range = "no finite scores"
        panels = (
            (example.image, {}),
            (gt, {}),
            (normalize_for_display(example.score), {"cmap": "inferno", "vmin": 0.0, "vmax": 1.0}),
            (blend.round().astype(np.uint8), {}),
        )
        for col, (picture, kwargs) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(picture, interpolation="nearest", **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
        axes[row, 2].text(
            0.01,
            0.03,
            heat_range,
            transform=axes[row, 2].transAxes,
            fontsize=7,
            color="white",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0},
        )
        if example.title:
            axes[row, 0].set_ylabel(example.title, fontsize=8)
    if not examples:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0, 0].text(0.0, 0.5, "no examples", fontsize=10)
    # a dark outline keeps light swatches (white lane markings) visible on the white page
    outline = {"edgecolor": "0.3", "linewidth": 0.6}
    handles = [
        Patch(facecolor=np.asarray(c) / 255.0, label=n, **outline) for c, n in zip(np.asarray(palette), class_names)
    ]
    handles.append(Patch(facecolor=UNKNOWN_COLOUR / 255.0, label="unknown / anomaly", **outline))
    handles.append(Patch(facecolor=IGNORE_COLOUR / 255.0, label="ignore", **outline))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))
    return _save(fig, Path(path))

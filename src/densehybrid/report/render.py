"""The run report: a Markdown file, a self-contained HTML page, a JSON file of the numbers, and PNG figures.

:func:`write_report` turns a :class:`ReportData` (metric rows, segmentation numbers, pixel samples of each score,
a few examples, and the run's settings) into::

    out_dir/report.md       the table, the numbers, links to the figures, config, timings, notes
    out_dir/report.html     the same content with the figures embedded (base64 PNG): opens from disk, no server
    out_dir/results.json    rows, segmentation, config, timings and per-score sample metrics (NaN -> null)
    out_dir/figures/        roc.png, pr.png, histograms.png, examples.png

Metric values are fractions in [0, 1] and are shown as percentages; NaN or missing values render as "n/a".
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densehybrid.report import figures as _figures

__all__ = ["Example", "ReportData", "ScoreSample", "format_table", "write_report"]

_METRICS = (("ap", "AP"), ("fpr95", "FPR95"), ("auroc", "AUROC"))
_FIGURES = (
    ("roc", "ROC curves"),
    ("pr", "Precision-recall curves"),
    ("histograms", "Score histograms"),
    ("examples", "Examples"),
)
_SEGMENTATION_LABELS = {
    "closed_miou": "closed-set mIoU",
    "closed_miou_before_finetuning": "closed-set mIoU before fine-tuning",
    "open_miou": "open-mIoU",
    "anomaly_iou": "anomaly IoU",
    "threshold": "threshold τ (raw score)",
    "threshold_tpr": "TPR at τ (calibration)",
    "per_class_iou": "closed-set IoU",
    "per_class_open_iou": "open-IoU",
}
# Keys made of these words hold fractions in [0, 1] and are shown as percentages.
_FRACTION_WORDS = {"iou", "miou", "tpr", "fpr", "fpr95", "acc", "accuracy", "ap", "auroc", "precision", "recall"}


def _ids_error(name: str, values: np.ndarray, bad: np.ndarray, allowed: str) -> ValueError:
    found = np.unique(values[bad])[:10].tolist()
    return ValueError(f"Expected `{name}` ids in {allowed}, but got {found} ({int(bad.sum())} pixel(s)).")


@dataclass
class Example:
    """One example row of the report's example grid.

    Attributes:
        image: (H, W, 3) uint8 RGB image.
        target: (H, W) int ground truth: class ids ``0..K-1``, anomaly id K, ignore 255.
        prediction: (H, W) int open-set prediction ``0..K`` (K = unknown).
        score: (H, W) float raw anomaly score map, higher = more anomalous (unbounded; infinities allowed).
        title: shown beside the row.
    """

    image: np.ndarray
    target: np.ndarray
    prediction: np.ndarray
    score: np.ndarray
    title: str = ""

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image)
        self.target = np.asarray(self.target)
        self.prediction = np.asarray(self.prediction)
        self.score = np.asarray(self.score)
        if self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"Expected `image` to have shape (H, W, 3), but got {self.image.shape}.")
        if self.image.dtype != np.uint8:
            raise TypeError(
                f"Expected `image` to be uint8 in [0, 255], but got dtype {self.image.dtype}. "
                "Convert a [0, 1] float image with `(image * 255).round().astype(np.uint8)`."
            )
        size = self.image.shape[:2]
        for name in ("target", "prediction", "score"):
            value = getattr(self, name)
            if value.shape != size:
                raise ValueError(f"Expected `{name}` to have shape {size} like `image`, but got {value.shape}.")
        for name in ("target", "prediction"):
            if not np.issubdtype(getattr(self, name).dtype, np.integer):
                raise TypeError(f"Expected `{name}` to be an integer array, but got dtype {getattr(self, name).dtype}.")
        if not np.issubdtype(self.score.dtype, np.floating):
            raise TypeError(f"Expected `score` to be a float array, but got dtype {self.score.dtype}.")

    def check_ids(self, num_classes: int) -> None:
        """Raise ``ValueError`` unless target ids are in ``[0, K]`` or 255 and prediction ids in ``[0, K]``."""
        bad = ((self.target < 0) | (self.target > num_classes)) & (self.target != 255)
        if bad.any():
            raise _ids_error("target", self.target, bad, f"[0, {num_classes}] or 255")
        bad = (self.prediction < 0) | (self.prediction > num_classes)
        if bad.any():
            raise _ids_error("prediction", self.prediction, bad, f"[0, {num_classes}]")


@dataclass
class ScoreSample:
    """A pixel subsample of one score, for its curves and histograms.

    Attributes:
        scores: (P,) float scores, higher = more anomalous; NaN is rejected, infinities are allowed.
        labels: (P,) int 0 (inlier) / 1 (anomaly); ignore pixels must be left out.
        family: (P,) int family id per pixel for per-family curves, or None.
    """

    scores: np.ndarray
    labels: np.ndarray
    family: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores)
        self.labels = np.asarray(self.labels)
        if self.scores.ndim != 1:
            raise ValueError(f"Expected `scores` to have shape (P,), but got {self.scores.shape}.")
        if self.scores.dtype == bool or not np.issubdtype(self.scores.dtype, np.number):
            raise TypeError(f"Expected `scores` to be a float array, but got dtype {self.scores.dtype}.")
        self.scores = self.scores.astype(np.float64, copy=False)
        if np.isnan(self.scores).any():
            raise ValueError(
                f"Expected `scores` to contain no NaN, but got {int(np.isnan(self.scores).sum())} NaN value(s)."
            )
        if self.labels.shape != self.scores.shape:
            raise ValueError(f"Expected `labels` to have shape {self.scores.shape}, but got {self.labels.shape}.")
        if self.labels.dtype != bool and not np.issubdtype(self.labels.dtype, np.integer):
            raise TypeError(f"Expected `labels` to be an integer array, but got dtype {self.labels.dtype}.")
        if self.labels.size and not np.isin(self.labels, (0, 1)).all():
            found = np.unique(self.labels[~np.isin(self.labels, (0, 1))])[:10].tolist()
            raise ValueError(
                f"Expected `labels` to hold only 0 (inlier) and 1 (anomaly), but got {found}. Drop ignore pixels."
            )
        self.labels = self.labels.astype(np.int64, copy=False)
        if self.family is not None:
            self.family = np.asarray(self.family)
            if self.family.shape != self.scores.shape:
                raise ValueError(f"Expected `family` to have shape {self.scores.shape}, but got {self.family.shape}.")
            if not np.issubdtype(self.family.dtype, np.integer):
                raise TypeError(f"Expected `family` to be an integer array, but got dtype {self.family.dtype}.")


@dataclass
class ReportSection:
    """An extra section of a report: a title, paragraphs, plain tables and images (PNG files).

    Attributes:
        title: section heading.
        paragraphs: text shown before the tables.
        tables: ``(header, rows)`` pairs, every row a list of cell texts.
        images: ``(caption, path)`` pairs; the Markdown links the path relative to the report folder, the HTML embeds
            the image.
        label_columns: leading text columns of every table (left-aligned); the others are numeric (right-aligned).
    """

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)
    label_columns: int = 1


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return str(path)


def _sections_markdown(sections: Sequence[ReportSection], out_dir: Path) -> list[str]:
    out: list[str] = []
    for section in sections:
        out += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            out += [paragraph, ""]
        for header, rows in section.tables:
            body = [list(map(str, r)) for r in rows]
            out += [_markdown_table(list(header), body, numeric_from=section.label_columns), ""]
        for caption, path in section.images:
            out += [f"![{caption}]({_relative_to(path, out_dir)})", "", caption, ""]
    return out


def _sections_html(sections: Sequence[ReportSection], out_dir: Path) -> list[str]:
    out: list[str] = []
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        out += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        for header, rows in section.tables:
            body = _plain([list(map(str, r)) for r in rows])
            out.append(_html_table(list(header), body, numeric_from=section.label_columns))
        for caption, path in section.images:
            encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            alt = html.escape(f"{caption} ({_relative_to(path, out_dir)})")
            out.append(
                f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    return out


@dataclass
class ReportData:
    """Everything a report shows.

    Attributes:
        title: report title.
        command: the command line that produced the run.
        rows: metric rows ``{"model", "score", "family", "ap", "fpr95", "auroc"}``, values fractions in [0, 1]
            (NaN allowed; a missing ``family`` means ``"all"``).
        segmentation: open-set segmentation numbers, e.g. ``closed_miou``, ``open_miou``, ``anomaly_iou``,
            ``threshold``, ``threshold_tpr``, ``per_class_iou`` and ``per_class_open_iou`` ({class name: IoU}).
        class_names: the K known class names.
        palette: (K, 3) uint8 class colours (unknown is drawn cyan, ignore black).
        samples: score name -> :class:`ScoreSample`.
        examples: the rows of the example grid.
        config: run settings.
        timings: stage -> seconds.
        notes: free-text remarks.
        family_names: family id -> name for the per-family curves, e.g. ``{1: "real", 2: "procedural"}``.
        extra: more JSON-ready keys for ``results.json`` (never replacing the keys above), e.g. per-seed rows.
        sections: more report sections (:class:`ReportSection`), shown after the figures.
    """

    title: str
    command: str
    rows: list[dict]
    segmentation: dict
    class_names: list[str]
    palette: np.ndarray
    samples: dict[str, ScoreSample]
    examples: list[Example]
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    family_names: dict[int, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    sections: list[ReportSection] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------- formatting


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _percent(value: object) -> str:
    if not _is_number(value) or not math.isfinite(float(value)):
        return "n/a"
    return f"{100 * float(value):.2f}"


def _number(value: object) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if _is_number(value):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    if value is None:
        return "n/a"
    if isinstance(value, (str, Path)):
        return str(value)
    return json.dumps(_jsonable(value), sort_keys=True)


def _is_fraction_key(key: str) -> bool:
    return bool(_FRACTION_WORDS & set(str(key).lower().replace("-", "_").split("_")))


def _value(key: str, value: object) -> str:
    return _percent(value) if _is_fraction_key(key) and _is_number(value) else _number(value)


def _finite(value: object) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(float(value)) else None


def _check_rows(rows: object) -> list[dict]:
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise TypeError(f"Expected `rows` to be a list of dicts, but got {type(rows).__name__}.")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"Expected `rows[{index}]` to be a dict, but got {type(row).__name__}.")
        missing = [key for key in ("model", "score") if key not in row]
        if missing:
            raise ValueError(f"Expected `rows[{index}]` to have the keys 'model' and 'score', but got {sorted(row)}.")
    return list(rows)


def _table_cells(rows: list[dict], families: list[str] | None) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and body of the metric table; each body cell is (text, is_best)."""
    rows = _check_rows(rows)
    if families is None:
        families = list(dict.fromkeys(str(row.get("family", "all")) for row in rows))
    keys = list(dict.fromkeys((str(row["model"]), str(row["score"])) for row in rows))
    lookup: dict[tuple[str, str, str], Mapping] = {}
    for row in rows:
        key = (str(row["model"]), str(row["score"]), str(row.get("family", "all")))
        if key in lookup:
            warnings.warn(f"Duplicate metric row for {key}; the table shows the last one.", UserWarning, stacklevel=3)
        lookup[key] = row
    best: dict[tuple[str, str], float] = {}
    for family in families:
        for metric, better in (("ap", max), ("fpr95", min)):
            values = [_finite(lookup.get((*k, family), {}).get(metric)) for k in keys]
            values = [v for v in values if v is not None]
            # Marking the "best" of a single value says nothing.
            if len(values) > 1:
                best[(family, metric)] = better(values)
    header = ["model", "score"] + [f"{family} {label}" for family in families for _, label in _METRICS]
    body = []
    for model, score in keys:
        cells: list[tuple[str, bool]] = [(model, False), (score, False)]
        for family in families:
            row = lookup.get((model, score, family), {})
            for metric, _ in _METRICS:
                value = row.get(metric)
                target = best.get((family, metric))
                text = _percent(value)
                if f"{metric}_std" in row and text != "n/a":
                    text += f" ± {_percent(row[f'{metric}_std'])}"
                cells.append((text, target is not None and _finite(value) == target))
        body.append(cells)
    return header, body


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str], body: list[list[str]], numeric_from: int = 1) -> str:
    header = [_markdown_escape(h) for h in header]
    body = [[_markdown_escape(c) for c in row] for row in body]
    widths = [max([len(header[i])] + [len(row[i]) for row in body] + [3]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i < numeric_from else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if i >= numeric_from else "-" * (w + 2)) for i, w in enumerate(widths))
    return "\n".join([line(header), rule + "|"] + [line(row) for row in body])


def format_table(rows: list[dict], families: list[str] | None = None, *, bold: bool = True) -> str:
    """The metric table as a Markdown pipe table, aligned for the terminal.

    One row per (model, score) in order of first appearance; for every family the columns AP, FPR95 and AUROC in %.
    The best AP and the lowest FPR95 of each family column are wrapped in ``**`` (Markdown bold) when the column has
    at least two values. Missing or NaN values read "n/a". A row with ``ap_std`` (``fpr95_std``, ``auroc_std``)
    shows ``mean ± std``.

    Args:
        rows: ``{"model", "score", "family", "ap", "fpr95", "auroc"}`` dicts, values fractions in [0, 1], optionally
            with standard deviations ``ap_std``, ``fpr95_std``, ``auroc_std``; a row without ``family`` counts as
            ``"all"``.
        families: the family columns in order; default: the families of ``rows`` in order of first appearance.
        bold: mark the best values (turn off for plain terminal output).

    Returns:
        The table, lines joined by newlines (no trailing newline).

    Raises:
        TypeError: if ``rows`` is not a list of dicts.
        ValueError: if a row lacks ``model`` or ``score``.

    Example:
        >>> print(format_table([{"model": "m", "score": "densehybrid", "family": "all", "ap": 0.5, "fpr95": 0.1,
        ...                      "auroc": float("nan")}]))
        | model | score       | all AP | all FPR95 | all AUROC |
        |-------|-------------|-------:|----------:|----------:|
        | m     | densehybrid |  50.00 |     10.00 |       n/a |
    """
    header, body = _table_cells(rows, families)
    text = [[f"**{t}**" if best and bold else t for t, best in row] for row in body]
    return _markdown_table(header, text, numeric_from=2)


# --------------------------------------------------------------------------------------------------------- sections


def _jsonable(value: Any) -> Any:
    """Plain JSON data: NaN/inf -> None, numpy -> Python, Path -> str, tuples -> lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _segmentation_tables(data: ReportData) -> tuple[list[list[str]], list[str], list[list[str]]]:
    """(scalar rows [label, value], per-class header, per-class rows) of the segmentation section."""
    segmentation = data.segmentation or {}
    scalars, per_class = [], {}
    for key, value in segmentation.items():
        if isinstance(value, Mapping):
            per_class[key] = value
        else:
            scalars.append([_SEGMENTATION_LABELS.get(key, str(key)), _value(key, value)])
    header: list[str] = []
    class_rows: list[list[str]] = []
    if per_class:
        names = list(
            dict.fromkeys([*map(str, data.class_names or []), *(str(n) for v in per_class.values() for n in v)])
        )
        names = [n for n in names if any(n in v for v in per_class.values())]
        header = ["class"] + [_SEGMENTATION_LABELS.get(key, str(key)) for key in per_class]
        for name in names:
            class_rows.append([name] + [_value(key, values.get(name)) for key, values in per_class.items()])
    return scalars, header, class_rows


def _flat_items(mapping: Mapping) -> list[list[str]]:
    return [[str(key), _number(value)] for key, value in (mapping or {}).items()]


def _timing_items(timings: Mapping) -> list[list[str]]:
    return [[str(k), "n/a" if _finite(v) is None else f"{float(v):.2f}"] for k, v in (timings or {}).items()]


def _sample_rows(summaries: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    return [
        [
            name,
            str(s["pixels"]),
            _percent(s["anomaly_fraction"]),
            _percent(s["ap"]),
            _percent(s["auroc"]),
            _percent(s["fpr95"]),
        ]
        for name, s in summaries.items()
    ]


_SAMPLE_HEADER = ["score", "pixels", "anomaly %", "AP", "AUROC", "FPR95"]
_TABLE_NOTE = (
    "Values in %. AP and AUROC: higher is better; FPR95 (false-positive rate at 95% true-positive rate): lower is "
    "better. Bold: best AP and lowest FPR95 of each column (by the mean)."
)
_SPREAD_NOTE = "a ± b: mean ± standard deviation over seeds."
_HEATMAP_NOTE = (
    "Anomaly heatmaps are normalised per example to that example's 1st-99th score percentile, for display only: "
    "colours are not comparable between rows (the label in each heatmap gives the raw range)."
)


def _table_note(rows: list[dict]) -> str:
    spread = any(any(f"{m}_std" in row for m, _ in _METRICS) for row in rows)
    return _TABLE_NOTE + " " + (_SPREAD_NOTE if spread else "Single values: no spread was measured.")


def _figure_caption(key: str, data: ReportData) -> str:
    if key in ("roc", "pr"):
        text = "Exact curves on the pixel sample of each score (see the sample table); legend: AP and AUROC in %."
        if any(s.family is not None for s in (data.samples or {}).values()):
            text += " One panel per family; pixels of unnamed families are shared by every family."
        else:
            text += " One panel: all anomaly families pooled."
        text += " Scores with equal values draw the same curve; line styles differ so that none hides another."
        return text
    if key == "histograms":
        return "Inlier and anomaly score distributions of each sample, density-normalised, log-scaled density axis."
    return _HEATMAP_NOTE + " Cyan: anomaly (ground truth) or unknown (prediction); black: ignore."


def _families_line(data: ReportData) -> str:
    if not data.family_names:
        return ""
    return "Families: " + ", ".join(f"{name} (id {fid})" for fid, name in sorted(data.family_names.items())) + "."


# --------------------------------------------------------------------------------------------------------- markdown


def _render_markdown(
    data: ReportData, summaries: Mapping, figure_paths: Mapping[str, str], out_dir: Path = Path(".")
) -> str:
    out = [f"# {data.title or 'densehybrid report'}", "", "Command:", "", "```", data.command or "n/a", "```", ""]
    out += ["## Anomaly detection", ""]
    if data.rows:
        out += [format_table(data.rows), "", _table_note(data.rows)]
        families = _families_line(data)
        out += ["", families] if families else []
    else:
        out.append("No metric rows.")
    out.append("")
    scalars, class_header, class_rows = _segmentation_tables(data)
    out += ["## Open-set segmentation", ""]
    if scalars:
        out += [_markdown_table(["metric", "value"], scalars), ""]
    if class_rows:
        out += [_markdown_table(class_header, class_rows), ""]
    if not scalars and not class_rows:
        out += ["No segmentation numbers.", ""]
    out += ["## Figures", ""]
    if summaries:
        sample_table = _markdown_table(_SAMPLE_HEADER, _sample_rows(summaries))
        out += ["Pixel samples behind the curves and histograms:", "", sample_table, ""]
    for key, label in _FIGURES:
        out += [f"### {label}", "", f"![{label}]({figure_paths[key]})", "", _figure_caption(key, data), ""]
    out += _sections_markdown(data.sections or [], out_dir)
    out += ["## Configuration", ""]
    out += [
        _markdown_table(["setting", "value"], _flat_items(data.config), numeric_from=2)
        if data.config
        else "None recorded.",
        "",
    ]
    out += ["## Timings", ""]
    out += [
        _markdown_table(["stage", "seconds"], _timing_items(data.timings)) if data.timings else "None recorded.",
        "",
    ]
    if data.notes:
        out += ["## Notes", ""] + [f"- {_markdown_escape(note)}" for note in data.notes] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
pre { background: #f5f5f5; padding: .8em; overflow-x: auto; white-space: pre-wrap; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #eef7ee; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: 13px; }
"""


def _html_table(header: list[str], body: list[list[tuple[str, bool]]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for row in body:
        cells = []
        for index, (text, best) in enumerate(row):
            classes = " ".join(c for c, on in (("num", index >= numeric_from), ("best", best)) if on)
            attr = f' class="{classes}"' if classes else ""
            cells.append(f"<td{attr}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _plain(body: list[list[str]]) -> list[list[tuple[str, bool]]]:
    return [[(cell, False) for cell in row] for row in body]


def _render_html(
    data: ReportData, summaries: Mapping, figure_files: Mapping[str, Path], out_dir: Path = Path(".")
) -> str:
    title = html.escape(data.title or "densehybrid report")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        "<p>Command:</p>",
        f"<pre>{html.escape(data.command or 'n/a')}</pre>",
        "<h2>Anomaly detection</h2>",
    ]
    if data.rows:
        header, body = _table_cells(data.rows, None)
        out += [_html_table(header, body, numeric_from=2), f'<p class="note">{html.escape(_table_note(data.rows))}</p>']
        families = _families_line(data)
        if families:
            out.append(f'<p class="note">{html.escape(families)}</p>')
    else:
        out.append("<p>No metric rows.</p>")
    out.append("<h2>Open-set segmentation</h2>")
    scalars, class_header, class_rows = _segmentation_tables(data)
    if scalars:
        out.append(_html_table(["metric", "value"], _plain(scalars)))
    if class_rows:
        out.append(_html_table(class_header, _plain(class_rows)))
    if not scalars and not class_rows:
        out.append("<p>No segmentation numbers.</p>")
    out.append("<h2>Figures</h2>")
    if summaries:
        out += ["<p>Pixel samples behind the curves and histograms:</p>"]
        out.append(_html_table(_SAMPLE_HEADER, _plain(_sample_rows(summaries))))
    for key, label in _FIGURES:
        encoded = base64.b64encode(Path(figure_files[key]).read_bytes()).decode("ascii")
        out += [
            f"<h3>{html.escape(label)}</h3>",
            f'<figure><img alt="{html.escape(label)} (figures/{key}.png)" src="data:image/png;base64,{encoded}">',
            f"<figcaption>{html.escape(_figure_caption(key, data))}</figcaption></figure>",
        ]
    out += _sections_html(data.sections or [], out_dir)
    out.append("<h2>Configuration</h2>")
    none = "<p>None recorded.</p>"
    out.append(
        _html_table(["setting", "value"], _plain(_flat_items(data.config)), numeric_from=2) if data.config else none
    )
    out.append("<h2>Timings</h2>")
    out.append(_html_table(["stage", "seconds"], _plain(_timing_items(data.timings))) if data.timings else none)
    if data.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in data.notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------- writer


def _check_report_data(data: ReportData) -> None:
    if not isinstance(data, ReportData):
        raise TypeError(f"Expected `data` to be a ReportData, but got {type(data).__name__}.")
    _check_rows(data.rows)
    palette = np.asarray(data.palette)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"Expected `palette` to have shape (K, 3), but got {palette.shape}.")
    if len(data.class_names) != palette.shape[0]:
        raise ValueError(
            f"Expected `class_names` to name the {palette.shape[0]} palette colours, but got {len(data.class_names)} "
            "names."
        )
    for name, sample in (data.samples or {}).items():
        if not isinstance(sample, ScoreSample):
            raise TypeError(f"Expected `samples[{name!r}]` to be a ScoreSample, but got {type(sample).__name__}.")
    for index, example in enumerate(data.examples or []):
        if not isinstance(example, Example):
            raise TypeError(f"Expected `examples[{index}]` to be an Example, but got {type(example).__name__}.")
        example.check_ids(palette.shape[0])


def write_report(
    data: ReportData, out_dir: str | Path, *, report_stage: tuple[str, float] | None = None
) -> dict[str, Path]:
    """Write the report of one run: Markdown, self-contained HTML, JSON and four PNG figures.

    Files: ``report.md``, ``report.html`` (figures embedded as base64 PNG, so it opens from disk),
    ``results.json`` (rows, segmentation, config, timings, notes, class and family names, per-score sample metrics
    and figure paths; NaN becomes ``null``) and ``figures/{roc,pr,histograms,examples}.png``. Existing files of the
    same names are overwritten.

    Args:
        data: the report content.
        out_dir: the output folder (created if missing).
        report_stage: ``(name, time.perf_counter() at its start)``: after the figures are drawn, the stage's
            seconds so far are added to ``data.timings[name]`` so that the written timings include the report.

    Returns:
        ``{"markdown", "html", "json", "roc", "pr", "histograms", "examples"}`` -> written paths.

    Raises:
        TypeError: if ``data`` or one of its samples or examples has the wrong type.
        ValueError: if the palette and class names disagree or an example holds ids outside ``[0, K]`` / 255.
    """
    _check_report_data(data)
    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    samples = dict(data.samples or {})
    palette = np.asarray(data.palette, dtype=np.uint8)
    family_names = {int(k): str(v) for k, v in (data.family_names or {}).items()}

    paths: dict[str, Path] = {
        "roc": _figures.plot_curves(samples, figure_dir / "roc.png", "roc", family_names),
        "pr": _figures.plot_curves(samples, figure_dir / "pr.png", "pr", family_names),
        "histograms": _figures.plot_histograms(samples, figure_dir / "histograms.png"),
        "examples": _figures.plot_examples(
            list(data.examples or []), palette, data.class_names, figure_dir / "examples.png"
        ),
    }
    relative = {key: f"figures/{Path(path).name}" for key, path in paths.items()}
    summaries = {name: _figures.sample_metrics(s.scores, s.labels) for name, s in samples.items()}
    if report_stage is not None:
        name, started = report_stage
        data.timings[name] = time.perf_counter() - started

    results = {
        "title": data.title,
        "command": data.command,
        "rows": data.rows,
        "segmentation": data.segmentation or {},
        "config": data.config or {},
        "timings": data.timings or {},
        "notes": data.notes or [],
        "class_names": data.class_names,
        "family_names": family_names,
        "samples": summaries,
        "figures": relative,
    }
    results.update({k: v for k, v in (data.extra or {}).items() if k not in results})
    paths["json"] = out_dir / "results.json"
    paths["json"].write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(_render_markdown(data, summaries, relative, out_dir), encoding="utf-8")
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(_render_html(data, summaries, paths, out_dir), encoding="utf-8")
    order = ("markdown", "html", "json", "roc", "pr", "histograms", "examples")
    return {key: paths[key] for key in order}

"""Check a downloaded benchmark tree and say exactly what is wrong and how to fix it.

:func:`diagnose` runs the benchmark's own loader discovery (so the doctor and the loaders agree on what a valid
tree is) and adds what a loader cannot afford on every run: every unpaired file, the frame count against a complete
download, and a sample of label files decoded and checked against the official raw encoding.

Example:
    >>> report = diagnose("fs-laf", "/data/fishyscapes")  # doctest: +SKIP
    >>> report.ok, [f.problem for f in report.errors]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densehybrid.data.datasets import BenchmarkDataset, BenchmarkSpec, get_benchmark
from densehybrid.data.datasets._io import DatasetFileError, check_same_size
from densehybrid.errors import DatasetError
from densehybrid.labels import IGNORE_INDEX

SEVERITIES = ("error", "warning", "info")
_LISTED_VALUES = 10


@dataclass(frozen=True)
class Finding:
    """One observation about a dataset tree.

    Attributes:
        severity: ``"error"`` (the benchmark cannot be evaluated as is), ``"warning"`` (it can, but the numbers
            would not be the official ones) or ``"info"``.
        path: the file or directory concerned, or None for the tree as a whole.
        problem: what is wrong (or what was found), one or two sentences.
        fix: how to repair it; empty for ``"info"``.
    """

    severity: str
    path: str | None
    problem: str
    fix: str = ""


@dataclass
class DoctorReport:
    """The result of :func:`diagnose`.

    Attributes:
        benchmark: the benchmark name.
        root: the checked root.
        split: the checked split.
        findings: every finding, errors first in discovery order.
        num_frames: usable (paired) frames found.
        expected_frames: frames of a complete download, or None when unknown.
        labels_checked: label files decoded and checked.
    """

    benchmark: str
    root: str
    split: str
    findings: list[Finding] = field(default_factory=list)
    num_frames: int = 0
    expected_frames: int | None = None
    labels_checked: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def add(self, severity: str, path: str | Path | None, problem: str, fix: str = "") -> None:
        self.findings.append(Finding(severity, None if path is None else str(path), problem, fix))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``ok`` included)."""
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def format(self, limit: int = 20) -> str:
        """Human-readable report; at most ``limit`` findings per severity are spelled out."""
        expected = "" if self.expected_frames is None else f" (a complete download has {self.expected_frames})"
        lines = [
            f"{self.benchmark} split {self.split!r} at {self.root}: {self.num_frames} frame(s){expected}, "
            f"{self.labels_checked} label file(s) decoded."
        ]
        for severity in SEVERITIES:
            selected = [f for f in self.findings if f.severity == severity]
            for finding in selected[:limit]:
                lines.append(f"{severity}: {finding.path or self.root}")
                lines.append(f"  {'problem' if severity != 'info' else 'found'}: {finding.problem}")
                if finding.fix:
                    fix = finding.fix.replace("\n", "\n       ")
                    lines.append(f"  fix: {fix}")
            if len(selected) > limit:
                lines.append(f"... and {len(selected) - limit} more {severity}(s) of the same kinds.")
        verdict = "OK" if self.ok else "NOT OK"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s).")
        return "\n".join(lines)


def describe_values(values: Iterable[int]) -> str:
    """Compact text for a set of ids: ``{0, 1, 255}``, ``{0..33}`` or ``{0..181, 255}``."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    parts = []
    for start, end in runs:
        parts.append(str(start) if start == end else f"{start}, {end}" if end == start + 1 else f"{start}..{end}")
    return "{" + ", ".join(parts) + "}"


def _download_fix(spec: BenchmarkSpec) -> str:
    return f"Download: {spec.download}\nExpected tree under ROOT:\n{spec.expected_tree}"


def _check_count(report: DoctorReport, spec: BenchmarkSpec, allow_partial: bool) -> None:
    expected, found = report.expected_frames, report.num_frames
    if expected is None or found == expected:
        return
    if found < expected:
        problem = (
            f"Expected the {expected} frames of a complete {spec.name} {report.split!r} split, but found {found}: "
            "the download is partial or files are missing."
        )
        if allow_partial:
            report.add("warning", report.root, problem + " Accepted because of --allow-partial.")
        else:
            report.add(
                "error",
                report.root,
                problem,
                "Download and extract the complete archives (unpaired files are listed above), or pass "
                "--allow-partial to accept a partial copy; metrics on it are not comparable to published numbers.\n"
                + _download_fix(spec),
            )
    else:
        report.add(
            "warning",
            report.root,
            f"Expected the {expected} frames of the official {spec.name} {report.split!r} split, but found {found}: "
            "extra files or a different dataset version.",
            "Remove files that do not belong to the official archive; metrics may differ from published numbers.",
        )


def _check_labels(
    report: DoctorReport,
    dataset: BenchmarkDataset,
    max_label_checks: int,
    inspect: Callable[[np.ndarray], None] | None = None,
) -> None:
    """Decode up to ``max_label_checks`` label files spread over the split; ``inspect`` sees each valid raw label."""
    frames = dataset.frames
    if not frames or max_label_checks == 0:
        return
    indices = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_label_checks)).round().astype(int))
    allowed = describe_values(dataset.raw_label_values)
    decoded, all_void = 0, 0
    for index in indices:
        frame = frames[int(index)]
        try:
            image = dataset.load_image(frame)
            raw = dataset.load_raw_label(frame)
            if raw is None:
                continue
            report.labels_checked += 1
            check_same_size(frame.image, tuple(image.shape[-2:]), frame.label, raw.shape)
        except DatasetFileError as err:
            report.add("error", err.path, err.problem, err.fix)
            continue
        unexpected = dataset.unexpected_values(raw)
        decoded += 1
        if inspect is not None and not unexpected:
            inspect(raw)
        if not unexpected and bool((dataset.encode_target(raw, frame) == IGNORE_INDEX).all()):
            all_void += 1
        if unexpected:
            shown = ", ".join(str(v) for v in unexpected[:_LISTED_VALUES])
            more = f" (and {len(unexpected) - _LISTED_VALUES} more)" if len(unexpected) > _LISTED_VALUES else ""
            hint = dataset.label_hint(unexpected, raw)
            report.add(
                "error",
                frame.label,
                f"Expected label ids in {allowed} ({report.benchmark} encoding), but got {shown}{more}.",
                hint or "Use the label files of the official archive unmodified (re-extract this file).",
            )
    if decoded and all_void == decoded:
        report.add(
            "error",
            report.root,
            f"Expected labelled pixels, but every pixel of the {decoded} label file(s) decoded is void after the "
            f"{report.benchmark} encoding: no metric can be computed on this tree.",
            "Check that these are the benchmark's label files (not blank placeholders or another dataset's "
            "annotations), and that the --option values (e.g. layout, label_type) match the tree.",
        )


def diagnose(
    benchmark: str,
    root: str | Path,
    split: str | None = None,
    max_label_checks: int = 20,
    allow_partial: bool = False,
    options: Mapping[str, Any] | None = None,
) -> DoctorReport:
    """Check the tree of ``benchmark`` under ``root``.

    Checks, in order: that ``root`` and the required directories exist; that every image has its label and every
    label its image; that the number of frames matches a complete download; and, for up to ``max_label_checks``
    frames spread over the split, that the image and label decode, have the same size, and that the label holds
    only ids of the official encoding.

    Args:
        benchmark: a name of :data:`~densehybrid.data.datasets.BENCHMARKS`.
        root: the dataset root.
        split: the split to check (default: the benchmark's evaluation split).
        max_label_checks: how many frames to decode (0 skips decoding).
        allow_partial: report fewer frames than a complete download as a warning, not an error.
        options: loader options (e.g. ``{"layout": "official"}``), as ``--option KEY=VALUE`` gives them.

    Returns:
        a :class:`DoctorReport`; ``report.ok`` is False when an error was found.

    Raises:
        ValueError: an unknown benchmark, split or option, or a negative ``max_label_checks``.
    """
    if benchmark == "folder":
        return diagnose_folder(root, split, max_label_checks, options)
    spec = get_benchmark(benchmark)
    split = spec.split if split is None else split
    if split not in spec.dataset.splits:
        raise ValueError(
            f"Expected `split` of {benchmark!r} to be one of {', '.join(spec.dataset.splits)}, got {split!r}."
        )
    if not isinstance(max_label_checks, int) or max_label_checks < 0:
        raise ValueError(f"Expected `max_label_checks` to be a non-negative int, but got {max_label_checks!r}.")
    root = Path(root).expanduser()
    report = DoctorReport(benchmark, str(root), split, expected_frames=spec.expected_counts.get(split))
    if not root.is_dir():
        found = "it is a file" if root.exists() else "it does not exist"
        report.add(
            "error",
            root,
            f"Expected the {benchmark} root {str(root)!r} to be a directory, but {found}.",
            _download_fix(spec),
        )
        return report
    try:
        dataset = spec.create(root, split, strict=False, **dict(options or {}))
    except DatasetFileError as err:
        report.add("error", err.path, err.problem, err.fix)
        return report
    except DatasetError as err:
        report.add("error", root, str(err), _download_fix(spec))
        return report
    except OSError as err:
        _unreadable(report, root, err)
        return report
    resolved = getattr(dataset, "resolved_layout", None)
    if resolved is not None:
        report.add("info", root, f"Detected the {resolved!r} layout.")
    for issue in dataset.issues:
        report.add("error", issue.path, issue.problem[:1].upper() + issue.problem[1:] + ".", issue.fix)
    report.num_frames = len(dataset.frames)
    _check_count(report, spec, allow_partial)
    try:
        _check_labels(report, dataset, max_label_checks)
    except OSError as err:
        _unreadable(report, root, err)
    return report


def _unreadable(report: DoctorReport, root: Path, err: OSError) -> None:
    path = err.filename or root
    report.add(
        "error",
        path,
        f"Expected {str(path)!r} to be readable, but reading failed ({err.strerror or err}).",
        "Fix the permissions of the dataset tree (e.g. `chmod -R u+rX ROOT`) or copy it somewhere readable.",
    )


def diagnose_folder(
    root: str | Path,
    split: str | None = None,
    max_label_checks: int = 20,
    options: Mapping[str, Any] | None = None,
) -> DoctorReport:
    """Check a user's tree (:class:`~densehybrid.data.datasets.FolderDataset`): ``classes.txt``, ``dataset.toml``,
    the ``images``/``labels`` pairing and label values of ``split`` (default ``train``, plus ``val`` when ``DIR/val``
    exists), and the anomaly pixels of each split's decoded labels (evaluation and calibration need them in ``val``).

    Args:
        options: loader options (``anomaly_id``).

    Returns:
        a :class:`DoctorReport` covering the checked splits (``num_frames`` counts both).
    """
    from densehybrid.data.datasets import FolderDataset, get_benchmark

    if not isinstance(max_label_checks, int) or max_label_checks < 0:
        raise ValueError(f"Expected `max_label_checks` to be a non-negative int, but got {max_label_checks!r}.")
    if split is not None and split not in FolderDataset.splits:
        raise ValueError(f"Expected `split` of 'folder' to be one of train, val, but got {split!r}.")
    root = Path(root).expanduser()
    splits = [split] if split is not None else ["train"] + (["val"] if (root / "val").is_dir() else [])
    report = DoctorReport("folder", str(root), ",".join(splits))
    fix = f"Expected tree under DIR:\n{FolderDataset.expected_tree}"
    if not root.is_dir():
        found = "it is a file" if root.exists() else "it does not exist"
        report.add("error", root, f"Expected the folder dataset {str(root)!r} to be a directory, but {found}.", fix)
        return report
    for name in splits:
        try:
            dataset = get_benchmark("folder").create(root, name, strict=False, **dict(options or {}))
        except DatasetFileError as err:
            report.add("error", err.path, err.problem, err.fix)
            continue
        if name == splits[0]:
            report.add(
                "info", root / "classes.txt", f"{dataset.num_classes} classes: {', '.join(dataset.class_names)}."
            )
        for issue in dataset.issues:
            report.add("error", issue.path, issue.problem[:1].upper() + issue.problem[1:] + ".", issue.fix)
        report.num_frames += len(dataset.frames)
        counts = {"pixels": 0, "files": 0, "decoded": 0}
        anomaly_id = dataset.anomaly_id if name == "val" else None  # the value is a class-free id in val only

        def count(raw: np.ndarray, anomaly_id: int | None = anomaly_id, counts: dict = counts) -> None:
            found = 0 if anomaly_id is None else int((raw == anomaly_id).sum())
            counts["pixels"] += found
            counts["files"] += found > 0
            counts["decoded"] += 1

        _check_labels(report, dataset, max_label_checks, count)
        _report_anomalies(report, root, name, dataset.anomaly_id, counts)
    if "val" not in splits and split is None:
        report.add(
            "info",
            root / "val",
            "No validation split (DIR/val): training runs without per-epoch validation, and evaluate/calibrate "
            "need one.",
        )
    return report


def _report_anomalies(report: DoctorReport, root: Path, split: str, anomaly_id: int, counts: Mapping[str, int]) -> None:
    """The anomaly pixels of one split's decoded labels; none in ``val`` is a warning (calibration needs them)."""
    if not counts["decoded"]:
        return
    where = f"{counts['decoded']} label file(s) decoded"
    if split != "val":
        report.add(
            "info", root, f"Split {split!r}: 0 anomaly pixels in the {where} (anomalies are marked in val only)."
        )
    elif counts["pixels"]:
        report.add(
            "info",
            root / "val",
            f"Split 'val': {counts['pixels']} anomaly pixels (label value {anomaly_id}) in {counts['files']} of the "
            f"{where}.",
        )
    else:
        report.add(
            "warning",
            root / "val",
            f"Expected anomaly pixels (label value {anomaly_id}) in split 'val', but the {where} have none: "
            "`densehybrid calibrate --benchmark folder` cannot choose a threshold and `evaluate` reports no AP.",
            f"Mark the unknown objects of the val images with label value {anomaly_id} in val/labels (or set "
            "anomaly_id = N in dataset.toml, or --option anomaly_id=N, to the value your labels use).",
        )

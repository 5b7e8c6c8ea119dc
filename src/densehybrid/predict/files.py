"""Which files a prediction run reads and writes: inputs from files, folders and globs, the output names, and the
output-path policy of :mod:`densehybrid.engine.outputs` checked before any work."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from densehybrid.data.datasets._io import IMAGE_SUFFIXES  # picked up when a folder is scanned
from densehybrid.engine.outputs import check_output_dir
from densehybrid.errors import OutputError

__all__ = [
    "IMAGE_SUFFIXES",
    "RESULT_FILES",
    "ImageJob",
    "check_output_plan",
    "check_prediction_out",
    "discover_images",
    "interrupted_records",
    "output_paths",
    "pending_path",
    "rank_records_path",
    "read_records",
    "record_names",
]


@dataclass(frozen=True)
class ImageJob:
    """One input file and the name its outputs derive from (its path relative to the input it came from)."""

    path: Path
    relative: Path


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [part for part in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


#: The reason given for an input that is a symbolic link pointing (through others) back at itself.
SYMLINK_LOOP = "a symbolic link loop (the link points, through others, back at itself)"


def _is_loop(path: Path) -> bool:
    """Whether resolving ``path`` runs into a symbolic link loop."""
    try:
        path.resolve()
    except (RuntimeError, OSError):  # RuntimeError up to Python 3.12, OSError (ELOOP) afterwards
        return True
    return False


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def discover_images(
    inputs: Iterable[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None
) -> tuple[list[ImageJob], list[tuple[str, str]]]:
    """Expand files, folders (recursive, image suffixes only) and globs into image jobs.

    Args:
        inputs: what the user named.
        exclude: a folder whose files are not inputs when it lies inside a scanned folder (the output folder, so a
            re-run does not read its own outputs); when it is the scanned folder or above it, everything is scanned
            and :func:`check_output_plan` refuses outputs that would overwrite inputs.

    Returns:
        ``(jobs, problems)``: jobs in input order, folders and globs sorted; ``problems`` holds
        ``(input, reason)`` for inputs that name nothing readable.
    """
    excluded = Path(exclude) if exclude is not None else None
    jobs: list[ImageJob] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            # outputs written inside a scanned folder are not read back, unless they go into that folder itself
            skip = excluded if excluded is not None and not _inside(path, excluded) else None
            candidates = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            loops = [p for p in candidates if _is_loop(p)]
            problems.extend((str(p), SYMLINK_LOOP) for p in loops)
            found = [
                p for p in candidates if p not in loops and not _inside(p, skip) and (p.is_file() or p.is_symlink())
            ]
            if not found and not loops:
                problems.append((text, "folder holds no image files (" + ", ".join(IMAGE_SUFFIXES[:4]) + ", ...)"))
            jobs.extend(ImageJob(p, p.relative_to(path)) for p in found)
        elif glob.has_magic(text):
            base = _glob_base(text)
            candidates = sorted(Path(p) for p in glob.glob(text, recursive=True))
            loops = [p for p in candidates if _is_loop(p)]
            problems.extend((str(p), SYMLINK_LOOP) for p in loops)
            skip = excluded if excluded is not None and not _inside(base, excluded) else None
            found = [p for p in candidates if p not in loops and not p.is_dir() and not _inside(p, skip)]
            if not found and not loops:
                problems.append((text, "pattern matches no file"))
            jobs.extend(ImageJob(p, p.relative_to(base) if _inside(p, base) else Path(p.name)) for p in found)
        elif _is_loop(path):
            problems.append((text, SYMLINK_LOOP))
        elif path.exists() or path.is_symlink():
            jobs.append(ImageJob(path, Path(path.name)))
        else:
            problems.append((text, "no such file or folder"))
    return jobs, problems


OUTPUT_KINDS = ("heatmap", "segmentation", "overlay")
RAW_KINDS = ("scores", "labels")


def output_paths(out_dir: Path, relative: Path, save_raw: bool) -> dict[str, Path]:
    """The files written for one image: ``<name>_heatmap.png``, ``_segmentation.png``, ``_overlay.png`` and, with
    ``save_raw``, ``_scores.npy`` and ``_labels.png`` (under the input's relative folder)."""
    stem = out_dir / relative.parent / relative.stem
    paths = {kind: stem.with_name(f"{stem.name}_{kind}.png") for kind in OUTPUT_KINDS}
    if save_raw:
        paths["scores"] = stem.with_name(f"{stem.name}_scores.npy")
        paths["labels"] = stem.with_name(f"{stem.name}_labels.png")
    return paths


#: Files one run writes at the top of the output folder; their presence marks the results of an earlier run.
RESULT_FILES = ("predictions.jsonl", "summary.json")

#: The run's own bookkeeping beside ``predictions.jsonl`` while it runs (hidden; removed when the run completes):
#: the records of rank R under torchrun (merged into ``predictions.jsonl`` at the end), the outputs rank R is writing
#: (appended before an image's files are written), and the records of the earlier run an ``--overwrite`` or
#: ``--resume`` run replaces (its outputs that the run does not write again are removed at the end).
RANK_RECORDS, PENDING, REPLACED = (
    ".predictions.rank-{rank}.jsonl",
    ".predictions.pending.rank-{rank}.jsonl",
    (".predictions.replaced.jsonl"),
)
BOOKKEEPING_PATTERN = ".predictions.*.jsonl"


def rank_records_path(out_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` of a multi-process run appends its records."""
    return out_dir / RANK_RECORDS.format(rank=rank)


def pending_path(out_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` notes the outputs it is about to write (one line per image)."""
    return out_dir / PENDING.format(rank=rank)


def read_records(path: Path) -> list[dict]:
    """The JSON lines of ``path`` that are records with a list of ``outputs`` (a line cut by a killed run, or any
    other line, is ignored; a missing file has none)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("outputs"), list):
            records.append(record)
    return records


def record_names(records: Iterable[dict]) -> set[str]:
    """The output names (relative to the output folder) the records list; absolute names and names with ``..`` are
    ignored (a record never points outside its folder)."""
    names: set[str] = set()
    for record in records:
        for name in record.get("outputs") or []:
            if isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts:
                names.add(Path(name).as_posix())
    return names


def interrupted_records(out_dir: Path) -> list[Path]:
    """The bookkeeping files an interrupted run left in ``out_dir`` (sorted)."""
    return sorted(p for p in Path(out_dir).glob(BOOKKEEPING_PATTERN) if p.is_file())


def check_output_plan(
    jobs: Sequence[ImageJob],
    out_dir: Path,
    save_raw: bool,
    *,
    overwrite: bool = False,
    read_files: Iterable[str | os.PathLike[str] | None] = (),
    resume: bool = False,
) -> dict[int, str]:
    """Check the planned outputs before any work, with the output-path policy of
    :mod:`densehybrid.engine.outputs`: the output folder is a writable folder and holds none of ``read_files``, no
    output of an earlier run (``predictions.jsonl``, ``summary.json``, an image's outputs, the records an interrupted
    run left) is replaced unless ``overwrite`` (or, with ``resume``, unless that run recorded it), no two images
    share an output, and no output would overwrite an input image.

    Returns:
        job index -> reason, for the jobs whose outputs would overwrite an input image (they are skipped and counted
        like unreadable files).

    Raises:
        OutputError: ``out_dir`` is a file, cannot be written, holds an input file, or holds an earlier result and
            ``overwrite`` is false (with ``resume``: a file no earlier run in ``out_dir`` recorded).
        ValueError: two inputs would write the same output file.
    """
    out_dir = Path(out_dir)
    inputs = {job.path.resolve(): job.path for job in jobs}
    owners: dict[Path, Path] = {}
    refused: dict[int, str] = {}
    planned: list[str] = list(RESULT_FILES)
    for index, job in enumerate(jobs):
        paths = output_paths(out_dir, job.relative, save_raw).values()
        for path in paths:
            resolved = path.resolve()
            if resolved in inputs:
                refused[index] = f"its output {str(path)!r} would overwrite the input {str(inputs[resolved])!r}"
            if resolved in owners and owners[resolved] != job.path:
                raise ValueError(
                    f"Expected every input to have its own outputs, but {str(owners[resolved])!r} and "
                    f"{str(job.path)!r} would both write {str(path)!r}. Predict them into separate --out folders."
                )
            owners[resolved] = job.path
        if index not in refused:
            planned.extend(path.relative_to(out_dir).as_posix() for path in paths)
    leftovers = interrupted_records(out_dir) if out_dir.is_dir() else []
    if leftovers and not (overwrite or resume):
        raise OutputError(
            f"Expected `--out` {str(out_dir)!r} to hold no interrupted run, but it holds the records of one "
            f"({', '.join(p.name for p in leftovers)}): pass --resume to continue it or --overwrite to replace it."
        )
    if resume:  # the earlier run's own files are continued, not overwritten
        recorded = record_names(r for path in [out_dir / RESULT_FILES[0], *leftovers] for r in read_records(path))
        planned = [name for name in planned if name not in recorded and name not in RESULT_FILES]
    check_output_dir(out_dir, inputs=read_files, outputs=planned, overwrite=overwrite)
    return refused


def check_prediction_out(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    save_raw: bool = False,
    overwrite: bool = False,
    read_files: Iterable[str | os.PathLike[str] | None] = (),
    resume: bool = False,
) -> None:
    """:func:`check_output_plan` for the images of ``inputs``, before a model is loaded (``densehybrid predict``).

    Raises:
        OutputError, ValueError: as :func:`check_output_plan`.
    """
    out = Path(out_dir).expanduser()
    jobs, _ = discover_images(inputs, exclude=out)
    check_output_plan(jobs, out, save_raw, overwrite=overwrite, read_files=read_files, resume=resume)

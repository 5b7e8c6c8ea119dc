"""``densehybrid predict`` as a library function: :func:`predict_files` runs a :class:`Predictor` over image files,
folders and globs and writes, per image, a heatmap (one display range for the whole run), the colour open-set
segmentation, an overlay and optionally the raw maps, one ``predictions.jsonl`` line per image and a
``summary.json``.

The run is a pipeline: images are decoded ahead (DataLoader workers, or a reader thread with ``num_workers=0``), the
forward pass runs in the calling thread, and rendering, PNG encoding and writing run on a writer thread while the
next forward pass runs. A file that cannot be read is reported in one line, skipped and counted; it never stops the
run unless ``strict``. The output folder follows the output-path policy of :mod:`densehybrid.engine.outputs`
(:func:`~densehybrid.predict.files.check_output_plan`): an earlier run's results are replaced only with
``overwrite`` (or continued with ``resume``), an output that would overwrite an input image is refused (that image
is skipped and counted), every file is written atomically, and one run writes into the folder at a time (its lock).

The record grows with the run: before an image's files are written their names are appended to a pending journal,
after them the image's line to ``predictions.jsonl`` (under torchrun, to the rank's own file), both flushed; so a run
killed at any point leaves no output that no record names, and ``overwrite`` or ``resume`` can account for all of
them. Under torchrun each rank predicts one contiguous block of the inputs and rank 0 merges the lines in input
order at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densehybrid.engine.outputs import JsonLines, check_output_dir, folder_lock
from densehybrid.errors import DenseHybridError, ResourceError
from densehybrid.predict.files import (
    REPLACED,
    RESULT_FILES,
    ImageJob,
    check_output_plan,
    discover_images,
    interrupted_records,
    output_paths,
    pending_path,
    rank_records_path,
    read_records,
    record_names,
)
from densehybrid.predict.predictor import Predictor
from densehybrid.predict.writing import (
    OUT_OF_DOMAIN_NOTE,
    Legend,
    image_record,
    out_of_domain,
    remove_outputs,
    write_image_outputs,
    write_json_lines,
    write_text,
)

__all__ = ["FALLBACK_PERCENTILES", "PredictionSummary", "predict_files"]

#: Percentiles of the first image's scores used as the display range when no calibration gives one.
FALLBACK_PERCENTILES = (1.0, 99.0)
#: Images whose outputs may wait for the writer thread (bounds the memory of a run).
PENDING_WRITES = 2


class _ImageFiles(torch.utils.data.Dataset):
    """Reads one job per item in the loader's workers; a failure is returned as a reason, never raised."""

    def __init__(self, jobs: Sequence[ImageJob]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from densehybrid.data.datasets._io import DatasetFileError, read_rgb

        start = time.perf_counter()
        path = self.jobs[index].path
        try:
            if path.is_file() and path.stat().st_size == 0:
                return {"index": index, "rgb": None, "error": "empty file (0 bytes)", "read_time": 0.0}
            rgb = read_rgb(path)
            if rgb.shape[0] == 0 or rgb.shape[1] == 0:
                reason = f"image has no pixels ({rgb.shape[1]}x{rgb.shape[0]})"
                return {"index": index, "rgb": None, "error": reason, "read_time": 0.0}
            return {"index": index, "rgb": rgb, "error": None, "read_time": time.perf_counter() - start}
        except DatasetFileError as exc:
            cause = exc.__cause__
            if cause is None:
                reason = "missing, a broken link or not a file"
            else:  # the decoder's own words, without the path the line already names
                detail = str(cause).replace(repr(str(path)), "").replace(str(path), "").strip()
                reason = f"not a readable image ({detail})"
        except Exception as exc:  # a bad file must never stop the run: report whatever the decoder raised
            reason = f"{type(exc).__name__}: {exc}"
        return {"index": index, "rgb": None, "error": reason, "read_time": time.perf_counter() - start}


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@dataclass
class PredictionSummary:
    """What :func:`predict_files` did.

    Attributes:
        num_images: images predicted by this run; num_resumed: images an earlier run had finished (``resume``).
        failures: ``(input, reason)`` of every input skipped.
        threshold, threshold_source: the threshold used and where it came from (``argument``, ``checkpoint``,
            ``exported file``, ``none``).
        inference: the runtime and the sliding window (e.g. ``"PyTorch, whole image (no sliding window)"``).
        display_range, display_range_source: the heatmap range and where it came from (``argument``,
            ``checkpoint``, ``first image``).
        seconds: wall time of the run; images_per_second: ``num_images / seconds``.
        out_dir: where the outputs are.
    """

    num_images: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    threshold: float | None = None
    threshold_source: str = "none"
    display_range: tuple[float, float] | None = None
    display_range_source: str = ""
    score: str = "densehybrid"
    inference: str = ""
    seconds: float = 0.0
    out_dir: str = ""
    stopped: bool = False
    out_of_domain: list[str] = field(default_factory=list)
    num_resumed: int = 0

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_resumed": self.num_resumed,
            "num_failed": len(self.failures),
            "failures": [{"input": path, "reason": reason} for path, reason in self.failures],
            "score": self.score,
            "inference": self.inference,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "display_range": list(self.display_range) if self.display_range else None,
            "display_range_source": self.display_range_source,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second if self.num_images else None,
            "out_dir": self.out_dir,
            "stopped_at_first_failure": self.stopped,
            "out_of_domain": list(self.out_of_domain),
        }

    def lines(self) -> list[str]:
        """The human-readable summary printed at the end of ``densehybrid predict``."""
        low, high = self.display_range if self.display_range else (math.nan, math.nan)
        threshold = (
            f"{self.threshold:.6g} ({self.threshold_source})"
            if self.threshold is not None
            else "none: no pixel is marked unknown (calibrate the checkpoint or pass --threshold)"
        )
        lines = [
            f"predicted {self.num_images} image(s), skipped {len(self.failures)}, in {self.seconds:.1f} s"
            + (f" ({self.images_per_second:.2f} images/s)" if self.num_images else "")
            + (f"; {self.num_resumed} image(s) done by the resumed run kept" if self.num_resumed else ""),
            f"score: {self.score}; threshold: {threshold}",
            f"inference: {self.inference}",
            f"heatmap scale: [{low:.6g}, {high:.6g}] ({self.display_range_source}), the same for every image",
            f"outputs: {self.out_dir}",
        ]
        if self.out_of_domain:
            lines.append(
                f"{len(self.out_of_domain)} image(s) with more than half of their pixels marked unknown may be outside "
                "the model's training domain: " + ", ".join(self.out_of_domain)
            )
        if self.stopped:
            lines.append("stopped at the first failure (--strict)")
        return lines


def _read_ahead(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` on a reader thread, ``depth`` items ahead (decoding overlaps the forward pass)."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():  # never blocks for good: the consumer may have stopped early
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=read, name="densehybrid-predict-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _first_image_range(scores: np.ndarray) -> tuple[float, float]:
    low, high = (float(v) for v in np.percentile(scores, FALLBACK_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


class _Records:
    """Where one process notes its work as it goes: before an image's files are written, their names (the pending
    journal); after, the image's record (``predictions.jsonl`` in a single process, this rank's part file under
    torchrun). Both are appended and flushed per image, on the writer thread."""

    def __init__(self, out: Path, rank: int, world: int) -> None:
        self.pending = JsonLines(pending_path(out, rank))
        self.records = JsonLines(out / RESULT_FILES[0] if world == 1 else rank_records_path(out, rank))

    def close(self) -> None:
        self.pending.close()
        self.records.close()


def _write_one(
    job: ImageJob,
    index: int,
    rgb: np.ndarray,
    result: Any,
    palette: np.ndarray,
    out: Path,
    save_raw: bool,
    display_range: tuple[float, float],
    legend: Legend | None,
    seconds: float,
    log: _Records,
) -> tuple[int, dict[str, Any]]:
    record = image_record(job, result, out, save_raw, seconds)
    record["display_range"] = [float(display_range[0]), float(display_range[1])]
    log.pending.append({"input": record["input"], "outputs": record["outputs"]})
    write_image_outputs(job, rgb, result, palette, out, save_raw, display_range, legend)
    log.records.append(record)
    return index, record


@dataclass
class _Plan:
    """What rank 0 found in the output folder before the work (sent to every rank).

    Attributes:
        refused: job index -> reason, for jobs whose outputs would overwrite an input image.
        kept: job index -> the earlier run's record of that image (``resume``: its outputs are complete).
        kept_other: the earlier run's records of images this run does not name (``resume``).
        replaced: outputs of the earlier run (or of an interrupted one) removed at the end unless written again.
        display_range: the heatmap range the kept records were drawn with.
    """

    refused: dict[int, str]
    kept: dict[int, dict[str, Any]] = field(default_factory=dict)
    kept_other: list[dict[str, Any]] = field(default_factory=list)
    replaced: set[str] = field(default_factory=set)
    display_range: tuple[float, float] | None = None


def _unique(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first record of each input."""
    seen: dict[Any, dict[str, Any]] = {}
    for record in records:
        seen.setdefault(record.get("input"), record)
    return list(seen.values())


def _prepare(
    jobs: Sequence[ImageJob],
    out: Path,
    save_raw: bool,
    overwrite: bool,
    resume: bool,
    read_files: Iterable[str | os.PathLike[str] | None],
) -> _Plan:
    """Check the output plan and bring the folder's records into the state this run continues from (rank 0, with
    the folder's lock held): with ``resume`` the complete records of the earlier run stay in ``predictions.jsonl``;
    with ``overwrite`` every earlier record moves into the replaced list; nothing an earlier run recorded is ever
    left unrecorded, so that a run killed at any point can be resumed or overwritten without leftovers."""
    refused = check_output_plan(jobs, out, save_raw, overwrite=overwrite, read_files=read_files, resume=resume)
    plan = _Plan(refused)
    if not out.is_dir():
        return plan
    leftovers = interrupted_records(out)
    replaced_file = out / REPLACED
    parts = [p for p in leftovers if p != replaced_file and ".pending." not in p.name]
    earlier = _unique(r for path in [out / RESULT_FILES[0], *parts] for r in read_records(path))
    pending = [r for p in leftovers if ".pending." in p.name for r in read_records(p)]
    gone = earlier
    if resume:
        index_of = {str(job.path): i for i, job in enumerate(jobs)}
        planned = {i: _names(out, job, save_raw) for i, job in enumerate(jobs)}
        this_run = {name for names in planned.values() for name in names}
        gone = []
        for record in earlier:
            i = index_of.get(record.get("input"))
            complete = all((out / name).is_file() for name in record_names([record]))
            if i is not None and i not in refused and i not in plan.kept and record["outputs"] == planned[i]:
                target = plan.kept if complete else None
            elif i is None and complete and not record_names([record]) & this_run:
                plan.kept_other.append(record)
                continue
            else:
                target = None
            if target is None:
                gone.append(record)
            else:
                target[i] = record
        ranges = [r.get("display_range") for r in plan.kept.values() if r.get("display_range")]
        if ranges:
            plan.display_range = (float(ranges[0][0]), float(ranges[0][1]))
    # every record that names outputs to replace (one image may have several: an older run's and a pending write)
    to_replace = list(
        {json.dumps(r, sort_keys=True): r for r in [*read_records(replaced_file), *gone, *pending]}.values()
    )
    kept_names = record_names([*plan.kept.values(), *plan.kept_other])
    plan.replaced = record_names(to_replace) - kept_names
    # the records the run continues from: the replaced ones first, so that a kill in between loses none
    if to_replace:
        write_json_lines(replaced_file, to_replace)
    kept = [plan.kept[i] for i in sorted(plan.kept)] + plan.kept_other
    if kept:
        write_json_lines(out / RESULT_FILES[0], kept)
    else:
        (out / RESULT_FILES[0]).unlink(missing_ok=True)
    for path in leftovers:
        if path != replaced_file:
            path.unlink(missing_ok=True)
    if overwrite or resume:
        (out / RESULT_FILES[1]).unlink(missing_ok=True)  # rewritten at the end; its absence marks an unfinished run
    names = [*RESULT_FILES, REPLACED, *plan.replaced, *(n for job in jobs for n in _names(out, job, save_raw))]
    _remove_stale_temporaries(out, names)
    return plan


def _names(out: Path, job: ImageJob, save_raw: bool) -> list[str]:
    return [path.relative_to(out).as_posix() for path in output_paths(out, job.relative, save_raw).values()]


def _remove_stale_temporaries(out: Path, names: Iterable[str]) -> None:
    """Delete the ``.NAME.*.tmp`` a killed run's atomic writes of these outputs left behind."""
    by_folder: dict[Path, set[str]] = {}
    for name in names:
        path = out / name
        by_folder.setdefault(path.parent, set()).add(path.name)
    for folder, files in by_folder.items():
        if folder.is_dir():
            for stale in folder.glob(".*.tmp"):
                if stale.is_file() and stale.name[1:].rsplit(".", 2)[0] in files:
                    stale.unlink(missing_ok=True)


def _size_problem(predictor: Predictor, rgb: np.ndarray) -> str | None:
    """Why ``predictor`` cannot run on the (H, W, 3) image (its input scale leaves no pixel or needs too much
    memory), or None."""
    try:
        predictor.check_input_size(rgb.shape[0], rgb.shape[1], count=1)
    except (ValueError, ResourceError) as exc:
        return str(exc)
    return None


def _shareable(error: BaseException) -> BaseException:
    """``error`` if it can be sent to the other ranks, else a :class:`DenseHybridError` with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return DenseHybridError(str(error))


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    save_raw: bool = False,
    batch_size: int = 1,
    num_workers: int = 0,
    strict: bool = False,
    progress: bool = True,
    report: Callable[[str], None] = print,
    overwrite: bool = False,
    read_files: Iterable[str | os.PathLike[str] | None] = (),
    legend: bool = True,
    resume: bool = False,
) -> PredictionSummary:
    """Predict every image of ``inputs`` and write the outputs under ``out_dir`` (see the module docstring).

    One run writes into ``out_dir`` at a time (:func:`~densehybrid.engine.outputs.folder_lock`: a second run is
    refused with the owner's pid). Each image's record is appended to ``predictions.jsonl`` (flushed) as soon as its
    files are written, so an interrupted run leaves a record of every image it finished; ``resume`` continues it.

    Under ``torchrun`` (a process group joined with :func:`densehybrid.engine.distributed.init_from_env`), the inputs
    are split into contiguous blocks (:func:`~densehybrid.engine.distributed.shard_range`), each rank writes the
    outputs of its block only, and rank 0 merges the records into ``predictions.jsonl`` and ``summary.json`` in input
    order; every rank returns the merged summary.

    Args:
        predictor: the predictor (its ``threshold`` and ``display_range`` apply to the whole run).
        inputs: image files, folders (recursive) and glob patterns.
        out_dir: output folder; outputs keep each input's relative path.
        save_raw: also write the float32 score map (``.npy``) and the label map (``.png``, unknown = K).
        batch_size: images per forward pass (images of one size are stacked; others run separately).
        num_workers: DataLoader processes decoding images (0: one reader thread), per process.
        strict: stop at the first unreadable input (under torchrun: each rank at the first of its block).
        progress: show a progress bar (rank 0's block under torchrun).
        report: receives one line per skipped input and per image that may be outside the model's training domain
            (more than half of it marked unknown; also in ``predictions.jsonl`` and the summary).
        overwrite: replace the results of an earlier run in ``out_dir``, also of an interrupted one; every output an
            earlier run recorded (or was writing when it was killed) that this run does not write again is removed
            at the end, so the folder holds this run's results only. Without it (and without ``resume``), an earlier
            result is refused before any work.
        read_files: files the run reads besides the images (checkpoint, statistics); never written.
        legend: draw a colour bar (score scale, threshold) under each heatmap and a legend of the class names
            (``predictor.class_names``, else ``"class i"``) under each segmentation; without it both images have
            exactly the input's size.
        resume: continue an earlier (interrupted) run in ``out_dir``: the images its records list with all their
            outputs present are skipped (also when it ran with another number of processes), the others predicted;
            the heatmap range is the one those records were drawn with unless the predictor has its own.

    Returns:
        :class:`PredictionSummary`; ``summary.json`` and ``predictions.jsonl`` are written as well.

    Raises:
        OutputError: ``out_dir`` is refused by :func:`~densehybrid.predict.files.check_output_plan`, or another
            run holds its lock.
        DenseHybridError: an output cannot be written.
        ValueError: two inputs would write the same output; both ``overwrite`` and ``resume``.
    """
    from tqdm.auto import tqdm

    from densehybrid.engine import distributed

    if overwrite and resume:
        raise ValueError("Expected at most one of `overwrite` and `resume`, but got both.")
    start = time.perf_counter()
    out = Path(out_dir).expanduser()
    jobs, problems = discover_images(inputs, exclude=out)
    rank, world = distributed.rank(), distributed.world_size()
    with contextlib.ExitStack() as stack:
        plan: _Plan | None = None
        error: BaseException | None = None
        if rank == 0:
            try:
                check_output_dir(out)  # a file or an unwritable folder is refused before the lock creates `out`
                stack.enter_context(folder_lock(out))
                plan = _prepare(jobs, out, save_raw, overwrite, resume, read_files)
            except Exception as exc:  # every rank stops with rank 0's message
                error = exc
        shared_plan, shared_error = distributed.broadcast_from_main(
            (plan, None if error is None else _shareable(error))
        )
        if error is not None:
            raise error
        if shared_error is not None:
            raise shared_error
        plan = shared_plan
        summary = PredictionSummary(
            threshold=predictor.threshold,
            threshold_source=predictor.threshold_source if predictor.threshold is not None else "none",
            display_range=predictor.display_range,
            display_range_source=predictor.display_range_source if predictor.display_range is not None else "",
            score=predictor.score,
            inference=predictor.inference,
            out_dir=str(out),
            num_resumed=len(plan.kept),
        )
        if summary.display_range is None and plan.display_range is not None:
            summary.display_range = plan.display_range
            summary.display_range_source = f"the resumed run's records ({RESULT_FILES[0]})"
        failures: list[tuple[int, str, str]] = []

        def fail(index: int, path: str, reason: str) -> bool:
            failures.append((index, path, reason))
            report(f"skipped {path}: {reason}")
            if strict:
                summary.stopped = True
            return strict

        if rank == 0:
            for path, reason in problems:
                if fail(-1, path, reason):
                    break
        todo = [i for i in range(len(jobs)) if i not in plan.kept]
        mine = [todo[k] for k in distributed.shard_range(len(todo))]
        first = None  # the first readable image of the run, read and predicted once on rank 0 for the heatmap range
        if summary.display_range is None and todo:  # the same on every rank: each one takes part in the broadcast
            found = None
            if rank == 0 and not summary.stopped:
                reader = _ImageFiles(jobs)
                for i in todo:
                    item = reader[i] if i not in plan.refused else {"error": "refused"}
                    if item["error"] is None and _size_problem(predictor, item["rgb"]) is None:
                        t0 = time.perf_counter()
                        result = predictor.predict_batch(torch.from_numpy(item["rgb"][None]).permute(0, 3, 1, 2))[0]
                        item["forward"] = time.perf_counter() - t0
                        found, first = _first_image_range(result.scores), (item, result) if i in mine else None
                        break
            summary.display_range = distributed.broadcast_from_main(found)
            if summary.display_range is not None:
                summary.display_range_source = (
                    f"percentiles {FALLBACK_PERCENTILES[0]:g}-{FALLBACK_PERCENTILES[1]:g} of the first image"
                )
        skip_first = {first[0]["index"]} if first is not None else set()
        log = _Records(out, rank, world)
        stack.callback(log.close)
        writes: list[Future] = []
        panels = Legend(predictor.score, tuple(predictor.class_names)) if legend else None
        loader: Iterable[list[dict[str, Any]]] = torch.utils.data.DataLoader(
            _ImageFiles(jobs),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_as_list,
            sampler=[i for i in mine if i not in skip_first],
        )
        bar = tqdm(total=len(mine), desc="predict", unit="image", disable=not progress or rank != 0, leave=False)

        def submit(writer: ThreadPoolExecutor, item: dict[str, Any], result: Any, seconds: float) -> None:
            job = jobs[item["index"]]
            if out_of_domain(result):
                report(f"{job.path}: {OUT_OF_DOMAIN_NOTE}")
            args = (predictor.palette, out, save_raw, summary.display_range, panels, seconds, log)
            writes.append(writer.submit(_write_one, job, item["index"], item["rgb"], result, *args))
            summary.num_images += 1
            # bounded memory, and a write error surfaces early instead of at the end of a long run
            while len([w for w in writes if not w.done()]) > PENDING_WRITES:
                next(w for w in writes if not w.done()).result()
            for w in writes:
                if w.done():
                    w.result()

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="densehybrid-predict-writer") as writer:
            if first is not None:
                submit(writer, first[0], first[1], first[0]["read_time"] + first[0]["forward"])
                bar.update(1)
            batches = iter([]) if summary.stopped else (_read_ahead(loader) if num_workers == 0 else iter(loader))
            try:
                for items in batches:
                    good = []
                    for item in items:
                        reason = item["error"] or plan.refused.get(item["index"])
                        reason = reason or _size_problem(predictor, item["rgb"])
                        if reason is not None:
                            if fail(item["index"], str(jobs[item["index"]].path), reason):
                                break
                            continue
                        good.append(item)
                    if summary.stopped:
                        break
                    # images of one size share a forward pass; the others run on their own
                    for size in dict.fromkeys(item["rgb"].shape for item in good):
                        group = [item for item in good if item["rgb"].shape == size]
                        t0 = time.perf_counter()
                        batch = torch.from_numpy(np.stack([item["rgb"] for item in group])).permute(0, 3, 1, 2)
                        results = predictor.predict_batch(batch)
                        forward = (time.perf_counter() - t0) / len(group)
                        for item, result in zip(group, results):
                            submit(writer, item, result, item["read_time"] + forward)
                    bar.update(len(items))
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
            written = [future.result() for future in writes]
        bar.close()
        log.close()
        parts = distributed.gather_to_main((written, failures, summary.num_images, summary.stopped))
        if rank == 0:
            assert parts is not None
            new = sorted((pair for part in parts for pair in part[0]), key=lambda pair: pair[0])
            records = sorted([*plan.kept.items(), *new], key=lambda pair: pair[0])
            final = [record for _, record in records] + plan.kept_other
            summary.failures = [(path, reason) for _, path, reason in sorted(
                (f for part in parts for f in part[1]), key=lambda f: f[0]
            )]  # fmt: skip
            summary.num_images = sum(part[2] for part in parts)
            summary.stopped = any(part[3] for part in parts)
            summary.out_of_domain = [record["input"] for _, record in new if record["out_of_domain"]]
            write_json_lines(out / RESULT_FILES[0], final)
            remove_outputs(out, plan.replaced - record_names(final), jobs)
            for path in interrupted_records(out):  # this run's (and the replaced run's) bookkeeping
                path.unlink(missing_ok=True)
            summary.seconds = time.perf_counter() - start
            write_text(out / RESULT_FILES[1], json.dumps(summary.to_dict(), indent=2, allow_nan=False) + "\n")
        merged = distributed.broadcast_from_main(summary)
    return merged

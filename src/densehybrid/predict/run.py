"""``densehybrid predict`` as a library function: :func:`predict_files` runs a :class:`Predictor` over image files,
folders and globs and writes, per image, a heatmap (one display range for the whole run), the colour open-set
segmentation, an overlay and optionally the raw maps, one ``predictions.jsonl`` line per image and a
``summary.json``.

The run is a pipeline: images are decoded ahead (DataLoader workers, or a reader thread with ``num_workers=0``), the
forward pass runs in the calling thread, and rendering, PNG encoding and writing run on a writer thread while the
next forward pass runs. A file that cannot be read is reported in one line, skipped and counted; it never stops the
run unless ``strict``. The output folder follows the output-path policy of :mod:`densehybrid.engine.outputs`
(:func:`~densehybrid.predict.files.check_output_plan`): an earlier run's results are replaced only with
``overwrite``, an output that would overwrite an input image is refused (that image is skipped and counted), and
every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
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

from densehybrid.predict.files import ImageJob, check_output_plan, discover_images
from densehybrid.predict.predictor import Predictor
from densehybrid.predict.writing import (
    OUT_OF_DOMAIN_NOTE,
    Legend,
    earlier_outputs,
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
        num_images: images predicted.
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

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
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
            + (f" ({self.images_per_second:.2f} images/s)" if self.num_images else ""),
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


def _write_one(
    job: ImageJob,
    rgb: np.ndarray,
    result: Any,
    palette: np.ndarray,
    out: Path,
    save_raw: bool,
    display_range: tuple[float, float],
    legend: Legend | None,
    seconds: float,
) -> dict[str, Any]:
    write_image_outputs(job, rgb, result, palette, out, save_raw, display_range, legend)
    return image_record(job, result, out, save_raw, seconds)


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
) -> PredictionSummary:
    """Predict every image of ``inputs`` and write the outputs under ``out_dir`` (see the module docstring).

    Args:
        predictor: the predictor (its ``threshold`` and ``display_range`` apply to the whole run).
        inputs: image files, folders (recursive) and glob patterns.
        out_dir: output folder; outputs keep each input's relative path.
        save_raw: also write the float32 score map (``.npy``) and the label map (``.png``, unknown = K).
        batch_size: images per forward pass (images of one size are stacked; others run separately).
        num_workers: DataLoader processes decoding images (0: one reader thread).
        strict: stop at the first unreadable input.
        progress: show a progress bar.
        report: receives one line per skipped input and per image that may be outside the model's training domain
            (more than half of it marked unknown; also in ``predictions.jsonl`` and the summary).
        overwrite: replace the results of an earlier run in ``out_dir``; the outputs that earlier run recorded in
            its ``predictions.jsonl`` and this run does not write again are removed at the end, so the folder holds
            this run's results only. Without it, an earlier result is refused before any work.
        read_files: files the run reads besides the images (checkpoint, statistics); never written.
        legend: draw a colour bar (score scale, threshold) under each heatmap and a legend of the class names
            (``predictor.class_names``, else ``"class i"``) under each segmentation; without it both images have
            exactly the input's size.

    Returns:
        :class:`PredictionSummary`; ``summary.json`` and ``predictions.jsonl`` are written as well.

    Raises:
        OutputError: ``out_dir`` is refused by :func:`~densehybrid.predict.files.check_output_plan`.
        DenseHybridError: an output cannot be written.
        ValueError: two inputs would write the same output.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out_dir).expanduser()
    jobs, problems = discover_images(inputs, exclude=out)
    refused = check_output_plan(jobs, out, save_raw, overwrite=overwrite, read_files=read_files)
    earlier = earlier_outputs(out) if overwrite else set()
    summary = PredictionSummary(
        threshold=predictor.threshold,
        threshold_source=predictor.threshold_source if predictor.threshold is not None else "none",
        display_range=predictor.display_range,
        display_range_source=predictor.display_range_source if predictor.display_range is not None else "",
        score=predictor.score,
        inference=predictor.inference,
        out_dir=str(out),
    )

    def fail(path: str, reason: str) -> bool:
        summary.failures.append((path, reason))
        report(f"skipped {path}: {reason}")
        if strict:
            summary.stopped = True
        return strict

    for path, reason in problems:
        if fail(path, reason):
            break
    writes: list[Future] = []
    panels = Legend(predictor.score, tuple(predictor.class_names)) if legend else None
    loader: Iterable[list[dict[str, Any]]] = torch.utils.data.DataLoader(
        _ImageFiles(jobs), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    bar = tqdm(total=len(jobs), desc="predict", unit="image", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="densehybrid-predict-writer") as writer:
        batches = iter([]) if summary.stopped else (_read_ahead(loader) if num_workers == 0 else iter(loader))
        try:
            for items in batches:
                good = []
                for item in items:
                    job = jobs[item["index"]]
                    reason = item["error"] or refused.get(item["index"])
                    if reason is not None:
                        if fail(str(job.path), reason):
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
                    if summary.display_range is None:
                        summary.display_range = _first_image_range(results[0].scores)
                        summary.display_range_source = (
                            f"percentiles {FALLBACK_PERCENTILES[0]:g}-{FALLBACK_PERCENTILES[1]:g} of the first image"
                        )
                    for item, result in zip(group, results):
                        if out_of_domain(result):
                            summary.out_of_domain.append(str(jobs[item["index"]].path))
                            report(f"{jobs[item['index']].path}: {OUT_OF_DOMAIN_NOTE}")
                        seconds = item["read_time"] + forward
                        args = (predictor.palette, out, save_raw, summary.display_range, panels, seconds)
                        writes.append(writer.submit(_write_one, jobs[item["index"]], item["rgb"], result, *args))
                        summary.num_images += 1
                    # bounded memory, and a write error surfaces early instead of at the end of a long run
                    while len([w for w in writes if not w.done()]) > PENDING_WRITES:
                        next(w for w in writes if not w.done()).result()
                    for w in writes:
                        if w.done():
                            w.result()
                bar.update(len(items))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        records = [future.result() for future in writes]
    bar.close()
    summary.seconds = time.perf_counter() - start
    remove_outputs(out, earlier - {name for record in records for name in record["outputs"]}, jobs)
    write_json_lines(out / "predictions.jsonl", records)
    write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2, allow_nan=False) + "\n")
    return summary

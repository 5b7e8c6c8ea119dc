"""Writing a prediction's files: PNGs and NumPy maps, atomically; the rendering and writing of one image's outputs
(run on a writer thread beside the next forward pass); the clean-up of an earlier run's outputs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densehybrid.engine.outputs import atomic_path
from densehybrid.errors import DenseHybridError
from densehybrid.predict.files import ImageJob, output_paths
from densehybrid.predict.predictor import PredictionResult
from densehybrid.predict.rendering import (
    colour_bar_panel,
    legend_panel,
    render_heatmap,
    render_overlay,
    render_segmentation,
    with_panel,
)

__all__ = ["OUT_OF_DOMAIN_FRACTION", "PNG_COMPRESS_LEVEL", "label_png_array", "out_of_domain", "write_png"]

#: An image with more than this fraction of its pixels marked unknown may be outside the model's training domain.
OUT_OF_DOMAIN_FRACTION = 0.5
OUT_OF_DOMAIN_NOTE = "more than half of the image is marked unknown: it may be outside the model's training domain"

#: zlib settings of every PNG written, chosen for speed: level 1 with the run-length strategy (``Z_RLE``). At
#: 1024x2048 it encodes the three PNGs of an image in about two thirds of the time of level 1 with the default
#: strategy, with smaller heatmaps and segmentations; level 0 stores raw pixels (ten times the bytes of a heatmap).
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = 3  # zlib's Z_RLE


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 or (H, W) uint8/uint16 array as PNG, atomically (fast compression)."""
    image = Image.fromarray(array)
    _atomic_write(
        path, lambda f: image.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE)
    )


@dataclass(frozen=True)
class Legend:
    """What the panels under the maps name: the score (colour bar) and the class names (legend; ``"class i"`` when
    they are not known)."""

    score: str
    class_names: tuple[str, ...] = ()


def label_png_array(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The raw label map as stored: uint8 when ids ``0..K`` fit, else uint16."""
    return labels.astype(np.uint8 if num_classes <= 255 else np.uint16)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def out_of_domain(result: PredictionResult) -> bool:
    """Whether more than :data:`OUT_OF_DOMAIN_FRACTION` of the image is marked unknown (False without a threshold)."""
    fraction = result.anomalous_fraction
    return fraction is not None and fraction > OUT_OF_DOMAIN_FRACTION


def image_record(job: ImageJob, result: PredictionResult, out: Path, save_raw: bool, seconds: float) -> dict[str, Any]:
    """The ``predictions.jsonl`` line of one image."""
    return {
        "input": str(job.path),
        "width": int(result.scores.shape[1]),
        "height": int(result.scores.shape[0]),
        "anomalous_fraction": result.anomalous_fraction,
        "max_score": _json_value(float(np.max(result.scores))),
        "num_components": result.num_components() if result.threshold is not None else None,
        "out_of_domain": out_of_domain(result),
        "note": OUT_OF_DOMAIN_NOTE if out_of_domain(result) else None,
        "seconds": seconds,
        "outputs": [path.relative_to(out).as_posix() for path in output_paths(out, job.relative, save_raw).values()],
    }


def write_image_outputs(
    job: ImageJob,
    rgb: np.ndarray,
    result: PredictionResult,
    palette: np.ndarray,
    out: Path,
    save_raw: bool,
    display_range: tuple[float, float],
    legend: Legend | None = None,
) -> None:
    """Render and write the heatmap, segmentation, overlay (and raw maps) of one image, each file atomically. With
    ``legend``, the heatmap gets its colour bar and the segmentation its legend of class names, below the map.

    Raises:
        DenseHybridError: a file cannot be written.
    """
    paths = output_paths(out, job.relative, save_raw)
    colours = render_segmentation(result.labels, palette)
    heatmap, segmentation = render_heatmap(result.scores, display_range), colours
    if legend is not None:
        width = heatmap.shape[1]
        bar = colour_bar_panel(width, display_range, result.threshold, legend.score)
        heatmap = with_panel(heatmap, bar)
        segmentation = with_panel(colours, legend_panel(width, legend.class_names, palette))
    try:
        write_png(paths["heatmap"], heatmap)
        write_png(paths["segmentation"], segmentation)
        write_png(paths["overlay"], render_overlay(rgb, colours))
        if save_raw:
            _atomic_write(paths["scores"], lambda f: np.save(f, result.scores.astype(np.float32)))
            write_png(paths["labels"], label_png_array(result.labels, result.num_classes))
    except OSError as exc:
        raise DenseHybridError(f"Cannot write the outputs of {str(job.path)!r}: {exc.strerror or exc}.") from exc


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically; raises :class:`DenseHybridError` naming the file."""
    try:
        _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    except OSError as exc:
        raise DenseHybridError(f"Cannot write {str(path)!r}: {exc.strerror or exc}.") from exc


def write_json_lines(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """``predictions.jsonl``: one strict JSON line per record."""
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def remove_outputs(out: Path, names: Iterable[str], jobs: Sequence[ImageJob]) -> None:
    """Delete the earlier run's outputs ``names`` (relative to ``out``, as its records list them) that this run did not
    write again; never an input image of this run, never a path outside ``out``."""
    inputs = {job.path.resolve() for job in jobs}
    root = out.resolve()
    for name in sorted(names):
        path = out / name
        resolved = path.resolve()
        if resolved in inputs or root not in resolved.parents or not path.is_file():
            continue
        try:
            path.unlink()
        except OSError as exc:
            raise DenseHybridError(
                f"Cannot remove {str(path)!r}, an output of the earlier run being replaced: {exc.strerror or exc}."
            ) from exc

"""Open-set prediction on one's own images: the :class:`Predictor` and the ``densehybrid predict`` workflow.

One job per module, each usable alone:

* :mod:`~densehybrid.predict.predictor`: the :class:`Predictor` (tiling, input scaling, NumPy results) around
  :class:`~densehybrid.openset.OpenSetModel` or an exported ONNX / TorchScript graph;
* :mod:`~densehybrid.predict.calibration`: the calibration a checkpoint carries (:class:`Calibration`);
* :mod:`~densehybrid.predict.rendering`: heatmap, segmentation and overlay colours, the legend and colour bar;
* :mod:`~densehybrid.predict.files`: inputs from files, folders and globs, output names, the output-path checks;
* :mod:`~densehybrid.predict.writing`: atomic PNG/NumPy writing of one image's outputs;
* :mod:`~densehybrid.predict.run`: :func:`predict_files`, the pipelined run behind ``densehybrid predict``.
"""

from __future__ import annotations

from densehybrid.predict.calibration import CALIBRATION_KEY, Calibration, read_calibration
from densehybrid.predict.files import (
    IMAGE_SUFFIXES,
    RESULT_FILES,
    ImageJob,
    check_output_plan,
    check_prediction_out,
    discover_images,
    output_paths,
)
from densehybrid.predict.predictor import DEFAULT_TILE_OVERLAP, PredictionResult, Predictor, image_tensor, tile_spans
from densehybrid.predict.rendering import (
    HEATMAP_COLORMAP,
    OVERLAY_ALPHA,
    class_labels,
    colour_bar_panel,
    default_palette,
    legend_panel,
    render_heatmap,
    render_overlay,
    render_segmentation,
    with_panel,
)
from densehybrid.predict.run import FALLBACK_PERCENTILES, PredictionSummary, predict_files
from densehybrid.predict.writing import (
    OUT_OF_DOMAIN_FRACTION,
    PNG_COMPRESS_LEVEL,
    _atomic_write,
    label_png_array,
    out_of_domain,
    write_png,
)

__all__ = [
    "CALIBRATION_KEY",
    "DEFAULT_TILE_OVERLAP",
    "FALLBACK_PERCENTILES",
    "HEATMAP_COLORMAP",
    "IMAGE_SUFFIXES",
    "OVERLAY_ALPHA",
    "PNG_COMPRESS_LEVEL",
    "RESULT_FILES",
    "Calibration",
    "ImageJob",
    "PredictionResult",
    "PredictionSummary",
    "Predictor",
    "_atomic_write",
    "check_output_plan",
    "check_prediction_out",
    "default_palette",
    "discover_images",
    "image_tensor",
    "label_png_array",
    "output_paths",
    "predict_files",
    "read_calibration",
    "OUT_OF_DOMAIN_FRACTION",
    "class_labels",
    "colour_bar_panel",
    "legend_panel",
    "out_of_domain",
    "with_panel",
    "render_heatmap",
    "render_overlay",
    "render_segmentation",
    "tile_spans",
    "write_png",
]

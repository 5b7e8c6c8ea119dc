"""Benchmark evaluation as the command line runs it: each benchmark's own protocol, and the open-set protocols.

* :func:`evaluate_benchmark`: anomaly metrics (pooled, per-image or SMIYC), SMIYC component metrics and closed-set
  mIoU of a model on a registered benchmark (``densehybrid evaluate``);
* :func:`streethazards_open_set`, :func:`coco_open_set`, :func:`two_fold_open_set`, :func:`open_set_folds`: a
  threshold calibrated on one part, open-mIoU on another or the same part, as each released script does
  (``densehybrid evaluate-open-set``); :func:`folder_open_set`: two folds over the halves of a user's val split.
"""

from __future__ import annotations

from densehybrid.evaluation.benchmark import (
    BENCHMARK_TRACKS,
    CLOSED_SET_BENCHMARKS,
    ScaleImage,
    evaluate_benchmark,
    open_benchmark,
    resolve_request,
)
from densehybrid.evaluation.open_set import (
    OPEN_SET_BENCHMARKS,
    calibration_pairs,
    coco_open_set,
    folder_open_set,
    open_set_confusion,
    open_set_folds,
    roadscene_open_set,
    streethazards_open_set,
    two_fold_open_set,
)

__all__ = [
    "BENCHMARK_TRACKS",
    "CLOSED_SET_BENCHMARKS",
    "OPEN_SET_BENCHMARKS",
    "ScaleImage",
    "calibration_pairs",
    "coco_open_set",
    "folder_open_set",
    "open_set_folds",
    "roadscene_open_set",
    "evaluate_benchmark",
    "open_benchmark",
    "open_set_confusion",
    "resolve_request",
    "streethazards_open_set",
    "two_fold_open_set",
]

"""Benchmark evaluation as the command line runs it: each benchmark's own protocol.

* :func:`evaluate_benchmark`: anomaly metrics (pooled, per-image or SMIYC), SMIYC component metrics and closed-set
  mIoU of a model on a registered benchmark (``densehybrid evaluate``).
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

__all__ = [
    "BENCHMARK_TRACKS",
    "CLOSED_SET_BENCHMARKS",
    "ScaleImage",
    "evaluate_benchmark",
    "open_benchmark",
    "resolve_request",
]

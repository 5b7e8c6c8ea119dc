"""Pixel-level anomaly metrics, SegmentMeIfYouCan component metrics and open-set IoU.

* exact functional metrics for inputs that fit in memory: :func:`average_precision`, :func:`auroc`,
  :func:`fpr_at_tpr`, :func:`threshold_at_tpr`, :func:`best_f1_threshold`;
* streaming anomaly metrics, one class per evaluation protocol (:data:`PROTOCOLS`, built by
  :func:`anomaly_metrics`): ``pooled`` (:class:`AnomalyMetrics`, fixed-size histogram), ``per_image``
  (:class:`PerImageAnomalyMetrics`) and ``smiyc`` (:class:`SmiycAnomalyMetrics`, the official binned curve);
* :class:`ComponentMetrics`: SegmentMeIfYouCan sIoU, PPV and mean F1;
* :class:`ConfusionMatrix`, :func:`miou`, :func:`open_miou`: closed-set mIoU and open-IoU.

Every streaming metric has ``update``, ``compute``, ``reset``, ``merge(other)`` and ``sync(group=None)``. See
``docs/metrics.md`` for the protocols, their sources and the accuracy of the binned state.
"""

from __future__ import annotations

from typing import Any

from densehybrid.metrics.components import COMPONENT_TRACKS, ComponentMetrics
from densehybrid.metrics.functional import auroc, average_precision, best_f1_threshold, fpr_at_tpr, threshold_at_tpr
from densehybrid.metrics.per_image import PerImageAnomalyMetrics
from densehybrid.metrics.segmentation import ConfusionMatrix, miou, open_miou
from densehybrid.metrics.smiyc import SmiycAnomalyMetrics
from densehybrid.metrics.streaming import AnomalyMetrics

# Evaluation protocols by the name a user (CLI, config) gives.
PROTOCOLS: dict[str, type] = {
    "pooled": AnomalyMetrics,
    "per_image": PerImageAnomalyMetrics,
    "smiyc": SmiycAnomalyMetrics,
}


def anomaly_metrics(
    protocol: str = "pooled", **kwargs: Any
) -> AnomalyMetrics | PerImageAnomalyMetrics | SmiycAnomalyMetrics:
    """Build the streaming anomaly metric of a named protocol.

    Args:
        protocol: ``"pooled"`` (Fishyscapes, SMIYC pixel level: all pixels in one ranking), ``"per_image"``
            (StreetHazards: mean over images) or ``"smiyc"`` (SegmentMeIfYouCan toolkit's binned curve).
        **kwargs: keyword arguments of the protocol's class (e.g. ``ignore_index``, ``bits``, ``variant``).

    Returns:
        A metric with ``update``, ``compute``, ``reset``, ``merge`` and ``sync``.

    Raises:
        ValueError: for an unknown protocol name.

    Example:
        >>> metric = anomaly_metrics("per_image", variant="streethazards")
        >>> type(metric).__name__
        'PerImageAnomalyMetrics'
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}. Available: {', '.join(sorted(PROTOCOLS))}.")
    return PROTOCOLS[protocol](**kwargs)


__all__ = [
    "COMPONENT_TRACKS",
    "PROTOCOLS",
    "AnomalyMetrics",
    "ComponentMetrics",
    "ConfusionMatrix",
    "PerImageAnomalyMetrics",
    "SmiycAnomalyMetrics",
    "anomaly_metrics",
    "auroc",
    "average_precision",
    "best_f1_threshold",
    "fpr_at_tpr",
    "miou",
    "open_miou",
    "threshold_at_tpr",
]

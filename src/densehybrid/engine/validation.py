"""Per-epoch validation of a training run: closed-set mIoU, and anomaly AP / FPR95 when the split has anomalies.

Each frame is run at its full resolution (batch 1). In a distributed run every rank validates every ``W``-th frame
and the metric states are summed over the ranks before computing. AP and FPR95 come from the binned pooled
metric (16 bits). These numbers monitor training; the benchmark
protocols of ``densehybrid evaluate`` remain the reference.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from densehybrid.engine import distributed
from densehybrid.engine.batches import unpack_sample
from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics import AnomalyMetrics, ConfusionMatrix
from densehybrid.models.output import output_fields
from densehybrid.scores import compute_score, default_score, score_info


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    device: torch.device,
    limit: int | None = None,
    amp: bool = False,
    score: str | None = None,
) -> dict[str, float]:
    """Closed-set mIoU over ``dataset`` and, where targets hold the anomaly id K, pooled AP and FPR95 of the
    model's anomaly score.

    Args:
        model: a DenseHybrid model (``forward(images, output_size) -> HybridOutput``) or a DiCNet model (the mIoU is
            its teacher's); left in eval mode.
        dataset: samples with ``image`` (3, H, W) and ``target`` (H, W): ids ``0..K-1``, anomaly K, void 255.
        num_classes: K.
        device: where to run.
        limit: only the first ``limit`` frames (None: all).
        amp: bfloat16 autocast on CUDA.
        score: the anomaly score; default the one the model's outputs call for
            (:func:`densehybrid.scores.default_score`: ``densehybrid``, or ``dicnet`` for a DiCNet model).

    Returns:
        ``{"val_miou": ..., "val_ap": ..., "val_fpr95": ...}`` (the anomaly keys only when anomalies were seen);
        values are fractions in [0, 1], NaN when undefined.
    """
    model.eval()
    score = default_score(output_fields(model)) if score is None else score
    inputs = score_info(score).inputs
    count = len(dataset) if limit is None else min(limit, len(dataset))
    confusion = ConfusionMatrix(num_classes, device="cpu")
    anomaly = AnomalyMetrics(bits=16, device="cpu")
    saw_anomalies = torch.zeros((), dtype=torch.int64)
    for index in range(distributed.rank(), count, distributed.world_size()):
        image, target = unpack_sample(dataset[index])
        image, target = image[None].to(device), target[None].long()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(image, output_size=tuple(target.shape[-2:]))
        logits = out.logits.float().cpu()
        known = torch.where(target >= num_classes, torch.full_like(target, IGNORE_INDEX), target)
        known = torch.where(target == IGNORE_INDEX, target, known)
        confusion.update(logits.argmax(1), known)
        is_anomaly = target == num_classes
        if bool(is_anomaly.any()) and all(getattr(out, field, None) is not None for field in inputs):
            saw_anomalies += 1
            binary = torch.where(target == IGNORE_INDEX, target, is_anomaly.long())
            anomaly.update(compute_score(score, out, tuple(target.shape[-2:])).float().cpu(), binary)
    confusion.sync()
    result: dict[str, Any] = {"val_miou": float(confusion.compute()["miou"])}
    if int(distributed.sum_over_ranks(saw_anomalies)) > 0:
        anomaly.sync()
        with warnings.catch_warnings():  # monitoring only: the binned AP/FPR95 need not match to 1e-4
            warnings.simplefilter("ignore", UserWarning)
            metrics = anomaly.compute()
        result["val_ap"] = float(metrics["ap"])
        result["val_fpr95"] = float(metrics["fpr95"])
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in result.items()}

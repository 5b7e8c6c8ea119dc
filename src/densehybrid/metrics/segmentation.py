"""Closed-set mIoU and open-set IoU from one dataset-level confusion matrix.

Open-IoU follows the released DenseHybrid code exactly (``utils/iou.py::OpenIoU`` and
``evaluate_osr.py::evaluate_open_dataset``, https://github.com/matejgrcic/DenseHybrid; Grcić et al., ECCV 2022,
"open-mIoU"; Grcić & Šegvić, TPAMI 2024, "Open-IoU"). With K known classes, predictions in ``0..K`` (K =
"unknown", i.e. detected anomaly) and targets in ``0..K`` (K = anomaly) plus ``ignore_index``, one confusion matrix
``C[target, prediction]`` of size (K+1) x (K+1) is accumulated over the whole split (ignored pixels dropped) and

.. math:: \\mathrm{IoU}_k = \\frac{C_{kk}}{\\sum_g C_{gk} + \\sum_p C_{kp} - C_{kk}}

so undetected anomalies (target K, prediction k) are false positives of class k and false anomaly detections
(target k, prediction K) are false negatives of class k. ``open_miou`` is the NaN-ignoring mean over the K known
classes (``nan_iou="skip"``, the ECCV ``evaluate_osr.py``); the TPAMI-era scripts (``evaluate_osr_sh.py``,
``evaluate_osr_coco.py``) set NaN IoUs to 0 before averaging (``nan_iou="zero"``), which counts a known class absent
from both targets and predictions as IoU 0. The anomaly class's IoU is reported separately. The closed-set mIoU of the same code
(``evaluate_closed_dataset``) drops the anomaly row and column: IoU over the K x K block, NaN-ignoring mean; feed
it closed-set predictions (argmax over the K classes) to get the closed-set number.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from densehybrid._checks import check_labels, check_ndim, check_same_shape
from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics._base import SumStateMetric

_CPU_CHUNK = 1 << 20
#: How the open-set mean treats the NaN IoU of a known class absent from targets and predictions: "skip" (NaN-ignoring
#: mean, ECCV ``evaluate_osr.py``) or "zero" (NaN set to 0 first, TPAMI-era ``evaluate_osr_sh.py`` and
#: ``evaluate_osr_coco.py``).
NAN_IOU_RULES = ("skip", "zero")


def _iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU of a square confusion matrix (rows = target, columns = prediction); NaN for absent classes."""
    confusion = confusion.to(torch.float64)
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, math.nan))


def _check_nan_iou(nan_iou: str) -> None:
    if nan_iou not in NAN_IOU_RULES:
        raise ValueError(f"Expected `nan_iou` to be one of {', '.join(NAN_IOU_RULES)}, but got {nan_iou!r}.")


def _nanmean(values: torch.Tensor, what: str) -> float:
    present = values[~values.isnan()]
    if present.numel() == 0:
        warnings.warn(f"No class appears in targets or predictions: {what} is reported as NaN.", UserWarning, 3)
        return math.nan
    return float(present.mean())


class ConfusionMatrix(SumStateMetric):
    """Dataset-level confusion matrix of K known classes plus the anomaly / "unknown" class K.

    Args:
        num_classes: K, the number of known classes.
        ignore_index: target id of pixels that are not evaluated, or None.
        validate_args: check the id ranges of every batch.
        device: device of the state; None: the device of the first update.

    Example:
        >>> matrix = ConfusionMatrix(num_classes=2)
        >>> target = torch.tensor([[[0, 0, 1, 2]]])  # 2 = anomaly
        >>> pred = torch.tensor([[[0, 1, 1, 2]]])  # 2 = "unknown"
        >>> matrix.update(pred, target)
        >>> result = matrix.compute()
        >>> result["open_miou"], result["anomaly_iou"]
        (0.5, 1.0)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int | None = IGNORE_INDEX,
        validate_args: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
        if ignore_index is not None and 0 <= ignore_index <= num_classes:
            raise ValueError(
                f"Expected `ignore_index` outside the class ids [0, {num_classes}], but got {ignore_index}."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        super().__init__(device)

    def _config(self) -> tuple:
        return (self.num_classes, self.ignore_index)

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        size = self.num_classes + 1
        # Row-major C[target, prediction]; one extra slot collects ignored pixels.
        return {"confusion": torch.zeros(size * size + 1, dtype=torch.int64, device=device)}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: (N, H, W) integer predictions in ``0..K`` (K = unknown); closed-set predictions use ``0..K-1``.
            target: (N, H, W) integer targets in ``0..K`` (K = anomaly) or ``ignore_index``.

        Raises:
            ValueError: mismatched shapes or ids out of range.
        """
        check_ndim("pred", pred, 3, "(N, H, W)")
        check_ndim("target", target, 3, "(N, H, W)")
        check_same_shape("pred", pred, "target", target, "Resize predictions to the label resolution first.")
        if self.validate_args:
            check_labels("pred", pred, self.num_classes + 1, None)
            check_labels("target", target, self.num_classes + 1, self.ignore_index)
        state = self._ensure_state(pred.device)
        confusion = state["confusion"]
        size = self.num_classes + 1
        flat_pred = pred.to(confusion.device).reshape(-1)
        flat_target = target.to(confusion.device).reshape(-1)
        total = flat_pred.numel()
        step = _CPU_CHUNK if confusion.device.type == "cpu" else max(total, 1)
        ones = torch.ones(min(step, total), dtype=torch.int64, device=confusion.device)
        for start in range(0, total, step):
            rows = flat_target[start : start + step].to(torch.int64)
            index = rows * size + flat_pred[start : start + step].to(torch.int64)
            if self.ignore_index is not None:
                index.masked_fill_(rows == self.ignore_index, size * size)
            confusion.scatter_add_(0, index, ones[: index.numel()])

    def confusion(self) -> torch.Tensor:
        """(K+1, K+1) int64 matrix, rows = target, columns = prediction (CPU copy)."""
        size = self.num_classes + 1
        if self._state is None:
            return torch.zeros(size, size, dtype=torch.int64)
        return self._state["confusion"][:-1].view(size, size).cpu()

    def compute(self, nan_iou: str = "skip") -> dict[str, Any]:
        """IoUs from the accumulated matrix.

        Args:
            nan_iou: how ``open_miou`` treats a known class absent from targets and predictions: ``"skip"`` it
                (NaN-ignoring mean) or count it as ``"zero"`` (the TPAMI-era open-set scripts); see the module
                docstring. The closed-set ``miou`` always skips it.

        Returns:
            A dict with ``miou`` (closed-set, K x K block), ``iou`` (its K per-class values), ``open_miou`` (mean
            open IoU of the K known classes), ``open_iou`` (K values), ``anomaly_iou`` (IoU of class K), and the
            pixel counts ``num_pixels`` and ``num_ignored``. Classes absent from targets and predictions have NaN
            IoU and are skipped by the means.
        """
        _check_nan_iou(nan_iou)
        confusion = self.confusion()
        num_ignored = 0 if self._state is None else int(self._state["confusion"][-1])
        closed = _iou(confusion[:-1, :-1])
        open_iou = _iou(confusion)
        return {
            "miou": _nanmean(closed, "the closed-set mIoU"),
            "iou": closed.tolist(),
            "open_miou": _nanmean(
                open_iou[:-1].nan_to_num(nan=0.0) if nan_iou == "zero" else open_iou[:-1], "the open-set mIoU"
            ),
            "open_iou": open_iou[:-1].tolist(),
            "anomaly_iou": float(open_iou[-1]),
            "num_pixels": int(confusion.sum()),
            "num_ignored": num_ignored,
        }


def miou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int | None = IGNORE_INDEX
) -> float:
    """Closed-set mIoU over K classes from one confusion matrix; anomaly (id K) and ignored pixels are dropped.

    Args:
        pred: (N, H, W) integer predictions in ``0..K`` (a K is dropped with its pixel's column).
        target: (N, H, W) integer targets in ``0..K`` or ``ignore_index``.
        num_classes: K.
        ignore_index: target id of pixels that are not evaluated, or None.

    Returns:
        NaN-ignoring mean IoU of the K classes.

    Example:
        >>> miou(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 0, 1]]]), num_classes=2)
        0.5
    """
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    matrix.update(pred, target)
    return matrix.compute()["miou"]


def open_miou(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = IGNORE_INDEX,
    nan_iou: str = "skip",
) -> float:
    """Open-set mIoU over the K known classes (released DenseHybrid definition, see the module docstring).

    Args:
        pred: (N, H, W) integer open-set predictions in ``0..K`` (K = unknown).
        target: (N, H, W) integer targets in ``0..K`` (K = anomaly) or ``ignore_index``.
        num_classes: K.
        ignore_index: target id of pixels that are not evaluated, or None.
        nan_iou: ``"skip"`` absent known classes (NaN-ignoring mean) or count them as ``"zero"``.

    Returns:
        mean open IoU of the K known classes.

    Example:
        >>> open_miou(torch.tensor([[[0, 1, 1, 0]]]), torch.tensor([[[0, 1, 2, 2]]]), num_classes=2)
        0.5
    """
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    matrix.update(pred, target)
    return matrix.compute(nan_iou=nan_iou)["open_miou"]

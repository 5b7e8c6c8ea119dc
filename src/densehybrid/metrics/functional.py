"""Exact pixel-level anomaly metrics for tensors in memory, in bounded extra memory.

Each function groups tied scores as scikit-learn does and computes its metric from the grouped counts
(:mod:`densehybrid.metrics._curve`), equal to scikit-learn's up to floating-point summation order. Scores are
rounded to float32 (as the streaming metrics do) and the curve is built piece by piece
(:class:`densehybrid.metrics._exact.ExactCurve`): a few passes over the input, each sorting at most 2**22 pixels,
so the extra memory stays bounded whatever the pixel count (float64 scores are sorted whole instead, keeping their
full precision). They are the reference for the streaming metrics; for evaluations that stream batches use
:class:`~densehybrid.metrics.AnomalyMetrics`, whose state does not grow with the number of pixels.

Conventions: ``scores`` are higher for more anomalous pixels and are used as given (never squashed or normalised);
``target`` holds 0 (inlier), 1 (anomaly) or ``ignore_index``; a threshold ``t`` predicts "anomaly" for
``score >= t``.
"""

from __future__ import annotations

import math
import warnings

import torch

from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics import _curve, _exact
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index, valid_pixels
from densehybrid.metrics._keys import keys_to_float, order_keys

__all__ = ["average_precision", "auroc", "best_f1_threshold", "fpr_at_tpr", "threshold_at_tpr"]


def exact_curve(scores: torch.Tensor, target: torch.Tensor) -> _curve.Curve:
    """Group valid pixels by distinct score, highest first.

    Args:
        scores: (n,) floating scores without NaN.
        target: (n,) int64 in {0, 1}.

    Returns:
        The grouped counts; thresholds are the distinct score values (float64).
    """
    if scores.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=scores.device)
        return _curve.Curve(empty, empty, empty.to(torch.float64))
    if scores.dtype == torch.float64:
        return _exact_curve_float64(scores, target)
    # One ascending sort of (key, label) pairs packed in int64: faster and leaner than a float sort plus a gather.
    packed = order_keys(scores).to(torch.int64)
    packed.mul_(2).add_(target)
    if packed.device.type == "cpu":
        packed.numpy().sort()  # in place, without the index array torch.sort would allocate
    else:
        packed = torch.sort(packed).values
    labels = packed & 1
    packed >>= 1
    keys = packed
    ends = torch.cat([(keys[1:] != keys[:-1]).nonzero().squeeze(1), keys.new_tensor([keys.numel() - 1])])
    tps = labels.cumsum_(0)[ends]
    counts = ends + 1
    pos = torch.diff(tps, prepend=tps.new_zeros(1))
    neg = torch.diff(counts - tps, prepend=tps.new_zeros(1))
    # Groups were built from the lowest score up; the curve runs from the highest down.
    return _curve.Curve(pos.flip(0), neg.flip(0), keys_to_float(keys[ends]).flip(0))


def _exact_curve_float64(scores: torch.Tensor, target: torch.Tensor) -> _curve.Curve:
    # float64 keys do not fit next to a label bit in int64: sort the values and carry the labels along.
    values, order = torch.sort(scores, descending=True, stable=True)
    labels = target[order]
    ends = torch.cat([(values[1:] != values[:-1]).nonzero().squeeze(1), order.new_tensor([values.numel() - 1])])
    tps = labels.cumsum(0)[ends]
    counts = ends + 1
    pos = torch.diff(tps, prepend=tps.new_zeros(1))
    neg = torch.diff(counts - tps, prepend=tps.new_zeros(1))
    return _curve.Curve(pos, neg, values[ends].to(torch.float64) + 0.0)


def _curve_from_inputs(
    scores: torch.Tensor, target: torch.Tensor, ignore_index: int | None, validate_args: bool
) -> _exact.ExactCurve | _exact.WholeCurve:
    """The exact curve: float64 scores sorted whole; any other dtype (rounded to float32) in bounded memory."""
    check_ignore_index(ignore_index)
    check_anomaly_inputs(scores, target, ignore_index, batched=False, validate_args=validate_args)
    if scores.dtype == torch.float64:
        flat_scores, flat_target, _ = valid_pixels(scores, target, ignore_index)
        return _exact.WholeCurve(exact_curve(flat_scores, flat_target))
    return _exact.ExactCurve(_exact.tensor_chunks(scores, target, ignore_index))


def _point_at_tpr(curve: _exact.ExactCurve | _exact.WholeCurve, tpr: float, strict: bool) -> tuple[float, int]:
    """(threshold, fps) of the first point meeting the rule (``strict``: on scikit-learn's thinned curve)."""
    pieces = curve.pieces(curve.first_bin_at_tpr(tpr, strict))
    return _exact.point_at_tpr(pieces, curve.num_pos, tpr, strict, drop_intermediate=strict)


def _check_tpr(tpr: float, strict: bool) -> None:
    upper_ok = tpr < 1 if strict else tpr <= 1
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not (0 < tpr and upper_ok):
        interval = "(0, 1)" if strict else "(0, 1]"
        raise ValueError(f"Expected `tpr` to be a float in {interval} (strict={strict}), but got {tpr!r}.")


def warn_degenerate(num_pos: int, num_neg: int, needs_neg: bool, what: str) -> bool:
    """Emit the library's warning for degenerate input; return True when the metric is undefined (NaN)."""
    if num_pos == 0:
        warnings.warn(
            f"No anomaly pixels were evaluated: {what} is undefined and reported as NaN.", UserWarning, stacklevel=3
        )
        return True
    if needs_neg and num_neg == 0:
        warnings.warn(
            f"No inlier pixels were evaluated: {what} is undefined and reported as NaN.", UserWarning, stacklevel=3
        )
        return True
    return False


def average_precision(
    scores: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = IGNORE_INDEX,
    validate_args: bool = True,
) -> float:
    r"""Average precision of anomaly detection, step-wise as scikit-learn's ``average_precision_score``.

    .. math:: \mathrm{AP} = \sum_n (R_n - R_{n-1}) P_n

    over the distinct score thresholds ``n`` in decreasing order (tied scores form one threshold).

    Args:
        scores: floating tensor of any shape; higher is more anomalous.
        target: integer tensor of the same shape: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.
        ignore_index: id of pixels to skip, or None.
        validate_args: scan for NaN scores and ids outside the encoding.

    Returns:
        AP in [0, 1]; NaN (with a ``UserWarning``) when no anomaly pixel is evaluated.

    Raises:
        ValueError: mismatched shapes, NaN scores or ids outside {0, 1, ignore_index}.

    References:
        scikit-learn ``sklearn.metrics.average_precision_score``; used by Fishyscapes, SegmentMeIfYouCan and the
        DenseHybrid evaluation (https://github.com/matejgrcic/DenseHybrid, ``evaluations/base.py``).

    Example:
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
        >>> target = torch.tensor([1, 0, 1, 0])
        >>> round(average_precision(scores, target), 4)
        0.8333
    """
    curve = _curve_from_inputs(scores, target, ignore_index, validate_args)
    if warn_degenerate(curve.num_pos, curve.num_neg, False, "average precision"):
        return math.nan
    return _exact.average_precision(curve.pieces(), curve.num_pos)


def auroc(
    scores: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = IGNORE_INDEX,
    validate_args: bool = True,
) -> float:
    r"""Area under the ROC curve (trapezoid rule, ties count one half), as scikit-learn's ``roc_auc_score``.

    .. math:: \mathrm{AUROC} = \frac{1}{P N} \sum_{i:\,y_i=1} \sum_{j:\,y_j=0}
              \left([s_i > s_j] + \tfrac{1}{2}[s_i = s_j]\right)

    Args:
        scores: floating tensor of any shape; higher is more anomalous.
        target: integer tensor of the same shape: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.
        ignore_index: id of pixels to skip, or None.
        validate_args: scan for NaN scores and ids outside the encoding.

    Returns:
        AUROC in [0, 1]; NaN (with a ``UserWarning``) unless both classes are present.

    Example:
        >>> auroc(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        0.75
    """
    curve = _curve_from_inputs(scores, target, ignore_index, validate_args)
    if warn_degenerate(curve.num_pos, curve.num_neg, True, "AUROC"):
        return math.nan
    return _exact.auroc(curve.pieces(), curve.num_pos, curve.num_neg)


def fpr_at_tpr(
    scores: torch.Tensor,
    target: torch.Tensor,
    tpr: float = 0.95,
    *,
    strict: bool = False,
    ignore_index: int | None = IGNORE_INDEX,
    validate_args: bool = True,
) -> float:
    """False positive rate at the first ROC operating point whose true positive rate reaches ``tpr``.

    The operating points are the distinct score thresholds in decreasing order. By default the first point with
    ``TPR >= tpr`` is taken (SegmentMeIfYouCan ``tpr95_fpr``, pytorch-ood ``fpr_at_tpr``). ``strict=True`` takes the
    first point with ``TPR > tpr`` on scikit-learn's ``roc_curve(drop_intermediate=True)``, exactly as the released
    DenseHybrid evaluation (``evaluations/base.py::calculate_auroc``).

    Args:
        scores: floating tensor of any shape; higher is more anomalous.
        target: integer tensor of the same shape: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.
        tpr: target true positive rate, in (0, 1] ((0, 1) when ``strict``).
        strict: use the released DenseHybrid rule (see above).
        ignore_index: id of pixels to skip, or None.
        validate_args: scan for NaN scores and ids outside the encoding.

    Returns:
        FPR in [0, 1]; NaN (with a ``UserWarning``) unless both classes are present.

    Example:
        >>> fpr_at_tpr(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        0.5
    """
    _check_tpr(tpr, strict)
    curve = _curve_from_inputs(scores, target, ignore_index, validate_args)
    if warn_degenerate(curve.num_pos, curve.num_neg, True, "the FPR at a TPR"):
        return math.nan
    _, fps = _point_at_tpr(curve, tpr, strict)
    return fps / curve.num_neg if fps >= 0 else math.nan


def threshold_at_tpr(
    scores: torch.Tensor,
    target: torch.Tensor,
    tpr: float = 0.95,
    *,
    strict: bool = False,
    ignore_index: int | None = IGNORE_INDEX,
    validate_args: bool = True,
) -> float:
    """Score threshold of the operating point used by :func:`fpr_at_tpr`.

    Predicting "anomaly" for ``score >= threshold`` reproduces that point on the given data, so the returned value
    is a calibrated open-set threshold (e.g. at TPR 95% on a validation split).

    Args:
        scores: floating tensor of any shape; higher is more anomalous.
        target: integer tensor of the same shape: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.
        tpr: target true positive rate, in (0, 1] ((0, 1) when ``strict``).
        strict: first point with TPR > ``tpr`` on scikit-learn's thinned ROC curve (released DenseHybrid code).
        ignore_index: id of pixels to skip, or None.
        validate_args: scan for NaN scores and ids outside the encoding.

    Returns:
        One of the score values; NaN (with a ``UserWarning``) when no anomaly pixel is evaluated.

    Example:
        >>> threshold_at_tpr(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        0.699999988079071
    """
    _check_tpr(tpr, strict)
    curve = _curve_from_inputs(scores, target, ignore_index, validate_args)
    if warn_degenerate(curve.num_pos, curve.num_neg, False, "the threshold at a TPR"):
        return math.nan
    return _point_at_tpr(curve, tpr, strict)[0]


def best_f1_threshold(
    scores: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = IGNORE_INDEX,
    validate_args: bool = True,
) -> tuple[float, float]:
    r"""Threshold that maximises the pixel F1 score, and that F1.

    .. math:: F_1(t) = \frac{2\,TP(t)}{2\,TP(t) + FP(t) + FN(t)}

    over the distinct score thresholds; on ties the highest threshold wins. SegmentMeIfYouCan binarises scores at
    its (binned) best-F1 threshold before computing component metrics.

    Args:
        scores: floating tensor of any shape; higher is more anomalous.
        target: integer tensor of the same shape: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.
        ignore_index: id of pixels to skip, or None.
        validate_args: scan for NaN scores and ids outside the encoding.

    Returns:
        ``(threshold, f1)``; ``(nan, nan)`` with a ``UserWarning`` when no anomaly pixel is evaluated.

    Example:
        >>> best_f1_threshold(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        (0.699999988079071, 0.8)
    """
    curve = _curve_from_inputs(scores, target, ignore_index, validate_args)
    if warn_degenerate(curve.num_pos, curve.num_neg, False, "the best-F1 threshold"):
        return math.nan, math.nan
    return _exact.best_f1(curve.pieces(), curve.num_pos)

"""Validation of the ``(scores, target)`` pairs that every anomaly metric receives.

Binary anomaly targets use :data:`~densehybrid.labels.INLIER` (0), :data:`~densehybrid.labels.ANOMALY` (1) and an
optional ``ignore_index`` (255 by default). Scores are taken as they are: never squashed, clipped or normalised.
"""

from __future__ import annotations

import torch

from densehybrid._checks import check_finite, check_labels, check_ndim, check_same_shape
from densehybrid.labels import ANOMALY, INLIER

_SHAPE_HINT = "Resize the scores to the label resolution before evaluating."


def check_ignore_index(ignore_index: int | None) -> None:
    """Raise unless ``ignore_index`` is None or an int that is neither the inlier nor the anomaly id."""
    if ignore_index is None:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"Expected `ignore_index` to be an int or None, but got {type(ignore_index).__name__}.")
    if ignore_index in (INLIER, ANOMALY):
        raise ValueError(
            f"Expected `ignore_index` to differ from the inlier ({INLIER}) and anomaly ({ANOMALY}) ids, "
            f"but got {ignore_index}."
        )


def check_anomaly_inputs(
    scores: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int | None,
    *,
    batched: bool,
    validate_args: bool = True,
) -> None:
    """Validate scores and a binary anomaly target.

    Args:
        scores: floating tensor; (N, H, W) when ``batched``, any shape otherwise.
        target: integer (or bool) tensor of the same shape with ids in {0, 1} or ``ignore_index``.
        ignore_index: id of pixels that are not evaluated, or None.
        batched: require the (N, H, W) layout of :meth:`update`.
        validate_args: also scan the values for NaN scores and ids outside the encoding (costs one pass).

    Raises:
        TypeError: for non-tensors, integer scores or floating targets.
        ValueError: for wrong or mismatched shapes, NaN scores or ids outside the encoding.
    """
    if batched:
        check_ndim("scores", scores, 3, "(N, H, W)")
        check_ndim("target", target, 3, "(N, H, W)")
    else:
        for name, tensor in (("scores", scores), ("target", target)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(tensor).__name__}.")
    if not scores.is_floating_point():
        raise TypeError(f"Expected `scores` to be a floating tensor, but got dtype {scores.dtype}.")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"Expected `target` to be an integer tensor, but got dtype {target.dtype}.")
    check_same_shape("scores", scores, "target", target, _SHAPE_HINT)
    if scores.device != target.device:
        raise ValueError(
            f"Expected `scores` and `target` on the same device, but got {scores.device} and {target.device}."
        )
    if not validate_args:
        return
    check_finite("scores", scores)
    if target.dtype == torch.bool:
        return
    # Cheap scan first; the shared helper builds the message (with the offending ids) only when needed.
    bad = (target != INLIER) & (target != ANOMALY)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        check_labels("target", target, (INLIER, ANOMALY), ignore_index)


def valid_pixels(
    scores: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flatten and drop ignored pixels.

    Returns:
        ``(scores, target, num_ignored)``: 1-D scores, 1-D int64 target in {0, 1}, and the dropped pixel count.
    """
    scores, target = scores.reshape(-1), target.reshape(-1)
    if target.dtype == torch.bool:
        return scores, target.to(torch.int64), 0
    if ignore_index is None:
        return scores, target.to(torch.int64), 0
    keep = target != ignore_index
    kept = int(keep.sum())
    return scores[keep], target[keep].to(torch.int64), target.numel() - kept

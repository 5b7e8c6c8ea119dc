"""Input validation shared by scores, losses, metrics and models.

Every message follows one template: ``Expected `<arg>` to <requirement>, but got <actual>.``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``ndim`` dimensions (``layout`` is e.g. "(N, C, H, W)")."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor of shape {layout}, but got {type(tensor).__name__}.")
    if tensor.ndim != ndim:
        raise ValueError(f"Expected `{name}` to have shape {layout}, but got {tuple(tensor.shape)}.")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have identical shapes."""
    if tuple(a.shape) != tuple(b.shape):
        msg = (
            f"Expected `{name_a}` and `{name_b}` to have the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}."
        )
        raise ValueError(msg + (f" {hint}" if hint else ""))


def check_spatial_match(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the batch and the spatial dimensions (everything after the channel axis) agree."""
    if a.shape[0] != b.shape[0] or tuple(a.shape[2:]) != tuple(b.shape[2:]):
        raise ValueError(
            f"Expected `{name_a}` {tuple(a.shape)} and `{name_b}` {tuple(b.shape)} to share batch size and (H, W)."
        )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN (infinities are allowed: they still rank)."""
    if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
        count = int(torch.isnan(tensor).sum())
        raise ValueError(f"Expected `{name}` to contain no NaN, but got {count} NaN value(s) of {tensor.numel()}.")


def check_labels(name: str, target: torch.Tensor, valid: Sequence[int] | int, ignore_index: int | None) -> None:
    """Raise ``ValueError`` if ``target`` holds ids outside ``valid`` (an int K means ``[0, K)``) or ignore.

    Args:
        name: argument name for the message.
        target: integer tensor of label ids.
        valid: either K (ids ``0..K-1`` are valid) or an explicit collection of valid ids.
        ignore_index: an extra id that is always allowed, or None.
    """
    if target.is_floating_point():
        raise TypeError(f"Expected `{name}` to be an integer tensor, but got dtype {target.dtype}.")
    if target.numel() == 0:
        return
    if isinstance(valid, int):
        bad = (target < 0) | (target >= valid)
        allowed = f"[0, {valid})"
    else:
        allowed_t = torch.as_tensor(list(valid), device=target.device, dtype=target.dtype)
        bad = ~torch.isin(target, allowed_t)
        allowed = "{" + ", ".join(str(v) for v in valid) + "}"
    if ignore_index is not None:
        bad &= target != ignore_index
        allowed += f" or the ignore index {ignore_index}"
    if bool(bad.any()):
        found = torch.unique(target[bad])[:10].tolist()
        raise ValueError(f"Expected `{name}` ids in {allowed}, but got {found} ({int(bad.sum())} pixel(s)).")

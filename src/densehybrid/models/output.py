"""The outputs models return: one named tuple per method, whose field names are what the scores read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from densehybrid.errors import NonFiniteError


class HybridOutput(NamedTuple):
    """Dense outputs of a DenseHybrid model, both at the requested output size.

    Attributes:
        logits: (N, K, H, W) closed-set class logits s(x); ``logsumexp`` over K is ln p̂(x) + ln Z.
        ood_logits: (N, 2, H, W) dataset-posterior logits g(x); channel 1 is "outlier".
    """

    logits: torch.Tensor
    ood_logits: torch.Tensor


class DistillationOutput(NamedTuple):
    """Outputs of a DiCNet model (a frozen teacher and its distilled student).

    Attributes:
        logits: (N, K, H, W) the teacher's closed-set logits at the requested output size (None when skipped).
        teacher_features: (N, C, h, w) the teacher's pre-logit features, on the model's own grid (e.g. H/8).
        student_features: (N, C, h, w) the student's features on the same grid.
    """

    logits: torch.Tensor
    teacher_features: torch.Tensor
    student_features: torch.Tensor


def output_fields(model: object) -> tuple[str, ...]:
    """The field names of the output ``model`` returns: its ``output_type`` (default :class:`HybridOutput`)."""
    output_type = getattr(model, "output_type", HybridOutput)
    return tuple(getattr(output_type, "_fields", HybridOutput._fields))


def output_as_float32(output: NamedTuple) -> NamedTuple:
    """The same output with every floating-point tensor field in float32 (outputs of a bfloat16 autocast pass)."""
    return output._replace(
        **{k: v.float() for k, v in output._asdict().items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    )


def check_finite_outputs(out: Any, batch: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`~densehybrid.errors.NonFiniteError` when a model output holds NaN or infinite values.

    A model with damaged weights (a diverged training run) gives NaN everywhere; every score and metric downstream
    would then fail with a misleading message or, worse, rank NaN silently.

    Args:
        out: a model output (``HybridOutput``, ``DistillationOutput``, ...); every tensor field is checked.
        batch: the batch, whose ``name`` entries identify the frames in the message.
    """
    names = list((batch or {}).get("name") or [])
    frames = f" on frame(s) {', '.join(map(str, names[:3]))}" if names else ""
    images = (batch or {}).get("image")
    for name, tensor in out._asdict().items():
        if not isinstance(tensor, torch.Tensor) or bool(torch.isfinite(tensor).all()):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if isinstance(images, torch.Tensor) and images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise NonFiniteError(
                f"Expected finite input images, but {int((~torch.isfinite(images)).sum())} input values are NaN or "
                f"infinite{frames}: the images, not the weights, make the outputs non-finite."
            )
        raise NonFiniteError(
            f"Expected finite model outputs, but {bad} of {tensor.numel()} `{name}` values are NaN or infinite"
            f"{frames}: the weights are probably damaged (e.g. saved from a diverged training run)."
        )

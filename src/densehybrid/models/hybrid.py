"""`DenseHybrid`: upgrade any closed-set segmenter with the dataset-posterior head.

A segmenter meets a small contract (:class:`Segmenter`): it exposes its pre-logit features and the classifier that
turns them into logits. The wrapper runs both, attaches :class:`~densehybrid.models.heads.DatasetPosteriorHead` to the
same features and upsamples both dense outputs to the requested size. That is the whole architectural change the
method needs (Grcić et al., ECCV 2022, Sec. 3; TPAMI 2024, Fig. 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from densehybrid.models.heads import DatasetPosteriorHead
from densehybrid.models.output import HybridOutput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class Segmenter(Protocol):
    """What a closed-set segmenter must provide to be wrapped.

    Attributes:
        feature_channels: C, channels of the pre-logit feature map.

    Methods:
        forward_features(images) -> (N, C, h, w): pre-logit features of normalised images.
        forward_head(features) -> (N, K, h, w): closed-set logits from those features.
    """

    feature_channels: int

    def forward_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor) -> torch.Tensor: ...


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with non-persistent buffers (kept out of state dicts)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"Expected `mean` and `std` to be 3 values with std > 0, but got {mean} and {std}.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @property
    def config(self) -> dict[str, list[float]]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def check_images(images: torch.Tensor) -> None:
    """Raise a clear error unless ``images`` is a float (N, 3, H, W) tensor."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected `images` to have shape (N, 3, H, W), but got {shape}.")
    if not images.is_floating_point():
        raise TypeError(f"Expected `images` to be float in [0, 1], but got dtype {images.dtype}.")


def resolve_output_size(images: torch.Tensor, output_size: Sequence[int] | None) -> tuple[int, int]:
    """Validate ``images`` and return the (H, W) both outputs get: ``output_size`` or the input's own size."""
    check_images(images)
    if output_size is None:
        return tuple(images.shape[-2:])  # ints; while tracing, sizes that follow the input
    size = tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"Expected `output_size` to be two positive ints (H, W), but got {output_size!r}.")
    return size  # type: ignore[return-value]


def upsample(x: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of a dense map to ``size`` (no-op when it already has that size).

    While tracing it always resizes (an identity at equal size): a skipped resize would be frozen into the graph.
    """
    if not torch.jit.is_tracing() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _pool_matrix(length: torch.Tensor, bins: torch.Tensor | int) -> torch.Tensor:
    """(bins, length) averaging weights of ``adaptive_avg_pool`` along one axis.

    Bin i covers ``[floor(i * n / m), ceil((i + 1) * n / m))`` as in PyTorch's adaptive pooling.
    """
    index = torch.arange(bins)
    start = torch.div(index * length, bins, rounding_mode="floor")
    stop = torch.div((index + 1) * length + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(length)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < stop[:, None])
    return inside.float() / (stop - start).float()[:, None]


def aspect_pool(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, (rows, max(1, round(rows * W / H))))``: a pyramid level whose column count follows
    the aspect ratio of the feature map (ladder models, LDN-121).

    Traceable by construction: while tracing, the sizes are tensors and the pooling is two products with averaging
    matrices, so an exported graph follows every input's aspect ratio. ``torch.round`` rounds halves to even as
    Python's ``round`` does, and the ratio is taken in float64, so the grid is the same.
    """
    if not torch.jit.is_tracing():
        h, w = x.shape[-2:]
        return F.adaptive_avg_pool2d(x, (rows, max(1, round(rows * (w / h)))))
    h, w = torch.as_tensor(x.shape[-2]), torch.as_tensor(x.shape[-1])
    cols = torch.clamp(torch.round(w.double() / h.double() * rows), min=1).long()
    pooled = torch.matmul(_pool_matrix(h, rows).to(x.dtype), x)
    return torch.matmul(pooled, _pool_matrix(w, cols).to(x.dtype).transpose(0, 1))


class HybridModel(nn.Module):
    """Base of models whose closed-set and dataset-posterior heads read one feature map.

    Subclasses define ``forward_features(images)``, ``forward_head(features)`` and ``forward_ood_head(features)``;
    :meth:`forward` runs them and resizes both outputs bilinearly (``align_corners`` as the architecture uses).
    """

    align_corners: bool = False

    def forward(self, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> HybridOutput:
        """Closed-set logits and dataset-posterior logits.

        Args:
            images: (N, 3, H, W) float in [0, 1].
            output_size: (H_out, W_out) of both outputs; defaults to (H, W).

        Returns:
            :class:`HybridOutput` with ``logits`` (N, K, H_out, W_out) and ``ood_logits`` (N, 2, H_out, W_out).
        """
        size = resolve_output_size(images, output_size)
        features = self.forward_features(images)
        logits, ood_logits = self.forward_head(features), self.forward_ood_head(features)
        return HybridOutput(upsample(logits, size, self.align_corners), upsample(ood_logits, size, self.align_corners))


class DenseHybrid(HybridModel):
    """Open-set wrapper around a closed-set segmenter.

    Args:
        segmenter: any module meeting the :class:`Segmenter` contract.
        num_classes: K; checked against the segmenter's logits on the first forward when given.
        mean: input normalisation mean (images arrive in [0, 1]).
        std: input normalisation std.
        bn_momentum: momentum of the head's BatchNorm (0.01 as released).

    Example:
        >>> from densehybrid.models import DenseHybrid, create_model
        >>> model = create_model("ladder_resnet18", num_classes=5).eval()
        >>> out = model(torch.rand(1, 3, 64, 96))
        >>> out.logits.shape, out.ood_logits.shape
        (torch.Size([1, 5, 64, 96]), torch.Size([1, 2, 64, 96]))
    """

    def __init__(
        self,
        segmenter: nn.Module,
        num_classes: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        missing = [a for a in ("feature_channels", "forward_features", "forward_head") if not hasattr(segmenter, a)]
        if missing:
            raise TypeError(
                f"Expected `segmenter` to provide feature_channels, forward_features() and forward_head(), but "
                f"{type(segmenter).__name__} lacks {', '.join(missing)}. Wrap it with an adapter from "
                "densehybrid.models.adapters or implement the Segmenter contract."
            )
        self.segmenter = segmenter
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.logits_ood = DatasetPosteriorHead(segmenter.feature_channels, bn_momentum=bn_momentum)

    @property
    def data_config(self) -> dict[str, list[float]]:
        """Input normalisation, saved with checkpoints."""
        return self.normalize.config

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> the segmenter's (N, C, h, w) pre-logit features."""
        return self.segmenter.forward_features(self.normalize(images))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Closed-set logits (N, K, h, w) from the segmenter's classifier."""
        logits = self.segmenter.forward_head(features)
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Expected the segmenter to produce {self.num_classes} logit channels, but got {logits.shape[1]}."
            )
        return logits

    def forward_ood_head(self, features: torch.Tensor) -> torch.Tensor:
        """Dataset-posterior logits (N, 2, h, w)."""
        return self.logits_ood(features)

    def freeze_segmenter(self) -> None:
        """Train only the dataset-posterior head: freeze the segmenter, BatchNorm statistics included."""
        for p in self.segmenter.parameters():
            p.requires_grad_(False)
        self._segmenter_frozen = True
        self.segmenter.eval()

    def train(self, mode: bool = True) -> DenseHybrid:
        super().train(mode)
        if getattr(self, "_segmenter_frozen", False):
            self.segmenter.eval()
        return self

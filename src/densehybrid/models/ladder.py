"""A light ladder-style segmenter on any timm backbone: the default model of the demo and the tests.

The design follows the ladder/SwiftNet family that LDN-121 belongs to: a pyramid of backbone features is upsampled
top-down, each step adding a 1x1 lateral projection of the skip feature and blending with a 3x3 BN-ReLU-conv.
The last blended map (stride 4, ``decoder_channels`` channels) is the pre-logit feature map that both the closed-set
classifier and the DenseHybrid dataset-posterior head read. It is small and fast on a CPU; it is not meant to beat
the official architectures.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

from densehybrid.models.heads import BNReluConv
from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, DenseHybrid, aspect_pool, upsample


class SpatialPyramidPooling(nn.Module):
    """Average-pool the top feature map at several grid sizes and fuse, widening the receptive field cheaply."""

    def __init__(self, in_channels: int, out_channels: int, grids: Sequence[int] = (8, 4, 2, 1)) -> None:
        super().__init__()
        bottleneck = out_channels
        level_channels = max(out_channels // 4, 16)
        self.grids = tuple(grids)
        self.reduce = BNReluConv(in_channels, bottleneck, kernel_size=1)
        self.levels = nn.ModuleList(BNReluConv(bottleneck, level_channels, kernel_size=1) for _ in self.grids)
        self.fuse = BNReluConv(bottleneck + level_channels * len(self.grids), out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        size = x.shape[-2:]
        pooled = [x]
        for grid, level in zip(self.grids, self.levels):
            pooled.append(upsample(level(aspect_pool(x, grid)), size))
        return self.fuse(torch.cat(pooled, dim=1))


class LadderUpsample(nn.Module):
    """One ladder step: upsample the coarse map, add a 1x1 projection of the skip feature, blend with 3x3."""

    def __init__(self, skip_channels: int, channels: int) -> None:
        super().__init__()
        self.lateral = BNReluConv(skip_channels, channels, kernel_size=1)
        self.blend = BNReluConv(channels, channels, kernel_size=3)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blend(upsample(coarse, tuple(skip.shape[-2:])) + self.lateral(skip))


class LadderSegmenter(nn.Module):
    """timm backbone + SPP + ladder decoder + 1x1 classifier, meeting the :class:`~densehybrid.models.Segmenter`
    contract.

    Args:
        backbone: any timm model name that supports ``features_only=True``.
        num_classes: K.
        decoder_channels: channels of the decoder and of the pre-logit features.
        pretrained_backbone: path to a local timm/torchvision state-dict file for the backbone (never downloaded).
        out_indices: which backbone stages to use (strides 4, 8, 16, 32 for most CNNs).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        decoder_channels: int = 128,
        pretrained_backbone: str | None = None,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=tuple(out_indices)
        )
        if pretrained_backbone is not None:
            _load_backbone_weights(self.backbone, pretrained_backbone)
        channels = self.backbone.feature_info.channels()
        self.spp = SpatialPyramidPooling(channels[-1], decoder_channels)
        self.upsample = nn.ModuleList(LadderUpsample(c, decoder_channels) for c in reversed(channels[:-1]))
        self.logits = BNReluConv(decoder_channels, num_classes, kernel_size=1, bias=True)
        self.feature_channels = decoder_channels

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, H/4, W/4) pre-logit features."""
        features = self.backbone(images)
        x = self.spp(features[-1])
        for step, skip in zip(self.upsample, reversed(features[:-1])):
            x = step(x, skip)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) features -> (N, K, h, w) closed-set logits."""
        return self.logits(features)


def _load_backbone_weights(backbone: nn.Module, path: str) -> None:
    from densehybrid.models.checkpoint import extract_state_dict, read_checkpoint_file

    state = extract_state_dict(read_checkpoint_file(path))
    # features_only models drop the classifier: ignore its keys, report anything else that does not fit
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "num_batches_tracked" not in k]
    if missing:
        from densehybrid.errors import CheckpointError

        raise CheckpointError(
            f"Expected `{path}` to hold weights for this backbone, but {len(missing)} key(s) are missing, "
            f"e.g. {missing[:5]}."
        )


def ladder_segmenter(
    backbone: str,
    num_classes: int,
    decoder_channels: int = 128,
    pretrained_backbone: str | None = None,
) -> DenseHybrid:
    """A :class:`DenseHybrid` model on a :class:`LadderSegmenter` with any timm backbone."""
    segmenter = LadderSegmenter(backbone, num_classes, decoder_channels, pretrained_backbone)
    return DenseHybrid(segmenter, num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def ladder_resnet18(
    num_classes: int, decoder_channels: int = 128, pretrained_backbone: str | None = None
) -> DenseHybrid:
    """Ladder decoder on a ResNet-18: the default light model (about 12M parameters)."""
    return ladder_segmenter("resnet18", num_classes, decoder_channels, pretrained_backbone)


def ladder_mobilenetv3(
    num_classes: int, decoder_channels: int = 96, pretrained_backbone: str | None = None
) -> DenseHybrid:
    """Ladder decoder on a MobileNetV3-Large: the lightest registered model."""
    return ladder_segmenter("mobilenetv3_large_100", num_classes, decoder_channels, pretrained_backbone)

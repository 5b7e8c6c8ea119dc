"""Ladder-DenseNet-121 (LDN-121) with the DenseHybrid dataset-posterior head, as in the released checkpoints.

Architecture (Krešo et al., "Efficient ladder-style DenseNets for semantic segmentation of large images", T-ITS 2020;
used by Grcić et al., DenseHybrid, ECCV 2022, for StreetHazards and SMIYC):

* **Encoder**: DenseNet-121 (growth 32, bottleneck 4x32, blocks 6/12/24/16) without its final norm. Two details
  differ from torchvision's ImageNet DenseNet and matter for the outputs: the stem pools with a 2x2 max-pool
  (stride 2), and each transition down-samples with a 3x3 average pool (stride 2, padding 1, padding excluded
  from the mean). Parameter names are torchvision's, so ImageNet DenseNet-121 weights load unchanged.
* **Context**: spatial pyramid pooling on the stride-32 output: a 1x1 bottleneck to 512 channels, four levels
  pooled to grids of 8, 4, 2 and 1 rows (columns follow the image aspect ratio), each reduced to 128 channels and
  upsampled back, then a 1x1 fusion to 512 channels.
* **Decoder**: three ladder steps (to strides 16, 8, 4) with 256, 256 and 128 channels. Each upsamples the coarse
  map bilinearly, adds a 1x1 projection of the dense block's output at that stride and blends with a 3x3
  BN-ReLU-conv. The stride-4 map (128 channels) is the pre-logit feature map.
* **Heads**: the closed-set classifier (BN-ReLU-1x1 conv to K, with bias) and the dataset-posterior head
  (BN-ReLU-1x1 conv to 2) both read the pre-logit features; both outputs are upsampled bilinearly
  (``align_corners=False``) to the requested size.

Every BatchNorm uses momentum 0.01. The model takes images in [0, 1] without normalisation, as the released models
were trained (``data_config`` is the identity). State-dict names, shapes and dtypes equal the released checkpoints
(``tests/data/compat/ldn121_th_keys.json``).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from os import PathLike

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from densehybrid.errors import CheckpointError
from densehybrid.models.heads import BNReluConv, DatasetPosteriorHead
from densehybrid.models.hybrid import HybridModel, Normalize, aspect_pool, check_images, upsample

logger = logging.getLogger(__name__)

BN_MOMENTUM = 0.01
DENSENET121_BLOCKS = (6, 12, 24, 16)


@contextmanager
def _frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged while a checkpointed segment is recomputed.

    Recomputation runs the forward a second time in training mode; without this, every checkpointed BatchNorm would
    fold the same batch into its running statistics twice.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _run(module: nn.Module, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Call ``fn(*inputs)``, through gradient checkpointing when ``enabled`` and a backward pass can follow."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(
            fn,
            *inputs,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), _frozen_batchnorm_statistics(module)),
        )
    return fn(*inputs)


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to ``bn_size * growth``) then BN-ReLU-3x3 conv (to ``growth``) on the concatenated inputs."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, checkpointing: bool) -> None:
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels, momentum=BN_MOMENTUM)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width, momentum=BN_MOMENTUM)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False)
        self.checkpointing = checkpointing

    def _layer(self, *features: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, dim=1))))
        return self.conv2(self.relu2(self.norm2(x)))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # The concatenation happens inside the checkpointed segment: that is where a DenseNet spends its memory.
        return _run(self, self._layer, *features, enabled=self.checkpointing)


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the output concatenates the input and every layer's new features."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int, checkpointing: bool) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, checkpointing)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, dim=1)


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv halving the channels, then a 3x3/2 average pool (padding excluded from the mean)."""

    def __init__(self, in_channels: int, out_channels: int, checkpointing: bool) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels, momentum=BN_MOMENTUM))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False))
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self, super().forward, x, enabled=self.checkpointing)


class DenseNetEncoder(nn.Module):
    """DenseNet encoder returning the stride-32 map and the dense-block outputs at strides 4, 8 and 16.

    Args:
        block_config: dense layers per block; (6, 12, 24, 16) is DenseNet-121.
        growth_rate: channels each dense layer adds.
        num_init_features: channels of the stem conv.
        bn_size: bottleneck width multiplier of the dense layers.
        checkpointing: recompute dense layers and transitions in the backward pass instead of storing them.

    Attributes:
        features: the stem and the blocks, named as torchvision's DenseNet (``conv0``, ``denseblock1``, ...).
        skip_channels: channels of the three skip maps (strides 4, 8, 16); (256, 512, 1024) for DenseNet-121.
        out_channels: channels of the stride-32 output; 1024 for DenseNet-121.
    """

    def __init__(
        self,
        block_config: Sequence[int] = DENSENET121_BLOCKS,
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features, momentum=BN_MOMENTUM),
            relu0=nn.ReLU(inplace=True),
            # 2x2 max-pool, not torchvision's 3x3/2 with padding: the released models were trained with this stem.
            pool0=nn.MaxPool2d(kernel_size=2, stride=2),
        )
        channels = num_init_features
        skip_channels = []
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = _DenseBlock(num_layers, channels, growth_rate, bn_size, checkpointing)
            channels += num_layers * growth_rate
            if i < len(block_config) - 1:
                skip_channels.append(channels)
                layers[f"transition{i + 1}"] = _Transition(channels, channels // 2, checkpointing)
                channels //= 2
        self.features = nn.Sequential(layers)
        self.num_blocks = len(block_config)
        self.skip_channels = tuple(skip_channels)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode.

        Args:
            x: (N, 3, H, W) images.

        Returns:
            the (N, out_channels, ~H/32, ~W/32) map and the skip maps [stride 4, stride 8, stride 16], each the
            output of a dense block before its transition.
        """
        f = self.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        skips = []
        for i in range(1, self.num_blocks + 1):
            x = getattr(f, f"denseblock{i}")(x)
            if i < self.num_blocks:
                skips.append(x)
                x = getattr(f, f"transition{i}")(x)
        return x, skips


class SpatialPyramidPooling(nn.Module):
    """Pyramid pooling over grids whose column count follows the aspect ratio of the feature map.

    A level with ``g`` rows is pooled to ``(g, max(1, round(g * W / H)))`` cells (Python's ``round``, which rounds
    halves to even), reduced by a BN-ReLU-1x1 conv, and upsampled bilinearly back to (H, W).

    Args:
        in_channels: channels of the input map.
        grids: rows of each pyramid level.
        bottleneck_channels: channels after the first 1x1 conv.
        level_channels: channels of each pooled level.
        out_channels: channels after fusion.
        checkpointing: recompute each 1x1 conv in the backward pass.
    """

    def __init__(
        self,
        in_channels: int,
        grids: Sequence[int] = (8, 4, 2, 1),
        bottleneck_channels: int = 512,
        level_channels: int = 128,
        out_channels: int = 512,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.grids = tuple(grids)
        self.checkpointing = checkpointing
        levels: OrderedDict[str, nn.Module] = OrderedDict(
            spp_bn=BNReluConv(in_channels, bottleneck_channels, kernel_size=1, bn_momentum=BN_MOMENTUM)
        )
        for i in range(len(self.grids)):
            levels[f"spp{i}"] = BNReluConv(bottleneck_channels, level_channels, kernel_size=1, bn_momentum=BN_MOMENTUM)
        fuse_in = bottleneck_channels + len(self.grids) * level_channels
        levels["spp_fuse"] = BNReluConv(fuse_in, out_channels, kernel_size=1, bn_momentum=BN_MOMENTUM)
        self.spp = nn.Sequential(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, h, w) -> (N, out_channels, h, w)."""
        size = x.shape[-2:]
        x = _run(self.spp.spp_bn, self.spp.spp_bn, x, enabled=self.checkpointing)
        levels = [x]
        for i, rows in enumerate(self.grids):
            pooled = aspect_pool(x, rows)  # traceable: exported graphs follow the input's aspect ratio
            level = getattr(self.spp, f"spp{i}")
            levels.append(upsample(_run(level, level, pooled, enabled=self.checkpointing), size))
        return _run(self.spp.spp_fuse, self.spp.spp_fuse, torch.cat(levels, dim=1), enabled=self.checkpointing)


class LadderUpsample(nn.Module):
    """One ladder step: ``blend_conv(up(x) + bottleneck(skip))``.

    Args:
        in_channels: channels of the coarse map (and of the projected skip).
        skip_channels: channels of the skip map.
        out_channels: channels after the 3x3 blend.
        checkpointing: recompute the convs in the backward pass.

    Attributes:
        logits_aux: a 1-channel auxiliary classifier on the coarse map. The released checkpoints hold its weights
            but the released model discards its output, so ``forward`` does not compute it.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.bottleneck = BNReluConv(skip_channels, in_channels, kernel_size=1, bn_momentum=BN_MOMENTUM)
        self.blend_conv = BNReluConv(in_channels, out_channels, kernel_size=3, bn_momentum=BN_MOMENTUM)
        self.logits_aux = BNReluConv(in_channels, 1, kernel_size=1, bias=True, bn_momentum=BN_MOMENTUM)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, h, w) and (N, skip_channels, 2h', 2w') -> (N, out_channels, 2h', 2w')."""
        skip = _run(self.bottleneck, self.bottleneck, skip, enabled=self.checkpointing)
        x = upsample(x, tuple(skip.shape[-2:])) + skip
        return _run(self.blend_conv, self.blend_conv, x, enabled=self.checkpointing)


class LadderDecoder(nn.Module):
    """Top-down ladder over the encoder's skips (deepest first).

    Args:
        in_channels: channels of the context map.
        skip_channels: encoder skip channels, shallowest first (as the encoder returns them).
        up_channels: output channels of each ladder step, deepest first.
        checkpointing: recompute the convs in the backward pass.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: Sequence[int],
        up_channels: Sequence[int] = (256, 256, 128),
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(up_channels) != len(skip_channels):
            raise ValueError(
                f"Expected `up_channels` to have one entry per skip ({len(skip_channels)}), but got {up_channels}."
            )
        steps: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i, (skip, out) in enumerate(zip(reversed(skip_channels), up_channels)):
            steps[f"upsample_{i}"] = LadderUpsample(channels, skip, out, checkpointing)
            channels = out
        self.upsample_layers = nn.Sequential(steps)
        self.out_channels = channels

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        for step, skip in zip(self.upsample_layers, reversed(skips)):
            x = step(x, skip)
        return x


class LadderDenseNet(HybridModel):
    """Ladder-DenseNet with the closed-set classifier and the DenseHybrid dataset-posterior head.

    Args:
        num_classes: K, the number of known classes (12 for StreetHazards, 19 for Cityscapes).
        block_config: DenseNet blocks; (6, 12, 24, 16) is DenseNet-121.
        checkpointing: gradient checkpointing of the dense layers, transitions, pyramid pooling and ladder convs;
            it saves memory in training at the cost of a second forward pass. BatchNorm statistics are updated once
            per step, not again during recomputation.
        mean: input normalisation mean; the released models take raw [0, 1] images (0, 0, 0).
        std: input normalisation std; (1, 1, 1) for the released models.

    Attributes:
        num_classes: K.
        feature_channels: channels of the pre-logit features (128).
        data_config: ``{"mean": [...], "std": [...]}`` applied inside ``forward``.

    Example:
        >>> model = LadderDenseNet(num_classes=12).eval()
        >>> out = model(torch.rand(1, 3, 64, 96))
        >>> tuple(out.logits.shape), tuple(out.ood_logits.shape)
        ((1, 12, 64, 96), (1, 2, 64, 96))
    """

    def __init__(
        self,
        num_classes: int,
        block_config: Sequence[int] = DENSENET121_BLOCKS,
        checkpointing: bool = False,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.backbone = DenseNetEncoder(block_config, checkpointing=checkpointing)
        # Nested twice (spp.spp.spp.*) so that state-dict names equal the released checkpoints.
        self.spp = nn.Sequential(
            OrderedDict(spp=SpatialPyramidPooling(self.backbone.out_channels, checkpointing=checkpointing))
        )
        self.upsample = LadderDecoder(512, self.backbone.skip_channels, checkpointing=checkpointing)
        self.feature_channels = self.upsample.out_channels
        self.logits = BNReluConv(self.feature_channels, num_classes, kernel_size=1, bias=True, bn_momentum=BN_MOMENTUM)
        self.logits_ood = DatasetPosteriorHead(self.feature_channels, bn_momentum=BN_MOMENTUM)

    @property
    def data_config(self) -> dict[str, list[float]]:
        """Input normalisation applied inside ``forward`` (identity for the released models)."""
        return self.normalize.config

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features.

        Args:
            images: (N, 3, H, W) float in [0, 1].

        Returns:
            (N, 128, ~H/4, ~W/4) features read by both heads.
        """
        check_images(images)
        x, skips = self.backbone(self.normalize(images))
        return self.upsample(self.spp(x), skips)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Closed-set logits (N, K, h, w) at the feature resolution."""
        return self.logits(features)

    def forward_ood_head(self, features: torch.Tensor) -> torch.Tensor:
        """Dataset-posterior logits (N, 2, h, w) at the feature resolution."""
        return self.logits_ood(features)


# torchvision's own densenet121-a639ec97.pth predates its current names: `denselayer1.norm.1.weight` is now
# `denselayer1.norm1.weight`.
_OLD_TORCHVISION_NAME = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def load_densenet_weights(encoder: DenseNetEncoder, path: str | PathLike[str]) -> dict:
    """Load ImageNet DenseNet weights (torchvision or timm files) into the encoder.

    Accepted: torchvision's ``densenet121-*.pth`` (old or new parameter names), timm's ``densenet121`` weights
    (``.pth``/``.bin``/``.safetensors``), and either nested under ``state_dict``/``model``. The ImageNet classifier
    and final norm (``classifier.*``, ``features.norm5.*``) are dropped; every encoder parameter and running
    statistic must be present (``num_batches_tracked`` counters may be absent, as in torchvision's file).

    Args:
        encoder: the encoder to fill.
        path: local file (weights are never downloaded).

    Returns:
        ``{"loaded": n, "ignored": [names]}``.

    Raises:
        CheckpointError: when the file is unreadable or lacks encoder weights or has wrong shapes.
    """
    from densehybrid.models.checkpoint import extract_state_dict, read_checkpoint_file, strip_prefix

    state = strip_prefix(extract_state_dict(read_checkpoint_file(path)))
    renamed = {}
    for name, tensor in state.items():
        match = _OLD_TORCHVISION_NAME.match(name)
        name = match.group(1) + match.group(2) if match else name
        for prefix in ("backbone.", "encoder."):
            name = name.removeprefix(prefix)
        renamed[name] = tensor
    own = encoder.state_dict()
    selected = {k: v for k, v in renamed.items() if k in own}
    ignored = sorted(k for k in renamed if k not in own)
    # Files older than PyTorch 0.4.1 (torchvision's own DenseNet-121) have no `num_batches_tracked` counters.
    missing = sorted(k for k in own if k not in selected and not k.endswith("num_batches_tracked"))
    if missing:
        raise CheckpointError(
            f"Expected `{path}` to hold DenseNet weights for every encoder parameter, but {len(missing)} are missing "
            f"(first: {', '.join(missing[:5])}). Pass a torchvision or timm densenet121 ImageNet file."
        )
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in selected.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"Expected `{path}` to match DenseNet-121 shapes, but {len(wrong)} differ (file vs model): "
            f"{'; '.join(wrong[:5])}."
        )
    encoder.load_state_dict(selected, strict=False)
    logger.info("Loaded %d DenseNet tensors from %s; ignored %s", len(selected), path, ignored)
    return {"loaded": len(selected), "ignored": ignored}


def ldn121(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    checkpointing: bool = False,
    **kwargs,
) -> LadderDenseNet:
    """LDN-121 with the dataset-posterior head; loads the released DenseHybrid LDN-121 checkpoints unchanged.

    Args:
        num_classes: K (12 for the released StreetHazards models).
        pretrained_backbone: local file with ImageNet DenseNet-121 weights (torchvision or timm) for the encoder.
        checkpointing: gradient checkpointing (see :class:`LadderDenseNet`).
        **kwargs: forwarded to :class:`LadderDenseNet` (``mean``, ``std``).

    Returns:
        a :class:`LadderDenseNet`.
    """
    model = LadderDenseNet(num_classes, checkpointing=checkpointing, **kwargs)
    if pretrained_backbone is not None:
        load_densenet_weights(model.backbone, pretrained_backbone)
    return model

"""Wider ResNet-38 (variant A2) with identity-mapping (pre-activation) blocks: the DeepLabV3+ trunk of DenseHybrid.

Wider ResNet-38 (Wu, Shen and van den Hengel, "Wider or Deeper: Revisiting the ResNet Model for Visual Recognition",
Pattern Recognition 2019) as used by NVIDIA's Cityscapes DeepLabV3+ and by DenseHybrid's Fishyscapes model:

* ``mod1``: a 3x3 conv (stride 1) to 64 channels.
* ``pool2`` + ``mod2``: 3x3/2 max-pool, 3 basic blocks to 128 channels (stride 2).
* ``pool3`` + ``mod3``: 3x3/2 max-pool, 3 basic blocks to 256 channels (stride 4).
* ``mod4``: 6 basic blocks to 512 channels, the first with stride 2 (stride 8).
* ``mod5``: 3 basic blocks to 1024 channels (512 inside), dilation 2.
* ``mod6``: 1 bottleneck block 512 -> 1024 -> 2048, dilation 4, channel dropout 0.3.
* ``mod7``: 1 bottleneck block 1024 -> 2048 -> 4096, dilation 4, channel dropout 0.5.

With dilation the output stride is 8. Every block is pre-activation: ``bn1`` (BN + ReLU) feeds both the residual
branch and, when the shape changes, a 1x1 projection shortcut (``proj_conv``). BatchNorm uses PyTorch's defaults.
Module names (``mod2.block1.bn1.0``, ``convs.conv1``, ``proj_conv``) are those of the released checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

#: Blocks per module (mod2..mod7) and their channels: (out, out) for basic blocks, (mid, mid2, out) for bottlenecks.
WRN38_STRUCTURE = (3, 3, 6, 3, 1, 1)
WRN38_CHANNELS = ((128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096))


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class IdentityResidualBlock(nn.Module):
    """Pre-activation residual block: ``convs(bn1(x)) + shortcut``.

    A basic block (two channel counts) is 3x3 -> BN-ReLU -> 3x3; a bottleneck (three) is 1x1 -> BN-ReLU -> 3x3 ->
    BN-ReLU -> [dropout] -> 1x1. The shortcut is ``x`` itself, or ``proj_conv(bn1(x))`` (1x1, strided) when the
    stride or the channel count changes.

    Args:
        in_channels: input channels.
        channels: internal and output channels, two (basic) or three (bottleneck) values.
        stride: stride of the first conv and of the projection.
        dilation: dilation (and padding) of the 3x3 convs.
        dropout: channel-dropout probability before the last conv, or None.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        stride: int = 1,
        dilation: int = 1,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"Expected `channels` to hold 2 or 3 values, but got {tuple(channels)}.")
        self.bn1 = _bn_relu(in_channels)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if len(channels) == 2:
            mid, out = channels
            layers["conv1"] = nn.Conv2d(in_channels, mid, 3, stride, padding=dilation, dilation=dilation, bias=False)
            layers["bn2"] = _bn_relu(mid)
            if dropout is not None:
                layers["dropout"] = nn.Dropout2d(dropout)
            layers["conv2"] = nn.Conv2d(mid, out, 3, padding=dilation, dilation=dilation, bias=False)
        else:
            mid, mid2, out = channels
            layers["conv1"] = nn.Conv2d(in_channels, mid, 1, stride, bias=False)
            layers["bn2"] = _bn_relu(mid)
            layers["conv2"] = nn.Conv2d(mid, mid2, 3, padding=dilation, dilation=dilation, bias=False)
            layers["bn3"] = _bn_relu(mid2)
            if dropout is not None:
                # Channel dropout (Dropout2d), as the released trunk was trained with.
                layers["dropout"] = nn.Dropout2d(dropout)
            layers["conv3"] = nn.Conv2d(mid2, out, 1, bias=False)
        self.convs = nn.Sequential(layers)
        if stride != 1 or in_channels != out:
            self.proj_conv = nn.Conv2d(in_channels, out, 1, stride, bias=False)
        else:
            self.proj_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, out, H / stride, W / stride)."""
        pre = self.bn1(x)
        shortcut = x if self.proj_conv is None else self.proj_conv(pre)
        # The conv output is not needed by any backward, so the in-place add is safe and saves a full-size buffer.
        return self.convs(pre).add_(shortcut)


def wide_resnet38_a2_stages(dilated: bool = True) -> OrderedDict[str, nn.Module]:
    """The stages of Wider ResNet-38 A2, in order: ``mod1, pool2, mod2, pool3, mod3, mod4, ..., mod7``.

    Args:
        dilated: dilate mod5 (2) and mod6/mod7 (4) instead of striding, for output stride 8 (as DeepLabV3+ uses);
            otherwise mod4, mod5 and mod6 each start with stride 2 (output stride 32).

    Returns:
        name -> module, ready to be registered as children (the names are the released parameter prefixes).
    """
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        mod1=nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)))
    )
    in_channels = 64
    for mod_id, (num_blocks, channels) in enumerate(zip(WRN38_STRUCTURE, WRN38_CHANNELS)):
        if dilated:
            dilation = {3: 2, 4: 4, 5: 4}.get(mod_id, 1)
            first_stride = 2 if mod_id == 2 else 1
        else:
            dilation = 1
            first_stride = 2 if 2 <= mod_id <= 4 else 1
        dropout = {4: 0.3, 5: 0.5}.get(mod_id)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for block_id in range(num_blocks):
            stride = first_stride if block_id == 0 else 1
            blocks[f"block{block_id + 1}"] = IdentityResidualBlock(in_channels, channels, stride, dilation, dropout)
            in_channels = channels[-1]
        if mod_id < 2:
            stages[f"pool{mod_id + 2}"] = nn.MaxPool2d(3, stride=2, padding=1)
        stages[f"mod{mod_id + 2}"] = nn.Sequential(blocks)
    return stages


class WideResNet38(nn.Module):
    """Wider ResNet-38 A2 trunk returning the stride-2 ``mod2`` map and the final map.

    Args:
        dilated: output stride 8 (True, DeepLabV3+) or 32.

    Attributes:
        out_channels: 4096.
        low_level_channels: 128 (``mod2``).
    """

    out_channels = WRN38_CHANNELS[-1][-1]
    low_level_channels = WRN38_CHANNELS[0][-1]

    def __init__(self, dilated: bool = True) -> None:
        super().__init__()
        for name, module in wide_resnet38_a2_stages(dilated).items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised images -> ``(mod2 output (N, 128, H/2, W/2), mod7 output (N, 4096, H/8, W/8))``."""
        return forward_wide_resnet38(self, x)


def forward_wide_resnet38(stages: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the trunk stages registered on ``stages`` (a :class:`WideResNet38` or a model holding the same children).

    Returns:
        ``(m2, out)``: the stride-2 low-level map from ``mod2`` and the last map from ``mod7``.
    """
    x = stages.mod1(x)
    m2 = stages.mod2(stages.pool2(x))
    x = stages.mod3(stages.pool3(m2))
    for name in ("mod4", "mod5", "mod6", "mod7"):
        x = getattr(stages, name)(x)
    return m2, x

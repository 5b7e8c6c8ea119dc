"""Small convolutional heads shared by every model, named as in the released DenseHybrid checkpoints."""

from __future__ import annotations

from torch import nn


class BNReluConv(nn.Sequential):
    """BatchNorm -> ReLU -> Conv, the building block of the released LDN and DenseHybrid heads.

    Children are named ``norm``, ``relu`` and ``conv`` so that state-dict keys read ``<head>.norm.weight`` and
    ``<head>.conv.weight``, exactly as in the released checkpoints.

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels produced.
        kernel_size: conv kernel size (padding keeps the resolution).
        bias: whether the conv has a bias.
        bn_momentum: BatchNorm momentum; the released models use 0.01.
        dilation: conv dilation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = False,
        bn_momentum: float = 0.01,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels, momentum=bn_momentum))
        self.add_module("relu", nn.ReLU(inplace=True))
        padding = kernel_size // 2 * dilation
        self.add_module(
            "conv",
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias, dilation=dilation),
        )


class DatasetPosteriorHead(BNReluConv):
    """The DenseHybrid dataset-posterior head g(x): BN -> ReLU -> 1x1 conv to 2 channels.

    Channel 0 is "inlier" (d_in), channel 1 is "outlier" (d_out), so ``log_softmax(g, 1)[:, 1] = ln P(d_out|x)``.
    It reads the same pre-logit features as the closed-set classifier and adds ``2 * C + 2 * C + 2`` parameters.
    """

    def __init__(self, in_channels: int, bn_momentum: float = 0.01) -> None:
        super().__init__(in_channels, 2, kernel_size=1, bias=True, bn_momentum=bn_momentum)

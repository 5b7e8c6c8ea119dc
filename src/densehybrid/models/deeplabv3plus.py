"""DeepLabV3+ on Wider ResNet-38 with the DenseHybrid dataset-posterior head, as in the released checkpoints.

This is the Cityscapes / Fishyscapes model of DenseHybrid (Grcić et al., ECCV 2022), built on NVIDIA's DeepLabV3+
(Chen et al., "Encoder-Decoder with Atrous Separable Convolution", ECCV 2018; Zhu et al., "Improving Semantic
Segmentation via Video Propagation and Label Relaxation", CVPR 2019):

* **Trunk**: Wider ResNet-38 A2, dilated to output stride 8 (:mod:`densehybrid.models.wideresnet38`); its modules
  are direct children (``mod1`` ... ``mod7``), as in the released files.
* **ASPP** on the 4096-channel stride-8 map: image pooling + 1x1 + three 3x3 convs with dilations 12, 24, 36 (the
  OS-16 rates 6, 12, 18 doubled), each conv-BN-ReLU to 256 channels, concatenated (1280) and reduced by a 1x1
  conv (``bot_aspp``) to 256.
* **Decoder**: the ASPP output is upsampled to the stride-2 ``mod2`` map and concatenated with a 1x1 reduction of
  it to 48 channels (``bot_fine``): 304 channels, the pre-logit features. ``final`` is conv3x3-BN-ReLU,
  conv3x3-BN-ReLU, conv1x1 (no bias) to K classes.
* **Head**: the dataset-posterior head (BN-ReLU-1x1 conv to 2, BN momentum 0.01) reads the same 304-channel
  features, before ``final``.

All upsampling is bilinear with ``align_corners=True``, the released model's convention, including the final
resize of both outputs to the requested size. (The compatibility fixture's README says ``align_corners=False``, but
its reference outputs are reproduced only with ``True``: relative error 8e-7 against 0.13 with ``False``.) Images
arrive in [0, 1] and are normalised inside ``forward`` with the ImageNet mean/std.

Weights: the released closed-set NVIDIA Cityscapes checkpoint (``cityscapes_cv0_wideresnet38_nosdcaug.pth``)
loads with ``pretrained=PATH`` (the head starts fresh); NVIDIA's weights are licensed CC BY-NC-SA 4.0
(non-commercial), see ``docs/models.md``.
"""

from __future__ import annotations

import logging
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from densehybrid.errors import CheckpointError
from densehybrid.models.heads import DatasetPosteriorHead
from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, HybridModel, Normalize, check_images
from densehybrid.models.wideresnet38 import WideResNet38, forward_wide_resnet38, wide_resnet38_a2_stages

logger = logging.getLogger(__name__)

HEAD_PREFIX = "logits_ood."


def _upsample_corners(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``, the convention inside the released DeepLabV3+."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class AtrousSpatialPyramidPooling(nn.Module):
    """ASPP: image pooling, a 1x1 conv and dilated 3x3 convs in parallel, concatenated.

    Args:
        in_channels: channels of the input map.
        channels: channels of each branch.
        rates: dilations of the 3x3 branches (12, 24, 36 at output stride 8).

    Output: (N, channels * (2 + len(rates)), h, w), branches in the order [image pooling, 1x1, *rates].
    """

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (12, 24, 36)) -> None:
        super().__init__()
        branches = [_conv_bn_relu(in_channels, channels, 1)]
        branches += [_conv_bn_relu(in_channels, channels, 3, dilation=r) for r in rates]
        self.features = nn.ModuleList(branches)
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = _conv_bn_relu(in_channels, channels, 1)
        self.out_channels = channels * (len(branches) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _upsample_corners(self.img_conv(self.img_pooling(x)), tuple(x.shape[-2:]))
        return torch.cat([pooled, *(branch(x) for branch in self.features)], dim=1)


class DeepLabV3PlusWRN38(HybridModel):
    """DeepLabV3+ on Wider ResNet-38 with the closed-set classifier and the dataset-posterior head.

    Args:
        num_classes: K (19 for Cityscapes).
        mean: input normalisation mean (ImageNet).
        std: input normalisation std (ImageNet).

    Attributes:
        num_classes: K.
        feature_channels: channels of the pre-logit features (304).
        data_config: ``{"mean": [...], "std": [...]}`` applied inside ``forward``.

    Example:
        >>> model = DeepLabV3PlusWRN38(num_classes=19).eval()  # doctest: +SKIP
        >>> out = model(torch.rand(1, 3, 64, 64))  # doctest: +SKIP
        >>> tuple(out.logits.shape), tuple(out.ood_logits.shape)  # doctest: +SKIP
        ((1, 19, 64, 64), (1, 2, 64, 64))
    """

    # the released model resizes its outputs with align_corners=True (the compat fixture confirms it)
    align_corners = True

    def __init__(
        self,
        num_classes: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        # The trunk's stages are direct children, so that names read `mod4.block1...` as in the released files.
        for name, module in wide_resnet38_a2_stages(dilated=True).items():
            self.add_module(name, module)
        self.aspp = AtrousSpatialPyramidPooling(WideResNet38.out_channels, 256, rates=(12, 24, 36))
        self.bot_fine = nn.Conv2d(WideResNet38.low_level_channels, 48, kernel_size=1, bias=False)
        self.bot_aspp = nn.Conv2d(self.aspp.out_channels, 256, kernel_size=1, bias=False)
        self.feature_channels = 256 + 48
        self.final = nn.Sequential(
            nn.Conv2d(self.feature_channels, 256, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, kernel_size=1, bias=False),
        )
        for m in self.final.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.logits_ood = DatasetPosteriorHead(self.feature_channels, bn_momentum=0.01)

    @property
    def data_config(self) -> dict[str, list[float]]:
        """Input normalisation applied inside ``forward`` (ImageNet mean/std)."""
        return self.normalize.config

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit decoder features.

        Args:
            images: (N, 3, H, W) float in [0, 1].

        Returns:
            (N, 304, ceil(H/2), ceil(W/2)): 48 channels from ``mod2`` and 256 from the upsampled ASPP.
        """
        check_images(images)
        m2, x = forward_wide_resnet38(self, self.normalize(images))
        aspp = self.bot_aspp(self.aspp(x))
        return torch.cat([self.bot_fine(m2), _upsample_corners(aspp, tuple(m2.shape[-2:]))], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Closed-set logits (N, K, h, w) at the feature resolution."""
        return self.final(features)

    def forward_ood_head(self, features: torch.Tensor) -> torch.Tensor:
        """Dataset-posterior logits (N, 2, h, w) at the feature resolution."""
        return self.logits_ood(features)


def load_closed_set_weights(model: DeepLabV3PlusWRN38, path: str | PathLike[str]) -> dict[str, list[str] | int]:
    """Load a closed-set DeepLabV3+ WRN38 checkpoint (NVIDIA's Cityscapes format); the head is left as it is.

    NVIDIA's files nest the state dict under ``"state_dict"`` with DataParallel's ``module.`` prefix; both are
    handled. Every parameter outside the dataset-posterior head must be present with the right shape. A file that
    also holds the head (a released DenseHybrid checkpoint) loads completely.

    Args:
        model: the model to fill.
        path: local checkpoint file.

    Returns:
        ``{"loaded": n, "missing": [...], "unexpected": []}``; ``missing`` lists the head's entries left fresh.

    Raises:
        CheckpointError: when a non-head parameter is missing, unexpected or of another shape.
    """
    from densehybrid.models.checkpoint import check_state_dict, read_checkpoint_file, split_checkpoint, strip_prefix

    state, _ = split_checkpoint(read_checkpoint_file(path))
    state = strip_prefix(state)
    missing, unexpected, mismatched, message = check_state_dict(model, state, source=f"checkpoint {str(path)!r}")
    if unexpected or mismatched or any(not k.startswith(HEAD_PREFIX) for k in missing):
        raise CheckpointError(message)
    model.load_state_dict(state, strict=False)
    report = {"loaded": len(state), "missing": missing, "unexpected": unexpected}
    logger.info("Loaded %d tensors from %s; left fresh: %s", len(state), path, missing)
    return report


def deeplabv3plus_wrn38(
    num_classes: int,
    pretrained: str | PathLike[str] | None = None,
    **kwargs,
) -> DeepLabV3PlusWRN38:
    """DeepLabV3+ WRN38 with the dataset-posterior head; loads the released DenseHybrid checkpoint unchanged.

    Args:
        num_classes: K (19 for the released Cityscapes models).
        pretrained: local closed-set checkpoint (NVIDIA's ``cityscapes_cv0_wideresnet38_nosdcaug.pth``, CC BY-NC-SA
            4.0) to start from; the head starts fresh. The load report is kept in ``model.pretrained_report``.
        **kwargs: forwarded to :class:`DeepLabV3PlusWRN38` (``mean``, ``std``).

    Returns:
        a :class:`DeepLabV3PlusWRN38`.
    """
    model = DeepLabV3PlusWRN38(num_classes, **kwargs)
    if pretrained is not None:
        model.pretrained_report = load_closed_set_weights(model, pretrained)
    return model

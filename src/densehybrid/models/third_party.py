"""Adapters for the segmenters people already use: segmentation_models_pytorch, Hugging Face transformers, torchvision.

Each adapter splits a third-party model into pre-logit features and its closed-set classifier (the
:class:`~densehybrid.models.Segmenter` contract), so that the dataset-posterior head of
:class:`~densehybrid.models.DenseHybrid` reads exactly the tensor the classifier reads. The weights of the
third-party model are kept as they are; only the order in which its parts are called changes.

Registered families (names the CLI and recipes accept; see :data:`FAMILY_HELP`):

* ``smp:ARCH:ENCODER`` (extra ``densehybrid[smp]``): any segmentation_models_pytorch architecture whose
  ``segmentation_head`` is a convolution on the decoder output, on any encoder (``encoder_weights=None``: nothing
  is downloaded).
* ``hf:segformer``, ``hf:upernet`` (extra ``densehybrid[hf]``): transformers' ``SegformerForSemanticSegmentation``
  and ``UperNetForSemanticSegmentation``, from the library's default configuration, a ``config`` dict, or a local
  ``save_pretrained`` folder.
* ``tv:BUILDER``: torchvision's segmentation builders (FCN, DeepLabV3, LR-ASPP).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densehybrid.errors import CheckpointError, DenseHybridError
from densehybrid.models.adapters import SplitSegmenter
from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, DenseHybrid

#: family prefix -> (how to name a member, what it covers). The registry resolves ``PREFIX:MEMBER`` names here.
FAMILY_HELP: dict[str, tuple[str, str]] = {
    "smp": (
        "smp:ARCH:ENCODER",
        "segmentation_models_pytorch (extra densehybrid[smp]): ARCH one of "
        "Unet, UnetPlusPlus, MAnet, Linknet, FPN, PSPNet, DeepLabV3, DeepLabV3Plus, PAN, UPerNet, Segformer, DPT "
        "(as the installed version has them); ENCODER any smp encoder, e.g. resnet34, mobilenet_v2, tu-<timm name>",
    ),
    "hf": (
        "hf:segformer | hf:upernet",
        "Hugging Face transformers (extra densehybrid[hf]); kwargs pretrained=FOLDER (save_pretrained output) "
        "or config={...} (overrides of the library's default configuration)",
    ),
    "tv": (
        "tv:BUILDER",
        "torchvision segmentation: fcn_resnet50, fcn_resnet101, deeplabv3_resnet50, deeplabv3_resnet101, "
        "deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large; kwargs pretrained=FILE (a torchvision state dict)",
    ),
}

_EXTRAS = {"segmentation_models_pytorch": "smp", "transformers": "hf"}


def require_extra(module: str, name: str) -> Any:
    """Import the optional library ``module`` that model ``name`` needs, or raise one message with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS[module]
        raise DenseHybridError(
            f"Expected the package {module} for model {name!r}, but it is not installed ({exc}). Install the extra: "
            f"pip install 'densehybrid[{extra}]'."
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


def _size(x: torch.Tensor, dim: int) -> torch.Tensor:
    # an int in eager mode, a traced 0-dim tensor while tracing: arithmetic on it stays in an exported graph
    return torch.as_tensor(x.shape[dim])


def pad_to_multiple(images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) on the bottom and right to the next multiple of ``divisor`` (traceable sizes)."""
    if divisor <= 1:
        return images
    pad_h = torch.remainder(-_size(images, -2), divisor)
    pad_w = torch.remainder(-_size(images, -1), divisor)
    return F.pad(images, [0, pad_w, 0, pad_h])


def crop_to_image(features: torch.Tensor, padded: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Keep the part of ``features`` (computed on ``padded``) that covers ``images``: ceil(H * h / H_pad) rows and
    likewise columns. Exact when the feature stride divides H and W; otherwise the kept map covers up to one feature
    cell more than the image."""
    rows = torch.div(
        _size(images, -2) * _size(features, -2) + _size(padded, -2) - 1, _size(padded, -2), rounding_mode="floor"
    )
    cols = torch.div(
        _size(images, -1) * _size(features, -1) + _size(padded, -1) - 1, _size(padded, -1), rounding_mode="floor"
    )
    return features[:, :, :rows, :cols]


def _folder_weights(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(
        f"Expected folder {str(folder)!r} to hold model.safetensors or pytorch_model.bin (save_pretrained output; "
        f"sharded weights are not supported), but it holds {found or 'nothing'}."
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a local file, or in a ``save_pretrained`` folder's weights file (read weights-only)."""
    from densehybrid.models.checkpoint import extract_state_dict, read_checkpoint_file, strip_prefix

    path = Path(path).expanduser()
    if path.is_dir():
        path = _folder_weights(path)
    return strip_prefix(extract_state_dict(read_checkpoint_file(path)))


def load_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    classifier: Sequence[str],
    drop: Sequence[str] = (),
) -> None:
    """Load ``state`` into a third-party ``model`` strictly, except that a classifier of another number of classes
    is left at its fresh initialisation (with a warning) and names starting with ``drop`` (auxiliary heads) are
    ignored.

    Raises:
        CheckpointError: anything besides the classifier is missing, unexpected or of another shape.
    """
    from densehybrid.models.checkpoint import check_state_dict

    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))} if drop else dict(state)
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(tuple(classifier)) and k in state and state[k].shape != own[k].shape]
    for key in fresh:
        del state[key]
    missing, unexpected, mismatched, message = check_state_dict(model, state, source=source)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected or mismatched:
        raise CheckpointError(message)
    model.load_state_dict(state, strict=False)
    if fresh:
        warnings.warn(
            f"{source} holds a classifier for another number of classes; it starts fresh ({', '.join(fresh)}).",
            UserWarning,
            stacklevel=3,
        )


def _hybrid(segmenter: nn.Module, num_classes: int, mean: Sequence[float] | None, std: Sequence[float] | None):
    return DenseHybrid(segmenter, num_classes=num_classes, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)


# --------------------------------------------------------------------------------------------------------------------
# segmentation_models_pytorch


class SmpSegmenter(nn.Module):
    """segmentation_models_pytorch model split at the input of its segmentation head.

    Features: the decoder output, (N, C, H/r, W/r) with C = ``segmentation_head[0].in_channels`` and r the decoder's
    output stride (1 for Unet, UnetPlusPlus, MAnet, Linknet; 4 for FPN, DeepLabV3+, PAN, UPerNet, Segformer; 8 for
    DeepLabV3 and PSPNet); for DPT the output of its head's 3x3 conv-BN-ReLU(-dropout), before the last 1x1 conv.
    Classifier: the head's convolution followed by the head's own upsampling (bilinear, ``align_corners=True``), so
    the closed-set logits equal the smp model's output (its activation, if any, is left out: logits are needed).

    Images are zero-padded (after normalisation) to a multiple of the encoder's output stride when the architecture
    requires divisible sizes, and the features are cropped back to the image (see :func:`crop_to_image`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = getattr(model, "segmentation_head", None)
        self.prefix_tokens = type(head).__name__ == "DPTSegmentationHead"  # DPT's encoder also returns its tokens
        if self.prefix_tokens:
            body, last = nn.Sequential(*list(head.head.children())[:-1]), head.head[-1]
            upsampling = nn.Upsample(scale_factor=head.upsampling_factor, mode="bilinear", align_corners=True)
        elif isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], nn.Conv2d):
            body, last = nn.Identity(), head[0]
            upsampling = head[1] if len(head) > 1 else nn.Identity()
        else:
            raise TypeError(
                f"Expected a segmentation_models_pytorch model whose `segmentation_head` is a convolution on the "
                f"decoder output (SegmentationHead), but {type(model).__name__} has {type(head).__name__}."
            )
        if getattr(model, "classification_head", None) is not None:
            warnings.warn("The smp model's classification head (aux_params) is not used.", UserWarning, stacklevel=2)
        self.backbone = model.encoder
        self.decoder = model.decoder
        self.head_body = body
        self.classifier = last
        self.upsampling = upsampling
        self.feature_channels = int(last.in_channels)
        divisible = bool(getattr(model, "requires_divisible_input_shape", True))
        stride = int(getattr(model.encoder, "output_stride", 32))
        # DPT reassembles the token grid one level coarser (stride 2x), then upsamples: it needs twice the stride
        self.size_divisor = (2 * stride if self.prefix_tokens else stride) if divisible else 1

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        padded = pad_to_multiple(images, self.size_divisor)
        encoded = self.backbone(padded)
        decoded = self.decoder(*encoded) if self.prefix_tokens else self.decoder(encoded)
        features = self.head_body(decoded)
        return crop_to_image(features, padded, images) if self.size_divisor > 1 else features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.upsampling(self.classifier(features))


#: the architectures whose head is a convolution on the decoder output (those the installed version has are offered)
SMP_ARCHITECTURES = (
    "Unet",
    "UnetPlusPlus",
    "MAnet",
    "Linknet",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
)


def from_smp(model: nn.Module) -> SmpSegmenter:
    """Split a segmentation_models_pytorch model (e.g. ``smp.Unet(...)``) for :class:`DenseHybrid`.

    Example:
        >>> import segmentation_models_pytorch as smp
        >>> net = smp.FPN("resnet18", encoder_weights=None, classes=5)
        >>> model = DenseHybrid(from_smp(net), num_classes=5)
    """
    return SmpSegmenter(model)


def smp_model(
    member: str,
    num_classes: int,
    pretrained: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> DenseHybrid:
    """``smp:ARCH:ENCODER``: ``smp.create_model(ARCH, ENCODER, encoder_weights=None, classes=K, **kwargs)`` wrapped.

    Args:
        member: ``ARCH:ENCODER``, e.g. ``Unet:resnet34``.
        num_classes: K.
        pretrained: a local file (state dict of the smp model, ``torch.save`` or ``.safetensors``) or an smp
            ``save_pretrained`` folder, loaded into the smp model before it is split; a classifier for another K
            starts fresh.
        mean, std: input normalisation (default ImageNet, what smp's encoders are trained with).
        **kwargs: the architecture's own arguments (``encoder_depth``, ``decoder_channels``, ...).
    """
    name = f"smp:{member}"
    arch, sep, encoder = member.partition(":")
    if not sep or not arch or not encoder:
        raise ValueError(f"Expected an smp model name 'smp:ARCH:ENCODER' (e.g. 'smp:Unet:resnet34'), but got {name!r}.")
    smp = require_extra("segmentation_models_pytorch", name)
    archs = {a.lower(): a for a in SMP_ARCHITECTURES if hasattr(smp, a)}
    if arch.lower() not in archs:
        raise ValueError(f"Unknown smp architecture {arch!r} in {name!r}. Available: {', '.join(archs.values())}.")
    if encoder not in smp.encoders.get_encoder_names() and not encoder.startswith("tu-"):
        raise ValueError(
            f"Unknown smp encoder {encoder!r} in {name!r}: expected one of segmentation_models_pytorch's encoder names "
            "(smp.encoders.get_encoder_names()) or tu-<timm model name>."
        )
    for key in ("encoder_weights", "classes", "in_channels", "activation", "aux_params", "encoder_name", "arch"):
        if key in kwargs:
            raise ValueError(f"Expected no `{key}` in the kwargs of {name!r}: the adapter sets it.")
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=num_classes, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise ValueError(f"Cannot build {name!r} with model.kwargs {sorted(kwargs)}: smp says {exc}") from exc
    if pretrained is not None:
        load_weights(model, read_weights(pretrained), f"pretrained {str(pretrained)!r}", ["segmentation_head."])
    return _hybrid(SmpSegmenter(model), num_classes, mean, std)


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face transformers


class TransformersSegmenter(nn.Module):
    """A transformers pixel classifier (SegFormer, UperNet) split at the input of its decode head's classifier.

    Features: SegFormer, the all-MLP decoder's fused map after BN-ReLU(-dropout), ``decoder_hidden_size`` channels at
    stride 4; UperNet, the FPN bottleneck's 3x3 conv-BN-ReLU output, ``hidden_size`` channels at stride 4. Classifier:
    the decode head's 1x1 ``classifier`` conv. UperNet's auxiliary FCN head is dropped (it is a training aid).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = getattr(model, "decode_head", None)
        classifier = getattr(head, "classifier", None)
        if not isinstance(classifier, nn.Conv2d):
            raise TypeError(
                f"Expected a transformers model with a `decode_head.classifier` Conv2d (SegformerForSemanticSegmentation"
                f", UperNetForSemanticSegmentation), but got {type(model).__name__}."
            )
        if hasattr(model, "segformer"):
            self.backbone, self.kind = model.segformer, "segformer"
        elif hasattr(model, "backbone"):
            self.backbone, self.kind = model.backbone, "upernet"
        else:
            raise TypeError(f"Expected a SegFormer or UperNet model from transformers, but got {type(model).__name__}.")
        head.classifier = nn.Identity()  # the decode head now returns its pre-logit features
        self.decode_head = head
        self.classifier = classifier
        self.feature_channels = int(classifier.in_channels)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "segformer":
            hidden = self.backbone(images, output_hidden_states=True, return_dict=True).hidden_states
        else:
            hidden = self.backbone(images, return_dict=True).feature_maps
        return self.decode_head(hidden)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def from_transformers(model: nn.Module) -> TransformersSegmenter:
    """Split a transformers ``SegformerForSemanticSegmentation`` or ``UperNetForSemanticSegmentation``.

    The model's ``decode_head.classifier`` is moved into the adapter (the decode head is changed in place).
    """
    return TransformersSegmenter(model)


_HF_CLASSES = {
    "segformer": ("SegformerConfig", "SegformerForSemanticSegmentation"),
    "upernet": ("UperNetConfig", "UperNetForSemanticSegmentation"),
}
_HF_UNRECORDED = ("id2label", "label2id", "num_labels", "transformers_version", "architectures", "_name_or_path")


def _config_dict(config: Any) -> dict[str, Any]:
    """The configuration's differences from the library default, plain values only (recorded in checkpoints)."""
    diff = {k: v for k, v in config.to_diff_dict().items() if k not in _HF_UNRECORDED and k != "model_type"}
    backbone = getattr(config, "backbone_config", None)
    if "backbone_config" in diff and hasattr(backbone, "to_diff_dict"):  # the nested backbone's differences only
        nested = backbone.to_diff_dict()
        diff["backbone_config"] = {k: v for k, v in nested.items() if k not in _HF_UNRECORDED}
    return diff


def _check_loading_info(info: Mapping[str, Any], source: str, classifier: str, drop: str) -> None:
    """Refuse what transformers' ``from_pretrained`` reports beyond a fresh classifier and a dropped auxiliary head."""
    mismatched = sorted(k[0] if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys", ()))
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(classifier))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(drop))
    bad_shapes = [k for k in mismatched if not k.startswith(classifier)]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"Expected {source} to fit its configuration, but got {len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(bad_shapes)} shape-mismatched entries: {', '.join((missing + unexpected + bad_shapes)[:10])}"
        )
    fresh = [k for k in mismatched if k.startswith(classifier)]
    if fresh:
        warnings.warn(
            f"{source} holds a classifier for another number of classes; it starts fresh ({', '.join(fresh)}).",
            UserWarning,
            stacklevel=4,
        )


def hf_model(
    member: str,
    num_classes: int,
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DenseHybrid:
    """``hf:segformer`` / ``hf:upernet``: a transformers pixel classifier wrapped.

    Args:
        member: ``segformer`` or ``upernet``.
        num_classes: K (the configuration's ``num_labels`` is set to it).
        pretrained: a local ``save_pretrained`` folder: its ``config.json`` and weights, read by transformers'
            ``from_pretrained(local_files_only=True)`` (safetensors, or ``pytorch_model.bin`` read weights-only); a
            classifier for another K starts fresh.
        config: overrides of the configuration (of the folder's, else the library default), e.g. a small
            ``hidden_sizes``; recorded so that checkpoints rebuild the same architecture without the folder.
        mean, std: input normalisation (default ImageNet, what both image processors use).
    """
    name = f"hf:{member}"
    if member not in _HF_CLASSES:
        raise ValueError(f"Unknown transformers model {name!r}. Available: hf:segformer, hf:upernet.")
    transformers = require_extra("transformers", name)
    config_cls, model_cls = (getattr(transformers, c) for c in _HF_CLASSES[member])
    folder = None
    if pretrained is not None:
        folder = Path(pretrained).expanduser()
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"Expected `pretrained` {str(pretrained)!r} to be a save_pretrained folder with config.json, but "
                f"{'it has no config.json' if folder.is_dir() else 'it is not a folder'}."
            )
        settings = config_cls.from_pretrained(str(folder), local_files_only=True).to_diff_dict()
        settings = {k: v for k, v in settings.items() if k not in _HF_UNRECORDED}
    else:
        settings = {}
    overrides = dict(config or {})
    for key in ("num_labels", "id2label", "label2id"):
        if key in overrides:
            raise ValueError(f"Expected no `{key}` in the config of {name!r}: it follows num_classes.")
    try:
        hf_config = config_cls(**{**settings, **overrides, "num_labels": num_classes})
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"Cannot configure {name!r} with config {sorted(overrides)}: transformers says {exc}") from exc
    if member == "upernet":
        hf_config.use_auxiliary_head = False
        hf_config.use_pretrained_backbone = False
    if folder is None:
        model = model_cls(hf_config)
    else:  # transformers' own reader: it maps the names of older saved formats (safetensors, or .bin weights-only)
        model, info = model_cls.from_pretrained(
            str(folder),
            config=hf_config,
            local_files_only=True,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            dtype=torch.float32,
        )
        _check_loading_info(info, f"pretrained {str(folder)!r}", "decode_head.classifier.", "auxiliary_head.")
    hybrid = _hybrid(TransformersSegmenter(model), num_classes, mean, std)
    hybrid.recorded_kwargs = {"config": _config_dict(hf_config)}
    return hybrid


# --------------------------------------------------------------------------------------------------------------------
# torchvision


class LRASPPClassifier(nn.Module):
    """LR-ASPP's two 1x1 classifiers as one map on the concatenated features: ``low_classifier(low) +
    high_classifier(high)``, exactly as torchvision's ``LRASPPHead`` computes its logits."""

    def __init__(self, low_classifier: nn.Conv2d, high_classifier: nn.Conv2d) -> None:
        super().__init__()
        self.low_classifier = low_classifier
        self.high_classifier = high_classifier
        self.low_channels = int(low_classifier.in_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        low, high = features[:, : self.low_channels], features[:, self.low_channels :]
        return self.low_classifier(low) + self.high_classifier(high)


class _LRASPPFeatures(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.cbr = head.cbr
        self.scale = head.scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        found = self.backbone(images)
        low, high = found["low"], found["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, x], dim=1)


def from_torchvision(model: nn.Module) -> SplitSegmenter:
    """Split a torchvision segmentation model (FCN, DeepLabV3, LR-ASPP; any backbone).

    Features: FCN and DeepLabV3, the head's output before its last 1x1 conv (FCN: 3x3 conv-BN-ReLU-dropout, in/4
    channels; DeepLabV3: ASPP, 3x3 conv, BN, ReLU, 256 channels), at stride 8; LR-ASPP, the concatenation of the
    stride-8 backbone map ("low") and the attention-scaled stride-16 branch upsampled to it (40 + 128 channels for
    MobileNetV3-Large). Classifier: the last 1x1 conv; for LR-ASPP its two 1x1 convs summed
    (:class:`LRASPPClassifier`). The auxiliary classifier, if any, is dropped.
    """
    from densehybrid.models.adapters import from_torchvision_deeplabv3

    classifier = getattr(model, "classifier", None)
    if type(classifier).__name__ == "LRASPPHead":
        head = LRASPPClassifier(classifier.low_classifier, classifier.high_classifier)
        channels = classifier.low_classifier.in_channels + classifier.high_classifier.in_channels
        return SplitSegmenter(_LRASPPFeatures(model.backbone, classifier), head, int(channels))
    return from_torchvision_deeplabv3(model)


_TV_BUILDERS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)


def tv_model(
    member: str,
    num_classes: int,
    pretrained: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DenseHybrid:
    """``tv:BUILDER``: ``torchvision.models.segmentation.BUILDER(weights=None, num_classes=K)`` wrapped.

    Args:
        pretrained: a local torchvision state dict of that model (its ``aux_classifier.*`` are ignored; a
            classifier for another K starts fresh).
    """
    from torchvision.models import segmentation

    if member not in _TV_BUILDERS:
        raise ValueError(
            f"Unknown torchvision model 'tv:{member}'. Available: {', '.join('tv:' + b for b in _TV_BUILDERS)}."
        )
    builder: Callable[..., nn.Module] = getattr(segmentation, member)
    extra = {} if member.startswith("lraspp") else {"aux_loss": False}
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
    if pretrained is not None:
        heads = (
            ["classifier.low_classifier.", "classifier.high_classifier."]
            if member.startswith("lraspp")
            else [f"classifier.{len(model.classifier) - 1}."]
        )
        load_weights(model, read_weights(pretrained), f"pretrained {str(pretrained)!r}", heads, ["aux_classifier."])
    return _hybrid(from_torchvision(model), num_classes, mean, std)


__all__ = [
    "FAMILY_HELP",
    "LRASPPClassifier",
    "SmpSegmenter",
    "TransformersSegmenter",
    "from_smp",
    "from_torchvision",
    "from_transformers",
    "hf_model",
    "smp_model",
    "tv_model",
]

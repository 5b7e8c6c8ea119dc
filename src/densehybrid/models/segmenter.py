"""Segmenter (ViT encoder + mask-transformer decoder) with the DenseHybrid dataset-posterior head.

Segmenter (Strudel et al., "Segmenter: Transformer for Semantic Segmentation", ICCV 2021) is the COCO model of the
TPAMI 2024 extension of DenseHybrid (Grcić et al., "Hybrid Open-set Segmentation with Synthetic Negative Data"):

* **Encoder**: a timm Vision Transformer (``/16`` patches, class token) whose position embeddings are resampled to
  the input's patch grid on the fly; images are zero-padded (after normalisation) to a multiple of 16. Like
  Segmenter's reference encoder it carries an unused 1000-way ImageNet head (``encoder.head``).
* **Decoder** (mask transformer): the patch tokens are projected (``proj_dec``), K learnt class embeddings
  (``cls_emb``) are appended, and two pre-norm transformer blocks process them jointly, followed by ``decoder_norm``.
* **Closed-set logits**: patches and class embeddings are projected (``proj_patch``, ``proj_classes``),
  L2-normalised, their dot products form K masks, normalised over classes by ``mask_norm`` (LayerNorm).
* **Head**: the dataset-posterior head (BN-ReLU-1x1 conv to 2) reads the decoder's patch tokens after
  ``decoder_norm``, reshaped to a (N, D, H/16, W/16) map: the decoder's pre-logit features, before the
  class-specific projections.

Both outputs are upsampled bilinearly (``align_corners=False``) to the padded size, cropped, and resized to
``output_size`` when that differs. Parameter names follow Segmenter's reference implementation (``encoder.*``,
``decoder.*``) plus ``logits_ood.*``. The TPAMI Segmenter code and its COCO checkpoints could not be checked against
a fixture, so compatibility with those files is not claimed; the LDN-121 and DeepLabV3+ models are the verified ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, checkpoint_filter_fn
from torch import nn

from densehybrid.errors import CheckpointError
from densehybrid.models.heads import DatasetPosteriorHead
from densehybrid.models.hybrid import Normalize, check_images, resolve_output_size
from densehybrid.models.output import HybridOutput

logger = logging.getLogger(__name__)

#: Normalisation of the in21k-pretrained timm ViTs that Segmenter uses ("vit" in Segmenter's config).
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)
#: registered name -> timm encoder architecture.
ENCODERS = {
    "segmenter_vit_ti16": "vit_tiny_patch16_384",
    "segmenter_vit_s16": "vit_small_patch16_384",
    "segmenter_vit_b16": "vit_base_patch16_384",
}


class MaskTransformer(nn.Module):
    """Segmenter's mask-transformer decoder.

    Args:
        num_classes: K.
        encoder_dim: width of the encoder tokens.
        dim: decoder width D.
        depth: transformer blocks.
        num_heads: attention heads (Segmenter uses D / 64).
        mlp_ratio: MLP width / D.
        dropout: dropout in attention and MLP.
        drop_path_rate: stochastic depth, increasing linearly over the blocks.
    """

    def __init__(
        self,
        num_classes: int,
        encoder_dim: int,
        dim: int,
        depth: int = 2,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        num_heads = num_heads or max(dim // 64, 1)
        self.num_classes = num_classes
        # Stochastic depth rising linearly to `drop_path_rate` (plain floats: the model may be built on meta).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=dropout,
                drop_path=rate,
                norm_layer=nn.LayerNorm,
            )
            for rate in rates
        )
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.proj_dec = nn.Linear(encoder_dim, dim)
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.dim = dim
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode patch tokens.

        Args:
            tokens: (N, h * w, encoder_dim) patch tokens (prefix tokens removed), row-major.
            grid: (h, w) patch grid.

        Returns:
            ``(features, classes)``: (N, D, h, w) patch features after ``decoder_norm`` and (N, K, D) class
            embeddings.
        """
        x = self.proj_dec(tokens)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        features = patches.transpose(1, 2).reshape(x.shape[0], self.dim, *grid)
        return features, classes

    def mask_logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Closed-set logits: normalised dot products of projected patches and class embeddings.

        Args:
            features: (N, D, h, w) from :meth:`forward`.
            classes: (N, K, D) from :meth:`forward`.

        Returns:
            (N, K, h, w) logits.
        """
        n, d, h, w = features.shape
        patches = F.normalize(features.flatten(2).transpose(1, 2) @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return masks.transpose(1, 2).reshape(n, self.num_classes, h, w)


class Segmenter(nn.Module):
    """Segmenter with the dataset-posterior head.

    Args:
        num_classes: K.
        encoder: timm ViT architecture name (e.g. ``"vit_base_patch16_384"``); built with ``pretrained=False``.
        image_size: training image size the position embeddings are laid out for (other sizes work: the
            embeddings are resampled on the fly).
        drop_path_rate: stochastic depth of the encoder.
        decoder_dropout: dropout in the decoder blocks.
        mean: input normalisation mean (0.5 for in21k ViTs).
        std: input normalisation std (0.5 for in21k ViTs).

    Attributes:
        num_classes: K.
        feature_channels: D, channels of the pre-logit features read by the head.
        patch_size: 16.
        data_config: ``{"mean": [...], "std": [...]}`` applied inside ``forward``.
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "vit_base_patch16_384",
        image_size: int | tuple[int, int] = 512,
        drop_path_rate: float = 0.1,
        decoder_dropout: float = 0.1,
        mean: Sequence[float] = VIT_MEAN,
        std: Sequence[float] = VIT_STD,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.encoder = timm.create_model(
            encoder,
            pretrained=False,
            img_size=image_size,
            # An ImageNet head that is never used, as in Segmenter's reference encoder, whose checkpoints hold it.
            num_classes=1000,
            global_pool="",
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        patch = self.encoder.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, Sequence) else patch)
        dim = self.encoder.embed_dim
        self.decoder = MaskTransformer(num_classes, dim, dim, depth=2, dropout=decoder_dropout)
        self.feature_channels = dim
        self.logits_ood = DatasetPosteriorHead(dim)

    @property
    def data_config(self) -> dict[str, list[float]]:
        """Input normalisation applied inside ``forward``."""
        return self.normalize.config

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder features of the padded image.

        Args:
            images: (N, 3, H, W) float in [0, 1].

        Returns:
            ``(features, classes)``: (N, D, ceil(H/16), ceil(W/16)) pre-logit patch features and (N, K, D) class
            embeddings.
        """
        check_images(images)
        x = self.normalize(images)
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, -w % p, 0, -h % p))
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens :]
        return self.decoder(tokens, (x.shape[-2] // p, x.shape[-1] // p))

    def forward_head(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Closed-set logits (N, K, h, w) on the patch grid from :meth:`forward_features`' output."""
        return self.decoder.mask_logits(*features)

    def forward_ood_head(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Dataset-posterior logits (N, 2, h, w) on the patch grid."""
        return self.logits_ood(features[0])

    def forward(self, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> HybridOutput:
        """Closed-set logits and dataset-posterior logits.

        Args:
            images: (N, 3, H, W) float in [0, 1].
            output_size: (H_out, W_out) of both outputs; defaults to (H, W).

        Returns:
            :class:`HybridOutput` with ``logits`` (N, K, H_out, W_out) and ``ood_logits`` (N, 2, H_out, W_out).
        """
        size = resolve_output_size(images, output_size)
        h, w = int(images.shape[-2]), int(images.shape[-1])
        features = self.forward_features(images)
        grid = features[0].shape[-2:]
        padded = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        outputs = []
        for x in (self.forward_head(features), self.forward_ood_head(features)):
            if padded != (h, w):
                # As Segmenter: upsample to the padded image, drop the padding, then resize if asked.
                x = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outputs.append(x)
        return HybridOutput(*outputs)


def load_vit_weights(encoder: nn.Module, path: str | PathLike[str], weights_only: bool = True) -> dict:
    """Load ImageNet ViT weights from a local file into a timm ViT encoder.

    Accepted: timm checkpoints (``.pth``, ``.bin``, ``.safetensors``), the original JAX ``.npz`` files, and a
    Segmenter checkpoint (its ``encoder.*`` entries). Position embeddings are resampled to the encoder's grid; the
    unused ImageNet head is taken when its shape fits and kept otherwise; every other encoder parameter must be
    present.

    Args:
        encoder: timm ``VisionTransformer``.
        path: local file (weights are never downloaded).
        weights_only: refuse pickled Python objects other than tensors.

    Returns:
        ``{"loaded": n, "ignored": [names]}``.

    Raises:
        CheckpointError: when encoder parameters are missing or have other shapes.
    """
    from densehybrid.models.checkpoint import extract_state_dict, read_checkpoint_file, strip_prefix

    if str(path).endswith(".npz"):
        try:
            encoder.load_pretrained(str(path))
        except Exception as err:  # timm's JAX loader raises KeyError/ValueError on foreign files
            raise CheckpointError(f"Cannot load ViT weights from {str(path)!r}: {err}") from err
        return {"loaded": len(encoder.state_dict()), "ignored": []}
    state = strip_prefix(extract_state_dict(read_checkpoint_file(path, weights_only=weights_only)))
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    state = checkpoint_filter_fn(state, encoder)
    own = encoder.state_dict()
    # The unused ImageNet head loads only when its shape fits (an in21k file has 21,843 classes).
    for key in [k for k in own if k.startswith("head.")]:
        if key not in state or state[key].shape != own[key].shape:
            state[key] = own[key]
    ignored = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise CheckpointError(
            f"Expected `{path}` to hold ViT weights for every encoder parameter, but {len(missing)} are missing "
            f"(first: {', '.join(missing[:5])}). Pass timm weights of the same ViT size."
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(
            f"Expected `{path}` to match the encoder's shapes, but {len(wrong)} differ (file vs model): "
            f"{'; '.join(wrong[:5])}. Is it another ViT size?"
        )
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)
    logger.info("Loaded %d ViT tensors from %s; ignored %s", len(own), path, ignored)
    return {"loaded": len(own), "ignored": ignored}


def _segmenter(
    name: str,
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None,
    image_size: int | tuple[int, int],
    **kwargs,
) -> Segmenter:
    model = Segmenter(num_classes, encoder=ENCODERS[name], image_size=image_size, **kwargs)
    if pretrained_backbone is not None:
        load_vit_weights(model.encoder, pretrained_backbone)
    return model


def segmenter_vit_b16(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    image_size: int | tuple[int, int] = 512,
    **kwargs,
) -> Segmenter:
    """Segmenter with a ViT-B/16 encoder (86M parameters) and the dataset-posterior head.

    Args:
        num_classes: K.
        pretrained_backbone: local ImageNet ViT-B/16 weights (timm or JAX ``.npz``) for the encoder.
        image_size: size the position embeddings are laid out for.
        **kwargs: forwarded to :class:`Segmenter` (``drop_path_rate``, ``decoder_dropout``, ``mean``, ``std``).
    """
    return _segmenter("segmenter_vit_b16", num_classes, pretrained_backbone, image_size, **kwargs)


def segmenter_vit_s16(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    image_size: int | tuple[int, int] = 512,
    **kwargs,
) -> Segmenter:
    """Segmenter with a ViT-S/16 encoder (22M parameters); see :func:`segmenter_vit_b16`."""
    return _segmenter("segmenter_vit_s16", num_classes, pretrained_backbone, image_size, **kwargs)


def segmenter_vit_ti16(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    image_size: int | tuple[int, int] = 512,
    **kwargs,
) -> Segmenter:
    """Segmenter with a ViT-Ti/16 encoder (6M parameters), small enough for CPU tests; see :func:`segmenter_vit_b16`."""
    return _segmenter("segmenter_vit_ti16", num_classes, pretrained_backbone, image_size, **kwargs)

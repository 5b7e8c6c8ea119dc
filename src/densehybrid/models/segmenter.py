"""Segmenter (ViT encoder + mask-transformer decoders) with a mask-transformer dataset-posterior head.

Segmenter (Strudel et al., "Segmenter: Transformer for Semantic Segmentation", ICCV 2021) is the COCO model of the
TPAMI 2024 extension of DenseHybrid (Grcić et al., "Hybrid Open-set Segmentation with Synthetic Negative Data"). The
structure is the released ``SegmenterTH`` of the TPAMI-era COCO20 scripts, parameter for parameter (verified against
a state-dict and output fixture of the released model, ``tests/data/compat/segmenter_vitb_th_*``):

* **Encoder** ``encoder.*``: a Vision Transformer (``/16`` patches, class token, pre-norm blocks, LayerNorm
  ``eps=1e-5``) whose position embeddings are laid out for a 512×512 image and resized bilinearly
  (``align_corners=False``) to the input's patch grid; images are zero-padded (after normalisation) to a multiple of
  16. It carries an unused 1000-way ImageNet head (``encoder.head``), as the released checkpoints do. The released
  ViT-B configuration has 16 attention heads (head width 48), not the 12 of ImageNet ViT-B; ViT-S and ViT-Ti keep
  6 and 3.
* **Class decoder** ``decoder.*`` (mask transformer): the patch tokens are projected (``proj_dec``), K learnt class
  embeddings (``cls_emb``) are appended, two pre-norm transformer blocks (D / 64 heads) process them jointly, then
  ``decoder_norm``; patches and class embeddings are projected (``proj_patch``, ``proj_classes``), L2-normalised,
  and their dot products form K masks, normalised over classes by ``mask_norm`` (a LayerNorm): the closed-set logits.
* **Dataset-posterior head** ``decoder_th.*``: a second, separate mask transformer of the same shape with 2 classes
  (inlier, outlier) that reads the same encoder tokens.

Both outputs are upsampled bilinearly (``align_corners=False``) to the padded size, cropped, and resized to
``output_size`` when that differs. The input is normalised with the ImageNet mean/std inside ``forward``, as the
released COCO pipeline does.

``forward`` returns logits in train and eval mode: one pass over the whole image (:meth:`forward_whole`). The
released COCO20 evaluation runs the model over 512×512 sliding windows with stride 320 and softmaxes the merged
outputs; that setting is recorded as ``model.inference_window`` and applied by inference
(:class:`densehybrid.OpenSetModel`, the evaluation protocols and the commands with ``--window auto``), see
:mod:`densehybrid.models.window`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention, checkpoint_filter_fn
from torch import nn

from densehybrid.errors import CheckpointError
from densehybrid.models.hybrid import IMAGENET_MEAN, IMAGENET_STD, Normalize, check_images, resolve_output_size
from densehybrid.models.output import HybridOutput
from densehybrid.models.window import WINDOW_MERGES, SlidingWindow

logger = logging.getLogger(__name__)

#: registered name -> (timm encoder architecture, encoder attention heads). The released ViT-B config passes 16.
ENCODERS = {
    "segmenter_vit_ti16": ("vit_tiny_patch16_384", 3),
    "segmenter_vit_s16": ("vit_small_patch16_384", 6),
    "segmenter_vit_b16": ("vit_base_patch16_384", 16),
}
#: The name earlier versions gave the released probability merge.
_LEGACY_MERGES = {"softmax": "probabilities"}


class SegmenterBlock(nn.Module):
    """Pre-norm transformer block of Segmenter: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    The children are registered in the order of the released checkpoints (``norm1``, ``norm2``, ``attn``, ``mlp``),
    so that state dicts list their entries in the same order. Attention and MLP are timm's.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP width / ``dim``.
        qkv_bias: bias of the query/key/value projection.
        proj_drop: dropout after attention and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic depth rate.
        norm_layer: LayerNorm class (the released model uses PyTorch's default ``eps=1e-5``).
        **_: further arguments of timm's block interface, which this block does not use.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        **_,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, dim) -> (N, L, dim)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MaskTransformer(nn.Module):
    """Segmenter's mask-transformer decoder: patch tokens and K class embeddings -> K masks.

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
        self.dim = dim
        # Parameters first, then children, in the order of the released state dict.
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        # Stochastic depth rising linearly to `drop_path_rate` (plain floats: the model may be built on meta).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            SegmenterBlock(dim, num_heads, mlp_ratio, proj_drop=dropout, attn_drop=dropout, drop_path=rate)
            for rate in rates
        )
        self.proj_dec = nn.Linear(encoder_dim, dim)
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Masks on the patch grid.

        Args:
            features: (N, C, h, w) encoder patch tokens laid out on their grid.

        Returns:
            (N, K, h, w) logits: ``mask_norm`` of the cosine similarities between projected patch features and
            projected class embeddings.
        """
        n, _, h, w = features.shape
        x = self.proj_dec(features.flatten(2).transpose(1, 2))
        x = torch.cat([x, self.cls_emb.expand(n, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return masks.transpose(1, 2).reshape(n, self.num_classes, h, w)


class Segmenter(nn.Module):
    """Segmenter with the mask-transformer dataset-posterior head (the released ``SegmenterTH``).

    Args:
        num_classes: K.
        encoder: timm ViT architecture name (e.g. ``"vit_base_patch16_384"``); built with ``pretrained=False``.
        encoder_heads: attention heads of the encoder (the released ViT-B uses 16); None keeps timm's.
        image_size: image size the position embeddings are laid out for (512 as released; other input sizes work:
            the embeddings are resized bilinearly to the input's grid).
        drop_path_rate: stochastic depth of the encoder.
        decoder_dropout: dropout in the decoder blocks.
        mean: input normalisation mean (ImageNet's, as released).
        std: input normalisation std.
        sliding_window: record the released sliding window as ``inference_window`` (False: None, one whole-image
            pass). ``forward`` never slides: inference applies it (:mod:`densehybrid.models.window`).
        window_size: side of the square windows of ``inference_window``.
        window_stride: step between windows.
        window_merge: ``"probabilities"`` (released; ``"softmax"`` is accepted as its earlier name) or
            ``"logits"``, see :class:`~densehybrid.models.window.SlidingWindow`.

    Attributes:
        num_classes: K.
        feature_channels: width of the encoder tokens the two decoders read.
        patch_size: 16.
        data_config: ``{"mean": [...], "std": [...]}`` applied inside ``forward``.
        inference_window: the released :class:`~densehybrid.models.window.SlidingWindow` (512, stride 320,
            probabilities), or None.
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "vit_base_patch16_384",
        encoder_heads: int | None = None,
        image_size: int | tuple[int, int] = 512,
        drop_path_rate: float = 0.1,
        decoder_dropout: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        sliding_window: bool = True,
        window_size: int = 512,
        window_stride: int = 320,
        window_merge: str = "probabilities",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
        for name, value in (("window_size", window_size), ("window_stride", window_stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}.")
        if window_stride > window_size:
            raise ValueError(
                f"Expected `window_stride` to be at most `window_size` ({window_size}), but got {window_stride}."
            )
        window_merge = _LEGACY_MERGES.get(window_merge, window_merge)
        if window_merge not in WINDOW_MERGES:
            raise ValueError(f"Expected `window_merge` to be one of {WINDOW_MERGES}, but got {window_merge!r}.")
        self.num_classes = num_classes
        self.inference_window = SlidingWindow(window_size, window_stride, window_merge) if sliding_window else None
        self.normalize = Normalize(mean, std)
        extra = {} if encoder_heads is None else {"num_heads": encoder_heads}
        self.encoder = timm.create_model(
            encoder,
            pretrained=False,
            img_size=image_size,
            # An ImageNet head that is never used, as in Segmenter's reference encoder, whose checkpoints hold it.
            num_classes=1000,
            global_pool="",
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            block_fn=SegmenterBlock,
            norm_layer=nn.LayerNorm,
            **extra,
        )
        patch = self.encoder.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, Sequence) else patch)
        dim = self.encoder.embed_dim
        self.feature_channels = dim
        self.decoder = MaskTransformer(num_classes, dim, dim, depth=2, dropout=decoder_dropout)
        self.decoder_th = MaskTransformer(2, dim, dim, depth=2, dropout=decoder_dropout)

    @property
    def data_config(self) -> dict[str, list[float]]:
        """Input normalisation applied inside ``forward``."""
        return self.normalize.config

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + h * w, D) position embeddings, the grid part resized bilinearly as the released encoder does."""
        pos = self.encoder.pos_embed
        prefix = self.encoder.num_prefix_tokens
        old = tuple(self.encoder.patch_embed.grid_size)
        if not torch.jit.is_tracing() and tuple(grid) == old:  # while tracing, always resize (traced grid sizes)
            return pos
        table = pos[:, prefix:].reshape(1, *old, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([pos[:, :prefix], table.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder patch tokens of the padded, normalised image.

        Args:
            images: (N, 3, H, W) float in [0, 1].

        Returns:
            (N, D, ceil(H/16), ceil(W/16)) patch tokens after the encoder's final norm (class token removed).
        """
        check_images(images)
        x = self.normalize(images)
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        enc = self.encoder
        x = enc.patch_embed(x)  # (N, h, w, D): timm's dynamic-size layout
        n, h, w, d = x.shape
        x = torch.cat([enc.cls_token.expand(n, -1, -1), x.reshape(n, h * w, d)], dim=1)
        x = enc.pos_drop(x + self._position_embedding((h, w)))
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x[:, enc.num_prefix_tokens :].transpose(1, 2).reshape(n, d, h, w)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Closed-set logits (N, K, h, w) on the patch grid from :meth:`forward_features`' output."""
        return self.decoder(features)

    def forward_ood_head(self, features: torch.Tensor) -> torch.Tensor:
        """Dataset-posterior logits (N, 2, h, w) on the patch grid; channel 1 = outlier."""
        return self.decoder_th(features)

    def forward(self, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> HybridOutput:
        """Closed-set and dataset-posterior logits from one whole-image pass, in train and eval mode.

        Args:
            images: (N, 3, H, W) float in [0, 1].
            output_size: (H_out, W_out) of both outputs; defaults to (H, W).

        Returns:
            :class:`HybridOutput` with ``logits`` (N, K, H_out, W_out) and ``ood_logits`` (N, 2, H_out, W_out).
        """
        return self.forward_whole(images, output_size)

    def forward_whole(self, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> HybridOutput:
        """One pass over the whole (padded) image: the released model's own ``forward``.

        Both outputs are upsampled bilinearly to the padded size, cropped to the image, and resized to
        ``output_size`` when that differs. Shapes as in :meth:`forward`.
        """
        size = resolve_output_size(images, output_size)
        h, w = images.shape[-2], images.shape[-1]  # no int(): traced sizes keep an exported graph dynamic
        features = self.forward_features(images)
        padded = (features.shape[-2] * self.patch_size, features.shape[-1] * self.patch_size)
        outputs = []
        for x in (self.forward_head(features), self.forward_ood_head(features)):
            x = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
            if torch.jit.is_tracing() or tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outputs.append(x)
        return HybridOutput(*outputs)


def load_vit_weights(encoder: nn.Module, path: str | PathLike[str]) -> dict:
    """Load ImageNet ViT weights from a local file into a timm ViT encoder.

    Accepted: timm checkpoints (``.pth``, ``.bin``, ``.safetensors``), the original JAX ``.npz`` files, and a
    Segmenter checkpoint (its ``encoder.*`` entries). Position embeddings are resampled to the encoder's grid; the
    unused ImageNet head is taken when its shape fits and kept otherwise; every other encoder parameter must be
    present.

    Args:
        encoder: timm ``VisionTransformer``.
        path: local file (weights are never downloaded).

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
    state = strip_prefix(extract_state_dict(read_checkpoint_file(path)))
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
    architecture, heads = ENCODERS[name]
    kwargs.setdefault("encoder_heads", heads)
    model = Segmenter(num_classes, encoder=architecture, image_size=image_size, **kwargs)
    if pretrained_backbone is not None:
        load_vit_weights(model.encoder, pretrained_backbone)
    return model


def segmenter_vit_b16(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    image_size: int | tuple[int, int] = 512,
    **kwargs,
) -> Segmenter:
    """The released COCO20 Segmenter: ViT-B/16 encoder (16 heads), class and dataset-posterior mask transformers.

    119.1 M parameters for K = 20. The released checkpoints ("Segmenter trained on COCO20", "... fine-tuned on COCO20
    with synthetic negatives") load with :func:`~densehybrid.models.load_checkpoint` and ``strict=True``.

    Args:
        num_classes: K.
        pretrained_backbone: local ImageNet ViT-B/16 weights (timm or JAX ``.npz``) for the encoder.
        image_size: size the position embeddings are laid out for.
        **kwargs: forwarded to :class:`Segmenter` (``drop_path_rate``, ``decoder_dropout``, ``mean``, ``std``,
            ``sliding_window``, ``window_size``, ``window_stride``, ``window_merge`` of the recorded
            ``inference_window``, ``encoder_heads``).
    """
    return _segmenter("segmenter_vit_b16", num_classes, pretrained_backbone, image_size, **kwargs)


def segmenter_vit_s16(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    image_size: int | tuple[int, int] = 512,
    **kwargs,
) -> Segmenter:
    """Segmenter with a ViT-S/16 encoder (6 heads); see :func:`segmenter_vit_b16`."""
    return _segmenter("segmenter_vit_s16", num_classes, pretrained_backbone, image_size, **kwargs)


def segmenter_vit_ti16(
    num_classes: int,
    pretrained_backbone: str | PathLike[str] | None = None,
    image_size: int | tuple[int, int] = 512,
    **kwargs,
) -> Segmenter:
    """Segmenter with a ViT-Ti/16 encoder (3 heads), small enough for CPU tests; see :func:`segmenter_vit_b16`."""
    return _segmenter("segmenter_vit_ti16", num_classes, pretrained_backbone, image_size, **kwargs)

"""Synthetic negatives: flow samples pasted as rectangles, and mixtures of synthetic and real negatives.

The released joint training (TPAMI DenseHybrid, ``*_finetune_flow``) draws one patch size h×w per batch, each side
uniform on ``{min_side, min_side + 8, ..., max_side}``, samples ``patches_per_image`` flow patches of that size per
image and pastes each as a *full rectangle* at a uniform position (later patches overwrite earlier ones). Pasted
pixels become ``ignore_index`` in the labels and ``True`` in the negative mask, exactly the outputs of the real-negative
pasting in :mod:`densehybrid.negatives`, so :func:`densehybrid.losses.densehybrid_loss` takes either.

Mixtures are this library's reading of the TPAMI paper's mixing parameter *b*, whose exact definition is not in the
released code: **each pasted negative is synthetic with probability b and real otherwise**, independently per image
and per pasted slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from densehybrid.labels import IGNORE_INDEX
from densehybrid.negatives import PasteResult, paste_negatives

__all__ = ["FlowNegatives", "FlowPaste", "MixedNegatives", "paste_rectangles", "to_8bit"]


class FlowPaste(NamedTuple):
    """A batch with rectangles pasted in.

    Attributes:
        images: (N, C, H, W) images with the patches pasted (differentiable with respect to the patches).
        target: (N, H, W) labels, ``ignore_index`` on pasted pixels.
        negative_mask: (N, H, W) bool, True on pasted pixels.
        replaced: (N, P, C, h, w) what each rectangle covered in the input images (the inlier content the released
            flow step fits by maximum likelihood), detached.
    """

    images: torch.Tensor
    target: torch.Tensor
    negative_mask: torch.Tensor
    replaced: torch.Tensor

    def as_paste_result(self) -> PasteResult:
        return PasteResult(self.images, self.target, self.negative_mask)


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 in 0..255 (rounded; the released scripts truncate with ``.long()``)."""
    return (images.detach() * 255.0).round().clamp(0, 255).to(torch.uint8)


def _uniform_index(u: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Uniforms in [0, 1) -> integers uniform in [0, count)."""
    count = torch.as_tensor(count, dtype=torch.int64)
    return torch.minimum((u * count).floor().long(), (count - 1).clamp(min=0))


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device).cpu()


def paste_rectangles(
    images: torch.Tensor,
    target: torch.Tensor,
    patches: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
    regions: torch.Tensor | None = None,
) -> FlowPaste:
    """Paste ``P`` equally sized patches per image as full rectangles at uniform positions.

    Patch ``p`` of image ``n`` gets its top-left corner uniform in ``[0, H - h] × [0, W - w]`` (or inside that image's
    ``regions`` entry); where patches overlap the later one wins, as the released sequential pasting does. One
    vectorised pass over the batch: no loop over images, patches or pixels.

    Args:
        images: (N, C, H, W) float images.
        target: (N, H, W) integer labels.
        patches: (N, P, C, h, w) or (N, C, h, w) patches in the value range of ``images``; gradients flow through.
        generator: source of the positions (the CPU default generator when None).
        ignore_index: label written on pasted pixels.
        regions: optional (N, 4) integer (top, left, height, width) of the area each image's patches must land in,
            e.g. the un-padded part of a padded crop (the released COCO recipe). Where a region is smaller than the
            patch, that dimension uses the whole image (as released).

    Returns:
        :class:`FlowPaste`.

    Raises:
        ValueError: for mismatched shapes or a patch larger than the images.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected `images` to have shape (N, C, H, W), but got {shape}.")
    n, c, height, width = images.shape
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != (n, height, width):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"Expected `target` to have shape {(n, height, width)} to match `images`, but got {shape}.")
    if isinstance(patches, torch.Tensor) and patches.ndim == 4:
        patches = patches[:, None]
    if not isinstance(patches, torch.Tensor) or patches.ndim != 5 or patches.shape[0] != n or patches.shape[2] != c:
        shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"Expected `patches` to have shape ({n}, P, {c}, h, w), but got {shape}.")
    num, ph, pw = patches.shape[1], patches.shape[3], patches.shape[4]
    if ph > height or pw > width:
        raise ValueError(
            f"Expected patches no larger than the {height}x{width} crop, but got {ph}x{pw}. Lower the largest patch "
            "side or use larger crops."
        )
    device = images.device

    # Allowed area per image: the whole image, or the region where it can hold the patch.
    top0 = torch.zeros(n, dtype=torch.int64)
    left0 = torch.zeros(n, dtype=torch.int64)
    area_h = torch.full((n,), height, dtype=torch.int64)
    area_w = torch.full((n,), width, dtype=torch.int64)
    if regions is not None:
        regions = torch.as_tensor(regions).to("cpu", torch.int64)
        if tuple(regions.shape) != (n, 4):
            raise ValueError(
                f"Expected `regions` to have shape ({n}, 4) (top, left, height, width), got {tuple(regions.shape)}."
            )
        fits_h, fits_w = regions[:, 2] >= ph, regions[:, 3] >= pw
        top0 = torch.where(fits_h, regions[:, 0], top0)
        left0 = torch.where(fits_w, regions[:, 1], left0)
        area_h = torch.where(fits_h, regions[:, 2], area_h)
        area_w = torch.where(fits_w, regions[:, 3], area_w)
        area_h = torch.minimum(area_h, height - top0)
        area_w = torch.minimum(area_w, width - left0)
    u = _rand((n, num, 2), generator)
    top = (top0[:, None] + _uniform_index(u[..., 0], (area_h - ph + 1)[:, None].clamp(min=1))).to(device)
    left = (left0[:, None] + _uniform_index(u[..., 1], (area_w - pw + 1)[:, None].clamp(min=1))).to(device)

    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_y = (rows >= top[..., None]) & (rows < top[..., None] + ph)  # (N, P, H)
    in_x = (cols >= left[..., None]) & (cols < left[..., None] + pw)  # (N, P, W)
    cover = in_y[..., :, None] & in_x[..., None, :]  # (N, P, H, W)
    mask = cover.any(dim=1)
    # The last patch covering a pixel wins.
    order = torch.arange(1, num + 1, device=device).view(1, num, 1, 1)
    last = (cover.long() * order).argmax(dim=1)  # (N, H, W)
    batch_idx = torch.arange(n, device=device).view(n, 1, 1)
    top_last = top[batch_idx, last]
    left_last = left[batch_idx, last]
    local_y = (rows.view(1, height, 1) - top_last).clamp(0, ph - 1)
    local_x = (cols.view(1, 1, width) - left_last).clamp(0, pw - 1)
    # Advanced indices around a slice put the indexed dims first: (N, H, W, C).
    pasted = patches[batch_idx, last, :, local_y, local_x].permute(0, 3, 1, 2).to(images.dtype)
    out_images = torch.where(mask[:, None], pasted, images)
    out_target = torch.where(mask, torch.full_like(target, ignore_index), target)

    ys = top[..., None] + torch.arange(ph, device=device)  # (N, P, h)
    xs = left[..., None] + torch.arange(pw, device=device)  # (N, P, w)
    b = torch.arange(n, device=device).view(n, 1, 1, 1)
    replaced = images.detach()[b, :, ys[..., :, None], xs[..., None, :]].permute(0, 1, 4, 2, 3)
    return FlowPaste(out_images, out_target, mask, replaced)


def _check_side(name: str, value: object, stride: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < stride or value % stride:
        raise ValueError(
            f"Expected `{name}` to be a positive multiple of {stride} (the flow's stride), but got {value!r}."
        )
    return value


class FlowNegatives:
    """Patches sampled from a normalizing flow, pasted as rectangles (the released synthetic-negative source).

    Args:
        flow: a :class:`~densehybrid.flows.DenseFlow` (anything with ``sample(n, (h, w), generator, differentiable)``
            returning [0, 255] images and a ``stride``).
        patches_per_image: patches pasted into every image (1 in the released Cityscapes recipe, 3 for COCO20).
        min_side: smallest patch side in pixels (16 released).
        max_side: largest patch side in pixels (216 for Cityscapes, 104 for COCO20).
        side_step: step between sides (8 released); sides are ``range(min_side, max_side + 1, side_step)``.
        ignore_index: label written on pasted pixels.

    Raises:
        ValueError: for sides that are not multiples of the flow's stride or ``max_side < min_side``.

    Example:
        >>> from densehybrid.flows import DenseFlow
        >>> flow = DenseFlow([1, 1, 1], [1, 1, 1], [8, 8, 8], coupling_depth=1, coupling_growth=8)
        >>> source = FlowNegatives(flow, patches_per_image=2, min_side=8, max_side=16)
        >>> out = source.paste(torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long))
        >>> bool(out.negative_mask.any()), out.replaced.shape[:2]
        (True, torch.Size([2, 2]))
    """

    def __init__(
        self,
        flow: torch.nn.Module,
        *,
        patches_per_image: int = 1,
        min_side: int = 16,
        max_side: int = 216,
        side_step: int = 8,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        stride = int(getattr(flow, "stride", 8))
        if isinstance(patches_per_image, bool) or not isinstance(patches_per_image, int) or patches_per_image < 1:
            raise ValueError(f"Expected `patches_per_image` to be a positive int, but got {patches_per_image!r}.")
        _check_side("min_side", min_side, stride)
        _check_side("max_side", max_side, stride)
        _check_side("side_step", side_step, stride)
        if max_side < min_side:
            raise ValueError(f"Expected `max_side` >= `min_side`={min_side}, but got {max_side}.")
        self.flow = flow
        self.patches_per_image = patches_per_image
        self.min_side, self.max_side, self.side_step = min_side, max_side, side_step
        self.ignore_index = ignore_index
        self.sides = list(range(min_side, max_side + 1, side_step))

    def check_crop(self, height: int, width: int) -> None:
        """Raise a clear error when the largest patch cannot fit a ``height`` × ``width`` crop."""
        if self.sides[-1] > height or self.sides[-1] > width:
            raise ValueError(
                f"Expected the largest patch side ({self.sides[-1]} px, from `max_side`={self.max_side}) to fit the "
                f"{height}x{width} training crop, but it does not. Lower `max_side` to at most {min(height, width)} "
                "or train on larger crops."
            )

    def sample_size(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """One (h, w) for a whole batch: each side uniform on :attr:`sides`, independently."""
        idx = _uniform_index(_rand((2,), generator), len(self.sides))
        return self.sides[int(idx[0])], self.sides[int(idx[1])]

    def sample(
        self,
        count: int,
        size: tuple[int, int],
        generator: torch.Generator | None = None,
        differentiable: bool = False,
    ) -> torch.Tensor:
        """(count, 3, h, w) flow samples scaled to [0, 1]; without gradients unless ``differentiable``.

        Never floored: the released TPAMI flow only clamps to [0, 255], for the segmenter step's samples too.
        """
        samples = self.flow.sample(count, size, generator=generator, differentiable=differentiable, quantize=False)
        return samples / 255.0

    def paste(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        differentiable: bool = False,
        patches_per_image: int | None = None,
        regions: torch.Tensor | None = None,
    ) -> FlowPaste:
        """Sample a size, ``N × patches_per_image`` patches, and paste them (see :func:`paste_rectangles`).

        Args:
            images: (N, 3, H, W) in [0, 1].
            target: (N, H, W) labels.
            generator: source of sizes, samples and positions.
            differentiable: keep the graph from the pasted pixels to the flow's parameters (the flow step);
                otherwise the patches are sampled without gradients (the segmenter step).
            patches_per_image: override (the released flow step pastes one patch per image).
            regions: see :func:`paste_rectangles`.
        """
        per_image = self.patches_per_image if patches_per_image is None else patches_per_image
        n = images.shape[0]
        self.check_crop(images.shape[-2], images.shape[-1])
        size = self.sample_size(generator)
        patches = self.sample(n * per_image, size, generator, differentiable)
        # Slot-major like the released code: patches [s*N:(s+1)*N] form the s-th pasting round.
        patches = patches.reshape(per_image, n, *patches.shape[1:]).transpose(0, 1)
        patches = patches.to(images.device, images.dtype)
        return paste_rectangles(
            images, target, patches, generator=generator, ignore_index=self.ignore_index, regions=regions
        )

    def __repr__(self) -> str:
        return (
            f"FlowNegatives(patches_per_image={self.patches_per_image}, sides={self.min_side}..{self.max_side} "
            f"step {self.side_step})"
        )


class MixedNegatives:
    """Each pasted negative is synthetic (a flow patch) with probability ``synthetic_fraction``, real otherwise.

    This is the library's reading of the TPAMI paper's mixing parameter *b* (the released code mixes nothing; its
    scripts are real-only or synthetic-only). For every image and every one of the ``patches_per_image`` pasting
    rounds a Bernoulli(b) draw picks the kind; the real ones go through :func:`densehybrid.negatives.paste_negatives`
    with the released mask rules, the synthetic ones through :func:`paste_rectangles`. Only as many flow patches as
    there are synthetic slots are sampled.

    Args:
        synthetic: the flow source (its ``patches_per_image`` sets the number of rounds).
        synthetic_fraction: b in [0, 1].
        rect_prob, min_side, side_step, num_classes_in_mask, max_class_pixels: the real pasting options of
            :func:`~densehybrid.negatives.paste_negatives`.
    """

    def __init__(
        self,
        synthetic: FlowNegatives,
        synthetic_fraction: float,
        *,
        rect_prob: float = 0.5,
        min_side: int = 16,
        side_step: int = 8,
        num_classes_in_mask: int = 2,
        max_class_pixels: int | None = None,
    ) -> None:
        if isinstance(synthetic_fraction, bool) or not isinstance(synthetic_fraction, (int, float)):
            raise TypeError(f"Expected `synthetic_fraction` to be a float in [0, 1], but got {synthetic_fraction!r}.")
        if not (math.isfinite(synthetic_fraction) and 0.0 <= synthetic_fraction <= 1.0):
            raise ValueError(f"Expected `synthetic_fraction` to be in [0, 1], but got {synthetic_fraction}.")
        self.synthetic = synthetic
        self.synthetic_fraction = float(synthetic_fraction)
        self.real_options = {
            "rect_prob": rect_prob,
            "min_side": min_side,
            "side_step": side_step,
            "num_classes_in_mask": num_classes_in_mask,
            "max_class_pixels": max_class_pixels,
        }

    @property
    def patches_per_image(self) -> int:
        return self.synthetic.patches_per_image

    def draw_kinds(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, patches_per_image) bool: True where the pasted negative is synthetic."""
        return _rand((batch, self.patches_per_image), generator) < self.synthetic_fraction

    def paste(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        real_negatives: torch.Tensor | Sequence[torch.Tensor],
        real_segments: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PasteResult:
        """Paste ``patches_per_image`` negatives into every image, each synthetic with probability b.

        Args:
            images: (N, 3, H, W) in [0, 1].
            target: (N, H, W) labels.
            real_negatives: (N, 3, h, w) real negative crops when ``patches_per_image == 1``, else a sequence of that
                many such batches (one per pasting round).
            real_segments: their segment maps, shaped alike, or None (rectangle masks only).
            generator: source of every random choice.

        Returns:
            :class:`~densehybrid.negatives.PasteResult` ``(images, target, negative_mask)``.
        """
        rounds = self.patches_per_image
        if isinstance(real_negatives, torch.Tensor):
            real_negatives = [real_negatives]
        if real_segments is None or isinstance(real_segments, torch.Tensor):
            real_segments = [real_segments] * len(real_negatives) if real_segments is None else [real_segments]
        if len(real_negatives) != rounds or len(real_segments) != rounds:
            raise ValueError(
                f"Expected {rounds} batches of real negatives and segments (one per pasting round), but got "
                f"{len(real_negatives)} and {len(real_segments)}."
            )
        n = images.shape[0]
        self.synthetic.check_crop(images.shape[-2], images.shape[-1])
        kinds = self.draw_kinds(n, generator)  # (N, rounds), drawn first so a seed fixes the split
        count = int(kinds.sum())
        size = self.synthetic.sample_size(generator)
        flow_patches = None
        if count:
            flow_patches = self.synthetic.sample(count, size, generator).to(images.device, images.dtype)
        # Each synthetic slot's patch, in slot-major order; real slots get a zero placeholder that is never pasted.
        slot_index = torch.full((rounds, n), -1, dtype=torch.int64)
        slot_index[kinds.T] = torch.arange(count)
        out = PasteResult(images, target, torch.zeros_like(target, dtype=torch.bool))
        for r in range(rounds):  # pasting rounds (at most a few), each over the whole batch
            real = paste_negatives(
                out.images,
                out.target,
                real_negatives[r],
                real_segments[r],
                generator=generator,
                ignore_index=self.synthetic.ignore_index,
                **self.real_options,
            )
            synthetic_rows = kinds[:, r].to(images.device)
            if count:
                idx = slot_index[r].clamp(min=0).to(images.device)
                synth = paste_rectangles(
                    out.images,
                    out.target,
                    flow_patches[idx],
                    generator=generator,
                    ignore_index=self.synthetic.ignore_index,
                )
                pick = synthetic_rows.view(n, 1, 1)
                images_r = torch.where(pick[:, None], synth.images, real.images)
                target_r = torch.where(pick, synth.target, real.target)
                mask_r = torch.where(pick, synth.negative_mask, real.negative_mask)
            else:
                images_r, target_r, mask_r = real.images, real.target, real.negative_mask
            out = PasteResult(images_r, target_r, out.negative_mask | mask_r)
        return out

    def __repr__(self) -> str:
        return f"MixedNegatives(synthetic_fraction={self.synthetic_fraction}, synthetic={self.synthetic!r})"

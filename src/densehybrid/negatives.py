"""Pasting negative (outlier) images into training batches, as the released DenseHybrid training code does.

One negative crop is pasted into every inlier image. Per image, with probability ``rect_prob`` the pasted region is a
random rectangle of the negative crop, otherwise the union of ``num_classes_in_mask`` random classes of the negative's
segment map. The pasted pixels become ``ignore_index`` in the label map and ``True`` in the negative mask that
:func:`densehybrid.losses.densehybrid_loss` takes. The whole batch is processed with tensor operations (no Python loop
over pixels or images), on the device of the inputs, and all randomness comes from one optional ``torch.Generator``.

References:
    Grcić, Bevandić, Šegvić. DenseHybrid: Hybrid Anomaly Detection for Dense Open-set Recognition. ECCV 2022.
    Official code: https://github.com/matejgrcic/DenseHybrid (``experiments/semseg_negatives_joint_th.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from densehybrid.labels import IGNORE_INDEX

__all__ = ["NegativePaster", "PasteResult", "paste_negatives"]


class PasteResult(NamedTuple):
    """A training batch with negatives pasted in.

    Attributes:
        images: (N, C, H, W) images, negative pixels replaced (same dtype and device as the input images).
        target: (N, H, W) labels, ``ignore_index`` on negative pixels, unchanged elsewhere.
        negative_mask: (N, H, W) bool, True on pasted negative pixels.
    """

    images: torch.Tensor
    target: torch.Tensor
    negative_mask: torch.Tensor


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be at least {minimum}, but got {value}.")
    return value


def _check_options(
    rect_prob: float, min_side: int, side_step: int, num_classes_in_mask: int, ignore_index: int
) -> None:
    if isinstance(rect_prob, bool) or not isinstance(rect_prob, (int, float)):
        raise TypeError(f"Expected `rect_prob` to be a float in [0, 1], but got {type(rect_prob).__name__}.")
    if not (0.0 <= rect_prob <= 1.0):
        raise ValueError(f"Expected `rect_prob` to be in [0, 1], but got {rect_prob}.")
    _check_int("min_side", min_side, 1)
    _check_int("side_step", side_step, 1)
    _check_int("num_classes_in_mask", num_classes_in_mask, 1)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"Expected `ignore_index` to be an int, but got {type(ignore_index).__name__}.")


def _stack_padded(
    name: str,
    items: torch.Tensor | Sequence[torch.Tensor],
    batch: int,
    item_ndim: int,
    layout: str,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch tensor (zero-padded to the largest item when given a list) and the per-item heights and widths."""
    if isinstance(items, torch.Tensor):
        if items.ndim != item_ndim + 1 or items.shape[0] != batch:
            raise ValueError(
                f"Expected `{name}` to have shape {layout} with N = {batch}, but got {tuple(items.shape)}."
            )
        if items.device != device:
            raise ValueError(f"Expected `{name}` to be on the device of `images` ({device}), but got {items.device}.")
        heights = torch.full((batch,), items.shape[-2], dtype=torch.int64)
        widths = torch.full((batch,), items.shape[-1], dtype=torch.int64)
        return items, heights, widths
    if not isinstance(items, Sequence) or len(items) != batch:
        got = f"length {len(items)}" if isinstance(items, Sequence) else type(items).__name__
        raise ValueError(f"Expected `{name}` to be a tensor {layout} or a list of {batch} tensors, but got {got}.")
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or item.ndim != item_ndim:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"Expected `{name}[{i}]` to be a tensor of shape ({layout[4:]}, but got {shape}.")
        if item.device != device:
            raise ValueError(
                f"Expected `{name}[{i}]` to be on the device of `images` ({device}), but got {item.device}."
            )
        if item.shape[:-2] != items[0].shape[:-2] or item.dtype != items[0].dtype:
            raise ValueError(
                f"Expected every `{name}` item to share leading dimensions and dtype with the first "
                f"{tuple(items[0].shape)} {items[0].dtype}, but got {tuple(item.shape)} {item.dtype} at {i}."
            )
    heights = torch.tensor([item.shape[-2] for item in items], dtype=torch.int64)
    widths = torch.tensor([item.shape[-1] for item in items], dtype=torch.int64)
    padded = items[0].new_zeros((batch, *items[0].shape[:-2], int(heights.max()), int(widths.max())))
    for i, item in enumerate(items):
        padded[i, ..., : item.shape[-2], : item.shape[-1]] = item
    return padded, heights, widths


def _check_rectangles(
    too_small: torch.Tensor,
    crop_h: torch.Tensor,
    crop_w: torch.Tensor,
    neg_h: torch.Tensor,
    neg_w: torch.Tensor,
    height: int,
    width: int,
    min_side: int,
) -> None:
    """Raise for the first item that needs a rectangle mask but whose crop has no side above ``min_side``."""
    if bool(too_small.any()):
        i = int(torch.nonzero(too_small)[0])
        raise ValueError(
            f"Expected every negative crop to be larger than `min_side`={min_side} on both sides for rectangle masks, "
            f"but got a {int(crop_h[i])}x{int(crop_w[i])} crop for item {i} (negative "
            f"{int(neg_h[i])}x{int(neg_w[i])}, image {height}x{width}). Use larger negatives or a smaller `min_side`."
        )


def _uniform_index(u: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Map uniforms in [0, 1) to integers uniform in ``[0, count)`` (``count`` >= 1 where it matters)."""
    return torch.minimum((u * count).floor().long(), (count - 1).clamp(min=0))


def paste_negatives(
    images: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | Sequence[torch.Tensor],
    negative_segments: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
    rect_prob: float = 0.5,
    min_side: int = 16,
    side_step: int = 8,
    num_classes_in_mask: int = 2,
    max_class_pixels: int | None = None,
) -> PasteResult:
    r"""Paste one negative crop into every image of a batch, with the released code's mask sampling.

    For each item :math:`n` with inlier size :math:`H \times W` and negative size :math:`h_n \times w_n`:

    1. If the negative is larger than the inlier image, a random :math:`\min(h_n, H) \times \min(w_n, W)` window of it
       (uniform position) is used instead; the released code never needs this because its negative crops
       (192 or 384 px) are smaller than its inlier crops. Call the crop size :math:`p_h \times p_w`.
    2. The mask on the crop is, with probability ``rect_prob``, a rectangle whose height and width are drawn
       independently and uniformly from ``range(min_side, min(p_h, p_w), side_step)`` = {16, 24, ...} and whose
       top-left corner is uniform inside the crop; otherwise it is the union of the pixels of
       ``num_classes_in_mask`` ids drawn uniformly *with replacement* among the ids present in the crop of
       ``negative_segments`` (so the mask may hold a single class). Without ``negative_segments`` every mask is a
       rectangle.
    3. The crop is placed with its top-left corner uniform in :math:`[0, H - p_h] \times [0, W - p_w]`; only mask
       pixels are replaced, and there the label becomes ``ignore_index`` (also where it was void already).

    Args:
        images: (N, C, H, W) inlier images (float in [0, 1] by convention).
        target: (N, H, W) integer labels of the inlier images.
        negatives: (N, C, h, w) negative crops, or a list of N tensors (C, h_n, w_n) of any sizes.
        negative_segments: (N, h, w) non-negative integer segment maps of the negatives (e.g. ADE20K class ids), a
            list of N (h_n, w_n) maps matching ``negatives``, or None for rectangles only.
        generator: source of all randomness; the same seed gives the same result. Its device is where the random
            numbers are drawn (the CPU default generator when None).
        ignore_index: label written on pasted pixels.
        rect_prob: probability of a rectangular mask.
        min_side: smallest rectangle side in pixels.
        side_step: step between rectangle sides.
        num_classes_in_mask: how many segment ids are drawn for a semantic mask.
        max_class_pixels: draw semantic-mask ids only among those covering fewer than this many pixels of the crop
            (the released COCO20 recipe: 10,000, i.e. small ADE20k classes); an item without such an id pastes its
            least frequent id (the lowest id on ties), as the released code does. None: every id present.

    Returns:
        :class:`PasteResult` ``(images, target, negative_mask)``; the inputs are not modified.

    Raises:
        ValueError: for shapes that disagree, negative segment ids, or a rectangle draw on a crop whose shorter side is
            not above ``min_side`` (the grid ``range(min_side, min(p_h, p_w), side_step)`` would be empty).

    References:
        Grcić et al., DenseHybrid, ECCV 2022; https://github.com/matejgrcic/DenseHybrid
        (``experiments/semseg_negatives_joint_th.py``: ``_get_outlier_with_mask``, ``_paste_anomaly``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> images, target = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.long)
        >>> out = paste_negatives(images, target, torch.rand(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)),
        ...                       generator=g)
        >>> bool((out.target[out.negative_mask] == 255).all()), out.negative_mask.any().item()
        (True, True)
    """
    _check_options(rect_prob, min_side, side_step, num_classes_in_mask, ignore_index)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected `images` to be a tensor of shape (N, C, H, W), but got {shape}.")
    batch, channels, height, width = images.shape
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != (batch, height, width):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(
            f"Expected `target` to have shape {(batch, height, width)} to match `images`, but got {shape}."
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"Expected `target` to be an integer tensor, but got dtype {target.dtype}.")
    if target.device != images.device:
        raise ValueError(
            f"Expected `target` to be on the device of `images` ({images.device}), but got {target.device}."
        )
    device = images.device
    neg, neg_h, neg_w = _stack_padded("negatives", negatives, batch, 3, "(N, C, h, w)", device)
    if neg.shape[1] != channels:
        raise ValueError(
            f"Expected `negatives` to have {channels} channels like `images`, but got shape {tuple(neg.shape)}."
        )
    segments = None
    if negative_segments is not None:
        segments, seg_h, seg_w = _stack_padded("negative_segments", negative_segments, batch, 2, "(N, h, w)", device)
        if not (torch.equal(seg_h, neg_h) and torch.equal(seg_w, neg_w)):
            raise ValueError(
                "Expected `negative_segments` to have the (h, w) of `negatives` item by item, but got "
                f"{list(zip(seg_h.tolist(), seg_w.tolist()))} and {list(zip(neg_h.tolist(), neg_w.tolist()))}."
            )
        if segments.is_floating_point() or segments.dtype == torch.bool:
            raise TypeError(f"Expected `negative_segments` to be an integer tensor, but got dtype {segments.dtype}.")
        if segments.numel() and int(segments.min()) < 0:
            raise ValueError(
                f"Expected `negative_segments` ids to be non-negative, but got minimum {int(segments.min())}."
            )
    if batch == 0:
        return PasteResult(images.clone(), target.clone(), torch.zeros_like(target, dtype=torch.bool))

    # Crop sizes (a negative larger than the inlier image is cut to fit) and the rectangle side grid per item.
    crop_h, crop_w = neg_h.clamp(max=height), neg_w.clamp(max=width)
    short = torch.minimum(crop_h, crop_w)
    # len(range(min_side, short, side_step)) == max(0, ceil((short - min_side) / side_step))
    num_sides = ((short - min_side + side_step - 1) // side_step).clamp(min=0)

    # All random numbers in one draw of fixed shape, so a seed fixes every choice whatever the branches.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((batch, 9 + num_classes_in_mask), generator=generator, dtype=torch.float64, device=gen_device)
    u = u.cpu()
    crop_y = _uniform_index(u[:, 0], neg_h - crop_h + 1)
    crop_x = _uniform_index(u[:, 1], neg_w - crop_w + 1)
    is_rect = u[:, 2] < rect_prob if segments is not None else torch.ones(batch, dtype=torch.bool)
    rect_h = min_side + side_step * _uniform_index(u[:, 3], num_sides)
    rect_w = min_side + side_step * _uniform_index(u[:, 4], num_sides)
    _check_rectangles(is_rect & (num_sides == 0), crop_h, crop_w, neg_h, neg_w, height, width, min_side)
    rect_y = _uniform_index(u[:, 5], crop_h - rect_h + 1)
    rect_x = _uniform_index(u[:, 6], crop_w - rect_w + 1)
    paste_y = _uniform_index(u[:, 7], height - crop_h + 1)
    paste_x = _uniform_index(u[:, 8], width - crop_w + 1)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    crop_h, crop_w, crop_y, crop_x = dev(crop_h), dev(crop_w), dev(crop_y), dev(crop_x)
    rect_h, rect_w, rect_y, rect_x = dev(rect_h), dev(rect_w), dev(rect_y), dev(rect_x)
    paste_y, paste_x, is_rect = dev(paste_y), dev(paste_x), dev(is_rect)

    # For every output pixel: its coordinates in the crop and in the (padded) negative.
    local_y = torch.arange(height, device=device)[None, :] - paste_y[:, None]  # (N, H)
    local_x = torch.arange(width, device=device)[None, :] - paste_x[:, None]  # (N, W)
    inside = ((local_y >= 0) & (local_y < crop_h[:, None]))[:, :, None] & (
        (local_x >= 0) & (local_x < crop_w[:, None])
    )[:, None, :]
    src_y = (local_y + crop_y[:, None]).clamp(0, neg.shape[-2] - 1)
    src_x = (local_x + crop_x[:, None]).clamp(0, neg.shape[-1] - 1)

    in_rect = ((local_y >= rect_y[:, None]) & (local_y < (rect_y + rect_h)[:, None]))[:, :, None] & (
        (local_x >= rect_x[:, None]) & (local_x < (rect_x + rect_w)[:, None])
    )[:, None, :]
    mask = in_rect
    if segments is not None and not bool(is_rect.all()):
        rows = torch.arange(segments.shape[-2], device=device)[None, :]
        cols = torch.arange(segments.shape[-1], device=device)[None, :]
        in_crop = ((rows >= crop_y[:, None]) & (rows < (crop_y + crop_h)[:, None]))[:, :, None] & (
            (cols >= crop_x[:, None]) & (cols < (crop_x + crop_w)[:, None])
        )[:, None, :]
        # Compact the ids of the whole batch to 0..U-1, then mark which ones each item's crop contains.
        ids, compact = torch.unique(segments, return_inverse=True)
        present = torch.zeros((batch, ids.numel()), dtype=torch.int64, device=device)
        present.scatter_add_(1, compact.reshape(batch, -1), in_crop.reshape(batch, -1).long())
        counts, present = present, present > 0
        if max_class_pixels is not None:
            # The released COCO code: ids under the limit; where none is, the least frequent id (the lowest on ties).
            small = present & (counts < max_class_pixels)
            rarest = counts.masked_fill(~present, torch.iinfo(counts.dtype).max).argmin(dim=1, keepdim=True)
            fallback = torch.zeros_like(present).scatter_(1, rarest, True) & present
            present = torch.where(small.any(dim=1, keepdim=True), small, fallback)
        is_rect = is_rect | (present.sum(dim=1) == 0)
        _check_rectangles(is_rect.cpu() & (num_sides == 0), crop_h, crop_w, neg_h, neg_w, height, width, min_side)
        # The r-th present id (0-based) is the number of ids whose running presence count is <= r.
        rank = _uniform_index(u[:, 9:], present.sum(dim=1, keepdim=True).cpu()).to(device)  # (N, k)
        running = present.long().cumsum(dim=1)  # (N, U)
        chosen = (running[:, None, :] <= rank[:, :, None]).sum(dim=-1)  # (N, k) compact ids
        batch_idx = torch.arange(batch, device=device)[:, None, None]
        picked = compact[batch_idx, src_y[:, :, None], src_x[:, None, :]]  # (N, H, W)
        in_classes = (picked[..., None] == chosen[:, None, None, :]).any(dim=-1)
        mask = torch.where(is_rect[:, None, None], in_rect, in_classes)
    mask = mask & inside

    batch_idx = torch.arange(batch, device=device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (N, H, W, C).
    pasted = neg[batch_idx, :, src_y[:, :, None], src_x[:, None, :]].permute(0, 3, 1, 2).to(images.dtype)
    out_images = torch.where(mask[:, None], pasted, images)
    out_target = torch.where(mask, torch.full_like(target, ignore_index), target)
    return PasteResult(out_images, out_target, mask)


class NegativePaster(nn.Module):
    """Module twin of :func:`paste_negatives`: stores the options (and optionally a generator) and pastes per call.

    ``forward(images, target, negatives, negative_segments=None, generator=None) -> PasteResult``; a ``generator``
    passed to ``forward`` overrides the stored one.

    Example:
        >>> paster = NegativePaster(rect_prob=1.0, generator=torch.Generator().manual_seed(0))
        >>> out = paster(torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long), torch.rand(1, 3, 40, 40))
        >>> out.negative_mask.sum().item() > 0
        True
    """

    def __init__(
        self,
        *,
        rect_prob: float = 0.5,
        min_side: int = 16,
        side_step: int = 8,
        num_classes_in_mask: int = 2,
        ignore_index: int = IGNORE_INDEX,
        generator: torch.Generator | None = None,
        max_class_pixels: int | None = None,
    ) -> None:
        super().__init__()
        _check_options(rect_prob, min_side, side_step, num_classes_in_mask, ignore_index)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}."
            )
        self.rect_prob = rect_prob
        self.min_side = min_side
        self.side_step = side_step
        self.num_classes_in_mask = num_classes_in_mask
        self.ignore_index = ignore_index
        self.generator = generator
        if max_class_pixels is not None:
            _check_int("max_class_pixels", max_class_pixels, 1)
        self.max_class_pixels = max_class_pixels

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        negatives: torch.Tensor | Sequence[torch.Tensor],
        negative_segments: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> PasteResult:
        return paste_negatives(
            images,
            target,
            negatives,
            negative_segments,
            generator=generator if generator is not None else self.generator,
            ignore_index=self.ignore_index,
            rect_prob=self.rect_prob,
            min_side=self.min_side,
            side_step=self.side_step,
            num_classes_in_mask=self.num_classes_in_mask,
            max_class_pixels=self.max_class_pixels,
        )

    def extra_repr(self) -> str:
        return (
            f"rect_prob={self.rect_prob}, min_side={self.min_side}, side_step={self.side_step}, "
            f"num_classes_in_mask={self.num_classes_in_mask}, ignore_index={self.ignore_index}"
        )

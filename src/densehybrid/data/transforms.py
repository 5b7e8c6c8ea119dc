"""Training augmentations of the released recipes, on torchvision.transforms.v2, for images and labels together.

* :class:`JitterCrop`: the released ``JitterRandomCrop``: rescale the image by a factor drawn uniformly from
  ``scale`` (bilinear for the image, nearest for the label), pad to at least the crop size with the recipe's
  fill colour and the ignore label, then take a random crop. Images smaller than the crop are thus padded with the
  fill and 255, as the released code does.
* :class:`SegmentationAugment`: :class:`JitterCrop` then a horizontal flip with probability 0.5, on sample dicts
  (``image`` (3, H, W) float in [0, 1], ``target`` (H, W) int64).
* :class:`NegativeCrop`: the released preprocessing of ADE20k negatives: the shorter side resized to ``resize``,
  then a jitter crop (Cityscapes: 192 px, scale 0.5-2, mean fill) or a plain random crop (StreetHazards: 384 px,
  COCO20: 256 px).
* :class:`AugmentedDataset`: applies a transform with torch's RNG seeded per (seed, epoch, index), so augmentation
  is the same whatever the DataLoader workers, the number of processes, or where a run was resumed.

Randomness comes from torch's global RNG (as torchvision's transforms draw it); the wrappers above seed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from densehybrid.labels import IGNORE_INDEX

__all__ = ["AugmentedDataset", "JitterCrop", "NegativeCrop", "SegmentationAugment", "fill_to_unit"]


def fill_to_unit(fill: Sequence[float]) -> tuple[float, float, float]:
    """An RGB fill colour in 0..255 (the released code's convention) as a [0, 1] colour for float images."""
    values = tuple(float(v) for v in fill)
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"Expected `fill` to be three values in [0, 255], but got {list(fill)}.")
    return tuple(v / 255 for v in values)  # type: ignore[return-value]


def _check_scale(scale: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in scale)
    if not 0 < low <= high:
        raise ValueError(f"Expected `scale` to be (low, high) with 0 < low <= high, but got {list(scale)}.")
    return low, high


class JitterCrop:
    """Random rescale by ``U(scale)``, pad with ``fill``/``ignore_index`` up to ``size``, random ``size`` crop.

    Args:
        size: crop side in pixels (square crops, as released); 0: no crop (whole images, as DiCNet trains).
        scale: range of the rescale factor (``(1, 1)``: no rescale).
        fill: RGB pad colour in 0..255 (e.g. the dataset mean, (73, 83, 72) for Cityscapes).
        ignore_index: pad value of the label.

    Call: ``(image (3, H, W) float, target (H, W) int) -> (image (3, size, size), target (size, size))``.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.5, 2.0),
        fill: Sequence[float] = (0, 0, 0),
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if int(size) < 0:
            raise ValueError(f"Expected `size` to be >= 0 (0: no crop), but got {size}.")
        self.size = int(size)
        self.scale = _check_scale(scale)
        self.fill = fill_to_unit(fill)
        self.ignore_index = int(ignore_index)
        self.crop = (
            v2.RandomCrop(
                self.size, pad_if_needed=True, fill={tv_tensors.Image: self.fill, tv_tensors.Mask: self.ignore_index}
            )
            if self.size
            else None
        )

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = tv_tensors.Image(image), tv_tensors.Mask(target)
        low, high = self.scale
        if (low, high) != (1.0, 1.0):
            factor = low + (high - low) * float(torch.rand(()))
            height, width = image.shape[-2:]
            new = [max(1, round(height * factor)), max(1, round(width * factor))]
            image = TF.resize(image, new, interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
            target = TF.resize(target, new, interpolation=v2.InterpolationMode.NEAREST)
        if self.crop is not None:
            image, target = self.crop(image, target)
        return image.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"JitterCrop(size={self.size}, scale={self.scale}, fill={self.fill}, ignore_index={self.ignore_index})"


class SegmentationAugment:
    """The released training augmentation of the inlier images: :class:`JitterCrop`, then a horizontal flip (p 0.5).

    Works on sample dicts (``image``, ``target``; other keys are kept) and returns a new dict.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.5, 2.0),
        fill: Sequence[float] = (0, 0, 0),
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop = JitterCrop(size, scale, fill, ignore_index)
        self.flip = v2.RandomHorizontalFlip(0.5) if flip else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, target = self.crop(sample["image"], sample["target"])
        if self.flip is not None:
            image, target = self.flip(tv_tensors.Image(image), tv_tensors.Mask(target))
            image, target = image.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)
        return {**sample, "image": image.contiguous(), "target": target.long().contiguous()}

    def __repr__(self) -> str:
        return f"SegmentationAugment({self.crop!r}, flip={self.flip is not None})"


class NegativeCrop:
    """The released preprocessing of a negative image and its class map before pasting.

    Args:
        size: side of the square negative crop (192 for Cityscapes, 384 for StreetHazards, 256 for COCO20).
        resize: the shorter side is first resized to this (bilinear image, nearest classes); 0: no resize.
        scale: jitter of the crop (``(0.5, 2)`` for Cityscapes; ``(1, 1)``: a plain random crop).
        fill: RGB pad colour in 0..255 where the (rescaled) negative is smaller than the crop.
        pad_label: class id of padded pixels in the class map.

    Call: ``(image (3, H, W) float, segments (H, W) int) -> (image (3, size, size), segments (size, size))``.
    """

    def __init__(
        self,
        size: int,
        resize: int = 0,
        scale: Sequence[float] = (1.0, 1.0),
        fill: Sequence[float] = (0, 0, 0),
        pad_label: int = IGNORE_INDEX,
    ) -> None:
        if int(resize) < 0:
            raise ValueError(f"Expected `resize` to be >= 0, but got {resize}.")
        self.resize = int(resize)
        self.crop = JitterCrop(size, scale, fill, pad_label)

    def __call__(self, image: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resize:
            image = TF.resize(image, self.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
            segments = TF.resize(segments[None], self.resize, interpolation=v2.InterpolationMode.NEAREST)[0]
        return self.crop(image, segments)

    def __repr__(self) -> str:
        return f"NegativeCrop(resize={self.resize}, crop={self.crop!r})"


class AugmentedDataset(Dataset):
    """``transform(dataset[i])`` with torch's global RNG seeded from ``(seed, epoch, i)`` and restored afterwards.

    The training loop calls :meth:`set_epoch` before each pass, so each epoch augments differently while a resumed
    run, another ``num_workers`` or another world size augments every sample exactly as an uninterrupted run.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[dict], dict], seed: int = 0) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if not isinstance(sample, dict):
            image, target = sample[0], sample[1]
            sample = {"image": image, "target": target}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)) % 2**63)
            return self.transform(sample)

    def __getattr__(self, name: str) -> Any:
        # num_classes, class_names, frames, ... of the wrapped dataset
        if name in ("dataset", "transform", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

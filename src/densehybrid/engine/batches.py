"""Turning dataset samples into batches: unpacking, collation and resumable ordering."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


def unpack_sample(sample: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image, target) from a dataset sample: a dict with ``image``/``target`` keys or an (image, target) tuple."""
    if isinstance(sample, dict):
        if "image" not in sample:
            raise ValueError(f"Expected dataset samples to have an 'image' key, but got keys {sorted(sample)}.")
        return sample["image"], sample.get("target")
    if isinstance(sample, (tuple, list)) and len(sample) >= 1:
        return sample[0], (sample[1] if len(sample) > 1 else None)
    raise TypeError(f"Expected a dataset sample to be a dict or a tuple, but got {type(sample).__name__}.")


def collate(samples: Sequence[Any]) -> dict[str, Any]:
    """Stack samples into a batch dict, keeping every key the samples share (tensors stacked, others listed)."""
    first = samples[0]
    if not isinstance(first, dict):
        images, targets = zip(*(unpack_sample(s) for s in samples))
        batch = {"image": torch.stack(images)}
        if targets[0] is not None:
            batch["target"] = torch.stack(targets)
        return batch
    batch: dict[str, Any] = {}
    for key in first:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            shapes = sorted({tuple(v.shape) for v in values})
            if len(shapes) > 1:
                raise ValueError(
                    f"Expected the samples of a batch to share one size, but their `{key}` tensors have shapes "
                    f"{shapes[0]} and {shapes[1]}: crop them to one size (recipes: augment.crop) or use a batch size of 1."
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through, so a resumed run sees the same batches.

    Args:
        length: dataset length.
        seed: base seed; epoch ``e`` uses ``seed * 100_003 + e``.
        epoch: which epoch's permutation to produce.
        start: number of leading indices to skip (already consumed before an interruption).
    """

    def __init__(self, length: int, seed: int, epoch: int, start: int = 0) -> None:
        self.length, self.seed, self.epoch, self.start = length, seed, epoch, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return max(self.length - self.start, 0)

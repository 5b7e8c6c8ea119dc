"""Tiny datasets and models shared by the tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

NUM_CLASSES = 4


class TinySegmentation(Dataset):
    """Images whose class is readable from colour: class k paints a region with a fixed colour plus noise."""

    def __init__(self, n: int = 16, size: tuple[int, int] = (32, 48), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        palette = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.8, 0.8, 0.2]])
        h, w = size
        self.images, self.targets = [], []
        for _ in range(n):
            target = torch.zeros(h, w, dtype=torch.int64)
            cut = int(torch.randint(h // 4, 3 * h // 4, (1,), generator=g))
            target[cut:] = 1
            col = int(torch.randint(w // 4, 3 * w // 4, (1,), generator=g))
            target[: cut // 2, col:] = 2
            target[cut + 2 :, : col // 2] = 3
            target[0, 0] = 255  # a void pixel
            image = palette[target.clamp(max=NUM_CLASSES - 1)].permute(2, 0, 1)
            image = (image + 0.1 * torch.randn(image.shape, generator=g)).clamp(0, 1)
            self.images.append(image)
            self.targets.append(target)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i]}


class TinyNegatives(Dataset):
    """Random-texture negatives with a two-segment map."""

    def __init__(self, n: int = 4, size: int = 24, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            image = torch.rand(3, size, size, generator=g)
            segments = torch.zeros(size, size, dtype=torch.int64)
            segments[:, size // 2 :] = 1
            self.items.append((image, segments))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def tiny_model(num_classes: int = NUM_CLASSES):
    """A small, fast DenseHybrid model (MobileNetV3 ladder, 32 decoder channels), seeded."""
    from densehybrid.models import create_model

    torch.manual_seed(0)
    return create_model("ladder_mobilenetv3", num_classes=num_classes, decoder_channels=32)

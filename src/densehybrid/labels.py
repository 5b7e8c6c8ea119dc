"""Label encodings used across the library.

Two encodings meet at every dataset boundary:

* **Segmentation targets** (training, closed-set and open-set evaluation): class ids ``0..K-1``, the
  "unknown"/anomaly class ``K`` where a benchmark labels anomalies, and :data:`IGNORE_INDEX` (255) for void.
* **Binary anomaly targets** (pixel-level anomaly metrics): :data:`INLIER` = 0, :data:`ANOMALY` = 1 and
  :data:`IGNORE_INDEX` = 255, the encoding of the SegmentMeIfYouCan and Fishyscapes label files.

Dataset loaders convert their on-disk encoding to these once; nothing downstream guesses.
"""

from __future__ import annotations

import numpy as np
import torch

INLIER = 0
ANOMALY = 1
IGNORE_INDEX = 255

#: Cityscapes train-id colours: the first colours of the default palette (no cyan, the unknown colour).
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


def anomaly_target(target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Binary anomaly target from a segmentation target whose anomaly class is ``num_classes``.

    Args:
        target: (N, H, W) int64 class ids in ``[0, K]`` or ``ignore_index``.
        num_classes: K, the number of known classes; id K marks anomalies.
        ignore_index: void id, kept as :data:`IGNORE_INDEX`.

    Returns:
        (N, H, W) int64 with values in {INLIER, ANOMALY, IGNORE_INDEX}.
    """
    out = torch.zeros_like(target)
    out[target == num_classes] = ANOMALY
    out[target == ignore_index] = IGNORE_INDEX
    return out


def default_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 class colours: the Cityscapes colours first, then seeded random colours away from cyan."""
    colours = list(CITYSCAPES_COLOURS[:num_classes])
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if abs(colour[0] - 0) + abs(colour[1] - 255) + abs(colour[2] - 255) > 120:  # keep clear of the unknown cyan
            colours.append(colour)
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)

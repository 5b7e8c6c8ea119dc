"""Label encodings used across the library.

Two encodings meet at every dataset boundary:

* **Segmentation targets** (training, closed-set and open-set evaluation): class ids ``0..K-1``, the
  "unknown"/anomaly class ``K`` where a benchmark labels anomalies, and :data:`IGNORE_INDEX` (255) for void.
* **Binary anomaly targets** (pixel-level anomaly metrics): :data:`INLIER` = 0, :data:`ANOMALY` = 1 and
  :data:`IGNORE_INDEX` = 255, the encoding of the SegmentMeIfYouCan and Fishyscapes label files.

Dataset loaders convert their on-disk encoding to these once; nothing downstream guesses.
"""

from __future__ import annotations

import torch

INLIER = 0
ANOMALY = 1
IGNORE_INDEX = 255


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

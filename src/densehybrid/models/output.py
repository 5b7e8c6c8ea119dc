"""The output every DenseHybrid model returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class HybridOutput(NamedTuple):
    """Dense outputs of a DenseHybrid model, both at the requested output size.

    Attributes:
        logits: (N, K, H, W) closed-set class logits s(x); ``logsumexp`` over K is ln p̂(x) + ln Z.
        ood_logits: (N, 2, H, W) dataset-posterior logits g(x); channel 1 is "outlier".
    """

    logits: torch.Tensor
    ood_logits: torch.Tensor

"""Spread order keys of the pooled histogram: order, exact decoding, and 1e-4 agreement on probabilities."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from densehybrid.metrics import AnomalyMetrics
from densehybrid.metrics._keys import SPREAD_HIGH_KEY, SPREAD_INF_KEY, spread_keys, spread_keys_to_float


def _floats() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    random = bits.view(torch.float32)
    p = torch.rand(1 << 14, generator=g)
    f32 = np.float32
    special = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, float("inf"), -float("inf"), 2.0**83, 1e-45, 3.4e38, -3.4e38]
    special += [np.nextafter(f32(a), f32(b)) for a, b in ((1, 0), (0.5, 0), (0.5, 1), (1, 2), (2.0**83, 0))]
    values = torch.cat([random[~random.isnan()], torch.tensor(special, dtype=torch.float32), p, 1 - p * 1e-6, -p])
    return values.sort().values


def test_spread_keys_keep_the_order_and_decode_exactly():
    values = _floats()
    keys = spread_keys(values)
    assert keys.dtype == torch.int32 and bool((keys[1:] >= keys[:-1]).all())
    shared = (keys[1:] == keys[:-1]) & (values[1:] != values[:-1])
    # Distinct scores share a key only from 2**83 on, and never with an infinity.
    assert bool((keys[1:][shared].abs() >= SPREAD_HIGH_KEY).all())
    assert not bool((keys[1:][shared].abs() == SPREAD_INF_KEY).any())
    decoded = spread_keys_to_float(keys).to(torch.float32)
    assert bool((decoded <= values).all()) and bool((spread_keys(decoded) == keys).all())
    below = keys.abs() < SPREAD_HIGH_KEY
    assert torch.equal(decoded[below], values[below])
    # Probabilities 5e-6 apart near 1 land 2**24-bin histogram bins apart (they shared one with plain float keys).
    near_one = spread_keys(torch.tensor([0.99999, 0.999995])) >> 8
    assert int(near_one[1] - near_one[0]) > 1000


def _sklearn(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return average_precision_score(labels, scores), roc_auc_score(labels, scores), fpr[np.argmax(tpr >= 0.95)]


@pytest.mark.parametrize(
    "transform",
    [
        lambda x: torch.sigmoid(x + 7),  # probabilities crowded near 1
        lambda x: torch.sigmoid(x - 9),  # near 0
        lambda x: -torch.sigmoid(-x - 7),  # negated probabilities near -1 (e.g. minus max-softmax)
        lambda x: torch.softmax(torch.stack([x, -x, 0 * x]), 0)[0],  # softmax outputs
    ],
    ids=["near-1", "near-0", "near-minus-1", "softmax"],
)
def test_pooled_metrics_within_1e4_of_sklearn_on_probabilities(transform):
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(1 << 17, generator=g) < 0.1).long()
    logits = torch.randn(1 << 17, generator=g) * 2 + 3 * labels
    scores = transform(logits).float()
    metric = AnomalyMetrics()
    metric.update(scores.view(1, 256, -1), labels.view(1, 256, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no error-bound warning: the bounds are within 1e-4
        result = metric.compute()
    ap, auroc, fpr95 = _sklearn(scores.numpy(), labels.numpy())
    assert abs(result["ap"] - ap) < 1e-4 and abs(result["auroc"] - auroc) < 1e-4 and abs(result["fpr95"] - fpr95) < 1e-4
    assert max(result["ap_error_bound"], result["auroc_error_bound"], result["fpr95_error_bound"]) <= 1e-4


def test_the_warning_stays_where_the_bound_exceeds_1e4():
    g = torch.Generator().manual_seed(2)
    labels = (torch.rand(1 << 15, generator=g) < 0.1).long()
    scores = 1000 + 1e-3 * (torch.randn(1 << 15, generator=g) + 2 * labels)  # a large offset: crowded float32 values
    metric = AnomalyMetrics()
    metric.update(scores.view(1, 128, -1), labels.view(1, 128, -1))
    with pytest.warns(UserWarning, match="may differ from the exact ones"):
        result = metric.compute()
    assert result["ap_error_bound"] > 1e-4 and not result["exact"]

"""Pooled pixel-level anomaly metrics with a fixed-size state: :class:`AnomalyMetrics`.

Protocol ``pooled``: all evaluated pixels of all images form one ranking (Fishyscapes, SegmentMeIfYouCan pixel
level, pytorch-ood ``OODSegmentationMetrics``); images without anomalies count. Exact pooled metrics need every
score in memory (sorting 2*10^8 pixels takes several GB), so the state here is a histogram of anomaly and inlier
pixels over ``2**bits`` bins of order-preserving float keys (:mod:`densehybrid.metrics._keys`):

* memory: ``2 * 2**bits`` int64 counts (256 MiB for the default ``bits=24``), independent of the number of pixels;
* resolution: a bin spans ``2**(32 - bits)`` consecutive float32 values, a relative score width of at most
  ``2**(9 - bits)`` (3.05e-5 for ``bits=24``) at every magnitude, from subnormals to 3.4e38;
* exactness: equal scores share a bin, so ties are exact; float16 (``bits >= 19``) and bfloat16 (``bits >= 16``)
  scores are exact; otherwise the only error is the unknown order of distinct scores that share a bin, and
  :meth:`AnomalyMetrics.compute` reports a guaranteed bound on it for AP, AUROC and FPR95.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics import _curve
from densehybrid.metrics._base import SumStateMetric, zeros
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index
from densehybrid.metrics._keys import MANTISSA_BITS, bin_lower_edges, order_keys
from densehybrid.metrics.functional import warn_degenerate

# Pixels per vectorised step on CPU: small enough that the temporaries of one step stay in the L2 cache.
_CPU_CHUNK = 1 << 18
DEFAULT_BITS = 24
MIN_BITS, MAX_BITS = 12, 28


class AnomalyMetrics(SumStateMetric):
    r"""Streaming AP, AUROC, FPR95 and thresholds over all pixels of a dataset (protocol ``pooled``).

    ``update`` adds a batch to a histogram of (score bin, label) counts; ``compute`` walks the bins from the highest
    score down, exactly as scikit-learn walks distinct thresholds, so every metric is the exact metric of the
    scores rounded down to their bin's lower edge:

    .. math::
        \mathrm{AP} = \sum_b \frac{p_b}{P} \frac{TP_b}{TP_b + FP_b},\qquad
        \mathrm{AUROC} = \frac{1}{PN}\sum_b n_b \frac{TP_{b-1} + TP_b}{2},\qquad
        \mathrm{FPR95} = \frac{FP_{b^*}}{N},\ b^* = \min\{b: TP_b \ge 0.95 P\}

    with ``p_b, n_b`` the anomaly/inlier pixels of bin ``b`` and ``TP_b, FP_b`` the cumulative counts down to it.

    Args:
        bits: key bits per bin, in [12, 28]; memory is ``2**(bits + 4)`` bytes. The default 24 keeps AP, AUROC and
            FPR95 within 1e-4 of the exact values on typical float32 scores (see ``docs/metrics.md``).
        ignore_index: target id of pixels that are not evaluated (counted in ``num_ignored``), or None.
        validate_args: scan every batch for NaN scores and ids outside {0, 1, ``ignore_index``}.
        device: device of the state; None allocates it on the device of the first :meth:`update` (later batches
            are moved there).

    Example:
        >>> metric = AnomalyMetrics()
        >>> metric.update(torch.tensor([[[0.9, 0.8], [0.7, 0.1]]]), torch.tensor([[[1, 0], [1, 0]]]))
        >>> result = metric.compute()
        >>> round(result["ap"], 4), result["auroc"], result["fpr95"]
        (0.8333, 0.75, 0.5)

    References:
        Fishyscapes (Blum et al., IJCV 2021) and SegmentMeIfYouCan (Chan et al., NeurIPS 2021) pool all pixels;
        scikit-learn ``average_precision_score``/``roc_auc_score`` define AP and AUROC.
    """

    protocol = "pooled"

    def __init__(
        self,
        *,
        bits: int = DEFAULT_BITS,
        ignore_index: int | None = IGNORE_INDEX,
        validate_args: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"Expected `bits` to be an int in [{MIN_BITS}, {MAX_BITS}], but got {bits!r}.")
        check_ignore_index(ignore_index)
        self.bits = bits
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        super().__init__(device)

    def _config(self) -> tuple:
        return (self.bits, self.ignore_index)

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            # [2 * bin + label] for label 0 (inlier) / 1 (anomaly); the last slot counts ignored pixels.
            "hist": zeros((2 << self.bits) + 1, torch.int64, device),
            # Updates whose dtype is finer than a bin: the metrics may then differ from the exact ones.
            "inexact_updates": torch.zeros((), dtype=torch.int64, device=device),
        }

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            scores: (N, H, W) floating anomaly scores, higher is more anomalous (float64 is rounded to float32).
            target: (N, H, W) integer ids: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.

        Raises:
            ValueError: mismatched shapes, NaN scores or ids outside the encoding.
        """
        check_anomaly_inputs(scores, target, self.ignore_index, batched=True, validate_args=self.validate_args)
        state = self._ensure_state(scores.device)
        hist = state["hist"]
        if MANTISSA_BITS[scores.dtype] > self.bits - 9:
            state["inexact_updates"] += 1
        flat_scores = scores.to(hist.device).reshape(-1)
        flat_target = target.to(hist.device).reshape(-1)
        total = flat_scores.numel()
        step = _CPU_CHUNK if hist.device.type == "cpu" else max(total, 1)
        shift, offset, dump = 32 - self.bits, 1 << (self.bits - 1), 2 << self.bits
        ones = torch.ones(1, dtype=torch.int64, device=hist.device)
        for start in range(0, total, step):
            index = order_keys(flat_scores[start : start + step])
            index >>= shift  # floor: the bin of each key
            index += offset  # bins from 0
            index *= 2
            labels = flat_target[start : start + step].to(torch.int32)
            index += labels
            if self.ignore_index is not None:
                index.masked_fill_(labels == self.ignore_index, dump)
            hist.index_add_(0, index, ones.expand(index.numel()))

    def _curve(self) -> tuple[_curve.Curve, int]:
        if self._state is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return _curve.Curve(empty, empty, empty.to(torch.float64)), 0
        hist = self._state["hist"]
        counts = hist[:-1].view(-1, 2)
        # nonzero() on the flat counts avoids materialising a (2**bits,) temporary; bins come out ascending.
        occupied = torch.unique_consecutive(hist[:-1].nonzero().squeeze(1) >> 1).flip(0)  # highest scores first
        grouped = counts[occupied]
        curve = _curve.Curve(grouped[:, 1], grouped[:, 0], bin_lower_edges(occupied, self.bits))
        return curve, int(hist[-1])

    def compute(self) -> dict[str, Any]:
        """Metrics over everything added so far.

        Returns:
            A dict with

            * ``ap``, ``auroc``, ``fpr95``: average precision, area under the ROC curve, FPR at the first operating
              point with TPR >= 0.95;
            * ``threshold_at_tpr95``: lower edge of that point's bin; ``score >= threshold`` reproduces its TPR/FPR on
              the evaluated data (exact score value when ``exact``);
            * ``best_f1``, ``best_f1_threshold``: the highest pixel F1 and its threshold;
            * ``num_anomaly``, ``num_inlier``, ``num_ignored``: pixel counts;
            * ``protocol`` ("pooled"), ``bits``, ``exact`` (True when every bin held a single distinct score value
              by construction: float16/bfloat16 inputs);
            * ``ap_error_bound``, ``auroc_error_bound``, ``fpr95_error_bound``: guaranteed upper bounds on the
              absolute difference to the exact metrics of the unrounded scores (0 when ``exact``; conservative for
              bins that hold a single tied value).

            Undefined metrics are NaN, with a ``UserWarning``: all of them without anomaly pixels; AUROC and FPR95
            without inlier pixels.
        """
        curve, num_ignored = self._curve()
        num_pos, num_neg = curve.num_pos, curve.num_neg
        exact = self._state is not None and int(self._state["inexact_updates"]) == 0
        result: dict[str, Any] = {
            "protocol": self.protocol,
            "ap": math.nan,
            "auroc": math.nan,
            "fpr95": math.nan,
            "threshold_at_tpr95": math.nan,
            "best_f1": math.nan,
            "best_f1_threshold": math.nan,
            "num_anomaly": num_pos,
            "num_inlier": num_neg,
            "num_ignored": num_ignored,
            "bits": self.bits,
            "exact": exact,
            "ap_error_bound": math.nan,
            "auroc_error_bound": math.nan,
            "fpr95_error_bound": math.nan,
        }
        if warn_degenerate(num_pos, num_neg, False, "every pooled anomaly metric"):
            return result
        ap = _curve.average_precision(curve)
        tpr_index = _curve.index_at_tpr(curve, 0.95)
        f1_index, best_f1 = _curve.best_f1_index(curve)
        ap_low, ap_high = _curve.average_precision_bounds(curve)
        result.update(
            ap=ap,
            threshold_at_tpr95=_curve.threshold_at_index(curve, tpr_index),
            best_f1=best_f1,
            best_f1_threshold=_curve.threshold_at_index(curve, f1_index),
            ap_error_bound=0.0 if exact else max(ap_high - ap, ap - ap_low, 0.0),
        )
        if warn_degenerate(num_pos, num_neg, True, "AUROC and FPR95"):
            return result
        pos, neg = curve.pos.to(torch.float64), curve.neg.to(torch.float64)
        result.update(
            auroc=_curve.auroc(curve),
            fpr95=_curve.fpr_at_index(curve, tpr_index),
            # Ties inside a bin count 1/2; the true order inside the bin can move each pair by 1/2.
            auroc_error_bound=0.0 if exact else float((pos * neg).sum() / (2 * num_pos * num_neg)),
            # The exact crossing lies inside bin b*: the FPR is off by at most that bin's inliers.
            fpr95_error_bound=0.0 if exact else float(curve.neg[tpr_index]) / num_neg,
        )
        return result

"""Pooled pixel-level anomaly metrics with a fixed-size state: :class:`AnomalyMetrics`.

Protocol ``pooled``: all evaluated pixels of all images form one ranking (Fishyscapes, SegmentMeIfYouCan pixel
level, pytorch-ood ``OODSegmentationMetrics``); images without anomalies count. Exact pooled metrics need every
score in memory (sorting 2*10^8 pixels takes several GB), so the state here is a histogram of anomaly and inlier
pixels over ``2**bits`` bins of order-preserving float keys (:mod:`densehybrid.metrics._keys`), plus the smallest
and largest key seen in each bin:

* memory: ``2 * 2**bits`` int64 counts and ``2 * 2**bits`` int32 key offsets (384 MiB of address space for the
  default ``bits=24``; on CPU only the pages of occupied bins become resident), independent of the pixel count;
* resolution: a bin spans ``2**(32 - bits)`` consecutive float32 values, a relative score width of at most
  ``2**(9 - bits)`` (3.05e-5 for ``bits=24``) at every magnitude from 1e-38 to 3.4e38 (subnormals below
  ``2**(32 - bits - 149)``, 3.6e-43 for ``bits=24``, share the bin of zero);
* exactness: equal scores share a bin, so ties are exact, and a bin that held a single distinct score is exact;
  float16 (``bits >= 19``) and bfloat16 (``bits >= 16``) scores are therefore always exact. Otherwise the only
  error is the unknown order of distinct scores inside a bin; :meth:`AnomalyMetrics.compute` reports a guaranteed
  bound on it for AP, AUROC and FPR95 and whether the result is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics import _curve
from densehybrid.metrics._base import SumStateMetric, zeros
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index
from densehybrid.metrics._keys import keys_to_float, order_keys
from densehybrid.metrics.functional import warn_degenerate

# Pixels per vectorised step on CPU: small enough that the temporaries of one step stay in the L2 cache.
_CPU_CHUNK = 1 << 18
DEFAULT_BITS = 24
MIN_BITS, MAX_BITS = 12, 28


class AnomalyMetrics(SumStateMetric):
    r"""Streaming AP, AUROC, FPR95 and thresholds over all pixels of a dataset (protocol ``pooled``).

    ``update`` adds a batch to a histogram of (score bin, label) counts; ``compute`` walks the bins from the highest
    score down, exactly as scikit-learn walks distinct thresholds, so every metric is the exact metric of the
    scores rounded down to the smallest score of their bin:

    .. math::
        \mathrm{AP} = \sum_b \frac{p_b}{P} \frac{TP_b}{TP_b + FP_b},\qquad
        \mathrm{AUROC} = \frac{1}{PN}\sum_b n_b \frac{TP_{b-1} + TP_b}{2},\qquad
        \mathrm{FPR95} = \frac{FP_{b^*}}{N},\ b^* = \min\{b: TP_b \ge 0.95 P\}

    with ``p_b, n_b`` the anomaly/inlier pixels of bin ``b`` and ``TP_b, FP_b`` the cumulative counts down to it.

    Args:
        bits: key bits per bin, in [12, 28]. The default 24 keeps AP, AUROC and FPR95 within 1e-4 of the exact
            values for scores that are not crowded into a narrow relative range (see ``docs/metrics.md``).
        ignore_index: target id of pixels that are not evaluated (counted in ``num_ignored``), or None.
        validate_args: scan every batch for NaN scores and ids outside {0, 1, ``ignore_index``}.
        device: device of the state; None allocates it on the device of the first :meth:`update` (later batches
            are moved there).

    Example:
        >>> metric = AnomalyMetrics()
        >>> metric.update(torch.tensor([[[0.9, 0.8], [0.7, 0.1]]]), torch.tensor([[[1, 0], [1, 0]]]))
        >>> result = metric.compute()
        >>> round(result["ap"], 4), result["auroc"], result["fpr95"], result["exact"]
        (0.8333, 0.75, 0.5, True)

    References:
        Fishyscapes (Blum et al., IJCV 2021) and SegmentMeIfYouCan (Chan et al., NeurIPS 2021) pool all pixels;
        scikit-learn ``average_precision_score``/``roc_auc_score`` define AP and AUROC.
    """

    protocol = "pooled"
    _max_states = ("high", "low")

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
        size = 1 << self.bits
        return {
            # [2 * bin + label] for label 0 (inlier) / 1 (anomaly); the last slot counts ignored pixels.
            "hist": zeros(2 * size + 1, torch.int64, device),
            # Per bin, 1 + the largest and span - the smallest key offset inside the bin (0: empty), so that both
            # combine by maximum and start from zero; the last slot takes ignored pixels.
            "high": zeros(size + 1, torch.int32, device),
            "low": zeros(size + 1, torch.int32, device),
        }

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            scores: (N, H, W) floating anomaly scores, higher is more anomalous (float64 is rounded to float32).
            target: (N, H, W) integer ids: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.

        Raises:
            ValueError: mismatched shapes, NaN scores or ids outside the encoding (the state is left unchanged).
        """
        check_anomaly_inputs(scores, target, self.ignore_index, batched=True, validate_args=self.validate_args)
        state = self._ensure_state(scores.device)
        hist, high, low = state["hist"], state["high"], state["low"]
        flat_scores = scores.to(hist.device).reshape(-1)
        flat_target = target.to(hist.device).reshape(-1)
        total = flat_scores.numel()
        step = _CPU_CHUNK if hist.device.type == "cpu" else max(total, 1)
        shift, span, size = 32 - self.bits, 1 << (32 - self.bits), 1 << self.bits
        ones = torch.ones(min(step, total), dtype=torch.int64, device=hist.device)
        for start in range(0, total, step):
            keys = order_keys(flat_scores[start : start + step])
            offsets = keys & (span - 1)  # position of the key inside its bin
            bins = (keys >> shift).to(torch.int64)  # arithmetic shift: floor, so negative keys keep their order
            bins += size // 2
            labels = flat_target[start : start + step].to(torch.int64)
            index = bins * 2 + labels
            if self.ignore_index is not None:
                ignored = labels == self.ignore_index
                index.masked_fill_(ignored, 2 * size)
                bins.masked_fill_(ignored, size)
            hist.scatter_add_(0, index, ones[: index.numel()])
            high.scatter_reduce_(0, bins, offsets + 1, "amax")
            low.scatter_reduce_(0, bins, span - offsets, "amax")

    def _curve(self) -> tuple[_curve.Curve, torch.Tensor, int]:
        """Grouped counts of the occupied bins (highest first), which of them held several scores, ignored count."""
        if self._state is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return _curve.Curve(empty, empty, empty.to(torch.float64)), empty.bool(), 0
        hist, high, low = self._state["hist"], self._state["high"], self._state["low"]
        counts = hist[:-1].view(-1, 2)
        # nonzero() on the flat counts avoids materialising a (2**bits,) temporary; bins come out ascending.
        occupied = torch.unique_consecutive(hist[:-1].nonzero().squeeze(1) >> 1).flip(0)
        grouped = counts[occupied]
        span = 1 << (32 - self.bits)
        smallest = span - low[occupied].to(torch.int64)
        largest = high[occupied].to(torch.int64) - 1
        start_keys = (occupied - (1 << (self.bits - 1))) << (32 - self.bits)
        curve = _curve.Curve(grouped[:, 1], grouped[:, 0], keys_to_float(start_keys + smallest))
        return curve, largest > smallest, int(hist[-1])

    def compute(self) -> dict[str, Any]:
        """Metrics over everything added so far.

        Returns:
            A dict with

            * ``ap``, ``auroc``, ``fpr95``: average precision, area under the ROC curve, FPR at the first operating
              point with TPR >= 0.95;
            * ``threshold_at_tpr95``: the smallest evaluated score of that point's bin; ``score >= threshold``
              reproduces its TPR and FPR on the evaluated data;
            * ``best_f1``, ``best_f1_threshold``: the highest pixel F1 and its threshold (same convention);
            * ``num_anomaly``, ``num_inlier``, ``num_ignored``: pixel counts;
            * ``protocol`` ("pooled") and ``bits``;
            * ``exact``: True when no bin mixed several distinct scores in a way that could change a metric, i.e. the
              values equal the exact (sorted) metrics;
            * ``ap_error_bound``, ``auroc_error_bound``, ``fpr95_error_bound``: guaranteed upper bounds on the
              absolute difference to the exact metrics (0 when ``exact``).

            Undefined metrics are NaN, with a ``UserWarning``: all of them without anomaly pixels; AUROC and FPR95
            without inlier pixels.
        """
        curve, multi, num_ignored = self._curve()
        num_pos, num_neg = curve.num_pos, curve.num_neg
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
            "exact": False,
            "ap_error_bound": math.nan,
            "auroc_error_bound": math.nan,
            "fpr95_error_bound": math.nan,
        }
        if warn_degenerate(num_pos, num_neg, False, "every pooled anomaly metric"):
            return result
        _, fps = curve.cumulative()
        # A multi-score bin matters for AP when it holds anomalies and inliers rank at or above it; for AUROC and
        # FPR95 when it holds both classes.
        ap_uncertain = multi & (curve.pos > 0) & (fps > 0)
        pair_uncertain = multi & (curve.pos > 0) & (curve.neg > 0)
        ap = _curve.average_precision(curve)
        tpr_index = _curve.index_at_tpr(curve, 0.95)
        f1_index, best_f1 = _curve.best_f1_index(curve)
        ap_low, ap_high = _curve.average_precision_bounds(curve, ap_uncertain)
        exact = not bool(ap_uncertain.any() or pair_uncertain.any())
        result.update(
            ap=ap,
            threshold_at_tpr95=_curve.threshold_at_index(curve, tpr_index),
            best_f1=best_f1,
            best_f1_threshold=_curve.threshold_at_index(curve, f1_index),
            exact=exact,
            ap_error_bound=0.0 if exact else max(ap_high - ap, ap - ap_low, 0.0),
        )
        if warn_degenerate(num_pos, num_neg, True, "AUROC and FPR95"):
            return result
        pairs = (curve.pos.to(torch.float64) * curve.neg.to(torch.float64))[pair_uncertain].sum()
        crossing_uncertain = bool(pair_uncertain[tpr_index])
        result.update(
            auroc=_curve.auroc(curve),
            fpr95=_curve.fpr_at_index(curve, tpr_index),
            # Ties inside a bin count 1/2; the true order inside the bin can move each pair by 1/2.
            auroc_error_bound=float(pairs / (2 * num_pos * num_neg)),
            # The exact crossing lies inside bin b*: the FPR is off by at most that bin's inliers.
            fpr95_error_bound=float(curve.neg[tpr_index]) / num_neg if crossing_uncertain else 0.0,
        )
        return result

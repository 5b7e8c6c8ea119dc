"""Pooled pixel-level anomaly metrics with a fixed-size state: :class:`AnomalyMetrics`.

Protocol ``pooled``: all evaluated pixels of all images form one ranking (Fishyscapes, SegmentMeIfYouCan pixel
level, pytorch-ood ``OODSegmentationMetrics``); images without anomalies count. Exact pooled metrics need every
score in memory (sorting 2*10^8 pixels takes several GB), so the state here is a histogram of anomaly and inlier
pixels over ``2**bits`` bins of order-preserving float keys (:mod:`densehybrid.metrics._keys`), plus the smallest
and largest key seen in each bin:

* memory: per bin two int64 counts plus four int32 words updated per pixel (two counts and the key range, side by
  side so that one cache line serves a pixel), 512 MiB of address space for the default ``bits=24``; on CPU only
  the pages of occupied bins become resident. Independent of the pixel count;
* resolution: a bin spans ``2**(32 - bits)`` consecutive spread keys (:func:`~densehybrid.metrics._keys.spread_keys`),
  a relative score width of at most ``2**(9 - bits)`` (3.05e-5 for ``bits=24``) at every magnitude from 1e-38 to
  2**118 outside [0.5, 1), and of at most ``2**(11 - bits)`` in ``1 - |score|`` inside it, so probabilities crowded
  near 1 are resolved like ``-log1p(-p)`` (subnormals below ``2**(32 - bits - 149)``, 3.6e-43 for ``bits=24``,
  share the bin of zero);
* exactness: equal scores share a bin, so ties are exact, and a bin that held a single distinct score is exact;
  float16 (``bits >= 19``) and bfloat16 (``bits >= 16``) scores are therefore always exact. Otherwise the only
  error is the unknown order of distinct scores inside a bin; :meth:`AnomalyMetrics.compute` reports a guaranteed
  bound on it for AP, AUROC and FPR95 and whether the result is exact.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist

from densehybrid.labels import IGNORE_INDEX
from densehybrid.metrics import _curve
from densehybrid.metrics._base import SumStateMetric, distributed_ready, zeros
from densehybrid.metrics._inputs import check_anomaly_inputs, check_ignore_index
from densehybrid.metrics._keys import SPREAD_HIGH_KEY, SPREAD_INF_KEY, spread_keys, spread_keys_to_float
from densehybrid.metrics.functional import warn_degenerate

# Pixels per vectorised step on CPU: the three scatters of a step then hit cache lines that the first one loaded,
# and each elementwise op stays at torch's parallelisation grain, so it runs on one thread (steady on busy machines).
_CPU_CHUNK = 1 << 15
_INT32_MAX = 2**31 - 1
DEFAULT_BITS = 24
MIN_BITS, MAX_BITS = 12, 28
#: FPR95 operating-point rules: "at_least" = the first point with TPR >= 0.95 (the exact definition, as SMIYC and
#: scikit-learn users compute it); "above" = the first point of scikit-learn's ``roc_curve`` with TPR > 0.95 (the
#: released DenseHybrid Fishyscapes code, ``evaluations/base.py``).
FPR95_RULES = ("at_least", "above")


class AnomalyMetrics(SumStateMetric):
    r"""Streaming AP, AUROC, FPR95 and thresholds over all pixels of a dataset (protocol ``pooled``).

    ``update`` adds a batch to a histogram of (score bin, label) counts; ``compute`` walks the bins from the highest
    score down, exactly as scikit-learn walks distinct thresholds, so every metric is the exact metric of the
    scores rounded down to the smallest score of their bin:

    .. math::
        \mathrm{AP} = \sum_b \frac{p_b}{P} \frac{TP_b}{TP_b + FP_b},\qquad
        \mathrm{AUROC} = \frac{1}{PN}\sum_b n_b \frac{TP_{b-1} + TP_b}{2},\qquad
        \mathrm{FPR95} = \frac{FP_{b^*}}{N},\ b^* = \min\{b: TP_b \ge 0.95 P\}\ (\texttt{fpr95\_rule="at\_least"})

    with ``p_b, n_b`` the anomaly/inlier pixels of bin ``b`` and ``TP_b, FP_b`` the cumulative counts down to it.

    Args:
        bits: key bits per bin, in [12, 28]. The default 24 keeps AP, AUROC and FPR95 within 1e-4 of the exact
            values for scores that are not crowded into a narrow relative range (see ``docs/metrics.md``).
        ignore_index: target id of pixels that are not evaluated (counted in ``num_ignored``), or None.
        validate_args: scan every batch for NaN scores and ids outside {0, 1, ``ignore_index``}.
        device: device of the state; None allocates it on the device of the first :meth:`update` (later batches
            are moved there).
        fpr95_rule: ``"at_least"`` (default): FPR at the first operating point with TPR >= 0.95, as the SMIYC
            toolkit and scikit-learn users compute it; ``"above"``: the first point of scikit-learn's ``roc_curve``
            with TPR > 0.95, the released DenseHybrid Fishyscapes code (``evaluations/base.py``). ``densehybrid
            evaluate`` picks each benchmark's released rule.

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
    # After _flush() the int32 count columns of "bins" are zero, so the whole tensor combines by maximum.
    _max_states = ("bins",)

    def __init__(
        self,
        *,
        bits: int = DEFAULT_BITS,
        ignore_index: int | None = IGNORE_INDEX,
        validate_args: bool = True,
        device: torch.device | str | None = None,
        fpr95_rule: str = "at_least",
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"Expected `bits` to be an int in [{MIN_BITS}, {MAX_BITS}], but got {bits!r}.")
        if fpr95_rule not in FPR95_RULES:
            raise ValueError(f"Expected `fpr95_rule` to be one of {', '.join(FPR95_RULES)}, but got {fpr95_rule!r}.")
        check_ignore_index(ignore_index)
        self.fpr95_rule = fpr95_rule
        self.bits = bits
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        super().__init__(device)

    def _config(self) -> tuple:
        return (self.bits, self.ignore_index, self.fpr95_rule)

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        slots = (1 << self.bits) + 1  # the last bin collects ignored pixels
        return {
            # Per bin: [inliers, anomalies, 1 + largest key offset, span - smallest key offset] (0: empty). The int32
            # counts are moved to "totals" before they could overflow (see _flush).
            "bins": zeros(4 * slots, torch.int32, device),
            "totals": zeros(2 * slots, torch.int64, device),
            "pending": torch.zeros((), dtype=torch.int64, device=device),  # pixels in the int32 counts
        }

    def _flush(self) -> None:
        """Move the int32 counts of every occupied bin into the int64 totals (touching only those bins)."""
        if self._state is None or int(self._state["pending"]) == 0:
            return
        bins = self._state["bins"].view(-1, 4)
        totals = self._state["totals"].view(-1, 2)
        occupied = (bins[:, 0] != 0).logical_or_(bins[:, 1] != 0).nonzero().squeeze(1)
        totals[occupied] += bins[occupied, :2].to(torch.int64)
        bins[occupied, :2] = 0
        self._state["pending"].zero_()

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            scores: (N, H, W) floating anomaly scores, higher is more anomalous (float64 is rounded to float32).
            target: (N, H, W) integer ids: 0 inlier, 1 anomaly, ``ignore_index`` not evaluated.

        Raises:
            ValueError: mismatched shapes, NaN scores or ids outside the encoding (the state is left unchanged).
        """
        check_anomaly_inputs(scores, target, self.ignore_index, batched=True, validate_args=False)
        state = self._ensure_state(scores.device)
        bins = state["bins"]
        flat_scores = scores.to(bins.device).reshape(-1)
        flat_target = target.to(bins.device).reshape(-1)
        total = flat_scores.numel()
        step = _CPU_CHUNK if bins.device.type == "cpu" else max(total, 1)
        if self.validate_args:
            # A separate pass, so that invalid input leaves the state untouched.
            for start in range(0, total, step):
                chunk_target = flat_target[start : start + step]
                bad = (chunk_target & ~1) != 0 if chunk_target.dtype != torch.bool else None  # ids other than 0, 1
                if bad is not None and self.ignore_index is not None:
                    bad &= chunk_target != self.ignore_index
                if bool(flat_scores[start : start + step].isnan().any()) or (bad is not None and bool(bad.any())):
                    check_anomaly_inputs(scores, target, self.ignore_index, batched=True)
        shift, span, dump = 32 - self.bits, 1 << (32 - self.bits), 4 << self.bits
        ones = torch.ones(min(step, total), dtype=torch.int32, device=bins.device)
        pending = int(state["pending"])
        for start in range(0, total, step):
            count = min(step, total - start)
            if pending + count > _INT32_MAX:
                self._flush()
                pending = 0
            keys = spread_keys(flat_scores[start : start + count])
            slot = keys >> shift  # arithmetic shift: floor, so negative keys keep their order
            slot += 1 << (self.bits - 1)
            slot = (slot << 2).to(torch.int64)  # 4 words per bin
            labels = flat_target[start : start + count]
            if self.ignore_index is not None:
                slot.masked_fill_(labels == self.ignore_index, dump)
            bins.scatter_add_(0, slot + labels.clamp(0, 1), ones[:count])
            offsets = keys & (span - 1)  # position of the key inside its bin
            slot += 2
            bins.scatter_reduce_(0, slot, offsets + 1, "amax")
            slot += 1
            bins.scatter_reduce_(0, slot, span - offsets, "amax")
            pending += count
        state["pending"].fill_(pending)

    def merge(self, other: AnomalyMetrics) -> AnomalyMetrics:
        """Add the state of ``other`` (fed with different data) to this metric, in place."""
        self._flush()
        if isinstance(other, AnomalyMetrics):
            other._flush()
        return super().merge(other)

    def sync(self, group: Any = None) -> AnomalyMetrics:
        """Combine the states of all processes of ``group`` (counts by sum, key ranges by maximum), in place.

        Only occupied bins travel (``all_gather_object`` of their ids, counts and key ranges), not the whole
        ``2**bits`` histogram; integer sums and maxima are exact, so every process ends with the state one process
        fed all the data would hold. Call it once, on every process, after the last :meth:`update`; a no-op without
        a process group.
        """
        if not distributed_ready():
            return self
        self._flush()
        state = self._ensure_state(torch.device("cpu"))
        totals, bins = state["totals"].view(-1, 2), state["bins"].view(-1, 4)
        occupied = (totals[:, 0] != 0).logical_or_(totals[:, 1] != 0).nonzero().squeeze(1)
        mine = (occupied.cpu(), totals[occupied].cpu(), bins[occupied, 2:].cpu())
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        for index, (ids, counts, ranges) in enumerate(gathered):
            if index == dist.get_rank(group) or ids.numel() == 0:
                continue
            ids = ids.to(totals.device)
            totals[ids] += counts.to(totals.device)
            bins[ids, 2:] = torch.maximum(bins[ids, 2:], ranges.to(bins.device))
        return self

    def _curve(self) -> tuple[_curve.Curve, torch.Tensor, int]:
        """Grouped counts of the occupied bins (highest first), which of them held several scores, ignored count.

        The curve's ``thresholds`` are the bins' smallest spread keys (int64), decoded by :func:`_threshold`.
        """
        if self._state is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return _curve.Curve(empty, empty, empty), empty.bool(), 0
        self._flush()
        totals = self._state["totals"]
        counts = totals.view(-1, 2)[:-1]
        # nonzero() on the flat counts avoids materialising a (2**bits,) temporary; bins come out ascending.
        occupied = torch.unique_consecutive(totals[:-2].nonzero().squeeze(1) >> 1).flip(0)
        grouped = counts[occupied]
        ranges = self._state["bins"].view(-1, 4)[occupied, 2:].to(torch.int64)
        span = 1 << (32 - self.bits)
        largest, smallest = ranges[:, 0] - 1, span - ranges[:, 1]
        start_keys = (occupied - (1 << (self.bits - 1))) << (32 - self.bits)
        low, high = start_keys + smallest, start_keys + largest
        # From 2**118 on one key of the spread keys may stand for two scores (+-inf are alone in theirs).
        compressed = (high >= SPREAD_HIGH_KEY) | (low <= -SPREAD_HIGH_KEY)
        compressed &= ~((low == high) & (low.abs() == SPREAD_INF_KEY))
        # The thresholds hold each bin's smallest key; _threshold decodes only the few that are asked for.
        curve = _curve.Curve(grouped[:, 1], grouped[:, 0], low)
        return curve, (largest > smallest) | compressed, int(totals[-2:].sum())

    def threshold_at_tpr(self, tpr: float = 0.95, strict: bool = False, drop_intermediate: bool | None = None) -> float:
        """Score threshold of the first operating point with TPR >= ``tpr`` (``strict``: TPR > ``tpr``, the released
        StreetHazards rule); NaN without anomaly pixels. Used to calibrate open-set thresholds.

        ``drop_intermediate`` (default: as ``strict``) skips the points scikit-learn's ``roc_curve`` drops, as the
        released code that walks it does (see :func:`densehybrid.metrics._curve.index_at_tpr`)."""
        curve = self._curve()[0]
        index = _curve.index_at_tpr(curve, tpr, strict=strict, drop_intermediate=drop_intermediate)
        return _threshold(curve, index)

    def best_f1_threshold(self) -> float:
        """Score threshold of the operating point with the highest pixel F1; NaN without anomaly pixels."""
        curve = self._curve()[0]
        return _threshold(curve, _curve.best_f1_index(curve)[0])

    def compute(self) -> dict[str, Any]:
        """Metrics over everything added so far.

        Returns:
            A dict with

            * ``ap``, ``auroc``, ``fpr95``: average precision, area under the ROC curve, FPR at the operating point
              that ``fpr95_rule`` picks (the first with TPR >= 0.95, or with ``"above"`` the first point of
              scikit-learn's ``roc_curve`` with TPR > 0.95); ``fpr95_rule`` itself;
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
            "fpr95_rule": self.fpr95_rule,
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
        tpr_index = _curve.index_at_tpr(curve, 0.95, strict=self.fpr95_rule == "above")
        f1_index, best_f1 = _curve.best_f1_index(curve)
        ap_low, ap_high = _curve.average_precision_bounds(curve, ap_uncertain)
        exact = not bool(ap_uncertain.any() or pair_uncertain.any())
        result.update(
            ap=ap,
            threshold_at_tpr95=_threshold(curve, tpr_index),
            best_f1=best_f1,
            best_f1_threshold=_threshold(curve, f1_index),
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
        _warn_if_coarse(result)
        return result


def _threshold(curve: _curve.Curve, index: int) -> float:
    """Score threshold of operating point ``index`` of a binned curve whose thresholds are spread keys (NaN for -1)."""
    if index < 0:
        return math.nan
    return float(spread_keys_to_float(curve.thresholds[index : index + 1])[0])


#: Error bound above which :meth:`AnomalyMetrics.compute` warns that the binned metrics may differ from exact ones.
ERROR_BOUND_WARNING = 1e-4
#: The start of that warning's text (a filter for it: ``warnings.filterwarnings("once", COARSE_METRICS_WARNING)``).
COARSE_METRICS_WARNING = "The binned pooled metrics may differ from the exact ones"


def _warn_if_coarse(result: dict[str, Any]) -> None:
    """Warn when a guaranteed error bound exceeds :data:`ERROR_BOUND_WARNING`: never a silently coarse number."""
    loose = {
        name: result[f"{name}_error_bound"]
        for name in ("ap", "auroc", "fpr95")
        if result[f"{name}_error_bound"] > ERROR_BOUND_WARNING
    }
    if loose:
        # One text whatever the bounds (they are in the result), so a run warns once (see densehybrid.cli.main).
        warnings.warn(
            f"{COARSE_METRICS_WARNING} by more than {ERROR_BOUND_WARNING:g}: many distinct float32 scores share a "
            "bin (scores crowded into a narrow range, e.g. by a large constant offset). The guaranteed bounds are "
            "the result's ap_error_bound, auroc_error_bound and fpr95_error_bound (in the JSON of `densehybrid "
            f"evaluate`). To tighten them: `--metric-option bits=28` on the command line (now {result['bits']}), "
            "AnomalyMetrics(bits=28) in Python, or float16 scores, which are always exact.",
            UserWarning,
            stacklevel=3,
        )

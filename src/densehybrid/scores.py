"""Dense anomaly scores: pure functions of a model's outputs.

Every score follows one sign convention: **higher means more anomalous**. Each declares the model outputs it reads
(:attr:`ScoreInfo.inputs`, field names of the model's output tuple) and :func:`compute_score` computes a named score
from a model output, whichever method produced it:

* scores of the logits, ``fn(logits, ood_logits=None, **options)``: the closed-set scores read ``logits``, the
  DenseHybrid scores also the dataset-posterior ``ood_logits`` (a :class:`~densehybrid.models.HybridOutput`);
* scores of teacher and student features, ``fn(teacher_features, student_features, size=None)``: :func:`dicnet`
  (a :class:`~densehybrid.models.DistillationOutput`).

For the logit scores: Dense inputs ``logits`` (N, K, H, W) and ``ood_logits`` (N, 2, H, W) give an
(N, H, W) map; per-vector inputs (N, K) and (N, 2) give (N,). Half and bfloat16 inputs are computed in float32 and
returned as float32; float32 and float64 inputs keep their dtype. No score takes ``softmax(...).log()``: every log
probability comes from ``log_softmax``/``logsumexp``, so logits of magnitude 1e4 still give finite scores.

:data:`SCORES` maps the names accepted by the command line (``--score``) to the functions, and :data:`SCORE_INFO`
records per score the outputs it reads and whether it needs fitted statistics (:func:`fit_sml_statistics`).

References:
    Grcić, Bevandić, Šegvić. DenseHybrid: Hybrid Anomaly Detection for Dense Open-set Recognition. ECCV 2022.
    Grcić, Šegvić. Hybrid Open-set Segmentation with Synthetic Negative Data. TPAMI 2024.
    Official code: https://github.com/matejgrcic/DenseHybrid
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from densehybrid._checks import check_finite, check_labels
from densehybrid.labels import IGNORE_INDEX

__all__ = [
    "SCORES",
    "SCORE_INFO",
    "SMLStatistics",
    "ScoreInfo",
    "check_score_inputs",
    "compute_score",
    "default_score",
    "densehybrid",
    "dicnet",
    "discriminative",
    "energy",
    "entropy",
    "fit_sml_statistics",
    "generative",
    "get_score",
    "list_scores",
    "max_logit",
    "msp",
    "requires_fit",
    "requires_ood_logits",
    "score_info",
    "sml",
]

ScoreFn = Callable[..., torch.Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_compute_dtype(tensor: torch.Tensor) -> torch.Tensor:
    # Half and bfloat16 overflow or lose the small differences the scores depend on: compute in float32.
    return tensor.float() if tensor.dtype in _LOW_PRECISION else tensor


def _check_logits(name: str, tensor: object, channels: int | None) -> torch.Tensor:
    layout = "(N, K, H, W) or (N, K)" if channels is None else f"(N, {channels}, H, W) or (N, {channels})"
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor of shape {layout}, but got {type(tensor).__name__}.")
    if tensor.ndim not in (2, 4):
        raise ValueError(f"Expected `{name}` to have shape {layout}, but got {tuple(tensor.shape)}.")
    if not tensor.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating-point tensor, but got dtype {tensor.dtype}.")
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(
            f"Expected `{name}` to have {channels} channels in dimension 1 (d_in, d_out), "
            f"but got shape {tuple(tensor.shape)}."
        )
    if channels is None and tensor.shape[1] < 1:
        raise ValueError(f"Expected `{name}` to have at least one class in dimension 1, but got {tuple(tensor.shape)}.")
    return tensor


def _prepare(
    logits: torch.Tensor,
    ood_logits: torch.Tensor | None,
    *,
    score: str,
    use_logits: bool = True,
    use_ood_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the inputs of one score and return them in the compute dtype."""
    _check_logits("logits", logits, None)
    if ood_logits is None:
        if use_ood_logits:
            raise ValueError(
                f"Expected `ood_logits` (N, 2, H, W) for the '{score}' score, but got None. "
                "Pass the dataset-posterior logits of a DenseHybrid model (`HybridOutput.ood_logits`)."
            )
    else:
        _check_logits("ood_logits", ood_logits, 2)
        if ood_logits.ndim != logits.ndim:
            raise ValueError(
                f"Expected `ood_logits` to have as many dimensions as `logits` {tuple(logits.shape)}, "
                f"but got {tuple(ood_logits.shape)}."
            )
        if ood_logits.shape[0] != logits.shape[0] or ood_logits.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"Expected `ood_logits` {tuple(ood_logits.shape)} to share the batch size and (H, W) of `logits` "
                f"{tuple(logits.shape)}, but they differ. Compute both at the same output size."
            )
        if ood_logits.device != logits.device:
            raise ValueError(
                f"Expected `ood_logits` to be on the device of `logits` ({logits.device}), but got {ood_logits.device}."
            )
    if use_logits:
        check_finite("logits", logits)
    if use_ood_logits:
        check_finite("ood_logits", ood_logits)
    return _as_compute_dtype(logits), None if ood_logits is None else _as_compute_dtype(ood_logits)


def _softmax_parts(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted logits s - max, their exponentials, and R = the sum of exp(s_k - max) over all but one arg-max.

    ``softmax = e / (1 + R)``; keeping R apart avoids the ``1 - (1 - tiny)`` cancellation of near-certain pixels.
    """
    top, index = s.max(dim=1, keepdim=True)
    shifted = s - top
    e = shifted.exp()
    rest = e.scatter(1, index, 0.0).sum(dim=1)
    return shifted, e, rest


def densehybrid(logits: torch.Tensor, ood_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""The DenseHybrid anomaly score: dataset posterior over unnormalised data likelihood.

    .. math::
        s_H(x) = \ln P(d_{out} \mid x) - \ln \hat p(x)
               = \operatorname{log\_softmax}(g(x))_1 - \operatorname{logsumexp}_k s_k(x)

    up to the constant :math:`\ln Z(\theta)`. The released code evaluates ``softmax(g).log()``; this uses
    ``log_softmax``, identical in exact arithmetic but finite where the posterior underflows.

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits :math:`s(x)`.
        ood_logits: (N, 2, H, W) or (N, 2) dataset-posterior logits :math:`g(x)`, channel 1 = outlier. Required.

    Returns:
        (N, H, W) or (N,) scores, higher = more anomalous.

    Raises:
        ValueError: if ``ood_logits`` is missing, shapes disagree, or an input holds NaN.

    References:
        Grcić et al., DenseHybrid, ECCV 2022, Eq. for :math:`s_H`;
        https://github.com/matejgrcic/DenseHybrid (``evaluations/evaluations.py``).

    Example:
        >>> logits, ood_logits = torch.randn(2, 19, 8, 8), torch.randn(2, 2, 8, 8)
        >>> densehybrid(logits, ood_logits).shape
        torch.Size([2, 8, 8])
    """
    s, g = _prepare(logits, ood_logits, score="densehybrid", use_ood_logits=True)
    return F.log_softmax(g, dim=1)[:, 1] - torch.logsumexp(s, dim=1)


def discriminative(logits: torch.Tensor, ood_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""The discriminative component of :func:`densehybrid`: the log dataset posterior of the outlier class.

    .. math::
        s_D(x) = \ln P(d_{out} \mid x) = \operatorname{log\_softmax}(g(x))_1

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits; only their shape is checked.
        ood_logits: (N, 2, H, W) or (N, 2) dataset-posterior logits, channel 1 = outlier. Required.

    Returns:
        (N, H, W) or (N,) scores in :math:`(-\infty, 0]`, higher = more anomalous.

    References:
        Grcić and Šegvić, Hybrid Open-set Segmentation with Synthetic Negative Data, TPAMI 2024
        (:math:`s_H = s_D + s_G`).

    Example:
        >>> discriminative(torch.randn(2, 19, 8, 8), torch.randn(2, 2, 8, 8)).shape
        torch.Size([2, 8, 8])
    """
    _, g = _prepare(logits, ood_logits, score="discriminative", use_logits=False, use_ood_logits=True)
    return F.log_softmax(g, dim=1)[:, 1]


def generative(logits: torch.Tensor, ood_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""The generative component of :func:`densehybrid`: the negative unnormalised log-likelihood.

    .. math::
        s_G(x) = -\ln \hat p(x) = -\operatorname{logsumexp}_k s_k(x)

    Equal to :func:`energy` at temperature 1.

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits.
        ood_logits: ignored (shape-checked when given).

    Returns:
        (N, H, W) or (N,) scores, higher = more anomalous.

    References:
        Grcić and Šegvić, TPAMI 2024 (:math:`s_H = s_D + s_G`).

    Example:
        >>> generative(torch.randn(2, 19, 8, 8)).shape
        torch.Size([2, 8, 8])
    """
    s, _ = _prepare(logits, ood_logits, score="generative")
    return -torch.logsumexp(s, dim=1)


def msp(logits: torch.Tensor, ood_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""One minus the maximum softmax probability.

    .. math::
        s_{MSP}(x) = 1 - \max_k \operatorname{softmax}(s(x))_k = \frac{R}{1 + R},
        \quad R = \sum_{k \ne c} e^{s_k - s_c}, \; c = \arg\max_k s_k

    Computed through :math:`R` so that near-certain pixels keep their small, distinct scores (``1 - max`` would
    round them all to 0 in float32).

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits.
        ood_logits: ignored (shape-checked when given).

    Returns:
        (N, H, W) or (N,) scores in :math:`[0, 1 - 1/K]`, higher = more anomalous.

    References:
        Hendrycks and Gimpel, A Baseline for Detecting Misclassified and Out-of-Distribution Examples, ICLR 2017.

    Example:
        >>> msp(torch.randn(2, 19, 8, 8)).shape
        torch.Size([2, 8, 8])
    """
    s, _ = _prepare(logits, ood_logits, score="msp")
    _, _, rest = _softmax_parts(s)
    return rest / (1.0 + rest)


def max_logit(logits: torch.Tensor, ood_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""The negative maximum logit.

    .. math::
        s_{ML}(x) = -\max_k s_k(x)

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits.
        ood_logits: ignored (shape-checked when given).

    Returns:
        (N, H, W) or (N,) scores, higher = more anomalous.

    References:
        Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022.

    Example:
        >>> max_logit(torch.randn(2, 19, 8, 8)).shape
        torch.Size([2, 8, 8])
    """
    s, _ = _prepare(logits, ood_logits, score="max_logit")
    return -s.amax(dim=1)


def energy(logits: torch.Tensor, ood_logits: torch.Tensor | None = None, *, temperature: float = 1.0) -> torch.Tensor:
    r"""The free energy of the logits.

    .. math::
        E(x) = -T \operatorname{logsumexp}_k \big(s_k(x) / T\big)

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits.
        ood_logits: ignored (shape-checked when given).
        temperature: :math:`T > 0`.

    Returns:
        (N, H, W) or (N,) scores, higher = more anomalous.

    Raises:
        ValueError: if ``temperature`` is not a finite positive number.

    References:
        Liu et al., Energy-based Out-of-distribution Detection, NeurIPS 2020.

    Example:
        >>> energy(torch.randn(2, 19, 8, 8), temperature=2.0).shape
        torch.Size([2, 8, 8])
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"Expected `temperature` to be a positive float, but got {type(temperature).__name__}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"Expected `temperature` to be a finite positive number, but got {temperature}.")
    s, _ = _prepare(logits, ood_logits, score="energy")
    return -temperature * torch.logsumexp(s / temperature, dim=1)


def entropy(logits: torch.Tensor, ood_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""The Shannon entropy (in nats) of the closed-set softmax.

    .. math::
        H(x) = -\sum_k P(k \mid x) \log P(k \mid x)
             = \log(1 + R) - \frac{\sum_k e^{s_k - s_c} (s_k - s_c)}{1 + R}

    with :math:`c` and :math:`R` as in :func:`msp`; this form keeps the tiny entropies of near-certain pixels.
    Terms with :math:`P = 0` contribute 0 (also for logits of :math:`-\infty`).

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits.
        ood_logits: ignored (shape-checked when given).

    Returns:
        (N, H, W) or (N,) scores in :math:`[0, \ln K]`, higher = more anomalous.

    References:
        Hendrycks et al., Deep Anomaly Detection with Outlier Exposure, ICLR 2019 (entropy baseline).

    Example:
        >>> round(entropy(torch.zeros(1, 4, 2, 2))[0, 0, 0].item(), 5) == round(math.log(4), 5)
        True
    """
    s, _ = _prepare(logits, ood_logits, score="entropy")
    shifted, e, rest = _softmax_parts(s)
    weighted = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(dim=1)
    return torch.log1p(rest) - weighted / (1.0 + rest)


@dataclass(frozen=True, eq=False)
class SMLStatistics:
    """Per-class statistics of the maximum logit for :func:`sml`, fitted by :func:`fit_sml_statistics`.

    Attributes:
        means: (K,) float64 mean of the max logit over training pixels predicted as class k.
        stds: (K,) float64 positive standard deviation of the same.
        counts: (K,) int64 number of pixels each class's statistics came from (0: pooled fallback).
    """

    means: torch.Tensor
    stds: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("means", "stds", "counts"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"Expected `{name}` to be a 1-D tensor of shape (K,), but got {shape}.")
        if not (self.means.shape == self.stds.shape == self.counts.shape) or self.means.numel() == 0:
            raise ValueError(
                "Expected `means`, `stds` and `counts` to have the same non-empty shape (K,), but got "
                f"{tuple(self.means.shape)}, {tuple(self.stds.shape)} and {tuple(self.counts.shape)}."
            )
        if not bool(torch.isfinite(self.means).all()):
            raise ValueError("Expected `means` to be finite, but got NaN or infinite values.")
        if not bool((torch.isfinite(self.stds) & (self.stds > 0)).all()):
            raise ValueError(f"Expected `stds` to be finite and positive, but got min {float(self.stds.min())}.")

    @property
    def num_classes(self) -> int:
        """K, the number of classes the statistics cover."""
        return int(self.means.numel())

    def to_dict(self) -> dict[str, torch.Tensor]:
        """A plain dict of CPU tensors, suitable for ``torch.save`` or a checkpoint entry."""
        return {"means": self.means.cpu(), "stds": self.stds.cpu(), "counts": self.counts.cpu()}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> SMLStatistics:
        """Rebuild statistics saved by :meth:`to_dict` (tensors or lists)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"Expected `state` to be a mapping with means/stds/counts, but got {type(state).__name__}.")
        missing = [key for key in ("means", "stds", "counts") if key not in state]
        if missing:
            raise ValueError(f"Expected `state` to contain keys means, stds and counts, but got {sorted(state)}.")
        return cls(
            means=torch.as_tensor(state["means"], dtype=torch.float64),
            stds=torch.as_tensor(state["stds"], dtype=torch.float64),
            counts=torch.as_tensor(state["counts"], dtype=torch.int64),
        )


def _split_batch(batch: object, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Expected each item of `batches` to be a logits tensor or a (logits, target) pair, but got "
        f"{type(batch).__name__} at position {index}."
    )


def fit_sml_statistics(
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    *,
    ignore_index: int | None = IGNORE_INDEX,
    min_std: float = 1e-6,
) -> SMLStatistics:
    r"""Fit the per-class max-logit statistics of standardized max logits (SML), streaming over batches.

    For every pixel the predicted class is :math:`c = \arg\max_k s_k(x)` and its max logit :math:`m = s_c(x)`.
    Per class, the mean :math:`\mu_c` and the population standard deviation :math:`\sigma_c` of :math:`m` are
    accumulated in float64 with Chan et al.'s pairwise update, so memory stays O(K) whatever the number of batches.
    As in the SML paper the grouping is by *predicted* class; a target only removes ``ignore_index`` pixels.

    Classes never predicted fall back to the statistics pooled over all pixels (with a ``UserWarning``), and standard
    deviations are clamped to at least ``min_std`` so that the score stays finite.

    Args:
        batches: iterable of logits tensors (N, K, H, W) / (N, K), or of ``(logits, target)`` pairs with target
            (N, H, W) / (N,) int64; a loader of training images run through the model, for example.
        ignore_index: target id of pixels to skip (only used when targets are given); None keeps every pixel.
        min_std: lower bound on each :math:`\sigma_c`.

    Returns:
        The fitted :class:`SMLStatistics`.

    Raises:
        ValueError: if no batch holds a usable pixel, the class count changes between batches, or inputs are invalid.

    References:
        Jung et al., Standardized Max Logits: A Simple yet Effective Approach for Identifying Unexpected Road
        Obstacles in Urban-Scene Segmentation, ICCV 2021. https://github.com/shjung13/Standardized-max-logits

    Example:
        >>> stats = fit_sml_statistics([torch.randn(2, 3, 4, 4) for _ in range(3)])
        >>> stats.means.shape
        torch.Size([3])
    """
    if not (math.isfinite(min_std) and min_std > 0):
        raise ValueError(f"Expected `min_std` to be a finite positive number, but got {min_std}.")
    count = mean = m2 = None
    num_classes = None
    for index, batch in enumerate(batches):
        logits, target = _split_batch(batch, index)
        _check_logits("logits", logits, None)
        check_finite("logits", logits)
        if num_classes is None:
            num_classes = int(logits.shape[1])
            count = torch.zeros(num_classes, dtype=torch.float64)
            mean = torch.zeros(num_classes, dtype=torch.float64)
            m2 = torch.zeros(num_classes, dtype=torch.float64)
        elif logits.shape[1] != num_classes:
            raise ValueError(
                f"Expected every `logits` batch to have {num_classes} classes like the first, but got "
                f"{tuple(logits.shape)} at position {index}."
            )
        values, classes = _as_compute_dtype(logits).max(dim=1)
        values, classes = values.double().reshape(-1), classes.reshape(-1)
        if target is not None:
            if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(
                logits.shape[:1] + logits.shape[2:]
            ):
                shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
                raise ValueError(
                    f"Expected `target` to have shape {tuple(logits.shape[:1] + logits.shape[2:])} to match "
                    f"`logits` {tuple(logits.shape)}, but got {shape} at position {index}."
                )
            check_labels("target", target, num_classes, ignore_index)
            if ignore_index is not None:
                keep = (target != ignore_index).reshape(-1).to(values.device)
                values, classes = values[keep], classes[keep]
        # Per-batch moments (fixed size K), merged into the running ones on the CPU.
        n_b = torch.bincount(classes, minlength=num_classes).double().cpu()
        sum_b = torch.zeros(num_classes, dtype=torch.float64, device=values.device).index_add_(0, classes, values)
        mean_b = sum_b.cpu() / n_b.clamp(min=1)
        dev = values - mean_b.to(values.device)[classes]
        m2_b = torch.zeros(num_classes, dtype=torch.float64, device=values.device).index_add_(0, classes, dev * dev)
        total = count + n_b
        delta = mean_b - mean
        safe_total = total.clamp(min=1)
        mean = mean + delta * n_b / safe_total
        m2 = m2 + m2_b.cpu() + delta * delta * count * n_b / safe_total
        count = total
    if count is None or float(count.sum()) == 0:
        raise ValueError(
            "Expected `batches` to hold at least one pixel that is not `ignore_index`, but got none. "
            "Pass training logits (and targets) of at least one image."
        )
    n_all = count.sum()
    pooled_mean = (count * mean).sum() / n_all
    pooled_var = (m2 + count * (mean - pooled_mean) ** 2).sum() / n_all
    seen = count > 0
    if not bool(seen.all()):
        unseen = torch.nonzero(~seen).flatten().tolist()
        warnings.warn(
            f"Classes {unseen} were never predicted while fitting SML statistics; they use the pooled mean and std.",
            UserWarning,
            stacklevel=2,
        )
    var = torch.where(seen, m2 / count.clamp(min=1), pooled_var)
    means = torch.where(seen, mean, pooled_mean)
    stds = var.sqrt().clamp(min=min_std)
    return SMLStatistics(means=means, stds=stds, counts=count.to(torch.int64))


def sml(
    logits: torch.Tensor,
    ood_logits: torch.Tensor | None = None,
    *,
    statistics: SMLStatistics | None = None,
) -> torch.Tensor:
    r"""Standardized max logits: the max logit standardised by the statistics of its predicted class.

    .. math::
        s_{SML}(x) = -\frac{\max_k s_k(x) - \mu_c}{\sigma_c}, \quad c = \arg\max_k s_k(x)

    The SML paper's optional boundary suppression and dilated smoothing are not applied.

    Args:
        logits: (N, K, H, W) or (N, K) closed-set logits.
        ood_logits: ignored (shape-checked when given).
        statistics: per-class :math:`\mu_c, \sigma_c` from :func:`fit_sml_statistics` on training data. Required.

    Returns:
        (N, H, W) or (N,) scores, higher = more anomalous.

    Raises:
        ValueError: if ``statistics`` is missing or covers a different number of classes.

    References:
        Jung et al., Standardized Max Logits, ICCV 2021. https://github.com/shjung13/Standardized-max-logits

    Example:
        >>> stats = SMLStatistics(torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.int64))
        >>> sml(torch.tensor([[1.0, 2.0, 0.0]]), statistics=stats)
        tensor([-2.])
    """
    if statistics is None:
        raise ValueError(
            "Expected `statistics` for the 'sml' score, but got None. "
            "Fit them on training logits with `densehybrid.scores.fit_sml_statistics`."
        )
    if not isinstance(statistics, SMLStatistics):
        raise TypeError(f"Expected `statistics` to be an SMLStatistics, but got {type(statistics).__name__}.")
    s, _ = _prepare(logits, ood_logits, score="sml")
    if statistics.num_classes != s.shape[1]:
        raise ValueError(
            f"Expected `statistics` for {s.shape[1]} classes to match `logits` {tuple(logits.shape)}, "
            f"but got statistics for {statistics.num_classes}."
        )
    values, classes = s.max(dim=1)
    means = statistics.means.to(device=s.device, dtype=s.dtype)
    stds = statistics.stds.to(device=s.device, dtype=s.dtype)
    return -(values - means[classes]) / stds[classes]


def dicnet(
    teacher_features: torch.Tensor,
    student_features: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    r"""The DiCNet score: the squared discrepancy between a frozen teacher's features and its distilled student's.

    .. math::
        s_{DiC}(x) = \frac{1}{C} \sum_c \big(T_c(x) - S_c(x)\big)^2

    on the feature grid, then resized bilinearly with ``align_corners=True`` to ``size``, as the released
    evaluation does. (It then min-max normalises each image, which changes no ranking within an image and is not
    applied here.)

    Args:
        teacher_features: (N, C, h, w) the teacher's pre-logit features.
        student_features: (N, C, h, w) the student's features.
        size: (H, W) of the returned map; default the feature grid (h, w).

    Returns:
        (N, H, W) scores, higher = more anomalous (float32 for half inputs).

    Raises:
        ValueError: shapes differ, are not 4-D, or an input holds NaN; a bad ``size``.

    References:
        Zhou et al., DiCNet: Anomaly Discovery in Semantic Segmentation via Distillation Comparison Networks,
        arXiv 2112.09908; https://github.com/zhouhuan-hust/DiCNet.

    Example:
        >>> dicnet(torch.zeros(2, 8, 4, 6), torch.ones(2, 8, 4, 6), size=(32, 48)).shape
        torch.Size([2, 32, 48])
    """
    for name, tensor in (("teacher_features", teacher_features), ("student_features", student_features)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Expected `{name}` to be a torch.Tensor (N, C, h, w), but got {type(tensor).__name__}.")
        if tensor.ndim != 4 or not tensor.is_floating_point():
            raise ValueError(
                f"Expected `{name}` to be a float (N, C, h, w) tensor, but got {tuple(tensor.shape)} "
                f"of dtype {tensor.dtype}."
            )
        check_finite(name, tensor)
    if teacher_features.shape != student_features.shape:
        raise ValueError(
            f"Expected `student_features` to have the shape of `teacher_features` {tuple(teacher_features.shape)}, "
            f"but got {tuple(student_features.shape)}: the student must produce the teacher's feature width and grid."
        )
    t, s = _as_compute_dtype(teacher_features), _as_compute_dtype(student_features).to(teacher_features.device)
    discrepancy = (t - s).pow(2).mean(dim=1, keepdim=True)
    if size is not None and torch.jit.is_tracing():
        # sizes are traced tensors: always resize (an identity at equal size), so the graph follows the input
        discrepancy = F.interpolate(discrepancy, size=tuple(size), mode="bilinear", align_corners=True)
    elif size is not None:
        size = tuple(int(v) for v in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Expected `size` to be two positive ints (H, W), but got {size!r}.")
        if size != tuple(discrepancy.shape[-2:]):
            discrepancy = F.interpolate(discrepancy, size=size, mode="bilinear", align_corners=True)
    return discrepancy[:, 0]


#: Model outputs the scores read, by field name of the model's output tuple.
LOGITS = ("logits",)
HYBRID = ("logits", "ood_logits")
FEATURES = ("teacher_features", "student_features")


@dataclass(frozen=True)
class ScoreInfo:
    """What a registered score needs.

    Attributes:
        name: the registry name.
        description: one line for ``densehybrid scores``.
        requires_ood_logits: the score reads the dataset-posterior head (a DenseHybrid model).
        requires_fit: the score needs statistics fitted on training data (keyword ``statistics=``).
        inputs: the model outputs it reads (field names of the output tuple): ``("logits",)``,
            ``("logits", "ood_logits")`` or ``("teacher_features", "student_features")``; by default derived from
            ``requires_ood_logits``.
    """

    name: str
    description: str
    requires_ood_logits: bool = False
    requires_fit: bool = False
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", HYBRID if self.requires_ood_logits else LOGITS)

    @property
    def reads_features(self) -> bool:
        """Whether the score compares teacher and student features (a DiCNet model) rather than reading logits."""
        return self.inputs == FEATURES


SCORES: dict[str, ScoreFn] = {
    "densehybrid": densehybrid,
    "discriminative": discriminative,
    "generative": generative,
    "msp": msp,
    "max_logit": max_logit,
    "energy": energy,
    "entropy": entropy,
    "sml": sml,
    "dicnet": dicnet,
}

SCORE_INFO: dict[str, ScoreInfo] = {
    info.name: info
    for info in (
        ScoreInfo("densehybrid", "hybrid log-ratio ln P(d_out|x) - logsumexp(logits) (DenseHybrid)", True),
        ScoreInfo("discriminative", "dataset posterior ln P(d_out|x) alone (s_D)", True),
        ScoreInfo("generative", "negative unnormalised log-likelihood -logsumexp(logits) alone (s_G)"),
        ScoreInfo("msp", "1 - maximum softmax probability"),
        ScoreInfo("max_logit", "negative maximum logit"),
        ScoreInfo("energy", "free energy -T*logsumexp(logits/T), option temperature (default 1)"),
        ScoreInfo("entropy", "entropy of the softmax over the K classes"),
        ScoreInfo("sml", "standardized max logit with per-class statistics fitted on training data", False, True),
        ScoreInfo("dicnet", "teacher-student feature discrepancy mean_c (T - S)^2 (DiCNet)", inputs=FEATURES),
    )
}

_DESCRIBED_INPUTS = {
    "ood_logits": "the dataset-posterior logits of a DenseHybrid model",
    "teacher_features": "teacher and student features of a DiCNet model",
    "student_features": "teacher and student features of a DiCNet model",
    "logits": "closed-set logits",
}


def list_scores(available: Iterable[str] | None = HYBRID) -> list[str]:
    """The registered score names, sorted.

    Args:
        available: the output fields a model provides (e.g. ``HybridOutput._fields``, or
            :func:`densehybrid.models.output_fields` of a model); only scores reading nothing else are listed.
            Default: the outputs of a DenseHybrid model. None lists every registered score.
    """
    if available is None:
        return sorted(SCORES)
    fields = set(available)
    return sorted(name for name in SCORES if set(SCORE_INFO[name].inputs) <= fields)


def default_score(available: Iterable[str]) -> str:
    """The score a model's outputs call for: ``dicnet`` for teacher and student features (a DiCNet model),
    ``densehybrid`` for a dataset-posterior head (a DenseHybrid model), else ``msp``.

    Args:
        available: the model's output fields (:func:`densehybrid.models.output_fields`).
    """
    fields = set(available)
    for name in ("dicnet", "densehybrid"):
        if set(SCORE_INFO[name].inputs) <= fields:
            return name
    return "msp"


def _lookup(name: str) -> str:
    if not isinstance(name, str) or name not in SCORES:
        raise ValueError(f"Unknown score {name!r}. Available: {', '.join(list_scores(None))}.")
    return name


def get_score(name: str) -> ScoreFn:
    """The score function registered under ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.

    Example:
        >>> get_score("energy") is energy
        True
    """
    return SCORES[_lookup(name)]


def score_info(name: str) -> ScoreInfo:
    """The :class:`ScoreInfo` of the score registered under ``name`` (raises like :func:`get_score`)."""
    return SCORE_INFO[_lookup(name)]


def requires_ood_logits(name: str) -> bool:
    """Whether the score ``name`` needs ``ood_logits`` (a model with a dataset-posterior head)."""
    return score_info(name).requires_ood_logits


def requires_fit(name: str) -> bool:
    """Whether the score ``name`` needs statistics fitted on training data before use."""
    return score_info(name).requires_fit


def check_score_inputs(names: Iterable[str], available: Iterable[str], model: str = "the model") -> None:
    """Raise one clear error when a score reads an output the model does not provide.

    Args:
        names: score names.
        available: the model's output fields (:func:`densehybrid.models.output_fields`).
        model: how to name the model in the message.

    Raises:
        ValueError: naming the score, what it needs, what the model gives and the scores that model supports.
    """
    fields = tuple(available)
    for name in names:
        info = score_info(name)
        missing = [field for field in info.inputs if field not in fields]
        if missing:
            raise ValueError(
                f"Expected a model that provides {_DESCRIBED_INPUTS.get(missing[0], missing[0])} "
                f"({', '.join(info.inputs)}) for score {info.name!r}, but {model} gives {', '.join(fields)}. "
                f"Scores for this model: {', '.join(list_scores(fields))}."
            )


def compute_score(
    name: str,
    output: Any,
    size: tuple[int, int] | None = None,
    **options: Any,
) -> torch.Tensor:
    """The named score of one model output, whichever method produced it.

    Args:
        name: a registered score.
        output: a model output with named fields (:class:`~densehybrid.models.HybridOutput`,
            :class:`~densehybrid.models.DistillationOutput`, or any object with those attributes).
        size: (H, W) of the map for scores of features (their grid is coarser); default the size of
            ``output.logits`` (the model's output size), else the feature grid. Logit scores keep the logits' size.
        **options: the score's keyword options (``temperature``, ``statistics``).

    Returns:
        (N, H, W) scores, higher = more anomalous.

    Raises:
        ValueError: an unknown score, or one that reads an output this model does not give (see
            :func:`check_score_inputs`).

    Example:
        >>> from densehybrid.models import HybridOutput
        >>> out = HybridOutput(torch.randn(1, 19, 8, 8), torch.randn(1, 2, 8, 8))
        >>> compute_score("densehybrid", out).shape
        torch.Size([1, 8, 8])
    """
    info = score_info(name)
    fields = tuple(field for field in (*HYBRID, *FEATURES) if getattr(output, field, None) is not None)
    check_score_inputs([info.name], fields, f"the {type(output).__name__}")
    fn = SCORES[info.name]
    if info.reads_features:
        logits = getattr(output, "logits", None)
        if size is None and isinstance(logits, torch.Tensor) and logits.ndim == 4:
            size = tuple(logits.shape[-2:])
        return fn(output.teacher_features, output.student_features, size, **options)
    return fn(output.logits, getattr(output, "ood_logits", None), **options)

"""Training objectives: the DenseHybrid loss with its variants, and plain closed-set cross-entropy.

Each loss is a function and an ``nn.Module`` twin whose ``__init__`` stores the options and whose ``forward`` calls the
function. Inputs follow the library conventions: ``logits`` (N, K, H, W), ``ood_logits`` (N, 2, H, W) with channel 1 =
outlier, ``target`` (N, H, W) int64 holding ids ``0..K-1`` or ``ignore_index``, and ``negative_mask`` (N, H, W) marking
pasted negative pixels (see :mod:`densehybrid.negatives`). Per-vector inputs (N, K), (N, 2), (N,) work the same way.
Half and bfloat16 logits are upcast to float32 before the loss is computed.

References:
    Grcić, Bevandić, Šegvić. DenseHybrid: Hybrid Anomaly Detection for Dense Open-set Recognition. ECCV 2022.
    Official code: https://github.com/matejgrcic/DenseHybrid (``experiments/semseg_negatives_joint_th.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from densehybrid._checks import check_finite, check_labels
from densehybrid.labels import IGNORE_INDEX

__all__ = [
    "DenseHybridLoss",
    "LossOutput",
    "SegmentationLoss",
    "densehybrid_loss",
    "segmentation_loss",
]

_REDUCTIONS = ("mean", "sum", "none")
_LIKELIHOODS = ("negatives", "paired")
_NEGATIVE_LOSSES = ("lse", "jsd")
# F.cross_entropy needs an int ignore index; this one can never be a class id.
_NO_CLASS = -100


class LossOutput(NamedTuple):
    r"""The total loss and its unweighted components, for logging.

    With ``reduction="mean"`` or ``"sum"`` every field is a scalar tensor; with ``"none"`` every field is an
    (N, H, W) map (0 where a term does not apply). Every field stays attached to the graph.

    Attributes:
        total: :math:`L_{seg} + \beta L_x + \lambda L_d`; call ``.backward()`` on this one.
        seg: :math:`L_{seg}`, cross-entropy on inlier pixels.
        likelihood: :math:`L_x`, the negative-pixel term (log-sum-exp or JSD, optionally paired with inliers).
        posterior: :math:`L_d`, two-way cross-entropy of the dataset posterior (0 when ``ood_logits`` is None).
    """

    total: torch.Tensor
    seg: torch.Tensor
    likelihood: torch.Tensor
    posterior: torch.Tensor


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {', '.join(repr(c) for c in choices)}, but got {value!r}.")


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a non-negative float, but got {type(value).__name__}.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Expected `{name}` to be a finite non-negative number, but got {value}.")
    return float(value)


def _check_inputs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ood_logits: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Validate shapes, dtypes, NaN and label ids; return (logits, target, ood_logits, negative_mask) for computing."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"Expected `logits` to be a torch.Tensor of shape (N, K, H, W), but got {type(logits).__name__}."
        )
    if logits.ndim not in (2, 4) or logits.shape[1] < 1:
        raise ValueError(f"Expected `logits` to have shape (N, K, H, W) or (N, K), but got {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise TypeError(f"Expected `logits` to be a floating-point tensor, but got dtype {logits.dtype}.")
    label_shape = tuple(logits.shape[:1]) + tuple(logits.shape[2:])
    layout = "(N, H, W)" if logits.ndim == 4 else "(N,)"
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"Expected `target` to be an int64 tensor of shape {layout}, but got {type(target).__name__}.")
    if tuple(target.shape) != label_shape:
        raise ValueError(
            f"Expected `target` to have shape {label_shape} to match `logits` {tuple(logits.shape)}, "
            f"but got {tuple(target.shape)}. Resize the labels (nearest) or the logits to one resolution."
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"Expected `target` to be an integer (int64) tensor, but got dtype {target.dtype}.")
    if ood_logits is not None:
        if not isinstance(ood_logits, torch.Tensor):
            raise TypeError(
                f"Expected `ood_logits` to be a torch.Tensor of shape (N, 2, H, W), but got {type(ood_logits).__name__}."
            )
        expected = (logits.shape[0], 2, *logits.shape[2:])
        if tuple(ood_logits.shape) != expected:
            raise ValueError(
                f"Expected `ood_logits` to have shape {expected} to match `logits` {tuple(logits.shape)}, "
                f"but got {tuple(ood_logits.shape)}."
            )
        if not ood_logits.is_floating_point():
            raise TypeError(f"Expected `ood_logits` to be a floating-point tensor, but got dtype {ood_logits.dtype}.")
    if negative_mask is None:
        negatives = torch.zeros(label_shape, dtype=torch.bool, device=logits.device)
    else:
        if not isinstance(negative_mask, torch.Tensor):
            raise TypeError(
                f"Expected `negative_mask` to be a bool tensor of shape {layout}, but got {type(negative_mask).__name__}."
            )
        if tuple(negative_mask.shape) != label_shape:
            raise ValueError(
                f"Expected `negative_mask` to have shape {label_shape} like `target`, but got {tuple(negative_mask.shape)}."
            )
        if negative_mask.dtype != torch.bool:
            binary = (negative_mask == 0) | (negative_mask == 1)
            if not bool(binary.all()):
                bad = torch.unique(negative_mask[~binary])[:5].tolist()
                raise ValueError(f"Expected `negative_mask` to hold only 0/1 or bool values, but got {bad}.")
        negatives = negative_mask.to(device=logits.device, dtype=torch.bool)
    check_finite("logits", logits)
    if ood_logits is not None:
        check_finite("ood_logits", ood_logits)
    target = target.to(device=logits.device, dtype=torch.int64)
    # Ids under pasted negatives are never read (they become "ignore" for the cross-entropy), so they are not checked.
    fill = ignore_index if ignore_index is not None else 0
    check_labels("target", torch.where(negatives, torch.full_like(target, fill), target), logits.shape[1], ignore_index)

    def upcast(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    return upcast(logits), target, None if ood_logits is None else upcast(ood_logits), negatives


def _reduce(values: torch.Tensor, where: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a per-pixel map over the pixels in ``where``; an empty set gives 0 (not NaN) for "mean"."""
    values = torch.where(where, values, torch.zeros_like(values))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    return total / where.sum().clamp(min=1)


def _cross_entropy_map(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    safe = torch.where(valid, target, torch.full_like(target, _NO_CLASS))
    return F.cross_entropy(logits, safe, ignore_index=_NO_CLASS, reduction="none")


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Closed-set cross-entropy over the labelled pixels.

    .. math::
        L_{seg} = \frac{1}{|\Omega|} \sum_{i \in \Omega} -\log \operatorname{softmax}(s(x_i))_{y_i},
        \quad \Omega = \{i : y_i \ne \text{ignore}\}

    Unlike ``F.cross_entropy``, a batch with no labelled pixel gives 0 instead of NaN under ``"mean"``.

    Args:
        logits: (N, K, H, W) or (N, K) class logits.
        target: (N, H, W) or (N,) int64 ids in ``[0, K)`` or ``ignore_index``.
        ignore_index: void id excluded from the loss; None means every pixel is labelled.
        reduction: ``"mean"`` over labelled pixels, ``"sum"``, or ``"none"`` for an (N, H, W) map (0 at void).

    Returns:
        A scalar, or the per-pixel map for ``reduction="none"``.

    Raises:
        ValueError: for mismatched shapes, ids outside ``[0, K)`` other than ``ignore_index``, NaN logits or an
            unknown ``reduction``.

    Example:
        >>> loss = segmentation_loss(torch.randn(2, 3, 4, 4, requires_grad=True), torch.randint(0, 3, (2, 4, 4)))
        >>> loss.backward()
    """
    _check_choice("reduction", reduction, _REDUCTIONS)
    logits, target, _, _ = _check_inputs(logits, target, ignore_index=ignore_index)
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    return _reduce(_cross_entropy_map(logits, target, valid), valid, reduction)


class SegmentationLoss(nn.Module):
    """Module twin of :func:`segmentation_loss`; stores the options, ``forward(logits, target)`` calls the function."""

    def __init__(self, *, ignore_index: int | None = IGNORE_INDEX, reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("reduction", reduction, _REDUCTIONS)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


def _jsd_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel JSD(P || U) with P = softmax over dim 1 and U uniform over the K classes."""
    num_classes = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    log_u = -math.log(num_classes)
    log_m = torch.logaddexp(log_p, torch.full_like(log_p, log_u)) - math.log(2.0)
    p = log_p.exp()
    kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(dim=1)
    kl_um = ((log_u - log_m) / num_classes).sum(dim=1)
    return 0.5 * kl_pm + 0.5 * kl_um


def densehybrid_loss(
    logits: torch.Tensor,
    ood_logits: torch.Tensor | None,
    target: torch.Tensor,
    negative_mask: torch.Tensor,
    *,
    beta: float = 0.03,
    lambda_: float = 0.3,
    likelihood: str = "negatives",
    negative_loss: str = "lse",
    posterior_ignore_void: bool = False,
    ignore_index: int | None = IGNORE_INDEX,
    reduction: str = "mean",
) -> LossOutput:
    r"""The DenseHybrid training loss, by default exactly as the released code computes it.

    With :math:`I` the inlier pixels (labelled and not negative), :math:`O` the pasted negative pixels
    (``negative_mask``) and :math:`V` the pixels counted by the posterior term:

    .. math::
        L &= L_{seg} + \beta L_x + \lambda L_d \\
        L_{seg} &= \frac{1}{|I|} \sum_{i \in I} -\log \operatorname{softmax}(s(x_i))_{y_i} \\
        L_x &= \frac{1}{|O|} \sum_{i \in O} \operatorname{logsumexp}_k s_k(x_i)
            \quad (= -\tfrac{1}{|O|}\textstyle\sum_O \ln \hat p(x_i) + \text{const}) \\
        L_d &= \frac{1}{|V|} \sum_{i \in V} -\log \operatorname{softmax}(g(x_i))_{m_i}, \quad m_i = [i \in O]

    Defaults follow the released code: :math:`\beta = 0.03`, :math:`\lambda = 10\beta = 0.3`, and :math:`V` is *every*
    pixel, so void pixels count as :math:`d_{in}` in :math:`L_d`. The released code also adds a detached mean-logit
    regulariser to :math:`L_x`; it has no gradient and is omitted, so logged :math:`L_x` values differ from the
    released logs by that constant. Negative pixels are excluded from :math:`L_{seg}` whatever their target id.

    Variants:

    * ``likelihood="paired"``: our variant, not the released code's and not confirmed as the paper's formula: it
      pairs the negative term with an inlier term of the same weight, so that :math:`\ln Z(\theta)` cancels (the
      argument of the ECCV abstract about the intractable normaliser; the paper's own form of :math:`L_x` could not
      be checked): :math:`L_x = \frac{1}{|O|}\sum_O \operatorname{LSE}(s) - \frac{1}{|I|}\sum_I
      \operatorname{LSE}(s)`.
    * ``negative_loss="jsd"`` (NFlowJS): per negative pixel the Jensen-Shannon divergence to the uniform
      distribution, :math:`\tfrac12 KL(P\|M) + \tfrac12 KL(U\|M)`, :math:`M = (P+U)/2`,
      :math:`P = \operatorname{softmax}(s)`, weighted by :math:`\beta`. It cannot be paired.
    * ``posterior_ignore_void=True``: :math:`V` excludes void pixels (``target == ignore_index``) that are not
      negatives.
    * ``ood_logits=None`` drops :math:`L_d` (a model without a posterior head, e.g. NFlowJS).

    Any term whose pixel set is empty is 0 (not NaN) under ``"mean"``.

    Args:
        logits: (N, K, H, W) or (N, K) class logits :math:`s(x)`.
        ood_logits: (N, 2, H, W) or (N, 2) dataset-posterior logits :math:`g(x)` (channel 1 = outlier), or None.
        target: (N, H, W) or (N,) int64 ids in ``[0, K)`` or ``ignore_index``; ids under negatives are not read.
        negative_mask: (N, H, W) or (N,) bool (or 0/1) mask of pasted negative pixels.
        beta: weight :math:`\beta` of :math:`L_x`.
        lambda_: weight :math:`\lambda` of :math:`L_d`.
        likelihood: ``"negatives"`` (released code) or ``"paired"`` (our Z-cancelling variant, see above).
        negative_loss: ``"lse"`` (DenseHybrid) or ``"jsd"`` (NFlowJS).
        posterior_ignore_void: exclude void pixels from :math:`L_d`.
        ignore_index: void id; None means every pixel is labelled.
        reduction: ``"mean"`` (each term averaged over its own pixel set, as above), ``"sum"`` (each term summed
            over its pixel set, the paired inlier term included) or ``"none"`` ((N, H, W) maps; ``total`` is the
            per-pixel weighted sum, and normalising it is left to the caller).

    Returns:
        :class:`LossOutput` ``(total, seg, likelihood, posterior)``, components unweighted.

    Raises:
        ValueError: for mismatched shapes, ids outside ``[0, K)`` other than ``ignore_index`` in ``target``, a
            non-binary ``negative_mask``, NaN in the logits, or unknown/conflicting options.

    References:
        Grcić et al., DenseHybrid, ECCV 2022; https://github.com/matejgrcic/DenseHybrid
        (``experiments/semseg_negatives_joint_th.py``). Grcić, Bevandić, Kalafatić, Šegvić, Dense Out-of-Distribution
        Detection by Robust Learning on Synthetic Negative Data (NFlowJS), Sensors 24(4):1248, 2024 (JSD loss).

    Example:
        >>> logits = torch.randn(2, 19, 8, 8, requires_grad=True)
        >>> ood_logits = torch.randn(2, 2, 8, 8, requires_grad=True)
        >>> target = torch.randint(0, 19, (2, 8, 8))
        >>> negative_mask = torch.zeros(2, 8, 8, dtype=torch.bool)
        >>> negative_mask[:, 2:5, 2:5] = True
        >>> out = densehybrid_loss(logits, ood_logits, target, negative_mask)
        >>> out.total.backward()
    """
    beta = _check_weight("beta", beta)
    lambda_ = _check_weight("lambda_", lambda_)
    _check_choice("likelihood", likelihood, _LIKELIHOODS)
    _check_choice("negative_loss", negative_loss, _NEGATIVE_LOSSES)
    _check_choice("reduction", reduction, _REDUCTIONS)
    if likelihood == "paired" and negative_loss == "jsd":
        raise ValueError(
            "Expected `likelihood` to be 'negatives' when `negative_loss` is 'jsd', but got 'paired'. "
            "The JSD term does not model the likelihood, so there is nothing for inliers to pair with."
        )
    if negative_mask is None:
        raise ValueError("Expected `negative_mask` to be an (N, H, W) bool tensor, but got None.")
    logits, target, ood_logits, negatives = _check_inputs(
        logits, target, ood_logits=ood_logits, negative_mask=negative_mask, ignore_index=ignore_index
    )
    labelled = target != ignore_index if ignore_index is not None else torch.ones_like(negatives)
    inliers = labelled & ~negatives

    seg = _reduce(_cross_entropy_map(logits, target, inliers), inliers, reduction)

    if negative_loss == "lse":
        lse = torch.logsumexp(logits, dim=1)
        lik = _reduce(lse, negatives, reduction)
        if likelihood == "paired":
            lik = lik - _reduce(lse, inliers, reduction)
    else:
        lik = _reduce(_jsd_to_uniform(logits), negatives, reduction)

    if ood_logits is None:
        post = torch.zeros_like(seg)
    else:
        counted = negatives | labelled if posterior_ignore_void else torch.ones_like(negatives)
        post_map = F.cross_entropy(ood_logits, negatives.long(), reduction="none")
        post = _reduce(post_map, counted, reduction)

    return LossOutput(seg + beta * lik + lambda_ * post, seg, lik, post)


class DenseHybridLoss(nn.Module):
    """Module twin of :func:`densehybrid_loss`; ``__init__`` stores the options (same names and defaults).

    ``forward(logits, ood_logits, target, negative_mask) -> LossOutput``.

    Example:
        >>> criterion = DenseHybridLoss(likelihood="paired")
        >>> out = criterion(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long),
        ...                 torch.ones(1, 4, 4, dtype=torch.bool))
        >>> sorted(out._fields)
        ['likelihood', 'posterior', 'seg', 'total']
    """

    def __init__(
        self,
        *,
        beta: float = 0.03,
        lambda_: float = 0.3,
        likelihood: str = "negatives",
        negative_loss: str = "lse",
        posterior_ignore_void: bool = False,
        ignore_index: int | None = IGNORE_INDEX,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        # Validate at construction so a bad config fails before the first batch.
        _check_weight("beta", beta)
        _check_weight("lambda_", lambda_)
        _check_choice("likelihood", likelihood, _LIKELIHOODS)
        _check_choice("negative_loss", negative_loss, _NEGATIVE_LOSSES)
        _check_choice("reduction", reduction, _REDUCTIONS)
        if likelihood == "paired" and negative_loss == "jsd":
            raise ValueError("Expected `likelihood` to be 'negatives' when `negative_loss` is 'jsd', but got 'paired'.")
        self.beta = beta
        self.lambda_ = lambda_
        self.likelihood = likelihood
        self.negative_loss = negative_loss
        self.posterior_ignore_void = posterior_ignore_void
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(
        self,
        logits: torch.Tensor,
        ood_logits: torch.Tensor | None,
        target: torch.Tensor,
        negative_mask: torch.Tensor,
    ) -> LossOutput:
        return densehybrid_loss(
            logits,
            ood_logits,
            target,
            negative_mask,
            beta=self.beta,
            lambda_=self.lambda_,
            likelihood=self.likelihood,
            negative_loss=self.negative_loss,
            posterior_ignore_void=self.posterior_ignore_void,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, lambda_={self.lambda_}, likelihood={self.likelihood!r}, "
            f"negative_loss={self.negative_loss!r}, posterior_ignore_void={self.posterior_ignore_void}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )

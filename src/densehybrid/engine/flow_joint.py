"""Training with a normalizing flow: the per-step functions of the released two-step joint fine-tuning iteration.

Both run inside :func:`~densehybrid.engine.fit` through
:class:`~densehybrid.engine.flow_objectives.JointFlowObjective` (flow pre-training is
:class:`~densehybrid.engine.flow_objectives.FlowLikelihoodObjective`, also run by ``fit``).

Joint fine-tuning (TPAMI DenseHybrid, ``*_finetune_flow``), one iteration on a batch ``(images, target)``:

1. **Segmenter step** (:func:`segmenter_step`): flow patches sampled *without gradients* (or a real/synthetic mixture)
   are pasted as rectangles; the DenseHybrid loss :math:`L_{seg} + \\beta L_x + 10\\beta L_d` is minimised by the
   segmenter's optimiser.
2. **Flow step** (:func:`flow_step`): *new, differentiable* patches (one per image, a new size) are pasted into the
   same un-pasted batch and the segmenter (still in train mode) is run; the flow minimises
   ``jsd_weight`` × the mean Jensen–Shannon divergence between the segmenter's class posterior and the uniform
   distribution over pasted pixels (it learns patches the segmenter is uncertain about) plus its maximum-likelihood
   loss in bits/dim on the inlier content the patches overwrote (so its samples stay near the inlier distribution).
   Only the flow's parameters receive gradients; the segmenter's are not computed (the released code computes and
   discards them). BatchNorm statistics of the segmenter see this batch too, as released.

Under ``torchrun`` the segmenter is wrapped in ``DistributedDataParallel`` by :func:`~densehybrid.engine.fit`, and the
flow's gradients are averaged over the ranks before every flow step (:func:`apply_flow_gradients`), so the flow, its
optimiser and its schedule stay identical on every rank.

Released hyper-parameters: ``jsd_weight`` 0.03; flow optimiser Adamax lr 1e-5, betas (0.9, 0.999), eps 1e-7 (1e-3 for
a randomly initialised flow), lr × 0.99 per epoch for traffic scenes and × 0.975 for COCO20
(:data:`FLOW_LR_DECAY`; use ``torch.optim.lr_scheduler.ExponentialLR`` stepped once per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from densehybrid.engine import distributed
from densehybrid.engine.batches import unpack_sample
from densehybrid.engine.outputs import atomic_path
from densehybrid.flows.negatives import FlowNegatives, MixedNegatives, to_8bit
from densehybrid.losses import densehybrid_loss

__all__ = [
    "FLOW_LR_DECAY",
    "apply_flow_gradients",
    "build_flow_optimizer",
    "flow_bits_per_dim",
    "flow_gradients",
    "flow_joint_step",
    "flow_step",
    "random_crops",
    "save_sample_grid",
    "segmenter_loss",
    "segmenter_step",
]

#: Per-epoch multiplicative decay of the flow's learning rate in the released joint fine-tuning.
FLOW_LR_DECAY = {"traffic": 0.99, "coco": 0.975}


def build_flow_optimizer(
    flow: nn.Module, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7
) -> torch.optim.Adamax:
    """The released flow optimiser: Adamax over every trainable flow parameter (lr 1e-5 for a pre-trained flow,
    1e-3 for a randomly initialised one)."""
    if not (lr > 0):
        raise ValueError(f"Expected the flow learning rate `lr` to be > 0, but got {lr}.")
    return torch.optim.Adamax([p for p in flow.parameters() if p.requires_grad], lr=lr, betas=betas, eps=eps)


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value):
        raise FloatingPointError(f"The {name} became {float(value)}; lower the learning rate or check the inputs.")


def segmenter_loss(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: Callable,
    negatives: FlowNegatives | MixedNegatives,
    real_negatives: torch.Tensor | Sequence[torch.Tensor] | None = None,
    real_segments: torch.Tensor | Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    regions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The segmenter half's loss (no optimiser step): paste no-grad negatives and evaluate the DenseHybrid loss.

    Arguments as :func:`segmenter_step`. Returns ``(total loss, logs)``; logs: ``loss``, ``seg``, ``likelihood``,
    ``posterior``. Used by :func:`segmenter_step` and by training loops that own the segmenter's optimiser.
    """
    if isinstance(negatives, MixedNegatives):
        if real_negatives is None:
            raise ValueError("Expected `real_negatives` for mixed negatives, but got None.")
        pasted = negatives.paste(images, target, real_negatives, real_segments, generator=generator)
    else:
        pasted = negatives.paste(images, target, generator=generator, regions=regions).as_paste_result()
    out = model(pasted.images, output_size=tuple(target.shape[-2:]))
    terms = loss(out.logits.float(), out.ood_logits.float(), pasted.target, pasted.negative_mask)
    _check_finite("segmenter loss", terms.total.detach())
    logs = {k: float(v.detach()) for k, v in terms._asdict().items()}
    logs["loss"] = logs.pop("total")
    return terms.total, logs


def segmenter_step(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: Callable,
    optimizer: torch.optim.Optimizer,
    negatives: FlowNegatives | MixedNegatives,
    real_negatives: torch.Tensor | Sequence[torch.Tensor] | None = None,
    real_segments: torch.Tensor | Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    regions: torch.Tensor | None = None,
) -> dict[str, float]:
    """The segmenter half of the joint iteration: paste no-grad negatives, minimise the DenseHybrid loss, step.

    Args:
        model: ``forward(images, output_size) -> HybridOutput``.
        images: (N, 3, H, W) augmented inlier crops in [0, 1].
        target: (N, H, W) labels (``ignore_index`` for void).
        loss: a :class:`~densehybrid.losses.DenseHybridLoss` (released: ``beta`` β, ``lambda_`` 10β;
            ``posterior_ignore_void=True`` for COCO20).
        optimizer: the segmenter's optimiser.
        negatives: :class:`FlowNegatives` (synthetic) or :class:`MixedNegatives` (then ``real_negatives`` needed).
        real_negatives, real_segments: real crops for a mixture, see :meth:`MixedNegatives.paste`.
        generator: source of every random choice.
        regions: where flow patches may land (see :func:`~densehybrid.flows.negatives.paste_rectangles`).

    Returns:
        logs: ``loss`` (total), ``seg``, ``likelihood``, ``posterior``.
    """
    optimizer.zero_grad(set_to_none=True)
    total, logs = segmenter_loss(
        model,
        images,
        target,
        loss=loss,
        negatives=negatives,
        real_negatives=real_negatives,
        real_segments=real_segments,
        generator=generator,
        regions=regions,
    )
    total.backward()
    optimizer.step()
    return logs


def flow_gradients(
    model: nn.Module,
    flow: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    *,
    negatives: FlowNegatives,
    jsd_weight: float = 0.03,
    mle_weight: float = 1.0,
    patches_per_image: int = 1,
    generator: torch.Generator | None = None,
    regions: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor | None], dict[str, float]]:
    """The flow half's loss and its gradients, without a step (arguments as :func:`flow_step`).

    Returns:
        ``(gradients, logs)``: one gradient per trainable flow parameter (None where the loss does not reach it) and
        the logs ``flow_jsd`` (unweighted), ``flow_bpd``.
    """
    pasted = negatives.paste(
        images, target, generator=generator, differentiable=True, patches_per_image=patches_per_image, regions=regions
    )
    out = model(pasted.images, output_size=tuple(target.shape[-2:]))
    jsd = densehybrid_loss(
        out.logits.float(), None, pasted.target, pasted.negative_mask, beta=1.0, lambda_=0.0, negative_loss="jsd"
    ).likelihood
    replaced = to_8bit(pasted.replaced.flatten(0, 1)).to(next(flow.parameters()).device)
    bpd = -flow.log_prob(replaced, generator=generator).sum() / (math.log(2.0) * replaced.numel())
    total = jsd_weight * jsd + mle_weight * bpd
    _check_finite("flow loss", total.detach())
    params = [p for p in flow.parameters() if p.requires_grad]
    grads = list(torch.autograd.grad(total, params, allow_unused=True))
    return grads, {"flow_jsd": float(jsd.detach()), "flow_bpd": float(bpd.detach())}


def apply_flow_gradients(
    flow: nn.Module, gradients: Sequence[torch.Tensor | None], optimizer: torch.optim.Optimizer
) -> None:
    """Average ``gradients`` (of :func:`flow_gradients`, in parameter order) over the ranks of a distributed run and
    step the flow's optimiser with them (a no-op average in one process)."""
    params = [p for p in flow.parameters() if p.requires_grad]
    gradients = distributed.average_gradients(list(gradients))
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, gradients):
        p.grad = g  # None where the loss does not reach p: the optimiser skips it, as after the released backward()
    optimizer.step()


def flow_step(
    model: nn.Module,
    flow: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    negatives: FlowNegatives,
    jsd_weight: float = 0.03,
    mle_weight: float = 1.0,
    patches_per_image: int = 1,
    generator: torch.Generator | None = None,
    regions: torch.Tensor | None = None,
) -> dict[str, float]:
    """The flow half of the joint iteration: paste new differentiable samples, minimise JSD + MLE, step the flow.

    .. math::
        L_{flow} = w_{jsd} \\frac{1}{|O|} \\sum_{i \\in O} \\mathrm{JSD}(P(y \\mid x_i) \\,\\|\\, U)
            + w_{mle} \\cdot \\frac{-\\ln p(x_{rep})}{\\ln 2 \\cdot |x_{rep}|}

    with :math:`O` the pasted pixels and :math:`x_{rep}` the inlier content the patches replaced (8-bit). In a
    distributed run the gradients are averaged over the ranks before the step (:func:`apply_flow_gradients`).

    Args:
        model: the segmenter (left in its current mode; the released code keeps it in train mode).
        flow: the flow that ``negatives`` samples from.
        images, target: the un-pasted batch (the same one the segmenter step used).
        optimizer: the flow's optimiser (:func:`build_flow_optimizer`).
        negatives: the flow source.
        jsd_weight: weight of the JSD term (0.03 released).
        mle_weight: weight of the MLE term (1 released).
        patches_per_image: patches per image in this step (1 released).
        generator: source of sizes, samples, positions and the flow's noise.
        regions: where patches may land.

    Returns:
        logs: ``flow_jsd`` (unweighted) and ``flow_bpd``.
    """
    grads, logs = flow_gradients(
        model,
        flow,
        images,
        target,
        negatives=negatives,
        jsd_weight=jsd_weight,
        mle_weight=mle_weight,
        patches_per_image=patches_per_image,
        generator=generator,
        regions=regions,
    )
    apply_flow_gradients(flow, grads, optimizer)
    return logs


def flow_joint_step(
    model: nn.Module,
    flow: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: Callable,
    segmenter_optimizer: torch.optim.Optimizer,
    flow_optimizer: torch.optim.Optimizer,
    negatives: FlowNegatives | MixedNegatives,
    real_negatives: torch.Tensor | Sequence[torch.Tensor] | None = None,
    real_segments: torch.Tensor | Sequence[torch.Tensor] | None = None,
    jsd_weight: float = 0.03,
    mle_weight: float = 1.0,
    generator: torch.Generator | None = None,
    regions: torch.Tensor | None = None,
) -> dict[str, float]:
    """One released joint iteration: :func:`segmenter_step`, then :func:`flow_step` on the same batch.

    The flow step always uses synthetic patches (one per image), also when the segmenter step pastes a mixture.

    Returns:
        the logs of both steps: ``loss``, ``seg``, ``likelihood``, ``posterior``, ``flow_jsd``, ``flow_bpd``.
    """
    logs = segmenter_step(
        model,
        images,
        target,
        loss=loss,
        optimizer=segmenter_optimizer,
        negatives=negatives,
        real_negatives=real_negatives,
        real_segments=real_segments,
        generator=generator,
        regions=regions,
    )
    synthetic = negatives.synthetic if isinstance(negatives, MixedNegatives) else negatives
    logs.update(
        flow_step(
            model,
            flow,
            images,
            target,
            optimizer=flow_optimizer,
            negatives=synthetic,
            jsd_weight=jsd_weight,
            mle_weight=mle_weight,
            generator=generator,
            regions=regions,
        )
    )
    return logs


# ------------------------------------------------------------------------------------------------------ pre-training
def random_crops(
    dataset: Dataset, count: int, crop_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``count`` random ``crop_size``² crops from random dataset images (shorter side resized up when needed).

    Returns:
        (count, 3, crop_size, crop_size) float images in [0, 1].
    """
    idx = torch.randint(len(dataset), (count,), generator=generator).tolist()
    crops = []
    for i in idx:  # data loading: one slice per drawn image
        image, _ = unpack_sample(dataset[i])
        image = torch.as_tensor(image)
        if not image.is_floating_point():
            image = image.float() / 255.0
        h, w = image.shape[-2:]
        if min(h, w) < crop_size:
            scale = crop_size / min(h, w)
            size = (max(crop_size, round(h * scale)), max(crop_size, round(w * scale)))
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
            h, w = size
        top = int(torch.randint(h - crop_size + 1, (1,), generator=generator))
        left = int(torch.randint(w - crop_size + 1, (1,), generator=generator))
        crops.append(image[:3, top : top + crop_size, left : left + crop_size])
    return torch.stack(crops)


def save_sample_grid(images: torch.Tensor, path: str | Path, nrow: int = 4) -> Path:
    """Write images in [0, 1] as one PNG grid, atomically (a temporary file renamed over ``path``)."""
    from torchvision.utils import save_image

    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(images.detach().float().cpu(), tmp, nrow=nrow, padding=2, format="png")
    return path


def flow_bits_per_dim(
    flow: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None, noise: str = "mean"
) -> float:
    """Mean bits/dim of images in [0, 1] under the flow, without gradients (for monitoring)."""
    with torch.no_grad():
        x = to_8bit(images).to(next(flow.parameters()).device)
        return float(-flow.log_prob(x, noise=noise, generator=generator).sum() / (math.log(2.0) * x.numel()))

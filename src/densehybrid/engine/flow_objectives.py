"""Objectives of :func:`~densehybrid.engine.fit` that train a normalizing flow: flow pre-training by maximum
likelihood, and the released joint fine-tuning of a segmenter with synthetic (or mixed) negatives.

Both follow the objective protocol of :func:`~densehybrid.engine.fit`: ``objective(model, images, target, generator)
-> (loss, logs)`` is minimised by the run's optimiser; ``after_step(model, generator)`` runs after that optimiser's
step; ``state_dict()``/``load_state_dict()`` put the flow (and its optimiser) into the run's ``last.pt`` and restore it
on resume; ``on_epoch_end(epoch, model)`` is called at the end of every epoch by ``densehybrid train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densehybrid.engine import distributed
from densehybrid.engine.flow_joint import apply_flow_gradients, flow_gradients, save_sample_grid, segmenter_loss
from densehybrid.flows.checkpoint import load_flow_state
from densehybrid.flows.negatives import FlowNegatives, MixedNegatives, to_8bit

__all__ = ["FlowLikelihoodObjective", "JointFlowObjective"]


def _bits_per_dim(flow: nn.Module, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Negative log-likelihood of images in [0, 1] (as 8-bit) in bits per dimension, differentiable.

    The flow is called (its ``forward`` is ``log_prob``), so that a ``DistributedDataParallel`` wrapper sees the pass.
    """
    x = to_8bit(images)
    return -flow(x, generator=generator).sum() / (math.log(2.0) * x.numel())


class FlowLikelihoodObjective:
    """Flow pre-training: bits/dim of the (augmented, random-crop) inlier batch; the model :func:`fit` trains is the
    flow itself (under ``torchrun`` wrapped in ``DistributedDataParallel`` by :func:`fit`). At each epoch end a grid of
    samples from fixed latents is written to ``out_dir`` (by rank 0).

    Args:
        out_dir: where ``samples_epochNNN.png`` go (None: no grids).
        grid_samples: samples per grid (0: none).
        grid_size: side of each sample, a multiple of the flow's stride.
        seed: seeds the grid's latents, so successive grids show the same latents.
    """

    name = "flow_likelihood"

    def __init__(self, out_dir: Path | None, grid_samples: int = 16, grid_size: int = 64, seed: int = 0) -> None:
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.grid_samples, self.grid_size, self.seed = int(grid_samples), int(grid_size), int(seed)
        self.grids: list[Path] = []

    def __call__(
        self, flow: nn.Module, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        bpd = _bits_per_dim(flow, images, generator)
        value = float(bpd.detach())
        return bpd, {"loss": value, "bpd": value}

    def on_epoch_end(self, epoch: int, flow: nn.Module) -> dict[str, float]:
        """Write ``samples_epoch{epoch + 1:03d}.png``; returns no metrics."""
        if self.out_dir is None or not self.grid_samples or not distributed.is_main():
            return {}
        was_training = flow.training
        flow.eval()
        with torch.no_grad():
            generator = torch.Generator().manual_seed(self.seed)
            samples = flow.sample(self.grid_samples, (self.grid_size, self.grid_size), generator=generator)
        flow.train(was_training)
        path = self.out_dir / f"samples_epoch{epoch + 1:03d}.png"
        self.grids.append(save_sample_grid(samples / 255.0, path, nrow=max(1, math.ceil(math.sqrt(len(samples))))))
        return {}


class JointFlowObjective:
    """The released two-step joint iteration inside :func:`fit`.

    ``__call__`` is the segmenter step's loss (no-grad flow patches, or a real/synthetic mixture, pasted as negatives;
    ``CE + β L_x + λ L_d``), which :func:`fit` minimises with the segmenter's optimiser; ``after_step`` is the flow
    step (:func:`~densehybrid.engine.flow_joint.flow_step`) on the same un-pasted batch, which steps the flow's own
    optimiser. Together they are :func:`~densehybrid.engine.flow_joint.flow_joint_step`. ``on_epoch_end`` decays the
    flow's learning rate (the released ``× 0.99`` or ``× 0.975`` per epoch).

    With :func:`fit` accumulating several slices per step (``TrainConfig.accumulate``), ``__call__`` runs once per
    slice and ``after_step`` computes the flow's gradients on every slice, each with that slice's generator, and steps
    the flow once with their mean (also averaged over the ranks of a distributed run), as the segmenter is stepped.

    Args:
        loss: a :class:`~densehybrid.losses.DenseHybridLoss`.
        flow: the flow (trained jointly).
        flow_optimizer: its optimiser (:func:`~densehybrid.engine.flow_joint.build_flow_optimizer`).
        flow_scheduler: stepped once per epoch (e.g. ``ExponentialLR``).
        negatives: :class:`FlowNegatives` (synthetic) or :class:`MixedNegatives` (mixed).
        real_negatives: for a mixture, ``draw(count, generator) -> (images, segments)`` of real negative crops
            (a :class:`~densehybrid.engine.train.NegativeStream`); one draw per pasting round.
        jsd_weight, mle_weight: weights of the flow step's terms (0.03 and 1 released).
    """

    name = "densehybrid_flow"

    def __init__(
        self,
        loss: Callable,
        flow: nn.Module,
        flow_optimizer: torch.optim.Optimizer,
        flow_scheduler: torch.optim.lr_scheduler.LRScheduler,
        negatives: FlowNegatives | MixedNegatives,
        real_negatives: Any | None = None,
        jsd_weight: float = 0.03,
        mle_weight: float = 1.0,
    ) -> None:
        if isinstance(negatives, MixedNegatives) and real_negatives is None:
            raise ValueError("Expected a source of real negatives for mixed negatives, but got None.")
        self.loss, self.flow, self.negatives, self.real_negatives = loss, flow, negatives, real_negatives
        self.flow_optimizer, self.flow_scheduler = flow_optimizer, flow_scheduler
        self.jsd_weight, self.mle_weight = float(jsd_weight), float(mle_weight)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict[str, float], torch.Generator]] = []

    @property
    def synthetic(self) -> FlowNegatives:
        return self.negatives.synthetic if isinstance(self.negatives, MixedNegatives) else self.negatives

    def __call__(
        self, model: nn.Module, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        real_images = real_segments = None
        if isinstance(self.negatives, MixedNegatives):
            drawn = [
                self.real_negatives.draw(images.shape[0], generator) for _ in range(self.negatives.patches_per_image)
            ]
            real_images = [image.to(images.device, images.dtype) for image, _ in drawn]
            real_segments = [segments.to(images.device) for _, segments in drawn]
        total, logs = segmenter_loss(
            model,
            images,
            target,
            loss=self.loss,
            negatives=self.negatives,
            real_negatives=real_images,
            real_segments=real_segments,
            generator=generator,
        )
        self._pending.append((images, target, logs, generator))
        return total, logs

    def after_step(self, model: nn.Module, generator: torch.Generator) -> None:
        """The flow step on the slices of the last calls, each with its own generator; its logs (``flow_jsd``,
        ``flow_bpd``) join each slice's."""
        if not self._pending:
            raise RuntimeError("Expected the segmenter step's batch before the flow step, but there is none.")
        pending, self._pending = self._pending, []
        segmenter = getattr(model, "module", model)  # never through a DistributedDataParallel wrapper
        total: list[torch.Tensor | None] | None = None
        for images, target, logs, slice_generator in pending:
            grads, flow_logs = flow_gradients(
                segmenter,
                self.flow,
                images,
                target,
                negatives=self.synthetic,
                jsd_weight=self.jsd_weight,
                mle_weight=self.mle_weight,
                generator=slice_generator,
            )
            logs.update(flow_logs)
            total = grads if total is None else [_add(a, b) for a, b in zip(total, grads)]
        if len(pending) > 1:
            total = [None if g is None else g / len(pending) for g in total]
        apply_flow_gradients(self.flow, total, self.flow_optimizer)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Decay the flow's learning rate; returns the rate of the next epoch as ``flow_lr``."""
        self.flow_scheduler.step()
        return {"flow_lr": float(self.flow_optimizer.param_groups[0]["lr"])}

    def state_dict(self) -> dict[str, Any]:
        return {
            "flow": self.flow.state_dict(),
            "flow_config": getattr(self.flow, "config", None),
            "flow_optimizer": self.flow_optimizer.state_dict(),
            "flow_scheduler": self.flow_scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_flow_state(self.flow, state["flow"])
        self.flow_optimizer.load_state_dict(state["flow_optimizer"])
        self.flow_scheduler.load_state_dict(state["flow_scheduler"])
        self._pending = []  # slices of a step that a stop interrupted before its flow step: dropped with that step


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two gradients, either of which may be None (a parameter the loss did not reach)."""
    if a is None or b is None:
        return b if a is None else a
    return a + b

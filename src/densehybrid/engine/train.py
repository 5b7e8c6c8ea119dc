"""Training loops: closed-set training and DenseHybrid fine-tuning with pasted negatives.

:func:`fit` owns everything that makes a run reproducible and resumable: the batch order (a seeded permutation per
epoch), one ``torch.Generator`` for augmentation and negative sampling, and atomic checkpoints holding the model,
optimiser, scheduler, position (epoch, step) and every RNG state. A run stopped after any checkpoint and resumed
ends with exactly the parameters of an uninterrupted run (on deterministic kernels, e.g. the CPU).

Under ``torchrun`` (an initialised ``torch.distributed`` process group) the same loop runs data-parallel: the model is
wrapped in ``DistributedDataParallel``, every step's global batch of ``batch_size`` samples is split across the ranks
(so a run gives the same batches at any world size), the logged losses are averaged over the ranks, and only rank 0
writes checkpoints (see :mod:`densehybrid.engine.distributed`). ``TrainConfig.accumulate`` splits each process's share
into slices whose gradients are accumulated before the step; random draws come from one generator per slice of the
global batch, so ``W`` processes with ``A`` slices each train exactly as one process with ``W * A`` slices.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from densehybrid.engine import distributed
from densehybrid.engine.batches import ResumableSampler, collate, unpack_sample
from densehybrid.engine.outputs import atomic_path, remove_stale_temporaries
from densehybrid.engine.runtime import (
    StepInterrupted,
    raise_if_stop_requested,
    rng_state,
    select_device,
    set_rng_state,
)
from densehybrid.errors import CheckpointError
from densehybrid.labels import IGNORE_INDEX
from densehybrid.losses import segmentation_loss
from densehybrid.models.checkpoint import checkpoint_dict, write_checkpoint
from densehybrid.models.output import HybridOutput
from densehybrid.recipes.schema import COMMON

OPTIMIZERS = COMMON["optim"]["optimizer"].choices
SCHEDULES = COMMON["optim"]["schedule"].choices


def _recipe_key(dotted: str) -> Any:
    """A :class:`TrainConfig` field whose default is the recipe schema's default of ``dotted`` (one source)."""
    section, key = dotted.split(".")
    default = COMMON[section][key].default
    return field(default=tuple(default) if isinstance(default, list) else default, metadata={"recipe_key": dotted})


@dataclass
class TrainConfig:
    """Optimisation settings of one run, derived from the recipe schema (see docs/training.md).

    Every field that a recipe sets takes its default from :data:`densehybrid.recipes.schema.COMMON` (the field's
    ``metadata["recipe_key"]`` names the key) and :meth:`from_recipe` builds the config of a resolved recipe, so the
    two cannot disagree. The fields without a recipe key (``device``, ``hflip``, ``max_steps``, ``progress``) say
    where and how long a run goes, not what it trains; nor does ``accumulate``, which says how the global batch is
    spread (like the number of processes, it may change when a run resumes).

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step (the global batch: split across the ranks of a distributed run).
        lr: learning rate of the decoder and heads.
        backbone_lr_ratio: the backbone (parameters whose name contains ``backbone``) trains at ``lr * ratio``
            (1/4 in the released recipes).
        lr_min: end of the per-epoch cosine schedule of ``lr`` (the backbone's ends at ``lr_min * ratio``).
        weight_decay: weight decay.
        betas: Adam betas.
        eps: Adam epsilon (1e-7 in the released recipes).
        seed: seeds batch order, augmentation and negatives.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        amp: mixed precision on CUDA (ignored on CPU); off by default, as the released code trains in float32.
        hflip: random horizontal flips in the loop (a recipe flips in its data transform instead: ``augment.flip``).
        num_workers: DataLoader workers.
        checkpoint_every: also write ``last.pt`` every this many steps (0: only at the end of each epoch).
        max_steps: stop after this many optimiser steps in total (a checkpoint is written), e.g. for smoke runs.
        progress: show a tqdm progress bar.
        optimizer: ``"adam"``, ``"sgd"`` (plain SGD with ``momentum``; the released Segmenter recipe uses none) or
            ``"adamax"`` (with ``betas`` and ``eps``; flow pre-training).
        momentum: SGD momentum.
        schedule: per-epoch learning rate: ``"cosine"`` (to ``lr_min``), ``"constant"`` or ``"poly"``
            (``lr * (1 - epoch / epochs) ** poly_power``).
        poly_power: exponent of the poly schedule.
        best_metric: a key of the ``on_epoch_end`` metrics; the checkpoint of the epoch where it is highest is
            also written to ``best.pt`` (None, or a metric no epoch reports: no best checkpoint).
        accumulate: slices of each process's share of the batch, run one after the other with their gradients
            accumulated before the optimiser step (``batch_size`` must be divisible by processes × ``accumulate``).
            Each slice of the global batch draws from its own generator
            (:func:`~densehybrid.engine.distributed.slice_generators`) and normalises its own BatchNorm statistics, so
            1 process with ``accumulate=2`` equals 2 processes with ``accumulate=1`` up to float rounding. With one
            slice in all (1 process, ``accumulate=1``) the run's generator is used directly.
    """

    epochs: int = _recipe_key("optim.epochs")
    batch_size: int = _recipe_key("optim.batch_size")
    lr: float = _recipe_key("optim.lr")
    backbone_lr_ratio: float = _recipe_key("optim.backbone_lr_ratio")
    lr_min: float = _recipe_key("optim.lr_min")
    weight_decay: float = _recipe_key("optim.weight_decay")
    betas: tuple[float, float] = _recipe_key("optim.betas")
    eps: float = _recipe_key("optim.eps")
    seed: int = _recipe_key("run.seed")
    device: str = "auto"
    amp: bool = _recipe_key("run.amp")
    hflip: bool = True
    num_workers: int = _recipe_key("run.num_workers")
    checkpoint_every: int = _recipe_key("run.checkpoint_every")
    max_steps: int | None = None
    progress: bool = True
    optimizer: str = _recipe_key("optim.optimizer")
    momentum: float = _recipe_key("optim.momentum")
    schedule: str = _recipe_key("optim.schedule")
    poly_power: float = _recipe_key("optim.poly_power")
    best_metric: str | None = _recipe_key("run.best_metric")
    accumulate: int = 1

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any], **run: Any) -> TrainConfig:
        """The config of a resolved recipe: every field with a recipe key from the recipe, the others from ``run``
        (``device``, ``max_steps``, ``progress``; ``hflip`` is off: a recipe flips in its data transform).

        Args:
            recipe: a resolved recipe (:func:`densehybrid.recipes.load_recipe`).
            **run: values of the fields without a recipe key, or overrides (e.g. ``best_metric=None`` for a run
                without validation).
        """
        values: dict[str, Any] = {"hflip": False}
        for item in fields(cls):
            dotted = item.metadata.get("recipe_key")
            if dotted is not None:
                section, key = dotted.split(".")
                value = recipe[section][key]
                values[item.name] = tuple(value) if isinstance(value, list) else value
        return cls(**{**values, **run})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {getattr(self, name)}.")
        if not (math.isfinite(self.lr) and math.isfinite(self.lr_min)) or self.lr <= 0 or self.lr_min < 0:
            raise ValueError(f"Expected finite `lr` > 0 and `lr_min` >= 0, but got {self.lr} and {self.lr_min}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected `optimizer` to be one of {', '.join(OPTIMIZERS)}, but got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Expected `schedule` to be one of {', '.join(SCHEDULES)}, but got {self.schedule!r}.")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    """What :func:`fit` returns."""

    epoch: int
    global_step: int
    finished: bool
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False


class ClosedSetObjective:
    """Plain cross-entropy on the closed-set logits (void = ``ignore_index``). The OOD head gets no gradient.

    A crop without a labelled pixel gives a loss of 0 (with gradients), not NaN (:func:`~densehybrid.losses.segmentation_loss`).
    """

    name = "closed_set"

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(
        self, model: nn.Module, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out: HybridOutput = model(images, output_size=tuple(target.shape[-2:]))
        loss = segmentation_loss(out.logits.float(), target, ignore_index=self.ignore_index)
        return loss, {"loss": float(loss.detach())}


class NegativeStream:
    """Draws one negative crop per inlier image from a negative dataset, using the trainer's generator.

    Samples are ``(image (3, h, w), segments (h, w))`` tuples or dicts with ``image`` and ``target``/``segments``;
    segments are class masks of the negative image (the released code uses ADE20k's 150-class labels).
    Each drawn image is randomly cropped (after resizing its shorter side up, if needed) to ``crop_size``, or, when
    ``transform`` is given, goes through it instead: ``transform(image, segments) -> (image, segments)`` (e.g.
    :class:`densehybrid.data.transforms.NegativeCrop`, the released recipes' resize-then-crop), run with torch's global
    RNG seeded from the trainer's generator so that a resumed run draws the same crops.
    """

    def __init__(self, dataset: Dataset, crop_size: int, transform: Callable | None = None) -> None:
        if len(dataset) == 0:
            raise ValueError("Expected the negative dataset to hold at least one image, but it is empty.")
        self.dataset = dataset
        self.crop_size = int(crop_size)
        self.transform = transform

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.dataset), (count,), generator=generator).tolist()
        images, segments = [], []
        for i in idx:
            sample = self.dataset[i]
            if isinstance(sample, dict):
                image, seg = sample["image"], sample.get("segments", sample.get("target"))
            else:
                image, seg = unpack_sample(sample)
            if self.transform is None:
                image, seg = self._crop(image, seg, generator)
            else:
                if seg is None:
                    seg = torch.zeros(image.shape[-2:], dtype=torch.int64)
                seed = int(torch.randint(2**62, (1,), generator=generator))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image, seg = self.transform(image, seg)
            images.append(image)
            segments.append(seg)
        return torch.stack(images), torch.stack(segments)

    def _crop(self, image: torch.Tensor, seg: torch.Tensor | None, g: torch.Generator):
        size = self.crop_size
        h, w = image.shape[-2:]
        if seg is None:
            seg = torch.zeros((h, w), dtype=torch.int64)
        if min(h, w) < size:
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            image = F.interpolate(image[None], size=new, mode="bilinear", align_corners=False)[0]
            seg = F.interpolate(seg[None, None].float(), size=new, mode="nearest")[0, 0].long()
            h, w = new
        top = int(torch.randint(h - size + 1, (1,), generator=g))
        left = int(torch.randint(w - size + 1, (1,), generator=g))
        return image[:, top : top + size, left : left + size], seg[top : top + size, left : left + size].long()


class DenseHybridObjective:
    """DenseHybrid fine-tuning: paste one negative into every image, then the hybrid loss.

    Args:
        loss: a :class:`~densehybrid.losses.DenseHybridLoss` (or any callable with its signature).
        negatives: stream of negative crops.
        paster: a :class:`~densehybrid.negatives.NegativePaster` (pasting options).
        pastes: negatives pasted into every image, one after the other (1 in the traffic-scene recipes, 3 on COCO20);
            the negative mask is the union of the pasted regions.
    """

    name = "densehybrid"

    def __init__(self, loss: Callable, negatives: NegativeStream, paster: Callable, pastes: int = 1) -> None:
        if int(pastes) < 1:
            raise ValueError(f"Expected `pastes` to be >= 1, but got {pastes}.")
        self.loss, self.negatives, self.paster, self.pastes = loss, negatives, paster, int(pastes)

    def __call__(
        self, model: nn.Module, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        negative_mask = torch.zeros_like(target, dtype=torch.bool)
        for _ in range(self.pastes):
            raise_if_stop_requested()  # many pastes make a long step: Ctrl-C must not wait for all of them
            neg_images, neg_segments = self.negatives.draw(images.shape[0], generator)
            pasted = self.paster(
                images,
                target,
                neg_images.to(images.device, images.dtype),
                neg_segments.to(images.device),
                generator=generator,
            )
            images, target = pasted.images, pasted.target
            negative_mask = negative_mask | pasted.negative_mask
        out: HybridOutput = model(images, output_size=tuple(target.shape[-2:]))
        terms = self.loss(out.logits.float(), out.ood_logits.float(), target, negative_mask)
        logs = {k: float(v.detach()) for k, v in terms._asdict().items()}
        logs["loss"] = logs.pop("total")
        return terms.total, logs


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (or SGD, Adamax) with two groups: backbone at ``lr * backbone_lr_ratio``, everything else at ``lr``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if "backbone" in name else rest).append(p)
    groups = [{"params": rest, "lr": config.lr, "initial_lr": config.lr}]
    if backbone:
        lr = config.lr * config.backbone_lr_ratio
        groups.append({"params": backbone, "lr": lr, "initial_lr": lr})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamax":
        return torch.optim.Adamax(groups, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    return torch.optim.Adam(groups, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def cosine_lr(base: float, lr_min: float, epoch: int, epochs: int) -> float:
    """The released recipes' per-epoch schedule: lr_min + (base - lr_min) * (1 + cos(pi * epoch / epochs)) / 2."""
    return lr_min + (base - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def epoch_lr(base: float, config: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) for a group whose initial rate is ``base``, per ``config.schedule``."""
    if config.schedule == "constant":
        return base
    if config.schedule == "poly":
        return base * (1 - epoch / config.epochs) ** config.poly_power
    return cosine_lr(base, config.lr_min, epoch, config.epochs)


def _set_epoch_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> None:
    """Schedule ``config.lr`` and scale it per group, as the released ``process_lr`` does: the backbone's rate is
    ``epoch_lr(lr) * ratio``, so its cosine floor is ``lr_min * ratio``."""
    rate = epoch_lr(config.lr, config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = rate * (group["initial_lr"] / config.lr)


def _hflip(images: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    if bool(flip.any()):
        idx = flip.nonzero().flatten().to(images.device)
        images = images.clone()
        target = target.clone()
        images[idx] = images[idx].flip(-1)
        target[idx] = target[idx].flip(-1)
    return images, target


#: Entries of ``fit``'s ``metadata`` that are fields of the checkpoint format (stored at its top level).
CHECKPOINT_FIELDS = ("method", "recipe", "class_names", "palette", "ignore_index")


def training_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    objective: str,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    generator: torch.Generator,
    history: list[dict[str, float]],
    scaler: torch.amp.GradScaler | None = None,
    metadata: dict[str, Any] | None = None,
    epoch_sums: dict[str, float] | None = None,
    objective_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to continue a run exactly, plus what is needed to rebuild the model, in the one checkpoint
    format (:func:`densehybrid.models.checkpoint.checkpoint_dict`).

    ``metadata`` entries named in :data:`CHECKPOINT_FIELDS` become the checkpoint's fields (the method defaults to
    the objective's name); the others are kept under ``"metadata"``. ``epoch_sums`` are the sums of the logged values
    over the steps done so far in the current epoch, so that a resumed epoch's averages in the history count every
    step of the epoch once. ``objective_state`` is the objective's own state (e.g. a flow, its optimiser and schedule).
    """
    extra = dict(metadata or {})
    described = {key: extra.pop(key) for key in CHECKPOINT_FIELDS if key in extra}
    described.setdefault("method", objective)
    training = {
        "objective": objective,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": asdict(config),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "generator": generator.get_state(),
        "rng": rng_state(),
        "history": history,
        "epoch_sums": dict(epoch_sums or {}),
        "world_size": distributed.world_size(),
    }
    if objective_state is not None:
        training["objective_state"] = objective_state
    return checkpoint_dict(model, training=training, metadata=extra, **described)


def fit(
    model: nn.Module,
    train_set: Dataset,
    objective: Callable,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[int, nn.Module], dict[str, float] | None] | None = None,
    metadata: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    sync_bn: bool = False,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_set`` with ``objective``; checkpoint to ``out_dir/last.pt``.

    The library's one training loop: closed-set training, DenseHybrid fine-tuning (real, synthetic or mixed
    negatives), flow pre-training and DiCNet distillation differ only in their objective.

    Args:
        model: the network to train (e.g. ``forward(images, output_size) -> HybridOutput``; a flow; a DiCNet).
        train_set: samples with an image (3, H, W) in [0, 1] and a target (H, W) of class ids / 255. A dataset with a
            ``set_epoch(epoch)`` method is told the epoch before each pass (per-epoch seeded augmentation).
        objective: :class:`ClosedSetObjective`, :class:`DenseHybridObjective` or a callable
            ``(model, images, target, generator) -> (loss, logs)``. An objective with ``state_dict()`` /
            ``load_state_dict()`` (e.g. one that trains a second network) is checkpointed with the run, and one with
            ``after_step(model, generator)`` is called after every optimiser step.
        config: optimisation settings.
        out_dir: where ``last.pt`` (and ``best.pt`` with ``config.best_metric``) is written atomically (None: no
            checkpoints); temporaries of saves killed mid-write (``.*.tmp``) found there are removed first.
        resume: continue from ``out_dir/last.pt`` if it exists.
        on_epoch_end: optional callback ``(epoch, model) -> metrics`` (e.g. validation), logged in the history.
        metadata: plain values stored in every checkpoint: the fields of :data:`CHECKPOINT_FIELDS` (method, recipe,
            class names, palette, ignore id) at the checkpoint's top level, the rest under ``"metadata"``.
        on_step: optional callback ``(global_step, logs)`` after every step (logs averaged over the ranks).
        stop: optional callable polled after every step; when it returns True (on any rank) the run writes a
            checkpoint and returns with ``interrupted=True`` (e.g. on SIGINT).
        sync_bn: convert BatchNorm layers to SyncBatchNorm in a distributed run (CUDA only).
        echo: optional callable given the run's console lines (on the main process only): ``"resuming from step N of
            M ..."`` and one line per epoch (:func:`epoch_line`: loss, validation metrics, time, ETA).

    Returns:
        :class:`TrainResult`; ``finished`` is False when ``config.max_steps`` or ``stop`` ended the run early.
    """
    loop = _Loop(model, train_set, objective, config, out_dir, metadata, sync_bn)
    loop.echo = echo if distributed.is_main() else None
    if resume:
        loop.resume()
    while loop.epoch < config.epochs:
        interrupted = loop.train_epoch(on_step, stop)
        if interrupted is not None:
            path = loop.save()
            distributed.barrier()
            return TrainResult(loop.epoch, loop.global_step, False, loop.history, path, interrupted=interrupted)
        loop.end_epoch(on_epoch_end)
    distributed.barrier()
    return TrainResult(loop.epoch, loop.global_step, True, loop.history, loop.checkpoint_path)


class _Loop:
    """The state of one :func:`fit` run: model, optimiser, generator, position and the running sums of the logs."""

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        objective: Callable,
        config: TrainConfig,
        out_dir: str | Path | None,
        metadata: dict[str, Any] | None,
        sync_bn: bool,
    ) -> None:
        self.device = distributed.local_device(select_device(config.device))
        model.to(self.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if config.batch_size % (self.world * config.accumulate):
            raise ValueError(
                f"Expected `batch_size` ({config.batch_size}, the global batch) to be divisible by the {self.world} "
                f"process(es) x {config.accumulate} accumulated slice(s)."
            )
        self.model, self.train_set, self.objective, self.config, self.metadata = (
            model,
            train_set,
            objective,
            config,
            metadata,
        )
        self.train_model = distributed.wrap(model, self.device, sync_bn) if self.world > 1 else model
        self.optimizer = build_optimizer(model, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        self.objective_name = getattr(objective, "name", type(objective).__name__)
        self.checkpoint_path = Path(out_dir) / "last.pt" if out_dir is not None else None
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.echo: Callable[[str], None] | None = None
        self.history: list[dict[str, float]] = []
        self.sums: dict[str, float] = {}
        self.summed_steps = 0  # steps whose logs are in `sums` (fewer than step_in_epoch after resuming an older file)
        if self.checkpoint_path is not None:
            remove_stale_temporaries(self.checkpoint_path.parent)  # a save killed mid-write leaves .last.pt.*.tmp
        self.steps_per_epoch = len(train_set) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"Expected at least `batch_size`={config.batch_size} training samples, but the dataset has "
                f"{len(train_set)}."
            )

    def resume(self) -> None:
        """Continue from ``last.pt`` when it exists: weights, optimiser, position, RNG states, objective state."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return
        try:
            state = load_training_state(self.checkpoint_path, self.model, self.optimizer, self.scaler)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc} The run cannot continue from it: start over with `--no-resume` (resume=False in Python) or "
                f"delete {str(self.checkpoint_path)!r}."
            ) from exc
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.history = state["history"]
        if self.step_in_epoch and state.get("epoch_sums"):
            self.sums, self.summed_steps = dict(state["epoch_sums"]), self.step_in_epoch
        if state.get("objective_state") is not None and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective_state"])
        if self.echo is not None and self.epoch >= self.config.epochs:
            self.echo(f"the run in {self.checkpoint_path} is finished (step {self.global_step}): nothing left to train")
        elif self.echo is not None:
            self.echo(
                f"resuming from step {self.global_step} of {self.total_steps} (epoch {self.epoch + 1}/"
                f"{self.config.epochs}, step {self.step_in_epoch}/{self.steps_per_epoch}) in {self.checkpoint_path}"
            )

    @property
    def total_steps(self) -> int:
        """The steps of the whole run (``config.max_steps`` when it ends the run earlier)."""
        total = self.config.epochs * self.steps_per_epoch
        return total if self.config.max_steps is None else min(total, self.config.max_steps)

    def save(self) -> Path | None:
        """Write ``last.pt`` atomically (rank 0 only); returns its path, or None when nothing is written."""
        if self.checkpoint_path is None or not distributed.is_main():
            return None
        state = training_checkpoint(
            self.model,
            self.optimizer,
            self.config,
            self.objective_name,
            self.epoch,
            self.step_in_epoch,
            self.global_step,
            self.generator,
            self.history,
            self.scaler,
            self.metadata,
            self.sums,
            self.objective.state_dict() if hasattr(self.objective, "state_dict") else None,
        )
        return write_checkpoint(state, self.checkpoint_path)

    def train_epoch(
        self, on_step: Callable[[int, dict[str, float]], None] | None, stop: Callable[[], bool] | None
    ) -> bool | None:
        """The rest of the current epoch; None when it ended, else whether ``stop`` (True) or ``max_steps`` ended
        the run."""
        config = self.config
        _set_epoch_lr(self.optimizer, config, self.epoch)
        self.train_model.train()
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.epoch)
        sampler = ResumableSampler(
            len(self.train_set), config.seed, self.epoch, start=self.step_in_epoch * config.batch_size
        )
        loader = DataLoader(
            self.train_set,
            batch_sampler=distributed.ShardedBatchSampler(sampler, config.batch_size, self.rank, self.world),
            num_workers=config.num_workers,
            collate_fn=collate,
        )
        self.epoch_start, self.epoch_first_step = time.perf_counter(), self.global_step
        bar = tqdm(
            loader,
            total=self.steps_per_epoch - self.step_in_epoch,
            desc=f"{self.objective_name} epoch {self.epoch + 1}/{config.epochs}",
            disable=not config.progress or not distributed.is_main(),
            leave=False,
        )
        for batch in bar:
            logs = self.step(batch)
            if logs is None:  # a stop during a long step: the unfinished step was dropped
                return True
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if on_step is not None:
                on_step(self.global_step, logs)
            if config.checkpoint_every and self.global_step % config.checkpoint_every == 0:
                self.save()
            stopping = stop is not None and distributed.any_rank(bool(stop()))
            if stopping or (config.max_steps is not None and self.global_step >= config.max_steps):
                return stopping
        return None

    def step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """One optimiser step on ``batch``; returns its logs (averaged over the slices and ranks), or None when a stop
        was requested during the step (:class:`~densehybrid.engine.runtime.StepInterrupted`): the step is dropped and
        the random state restored to before it, so a resumed run repeats it exactly."""
        images = batch["image"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True).long()
        before = (self.generator.get_state(), rng_state())
        count = self.config.accumulate
        # one shared stream on every rank; each slice of the global batch draws from its own generator derived from it
        generators = distributed.slice_generators(self.generator, count) if self.world * count > 1 else [self.generator]
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[dict[str, float]] = []
        for index, (part, part_target) in enumerate(zip(images.chunk(count), target.chunk(count))):
            if self.config.hflip:
                part, part_target = _hflip(part, part_target, generators[index])
            last = index == count - 1  # DistributedDataParallel averages the accumulated gradients once, at the last
            with contextlib.nullcontext() if last or self.world == 1 else self.train_model.no_sync():
                try:
                    with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                        loss, logs = self.objective(self.train_model, part, part_target, generators[index])
                except StepInterrupted:
                    self.generator.set_state(before[0])
                    set_rng_state(before[1])
                    return None
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"The training loss became {float(loss)} at step {self.global_step} (epoch {self.epoch + 1}); "
                        "lower the learning rate or check the inputs."
                    )
                loss = loss / count if count > 1 else loss
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            parts.append(logs)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if hasattr(self.objective, "after_step"):
            self.objective.after_step(self.train_model, generators[-1])
        self.step_in_epoch += 1
        self.global_step += 1
        # after after_step, which may add to the slices' logs (the flow step's)
        logs = {k: sum(part[k] for part in parts) / count for k in parts[0]}
        logs = distributed.mean_over_ranks(logs) if self.world > 1 else logs
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.summed_steps += 1
        return logs

    def end_epoch(self, on_epoch_end: Callable[[int, nn.Module], dict[str, float] | None] | None) -> None:
        """Record the epoch's averages and ``on_epoch_end``'s metrics, checkpoint, and keep ``best.pt``."""
        record = {k: v / max(self.summed_steps, 1) for k, v in self.sums.items()}
        record.update(
            epoch=self.epoch + 1,
            seconds=time.perf_counter() - self.epoch_start,
            lr=self.optimizer.param_groups[0]["lr"],
        )
        if on_epoch_end is not None:
            record.update(on_epoch_end(self.epoch, self.model) or {})
            self.train_model.train()
        self.history.append(record)
        if self.echo is not None:  # time per step of this epoch, validation included, times the steps left
            wall, steps = time.perf_counter() - self.epoch_start, max(1, self.global_step - self.epoch_first_step)
            self.echo(
                epoch_line(record, self.config.epochs, wall, wall / steps * (self.total_steps - self.global_step))
            )
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums, self.summed_steps = {}, 0
        path = self.save()
        if path is not None and _is_best(self.history, self.config.best_metric):
            _atomic_copy(path, path.with_name("best.pt"))


def _duration(seconds: float) -> str:
    """``"45s"``, ``"3m 05s"``, ``"2h 07m"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


#: The validation metrics of an epoch line, in order, with their names (fractions, shown in %).
EPOCH_METRICS = (("val_miou", "val mIoU"), ("val_ap", "AP"), ("val_fpr95", "FPR95"))


def epoch_line(record: Mapping[str, Any], epochs: int, seconds: float, eta_seconds: float) -> str:
    """One console line per epoch: ``"epoch 3/10  loss 0.4123  val mIoU 61.2%  AP 43.1%  FPR95 12.3%  1m 02s
    ETA 7m 14s"`` (the validation metrics a record has, NaN shown as ``n/a``; ``seconds``: the epoch with its
    validation; ``eta_seconds``: the rest of the run, ``done`` when nothing is left)."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    if isinstance(record.get("loss"), float):
        parts.append(f"loss {record['loss']:.4f}")
    for key, name in EPOCH_METRICS:
        value = record.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{name} {100 * value:.1f}%" if math.isfinite(value) else f"{name} n/a")
    parts.append(_duration(seconds))
    parts.append(f"ETA {_duration(eta_seconds)}" if eta_seconds > 0 else "done")
    return "  ".join(parts)


def _is_best(history: list[dict[str, float]], metric: str | None) -> bool:
    """Whether the last epoch of ``history`` has the highest finite ``metric`` so far (ties: the earliest wins)."""
    if metric is None:
        return False
    values = [h.get(metric) for h in history]
    last = values[-1]
    if not isinstance(last, (int, float)) or not math.isfinite(last):
        return False
    earlier = [v for v in values[:-1] if isinstance(v, (int, float)) and math.isfinite(v)]
    return not earlier or last > max(earlier)


def _atomic_copy(source: Path, target: Path) -> Path:
    """Copy ``source`` over ``target`` through a temporary file and a rename (never a half-written ``target``)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def load_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit` into ``model`` (strict) and ``optimizer``; return its contents."""
    from densehybrid.models.checkpoint import load_checkpoint

    state = load_checkpoint(model, path)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise ValueError(f"Expected `{path}` to hold an optimiser state to resume from, but it has none.")
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state

"""Training methods with a normalizing flow: ``denseflow-pretrain`` and the synthetic / mixed
negatives of the ``densehybrid`` method (:func:`build_flow_finetuning`, used when ``negatives.source`` is not
``real``).

- ``denseflow-pretrain`` (listed in :data:`densehybrid.recipes.methods.METHODS`) trains a :class:`~densehybrid.flows.DenseFlow` by maximum likelihood (bits/dim) on the
  recipe's augmented inlier crops with ``[optim]``'s optimiser (Adamax in the shipped recipe) and writes a grid of
  samples after every epoch. The trained network is the flow: ``last.pt`` holds it under ``"model"`` and loads with
  :func:`~densehybrid.flows.load_flow_state` or as ``--flow-init`` of a fine-tuning run.
- Fine-tuning with ``negatives.source = "synthetic"`` or ``"mixed"`` runs the released two-step joint iteration
  (:class:`~densehybrid.engine.flow_objectives.JointFlowObjective`): the segmenter trains with ``[optim]``, the flow
  with its own Adamax (``[flow]``), and the flow with its optimiser and schedule is saved in ``last.pt`` and restored
  on resume.

Both run under ``torchrun`` like any recipe: pre-training wraps the flow in ``DistributedDataParallel``; joint
fine-tuning wraps the segmenter and averages the flow's gradients over the ranks before each flow step, so the flow,
its optimiser and its schedule are identical on every rank and rank 0's ``last.pt`` resumes at any world size.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from densehybrid.errors import CheckpointError

if TYPE_CHECKING:
    from densehybrid.recipes.methods import MethodContext

__all__ = [
    "build_flow",
    "build_flow_finetuning",
    "build_pretrain_flow",
    "build_pretrain_objective",
    "load_flow_init",
]


def load_flow_init(flow: nn.Module, path: str) -> dict[str, Any]:
    """Load ``path`` into ``flow``: a released DenseFlow file (bare, nested or prefixed, see
    :func:`~densehybrid.flows.load_flow_state`), a ``denseflow-pretrain`` run's ``last.pt`` (the flow is its model) or
    a flow fine-tuning run's ``last.pt`` (the flow is in its objective state).

    Raises:
        CheckpointError: the file is missing or does not fit the flow (the message lists the mismatched keys).
    """
    from densehybrid.flows import load_flow_state
    from densehybrid.models.checkpoint import read_checkpoint

    source = Path(path).expanduser()
    if not source.is_file():
        raise CheckpointError(
            f"Expected the flow checkpoint (`--flow-init`, flow.init) {path!r} to exist, but it is missing."
        )
    try:
        info = read_checkpoint(source)
        nested = info.training.get("objective_state")
        joint = isinstance(nested, Mapping) and isinstance(nested.get("flow"), Mapping)
        return load_flow_state(flow, nested["flow"] if joint else info.state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"Flow checkpoint {str(source)!r} (`--flow-init`, flow.init): {exc}") from exc


def build_flow(section: Mapping[str, Any]) -> tuple[nn.Module, bool]:
    """The flow of a recipe's ``[flow]`` section, initialised from ``flow.init`` when given.

    Returns:
        ``(flow, pretrained)``; ``pretrained`` is False for a random initialisation (a ``UserWarning`` says so).
    """
    from densehybrid.flows import DenseFlow

    if section["config"] == "small":
        flow = DenseFlow.small(checkpointing=section["checkpointing"])
    else:
        flow = DenseFlow(checkpointing=section["checkpointing"])
    if section["init"]:
        load_flow_init(flow, section["init"])
        return flow, True
    return flow, False


# -- denseflow-pretrain -----------------------------------------------------------------------------------------------
def build_pretrain_flow(context: MethodContext) -> nn.Module:
    """The flow a ``denseflow-pretrain`` recipe trains (its ``build_model``)."""
    recipe = context.recipe
    crop = recipe["augment"]["crop"]
    grid = recipe["flow"]["grid_size"]
    for name, value in (("augment.crop", crop), ("flow.grid_size", grid)):
        if value % 8:
            raise ValueError(
                f"Expected recipe key `{name}` to be a multiple of 8 (the flow downsamples by 8), but got {value}."
            )
    torch.manual_seed(recipe["run"]["seed"])
    flow, _ = build_flow(recipe["flow"])
    return flow.train()


def build_pretrain_objective(context: MethodContext) -> Any:
    """The ``denseflow-pretrain`` objective: bits/dim of the crops, a grid of samples per epoch."""
    from densehybrid.engine.flow_objectives import FlowLikelihoodObjective

    section = context.recipe["flow"]
    return FlowLikelihoodObjective(
        context.out_dir, section["grid_samples"], section["grid_size"], seed=context.recipe["run"]["seed"]
    )


# -- synthetic and mixed negatives of the densehybrid method ----------------------------------------------------------
def _training_size(context: MethodContext) -> tuple[int, int, str]:
    """(height, width, description) of the training inputs: the crop, or with ``augment.crop = 0`` (whole images)
    the size of the first training image."""
    recipe = context.recipe
    crop = recipe["augment"]["crop"]
    if crop or context.data_root is None:
        return crop, crop, f"the {crop}x{crop} training crop (augment.crop)"
    from densehybrid.recipes.run import open_dataset

    height, width = open_dataset(recipe, context.data_root, recipe["data"]["train_split"])[0]["image"].shape[-2:]
    return int(height), int(width), f"the {height}x{width} training images (augment.crop = 0: whole images)"


def build_flow_finetuning(context: MethodContext) -> Any:
    """The objective of DenseHybrid fine-tuning with synthetic (``negatives.source = "synthetic"``) or mixed negatives.

    Raises:
        ValueError: a largest flow patch that does not fit the crop, patch sides that are not multiples of 8, a
            ``synthetic_fraction`` outside [0, 1], mixed negatives without ``--neg-root``.
        CheckpointError: a ``flow.init`` that is missing or does not fit the flow.
    """
    from densehybrid.engine.flow_joint import build_flow_optimizer
    from densehybrid.engine.flow_objectives import JointFlowObjective
    from densehybrid.flows import FlowNegatives, MixedNegatives
    from densehybrid.losses import DenseHybridLoss
    from densehybrid.recipes.methods import build_negative_stream, negative_root

    recipe = context.recipe
    neg, section, loss = recipe["negatives"], recipe["flow"], recipe["loss"]
    height, width, where = _training_size(context)
    if section["max_side"] > min(height, width):
        raise ValueError(
            f"Expected the largest flow patch (flow.max_side = {section['max_side']} px) to fit {where}, but it does "
            f"not. Lower flow.max_side to at most {min(height, width)} or use a larger crop."
        )
    mixed = neg["source"] == "mixed"
    if mixed and not 0.0 <= neg["synthetic_fraction"] <= 1.0:
        raise ValueError(
            f"Expected recipe key `negatives.synthetic_fraction` in [0, 1], but got {neg['synthetic_fraction']}."
        )
    if mixed and neg["rect_prob"] > 1:
        raise ValueError(f"Expected recipe key `negatives.rect_prob` in [0, 1], but got {neg['rect_prob']}.")
    neg_root = negative_root(context)
    if mixed and neg_root is None:
        raise ValueError(
            f"Expected `--neg-root DIR` (the {neg['dataset']} negatives) for mixed negatives in recipe "
            f"{recipe['name']!r}, but got none. Use negatives.source=synthetic for flow samples only."
        )
    with torch.random.fork_rng(devices=[]):  # the flow's initialisation, seeded without moving the run's RNG
        torch.manual_seed(recipe["run"]["seed"])
        flow, pretrained = build_flow(section)
    lr = section["lr"]
    if not pretrained:
        lr = section["lr_random_init"]
        warnings.warn(
            f"No flow checkpoint (--flow-init or flow.init) for recipe {recipe['name']!r}: the flow starts from a random "
            f"initialisation and trains at lr {lr:g} (flow.lr_random_init), as the released code does.",
            UserWarning,
            stacklevel=2,
        )
    flow.to(context.device).train()
    synthetic = FlowNegatives(
        flow,
        patches_per_image=neg["pastes"],
        min_side=section["min_side"],
        max_side=section["max_side"],
        side_step=section["side_step"],
    )
    synthetic.check_crop(height, width)
    negatives: Any = synthetic
    real = None
    if mixed:
        negatives = MixedNegatives(
            synthetic,
            neg["synthetic_fraction"],
            rect_prob=neg["rect_prob"],
            min_side=neg["min_side"],
            side_step=neg["side_step"],
            num_classes_in_mask=neg["classes_in_mask"],
            max_class_pixels=neg["max_class_pixels"] or None,
        )
        real = build_negative_stream(recipe, neg_root, context.progress)
    optimizer = build_flow_optimizer(flow, lr=lr, betas=tuple(section["betas"]), eps=section["eps"])
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=section["lr_decay"])
    criterion = DenseHybridLoss(
        beta=loss["beta"], lambda_=loss["lambda"], posterior_ignore_void=loss["posterior_ignore_void"]
    )
    return JointFlowObjective(
        criterion,
        flow,
        optimizer,
        scheduler,
        negatives,
        real_negatives=real,
        jsd_weight=section["jsd_weight"],
        mle_weight=section["mle_weight"],
    )

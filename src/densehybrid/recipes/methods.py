"""Training methods: what a recipe's ``method`` key selects.

A method is one :class:`TrainingMethod` entry of the literal table :data:`METHODS`: its name, the recipe sections it
adds to the common schema, and one function ``build(context) -> objective`` that returns the training step's
objective, a callable ``(model, images, target, generator) -> (loss, logs)`` (see :func:`densehybrid.engine.fit`; an
objective may also carry ``state_dict``/``load_state_dict`` and ``after_step`` to train a second network, e.g. a
flow). A method that trains something other than a registered segmentation model passes ``build_model``. Functions
of other modules are named as ``"module:function"`` (:class:`Entry`), imported when a run calls them, so importing
the table imports no method's code.

The package's methods: ``closed-set`` (cross-entropy) and ``densehybrid`` (pasted real negatives or flow samples, and
the hybrid loss), here; ``denseflow-pretrain`` in :mod:`densehybrid.recipes.flow_methods`; ``dicnet`` (feature
distillation) in :mod:`densehybrid.recipes.distillation`. Code outside the package adds its own with
:func:`register_method`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densehybrid.recipes.distillation import DISTILL_SECTIONS
from densehybrid.recipes.flow_schema import FLOW_FINETUNE_KEYS, FLOW_PRETRAIN_KEYS, NEGATIVE_SOURCES
from densehybrid.recipes.schema import Key

__all__ = ["METHODS", "Entry", "MethodContext", "TrainingMethod", "get_method", "list_methods", "register_method"]


@dataclass
class MethodContext:
    """What a method's ``build`` receives.

    Attributes:
        recipe: the resolved recipe (every key present, values checked).
        model: the model to train (already initialised and on ``device``), or None inside ``build_model``.
        num_classes: K.
        device: the device of the run.
        neg_root: ``--neg-root`` (None when not given).
        data_root: ``--data-root``.
        out_dir: ``--out`` (None when the run writes nothing).
        init: ``--init`` (else the recipe's ``model.init``; empty: none), for a method's ``build_model``.
        progress: show progress bars (the check of the negatives' files).
    """

    recipe: dict[str, Any]
    model: nn.Module | None
    num_classes: int
    device: torch.device
    neg_root: Path | None = None
    data_root: Path | None = None
    out_dir: Path | None = None
    init: str = ""
    progress: bool = True


@dataclass(frozen=True)
class TrainingMethod:
    """A registered training method (see the module docstring)."""

    name: str
    build: Callable[[MethodContext], Callable]
    sections: Mapping[str, Mapping[str, Key]] = field(default_factory=dict)
    description: str = ""
    build_model: Callable[[MethodContext], nn.Module] | None = None
    uses_negatives: bool = False


@dataclass(frozen=True)
class Entry:
    """A function named as ``"module:function"``, imported when first called (a table entry without imports)."""

    target: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib

        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


def register_method(
    name: str,
    build: Callable[[MethodContext], Callable],
    *,
    sections: Mapping[str, Mapping[str, Key]] | None = None,
    description: str = "",
    build_model: Callable[[MethodContext], nn.Module] | None = None,
    uses_negatives: bool = False,
) -> TrainingMethod:
    """Add a training method of code outside the package to :data:`METHODS` under ``name``; returns it.

    The package's own methods are entries of the literal table :data:`METHODS`; this is for plug-ins.

    Args:
        name: the ``method`` value recipes use.
        build: ``(MethodContext) -> objective``.
        sections: recipe sections (or keys added to common sections) this method reads, ``{section: {key: Key}}``.
        description: one line for ``densehybrid recipes``.
        build_model: ``(MethodContext) -> nn.Module`` when the trained network is not ``[model]``'s registered model.
        uses_negatives: the method pastes negatives read from ``--neg-root``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in METHODS:
        raise ValueError(f"Expected a new training method name, but {name!r} is already registered.")
    method = TrainingMethod(name, build, dict(sections or {}), description, build_model, uses_negatives)
    METHODS[name] = method
    return method


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def get_method(name: str) -> TrainingMethod:
    """The method registered under ``name``; a ValueError lists the valid names."""
    if name not in METHODS:
        raise ValueError(f"Unknown training method {name!r}. Available: {', '.join(list_methods())}.")
    return METHODS[name]


# -- closed-set -------------------------------------------------------------------------------------------------------
def _build_closed_set(context: MethodContext) -> Callable:
    from densehybrid.engine.train import ClosedSetObjective

    return ClosedSetObjective()


# -- densehybrid ------------------------------------------------------------------------------------------------------
DENSEHYBRID_SECTIONS: dict[str, dict[str, Key]] = {
    "loss": {
        "beta": Key("float", 0.03, "weight of the negative likelihood term L_x", minimum=0.0),
        "lambda": Key(
            "float", 0.3, "weight of the dataset-posterior term L_d (10 * beta in the released code)", minimum=0.0
        ),
        "posterior_ignore_void": Key("bool", False, "leave void pixels out of L_d (COCO20) instead of inliers"),
    },
    "negatives": {
        "source": Key(
            "str",
            "real",
            "real (pasted images), synthetic (samples of a flow trained jointly, see [flow]) or mixed (each pasted "
            "negative synthetic with probability synthetic_fraction)",
            choices=NEGATIVE_SOURCES,
        ),
        "synthetic_fraction": Key(
            "float", 0.5, "b of source = mixed: the probability that a pasted negative is synthetic", minimum=0.0
        ),
        "required": Key("bool", True, "fail without --neg-root; false: train closed-set when it is not given"),
        "dataset": Key(
            "str",
            "ade20k",
            "ade20k (ADEChallengeData2016), folder (any images) or roadscene (the generated negatives of the RoadScene "
            "benchmark at --neg-root, default --data-root)",
            choices=("ade20k", "folder", "roadscene"),
        ),
        "split": Key("str", "training", "the ADE20k split the negatives come from"),
        "resize": Key("int", 384, "the negative's shorter side is first resized to this (0: no resize)", minimum=0),
        "crop": Key("int", 384, "side of the square negative crop", minimum=1),
        "scale": Key(
            "floats", [1.0, 1.0], "jitter of the negative crop ([1, 1]: a plain crop)", minimum=1e-3, length=2
        ),
        "fill": Key("floats", [107.0, 117.0, 120.0], "RGB (0..255) padding of a negative crop", length=3),
        "pastes": Key("int", 1, "negatives pasted into every image", minimum=1),
        "rect_prob": Key("float", 0.5, "probability of a rectangle mask (else the union of classes)", minimum=0.0),
        "min_side": Key("int", 16, "smallest rectangle side", minimum=1),
        "side_step": Key("int", 8, "step between rectangle sides", minimum=1),
        "classes_in_mask": Key("int", 2, "classes drawn (with replacement) for a class mask", minimum=1),
        "max_class_pixels": Key("int", 0, "draw only classes smaller than this many pixels (0: any)", minimum=0),
    },
    "flow": FLOW_FINETUNE_KEYS,
}


#: Distinct generated negatives of ``negatives.dataset = "roadscene"`` (the demo's pool).
ROADSCENE_NEGATIVES = 1000


def negative_root(context: MethodContext) -> Path | None:
    """``--neg-root``; for the generated ``roadscene`` negatives, ``--data-root`` when it is not given."""
    if context.neg_root is None and context.recipe["negatives"]["dataset"] == "roadscene":
        return context.data_root
    return context.neg_root


def build_negative_stream(recipe: Mapping[str, Any], neg_root: Path, progress: bool = True) -> Any:
    """The :class:`~densehybrid.engine.NegativeStream` of a recipe's ``[negatives]`` section on ``neg_root``; every
    negative file is checked first (:func:`~densehybrid.data.datasets.check_dataset_files`).

    ``roadscene`` negatives are generated from the seed of the RoadScene benchmark at ``neg_root``, at the crop size,
    and drawn as they are (``resize``, ``scale`` and ``fill`` are not used).

    Raises:
        DatasetFileError: a damaged negative image or class mask, named.
    """
    from densehybrid.data.datasets import ADE20K, ImageFolder, check_dataset_files
    from densehybrid.data.transforms import NegativeCrop
    from densehybrid.engine.train import NegativeStream

    section = recipe["negatives"]
    if section["dataset"] == "roadscene":
        from densehybrid.data.roadscene import RoadSceneBenchmark, RoadSceneNegatives

        seed = RoadSceneBenchmark.from_root(neg_root).seed
        side = section["crop"]
        return NegativeStream(RoadSceneNegatives(seed, (side, side), ROADSCENE_NEGATIVES), side)
    if section["dataset"] == "ade20k":
        dataset = ADE20K(neg_root, split=section["split"])
    else:
        dataset = ImageFolder(neg_root)
    check_dataset_files(dataset, "negatives", progress)
    crop = NegativeCrop(section["crop"], section["resize"], section["scale"], section["fill"])
    return NegativeStream(dataset, section["crop"], transform=crop)


def _build_densehybrid(context: MethodContext) -> Callable:
    from densehybrid.engine.train import DenseHybridObjective
    from densehybrid.losses import DenseHybridLoss
    from densehybrid.negatives import NegativePaster

    recipe = context.recipe
    if recipe["negatives"]["source"] != "real":
        from densehybrid.recipes.flow_methods import build_flow_finetuning

        return build_flow_finetuning(context)
    neg_root = negative_root(context)
    if neg_root is None:
        raise ValueError(
            f"Expected `--neg-root DIR` (the {recipe['negatives']['dataset']} negatives) for recipe "
            f"{recipe['name']!r}, but got none."
        )
    loss = recipe["loss"]
    neg = recipe["negatives"]
    if neg["rect_prob"] > 1:
        raise ValueError(f"Expected recipe key `negatives.rect_prob` in [0, 1], but got {neg['rect_prob']}.")
    paster = NegativePaster(
        rect_prob=neg["rect_prob"],
        min_side=neg["min_side"],
        side_step=neg["side_step"],
        num_classes_in_mask=neg["classes_in_mask"],
        max_class_pixels=neg["max_class_pixels"] or None,
    )
    criterion = DenseHybridLoss(
        beta=loss["beta"], lambda_=loss["lambda"], posterior_ignore_void=loss["posterior_ignore_void"]
    )
    return DenseHybridObjective(
        criterion, build_negative_stream(recipe, neg_root, context.progress), paster, pastes=neg["pastes"]
    )


# -- the table --------------------------------------------------------------------------------------------------------
#: Every training method of the package, by the name recipes use (``method = "..."``).
METHODS: dict[str, TrainingMethod] = {
    "closed-set": TrainingMethod(
        "closed-set",
        _build_closed_set,
        description="cross-entropy on the known classes (the posterior head gets no gradient)",
    ),
    "densehybrid": TrainingMethod(
        "densehybrid",
        _build_densehybrid,
        DENSEHYBRID_SECTIONS,
        description="DenseHybrid: negatives (real, flow samples or mixed) pasted into every image; CE + beta L_x + "
        "lambda L_d",
        uses_negatives=True,
    ),
    "denseflow-pretrain": TrainingMethod(
        "denseflow-pretrain",
        Entry("densehybrid.recipes.flow_methods:build_pretrain_objective"),
        {"flow": FLOW_PRETRAIN_KEYS},
        description="DenseFlow pre-training: bits/dim on random inlier crops, a samples grid per epoch",
        build_model=Entry("densehybrid.recipes.flow_methods:build_pretrain_flow"),
    ),
    "dicnet": TrainingMethod(
        "dicnet",
        Entry("densehybrid.recipes.distillation:build_objective"),
        DISTILL_SECTIONS,
        description="DiCNet: the student learns the frozen teacher's features, mse(S(x), T(x)); no labels, no "
        "negatives",
        build_model=Entry("densehybrid.recipes.distillation:build_distillation_model"),
    ),
}

"""The keys a recipe may hold: their types, defaults, allowed values and meaning.

A recipe is a nested table (TOML or JSON). The sections every method shares are in :data:`COMMON`; a training
method adds its own sections in its entry of :data:`densehybrid.recipes.methods.METHODS`. Values are
checked here, once, before any data or weights are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("str", "int", "float", "bool", "floats", "table")
#: The value that leaves a key to the run (keys whose :attr:`Key.auto` says what it derives).
AUTO = "auto"


@dataclass(frozen=True)
class Key:
    """One recipe key.

    Attributes:
        kind: ``str``, ``int``, ``float``, ``bool``, ``floats`` (a list of numbers) or ``table`` (free key/values, e.g.
            model keyword arguments).
        default: the value when a recipe omits the key.
        help: one line for ``densehybrid recipes`` and the docs.
        choices: the allowed values (for ``str``/``int``), or None.
        minimum: the smallest allowed number (``int``/``float``/each of ``floats``), or None.
        length: the required list length for ``floats``, or None.
        below: every number must be smaller than this (``int``/``float``/each of ``floats``), or None.
        auto: what the value ``"auto"`` means for this key (a run derives it, see
            :mod:`densehybrid.recipes.derived`); empty: ``"auto"`` is not accepted.
    """

    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    length: int | None = None
    below: float | None = None
    auto: str = ""

    def check(self, dotted: str, value: Any, choices: tuple[Any, ...] | None = None) -> Any:
        """``value`` converted to this key's kind (ints accepted as floats), or a ValueError naming ``dotted``."""
        choices = self.choices if choices is None else choices
        if self.auto and value == AUTO:
            return AUTO
        either = f' or "{AUTO}"' if self.auto else ""

        def fail(expected: str) -> ValueError:
            return ValueError(f"Expected recipe key `{dotted}` to be {expected}{either}, but got {value!r}.")

        if self.kind == "bool":
            if not isinstance(value, bool):
                raise fail("true or false")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise fail("a string")
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail("an integer")
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise fail("a finite number")
            value = float(value)
        elif self.kind == "floats":
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                raise fail("a list of numbers")
            if self.length is not None and len(value) != self.length:
                raise fail(f"a list of {self.length} numbers")
            value = [float(v) for v in value]
        elif self.kind == "table":
            if not isinstance(value, Mapping):
                raise fail("a table of key = value pairs")
            return dict(value)
        if choices is not None and value not in choices:
            allowed = [*choices, AUTO] if self.auto else list(choices)
            raise ValueError(
                f"Expected recipe key `{dotted}` to be one of {', '.join(repr(c) for c in allowed)}, but got {value!r}."
            )
        if self.minimum is not None:
            numbers = value if isinstance(value, list) else [value]
            if any(v < self.minimum for v in numbers):
                raise fail(f">= {self.minimum:g}")
        if self.below is not None:
            numbers = value if isinstance(value, list) else [value]
            if any(v >= self.below for v in numbers):
                raise fail(f"< {self.below:g}" if isinstance(self.below, float) else f"< {self.below}")
        return value


Schema = Mapping[str, Mapping[str, Key]]

#: Top-level keys (outside any section).
TOP: dict[str, Key] = {
    "name": Key("str", "", "the recipe's name"),
    "method": Key("str", "", "the training method (see `densehybrid recipes`)"),
    "description": Key("str", "", "one line shown by `densehybrid recipes`"),
    "seed_command": Key("str", "", "the released training command this recipe stands for"),
    "reproduces": Key("str", "", "the released checkpoint this recipe should reproduce"),
    "notes": Key("str", "", "where the recipe deviates from or is unsure about the released code"),
}

#: Sections every method shares.
COMMON: dict[str, dict[str, Key]] = {
    "model": {
        "name": Key("str", "ladder_resnet18", "a registered model (`densehybrid models`)"),
        "num_classes": Key("int", 0, "K; 0: the training dataset's number of classes", minimum=0),
        "kwargs": Key("table", {}, "keyword arguments of the model's entry point"),
        "init": Key("str", "", "weights to start from (--init overrides); empty: none"),
        "init_as": Key(
            "str",
            "checkpoint",
            "how `init` is used: a full checkpoint (the posterior head may be missing), the model's `pretrained` or "
            "`pretrained_backbone` argument",
            choices=("checkpoint", "pretrained", "pretrained_backbone"),
        ),
    },
    "data": {
        "dataset": Key("str", "folder", "a benchmark name of `densehybrid doctor` or `folder` (your own tree)"),
        "train_split": Key("str", "train", "the training split"),
        "val_split": Key("str", "val", "the validation split; empty: no validation"),
        "options": Key("table", {}, "loader options (as `--option KEY=VALUE` of `densehybrid evaluate`)"),
    },
    "augment": {
        "crop": Key(
            "int",
            512,
            "side of the square random crop (0: whole images, no crop)",
            minimum=0,
            auto="from the training images' sizes: the shorter side of the smallest, rounded down to a multiple of "
            "32, from 32 to 512",
        ),
        "scale": Key("floats", [0.5, 2.0], "range of the random rescale before cropping", minimum=1e-3, length=2),
        "fill": Key("floats", [0.0, 0.0, 0.0], "RGB (0..255) padding colour; labels are padded with 255", length=3),
        "flip": Key("bool", True, "random horizontal flips"),
    },
    "optim": {
        "optimizer": Key("str", "adam", "adam, sgd or adamax", choices=("adam", "sgd", "adamax")),
        "lr": Key(
            "float",
            4e-4,
            "learning rate of the decoder and heads",
            minimum=1e-12,
            auto="the released rates: 1e-5 (fine-tuning, ldn121-streethazards-finetune) when a DenseHybrid run starts "
            "from --init, else 4e-4 (ldn121-streethazards)",
        ),
        "backbone_lr_ratio": Key(
            "float",
            0.25,
            "the backbone trains at lr * ratio",
            minimum=0.0,
            auto='the ratio of the released recipe `optim.lr = "auto"` takes its rate from (1/4)',
        ),
        "lr_min": Key("float", 1e-7, "end of the cosine schedule", minimum=0.0),
        "schedule": Key("str", "cosine", "per-epoch learning rate", choices=("cosine", "constant", "poly")),
        "poly_power": Key("float", 0.9, "exponent of the poly schedule", minimum=0.0),
        "betas": Key("floats", [0.9, 0.999], "Adam (Adamax) betas", minimum=0.0, length=2, below=1.0),
        "eps": Key("float", 1e-7, "Adam (Adamax) epsilon", minimum=0.0),
        "momentum": Key("float", 0.0, "SGD momentum", minimum=0.0),
        "weight_decay": Key("float", 0.0, "weight decay", minimum=0.0),
        "epochs": Key("int", 10, "passes over the training split", minimum=1),
        "batch_size": Key("int", 8, "images per step, over all processes", minimum=1),
    },
    "run": {
        "amp": Key("bool", False, "mixed precision on CUDA (the released recipes train in float32)"),
        "checkpoint_every": Key("int", 500, "also write last.pt every this many steps (0: epoch ends only)", minimum=0),
        "seed": Key(
            "int",
            0,
            "seeds batch order, augmentation, negatives and the model's initialisation",
            minimum=0,
            below=2**32,
        ),
        "num_workers": Key(
            "int",
            4,
            "DataLoader workers per process",
            minimum=0,
            auto="from the machine: the usable CPU cores per process minus one (the training itself), at most 8",
        ),
        "sync_bn": Key("bool", False, "SyncBatchNorm in multi-GPU runs (CUDA only)"),
        "validate": Key("bool", True, "validate at the end of each epoch (when the recipe has a validation split)"),
        "val_limit": Key("int", 0, "validate on the first N frames only (0: all)", minimum=0),
        "best_metric": Key(
            "str",
            "val_miou",
            "validation metric whose best (highest) epoch is kept as best.pt",
            choices=("val_miou", "val_ap"),  # the keys of densehybrid.engine.validation.validate where higher is better
            auto="val_ap when the run trains an anomaly score and val has anomaly pixels, else val_miou",
        ),
    },
}


def merge_schema(*parts: Schema) -> dict[str, dict[str, Key]]:
    """Sections of several schemas in one (a later part may add keys to a section, never redefine one)."""
    merged: dict[str, dict[str, Key]] = {}
    for part in parts:
        for section, keys in part.items():
            target = merged.setdefault(section, {})
            clash = sorted(set(target) & set(keys))
            if clash:
                raise ValueError(f"Expected new keys for section [{section}], but {clash} are defined twice.")
            target.update(keys)
    return merged


def valid_keys(schema: Schema) -> list[str]:
    """Every dotted key of ``schema`` (``section.key``), with the top-level keys first."""
    return list(TOP) + [f"{section}.{key}" for section, keys in schema.items() for key in keys]

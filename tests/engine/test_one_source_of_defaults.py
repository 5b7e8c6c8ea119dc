"""One source of defaults: `TrainConfig` is derived from the recipe schema, and every Python entry point computes in
float32 unless AMP is asked for."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import fields

from densehybrid.engine.train import TrainConfig
from densehybrid.recipes import load_recipe
from densehybrid.recipes.schema import COMMON

#: TrainConfig fields that say where and how long a run goes (no recipe key).
RUN_INPUTS = {
    "device",
    "hflip",
    "max_steps",
    "progress",
    "accumulate",
}  # accumulate: how the batch is spread, like the processes


def _keyed() -> dict[str, str]:
    return {item.name: item.metadata["recipe_key"] for item in fields(TrainConfig) if "recipe_key" in item.metadata}


def _schema_default(dotted: str):
    section, key = dotted.split(".")
    default = COMMON[section][key].default
    return tuple(default) if isinstance(default, list) else default


def test_train_config_defaults_are_the_schema_defaults():
    keyed = _keyed()
    assert {item.name for item in fields(TrainConfig)} - set(keyed) == RUN_INPUTS
    assert {f"optim.{key}" for key in COMMON["optim"]} <= set(keyed.values())  # every optimiser key reaches fit
    default = TrainConfig()
    for name, dotted in keyed.items():
        assert getattr(default, name) == _schema_default(dotted), (name, dotted)
    assert default.amp is False  # float32 unless asked for, as the recipes


def test_train_config_of_a_recipe_takes_every_recipe_key():
    recipe = load_recipe("segmenter-coco20", ["optim.epochs=3", "run.amp=true", "run.checkpoint_every=7"])
    config = TrainConfig.from_recipe(recipe, device="cpu", max_steps=5)
    for name, dotted in _keyed().items():
        section, key = dotted.split(".")
        value = recipe[section][key]
        assert getattr(config, name) == (tuple(value) if isinstance(value, list) else value), name
    assert (config.epochs, config.amp, config.checkpoint_every, config.optimizer) == (3, True, 7, "sgd")
    assert config.hflip is False and config.device == "cpu" and config.max_steps == 5  # flips are in the transform


def test_python_entry_points_default_to_float32():
    modules = [
        "densehybrid.engine.evaluate",
        "densehybrid.engine.validation",
        "densehybrid.evaluation.benchmark",
        "densehybrid.evaluation.open_set",
        "densehybrid.calibrate",
        "densehybrid.predict",
    ]
    checked = []
    for name in modules:
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if getattr(value, "__module__", None) != name or not callable(value):
                continue
            target = value.__init__ if inspect.isclass(value) else value
            parameters = inspect.signature(target).parameters
            if "amp" in parameters and parameters["amp"].default is not inspect.Parameter.empty:  # else required
                checked.append(f"{name}.{attribute}")
                assert parameters["amp"].default is False, f"{name}.{attribute}"
    assert {"densehybrid.engine.evaluate.evaluate", "densehybrid.engine.evaluate.model_outputs"} <= set(checked)

"""Training recipes: declarative files that say what ``densehybrid train`` does.

A recipe is one TOML (or JSON) file: a ``method`` (a registered training method, see
:mod:`densehybrid.recipes.methods`) and nested sections ``[model]``, ``[data]``, ``[augment]``, ``[optim]``, ``[run]``
plus the method's own (``[loss]``, ``[negatives]`` for ``densehybrid``). The released recipes ship as files under
``densehybrid/recipes/presets/``; a user can copy one, change it and pass its path to ``--recipe``. Keys a file omits
take the schema's defaults (:mod:`densehybrid.recipes.schema`); ``--set section.key=VALUE`` overrides any key. A recipe
may start from another with ``base = "NAME"`` (a shipped recipe or a file path) and hold only what differs
(:func:`expand_recipe`).

Example:
    >>> recipe = load_recipe("ldn121-streethazards", ["optim.epochs=2"])
    >>> recipe["method"], recipe["optim"]["epochs"], recipe["optim"]["lr"]
    ('closed-set', 2, 0.0004)
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from densehybrid.recipes.methods import (
    METHODS,
    MethodContext,
    TrainingMethod,
    get_method,
    list_methods,
    register_method,
)
from densehybrid.recipes.schema import COMMON, TOP, Key, merge_schema, valid_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "METHODS",
    "RECIPES",
    "Key",
    "MethodContext",
    "TrainingMethod",
    "expand_recipe",
    "get_method",
    "list_methods",
    "list_recipes",
    "load_recipe",
    "optimizer_groups",
    "parse_override",
    "read_recipe_file",
    "recipe_path",
    "recipe_schema",
    "register_method",
    "resolve_recipe",
]

#: Sections whose keys are free (their sub-keys can be set with ``--set model.kwargs.NAME=VALUE``).
_FREE_TABLES = {("model", "kwargs"), ("data", "options")}


#: Every recipe shipped with the package: its name is the file ``presets/NAME.toml``.
RECIPES: tuple[str, ...] = (
    "generic",
    "ldn121-streethazards",
    "ldn121-streethazards-finetune",
    "ldn121-streethazards-finetune-flow",
    "dlv3p-cityscapes-finetune",
    "dlv3p-cityscapes-finetune-flow",
    "segmenter-coco20",
    "segmenter-coco20-finetune",
    "segmenter-coco20-finetune-flow",
    "denseflow-pretrain",
    "dicnet",
    "dicnet-streethazards",
    "demo-closed-set",
    "demo-finetune",
    "demo-flow-pretrain",
    "demo-finetune-flow",
    "demo-dicnet",
)


def _presets() -> Any:
    return resources.files("densehybrid.recipes") / "presets"


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package (:data:`RECIPES`), sorted."""
    return sorted(RECIPES)


def recipe_path(name_or_path: str | Path) -> Any:
    """The file of a shipped recipe name, or ``name_or_path`` itself when it is an existing file.

    Raises:
        ValueError: neither a shipped recipe nor a file; the message lists the shipped names.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".toml", ".json") or candidate.is_file():
        if not candidate.is_file():
            raise ValueError(
                f"Expected `--recipe` {str(candidate)!r} to be an existing recipe file, but it is missing."
            )
        return candidate
    shipped = _presets() / f"{name_or_path}.toml"
    if name_or_path not in RECIPES:
        raise ValueError(
            f"Unknown recipe {str(name_or_path)!r}. Available: {', '.join(list_recipes())} (or the path of a .toml "
            "or .json recipe file)."
        )
    return shipped


def read_recipe_file(path: Any) -> dict[str, Any]:
    """The raw table of a TOML or JSON recipe file.

    Raises:
        ValueError: the file does not parse; the message names it and the parser's complaint.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"Expected recipe file {str(path)!r} to be UTF-8 text (TOML or JSON), but byte {exc.start} is not UTF-8."
        ) from None
    except OSError as exc:
        raise ValueError(f"Cannot read recipe file {str(path)!r}: {exc.strerror or exc}.") from None
    try:
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"Cannot read recipe file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"Expected recipe file {str(path)!r} to hold a table of sections, but got {type(data).__name__}."
        )
    return data


def recipe_schema(method: str) -> dict[str, dict[str, Key]]:
    """The sections and keys a recipe of ``method`` may hold."""
    return merge_schema(COMMON, get_method(method).sections)


def parse_override(item: str) -> tuple[str, Any]:
    """``"section.key=VALUE"`` -> ``("section.key", value)``; the value is read as a TOML value when it parses
    (numbers, true/false, ``[0.5, 2]``, ``{a = 1}``, quoted strings), else kept as text.

    Raises:
        ValueError: no ``=`` or an empty key.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"Expected `--set` as KEY=VALUE (e.g. optim.lr=1e-5), but got {item!r}.")
    text = text.strip()
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def _unknown(what: str, name: str, choices: Sequence[str]) -> ValueError:
    return ValueError(f"Unknown recipe key {name!r}{what}. Valid keys: {', '.join(choices)}.")


def _apply_override(raw: dict[str, Any], dotted: str, value: Any, schema: Mapping[str, Mapping[str, Key]]) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        if parts[0] not in TOP:
            raise _unknown(" in --set", dotted, valid_keys(schema))
        raw[parts[0]] = value
        return
    section, key, *rest = parts
    if section not in schema or key not in schema[section]:
        raise _unknown(" in --set", dotted, valid_keys(schema))
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ValueError(f"Expected recipe section [{section}] to be a table, but got {table!r}.")
    if rest:
        if (section, key) not in _FREE_TABLES or len(rest) != 1:
            raise _unknown(" in --set", dotted, valid_keys(schema))
        free = table.setdefault(key, {})
        free = dict(copy.deepcopy(schema[section][key].default)) | dict(free)
        free[rest[0]] = value
        table[key] = free
    else:
        table[key] = value


def resolve_recipe(raw: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "recipe") -> dict[str, Any]:
    """Check ``raw`` (and ``--set`` overrides) against the schema of its method; fill the defaults.

    Args:
        raw: the table of a recipe file.
        overrides: ``section.key=VALUE`` strings, applied in order.
        source: the recipe's name or file, for messages.

    Returns:
        the resolved recipe: every section and key of the method's schema, values converted and checked.

    Raises:
        ValueError: an unknown method, section or key (the message lists the valid ones), or a bad value.
    """
    raw = copy.deepcopy(dict(raw))
    parsed = [parse_override(item) for item in overrides]
    for dotted, value in parsed:  # the method decides the schema, so it is set first
        if dotted == "method":
            raw["method"] = value
    method = raw.get("method")
    if not isinstance(method, str) or not method:
        raise ValueError(
            f"Expected {source} to name its training `method` (one of {', '.join(list_methods())}), but it has none."
        )
    schema = recipe_schema(method)
    for dotted, value in parsed:
        _apply_override(raw, dotted, value, schema)
    resolved: dict[str, Any] = {}
    for key, spec in TOP.items():
        resolved[key] = spec.check(key, raw.get(key, spec.default))
    for name, value in raw.items():
        if name in TOP:
            continue
        if name not in schema:
            raise _unknown(f" in {source}", name, valid_keys(schema))
        if not isinstance(value, Mapping):
            raise ValueError(f"Expected [{name}] in {source} to be a section (a table), but got {value!r}.")
        for key in value:
            if key not in schema[name]:
                raise _unknown(f" in {source}", f"{name}.{key}", valid_keys(schema))
    for section, keys in schema.items():
        given = raw.get(section, {})
        resolved[section] = {
            key: spec.check(f"{section}.{key}", copy.deepcopy(given.get(key, spec.default)))
            for key, spec in keys.items()
        }
    _check_model_and_data(resolved)
    return resolved


def _check_model_and_data(recipe: dict[str, Any]) -> None:
    from densehybrid.data.datasets import list_benchmarks
    from densehybrid.engine.outputs import check_name
    from densehybrid.models import list_models
    from densehybrid.models.registry import check_model_kwargs, is_family_name

    check_name(recipe["name"], "recipe key `name`")
    if not is_family_name(str(recipe["model"]["name"])):  # family members (smp:..., hf:...) are checked when built
        Key("str", "", "", choices=tuple(list_models())).check("model.name", recipe["model"]["name"])
    check_model_kwargs(recipe["model"]["name"], recipe["model"]["kwargs"], "recipe keys `model.kwargs`")
    from densehybrid.recipes.distillation import DICNET_MODELS

    if recipe["model"]["name"] in DICNET_MODELS and recipe["method"] != "dicnet":
        raise ValueError(
            f"Expected a DiCNet model ({', '.join(DICNET_MODELS)}) only with method 'dicnet' (it is trained by "
            f"distillation), but the recipe has model.name={recipe['model']['name']!r} and method {recipe['method']!r}."
        )
    if (
        recipe["augment"]["crop"] == 0
        and recipe["augment"]["scale"] != [1.0, 1.0]
        and recipe["optim"]["batch_size"] > 1
    ):
        raise ValueError(
            f"Expected `augment.scale` = [1, 1] with augment.crop = 0 (whole images are batched, so they need one "
            f"size), but got {recipe['augment']['scale']}. Set augment.crop (e.g. 512) or augment.scale=[1, 1]."
        )
    Key("str", "", "", choices=tuple(list_benchmarks())).check("data.dataset", recipe["data"]["dataset"])
    low, high = recipe["augment"]["scale"]
    if low > high:
        raise ValueError(f"Expected recipe key `augment.scale` as [low, high] with low <= high, but got {[low, high]}.")
    if not all(0 <= v <= 255 for v in recipe["augment"]["fill"]):
        raise ValueError(
            f"Expected recipe key `augment.fill` to be RGB values in 0..255, but got {recipe['augment']['fill']}."
        )


def _merge_tables(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``parent`` with ``child`` laid over it: tables merge key by key (recursively), any other value replaces."""
    merged = copy.deepcopy(dict(parent))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge_tables(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _base_path(base: Any, child: Any, source: str) -> Any:
    """The file a ``base`` names: a shipped recipe, or a file path (relative to the including file's folder)."""
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"Expected `base` in {source} to name a recipe (a shipped name or a file path), but got {base!r}."
        )
    if isinstance(child, Path) and (Path(base).suffix in (".toml", ".json") or "/" in base):
        beside = child.parent / Path(base).expanduser()
        if beside.is_file():
            return beside
    try:
        return recipe_path(base)
    except ValueError as exc:
        raise ValueError(f"Cannot resolve `base = {base!r}` of {source}: {exc}") from exc


def _source(path: Any, name: str) -> str:
    return f"recipe file {str(path)!r}" if isinstance(path, Path) else f"recipe {name!r}"


def expand_recipe(path: Any, name: str = "", chain: Sequence[str] = ()) -> dict[str, Any]:
    """The raw table of the recipe file ``path`` with its ``base`` chain laid under it (no validation yet).

    A recipe with ``base = "NAME"`` (a shipped recipe or a file path) starts from that recipe's table (itself
    expanded) and overrides it: sections merge key by key, every other value replaces the parent's. Only ``name`` is
    never inherited (a recipe file without one is named after the file).

    Raises:
        ValueError: a ``base`` that names no recipe, or a cycle (the message shows the chain).
    """
    key = str(path)
    if key in chain:
        cycle = " -> ".join([*chain, key])
        raise ValueError(f"Expected recipe `base` chains to end, but they form a cycle: {cycle}.")
    raw = read_recipe_file(path)
    base = raw.pop("base", None)
    if base is not None:
        parent = expand_recipe(_base_path(base, path, _source(path, name or key)), chain=[*chain, key])
        parent.pop("name", None)
        raw = _merge_tables(parent, raw)
    if not raw.get("name"):
        raw["name"] = name or Path(str(path)).stem
    return raw


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a shipped recipe (by name) or a recipe file, lay it over its ``base`` chain, apply ``--set`` overrides
    and resolve it.

    Raises:
        ValueError: an unknown recipe (the message lists the shipped ones), a file that does not parse, a ``base``
            that names no recipe or forms a cycle, or a recipe that does not fit its method's schema.
    """
    path = recipe_path(name_or_path)
    raw = expand_recipe(path)
    return resolve_recipe(raw, overrides, _source(path, str(name_or_path)))


def optimizer_groups(recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The optimiser parameter groups of a resolved recipe and the learning rate each starts at.

    The run's optimiser has one group for the backbone (parameters whose name contains ``backbone``, at
    ``optim.lr * optim.backbone_lr_ratio``) and one for everything else (``optim.lr``); a recipe that also trains a
    flow beside the segmenter (``negatives.source`` synthetic or mixed) adds the flow's own Adamax group. A rate
    left ``"auto"`` (the run derives it, :mod:`densehybrid.recipes.derived`) is shown as ``"auto"``.
    """
    from densehybrid.recipes.schema import AUTO

    optim = recipe["optim"]
    schedule = optim["schedule"] + (f" to {optim['lr_min']:g}" if optim["schedule"] == "cosine" else "")
    auto = AUTO in (optim["lr"], optim["backbone_lr_ratio"])
    groups = [
        {"group": "decoder and heads", "optimizer": optim["optimizer"], "lr": optim["lr"], "schedule": schedule},
        {
            "group": "backbone",
            "optimizer": optim["optimizer"],
            "lr": AUTO if auto else optim["lr"] * optim["backbone_lr_ratio"],
            "schedule": schedule,
        },
    ]
    if recipe.get("negatives", {}).get("source", "real") != "real":
        flow = recipe["flow"]
        groups.append(
            {
                "group": "flow",
                "optimizer": "adamax",
                "lr": flow["lr"] if flow["init"] else flow["lr_random_init"],
                "schedule": f"x {flow['lr_decay']:g} per epoch",
            }
        )
    return groups

"""Model registry: names the CLI and `create_model` understand.

Entry points are imported lazily so that importing the package stays cheap and a missing optional backbone only
fails when that model is asked for. Each entry point is ``fn(num_classes: int, **kwargs) -> nn.Module`` and returns
a model whose ``forward(images, output_size=None)`` gives a :class:`~densehybrid.models.HybridOutput` (DiCNet models: a
:class:`~densehybrid.models.DistillationOutput`, declared as their ``output_type``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from densehybrid.errors import DenseHybridError

# name -> "module:function"
MODELS: dict[str, str] = {
    "ladder_resnet18": "densehybrid.models.ladder:ladder_resnet18",
    "ladder_mobilenetv3": "densehybrid.models.ladder:ladder_mobilenetv3",
    "ladder_efficientnet_lite0": "densehybrid.models.efficientnet_lite:ladder_efficientnet_lite0",
    "deeplabv3_resnet50": "densehybrid.models.adapters:deeplabv3_resnet50",
    "deeplabv3_mobilenet_v3_large": "densehybrid.models.adapters:deeplabv3_mobilenet_v3_large",
    "ldn121": "densehybrid.models.ldn:ldn121",
    "deeplabv3plus_wrn38": "densehybrid.models.deeplabv3plus:deeplabv3plus_wrn38",
    "segmenter_vit_b16": "densehybrid.models.segmenter:segmenter_vit_b16",
    "segmenter_vit_s16": "densehybrid.models.segmenter:segmenter_vit_s16",
    "segmenter_vit_ti16": "densehybrid.models.segmenter:segmenter_vit_ti16",
    "dicnet_pspnet": "densehybrid.models.dicnet:dicnet_pspnet",
    "dicnet": "densehybrid.models.dicnet:dicnet",
}


# family prefix -> "module:function"; ``PREFIX:MEMBER`` names call ``function(MEMBER, num_classes, **kwargs)``
MODEL_FAMILIES: dict[str, str] = {
    "smp": "densehybrid.models.third_party:smp_model",
    "hf": "densehybrid.models.third_party:hf_model",
    "tv": "densehybrid.models.third_party:tv_model",
}


def is_family_name(name: str) -> bool:
    """Whether ``name`` names a member of a registered family (``smp:Unet:resnet34``, ``hf:segformer``, ...)."""
    prefix, sep, member = name.partition(":")
    return bool(sep and member) and prefix in MODEL_FAMILIES


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODELS)


def get_model_entry(name: str) -> Callable[..., nn.Module]:
    """Resolve a registered model name (or a family member's name) to its entry point."""
    if is_family_name(name):
        prefix, _, member = name.partition(":")
        module_name, fn_name = MODEL_FAMILIES[prefix].split(":")
        return functools.partial(getattr(importlib.import_module(module_name), fn_name), member)
    if name not in MODELS:
        families = ", ".join(f"{prefix}:..." for prefix in MODEL_FAMILIES)
        raise ValueError(
            f"Unknown model {name!r}. Available: {', '.join(list_models())}; families: {families} "
            "(`densehybrid models` lists them)."
        )
    module_name, fn_name = MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered DenseHybrid model.

    Args:
        name: one of :func:`list_models`, or ``PREFIX:MEMBER`` of a family in :data:`MODEL_FAMILIES`.
        num_classes: K, the number of known classes.
        **kwargs: forwarded to the entry point (e.g. ``pretrained_backbone=PATH``).

    Returns:
        an ``nn.Module`` with ``forward(images, output_size=None) -> HybridOutput``, attributes ``num_classes`` and
        ``data_config``, and ``model_name``/``model_kwargs`` recorded so checkpoints can rebuild it.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    check_model_kwargs(name, kwargs)
    try:
        model = get_model_entry(name)(num_classes=num_classes, **kwargs)
    except TypeError as exc:  # an argument the entry point (or the class it forwards **kwargs to) does not take
        if "unexpected keyword argument" not in str(exc) and "multiple values" not in str(exc):
            raise
        raise ValueError(
            f"Expected arguments of model {name!r} (see its entry point {MODELS.get(name, name)}), but got "
            f"{sorted(kwargs)}: {exc}."
        ) from None
    except (RuntimeError, ValueError) as exc:  # torch refusing a layer size the arguments asked for (-1 channels)
        if not kwargs or isinstance(exc, DenseHybridError):
            raise
        raise ValueError(
            f"Cannot build model {name!r} with the arguments {kwargs}: {str(exc).splitlines()[0]}. Check the values "
            "(recipes: model.kwargs)."
        ) from exc
    model.model_name = name
    recorded = getattr(model, "recorded_kwargs", {})  # what the entry point resolved, e.g. a folder's configuration
    model.model_kwargs = {"num_classes": num_classes, **{k: v for k, v in kwargs.items() if _is_plain(v)}, **recorded}
    return model


#: Arguments of the file readers; weight files are always read weights-only (unpickling a file can run code), so no
#: recipe, ``--set`` or checkpoint metadata may pass them to a model.
LOADER_KWARGS = ("weights_only", "pickle_module", "mmap", "map_location")


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], where: str = "model arguments") -> None:
    """Refuse file-reader arguments (:data:`LOADER_KWARGS`) among the keyword arguments of model ``name``, and
    arguments its entry point does not take (when it takes no ``**kwargs``).

    Raises:
        ValueError: a reader argument such as ``weights_only``, or an unknown argument, is given.
    """
    loader = sorted(set(kwargs) & set(LOADER_KWARGS))
    if loader:
        raise ValueError(
            f"Expected no file-reader argument among the {where} of {name!r}, but got {loader}: densehybrid reads "
            "every weight file weights-only (unpickling a file can run code), and that is not configurable."
        )
    if is_family_name(name) or name not in MODELS:  # a family member's arguments are checked when it is built
        return
    parameters = inspect.signature(get_model_entry(name)).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters) - {"num_classes"})
        if unknown:
            known = ", ".join(p for p in parameters if p != "num_classes")
            raise ValueError(
                f"Expected arguments of model {name!r} among {known}, but the {where} hold {unknown} "
                f"(see its entry point {MODELS[name]})."
            )


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):  # e.g. a pair of file names; a Path inside would not load weights-only
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))

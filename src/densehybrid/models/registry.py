"""Model registry: names the CLI and `create_model` understand.

Entry points are imported lazily so that importing the package stays cheap and a missing optional backbone only
fails when that model is asked for. Each entry point is ``fn(num_classes: int, **kwargs) -> nn.Module`` and returns
a model whose ``forward(images, output_size=None)`` gives a :class:`~densehybrid.models.HybridOutput` (DiCNet models: a
:class:`~densehybrid.models.DistillationOutput`, declared as their ``output_type``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from torch import nn

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
    model = get_model_entry(name)(num_classes=num_classes, **kwargs)
    model.model_name = name
    recorded = getattr(model, "recorded_kwargs", {})  # what the entry point resolved, e.g. a folder's configuration
    model.model_kwargs = {"num_classes": num_classes, **{k: v for k, v in kwargs.items() if _is_plain(v)}, **recorded}
    return model


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):  # e.g. a pair of file names; a Path inside would not load weights-only
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))

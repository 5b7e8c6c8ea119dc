"""Model registry: names the CLI and `create_model` understand.

Entry points are imported lazily so that importing the package stays cheap and a missing optional backbone only
fails when that model is asked for. Each entry point is ``fn(num_classes: int, **kwargs) -> nn.Module`` and returns
a model whose ``forward(images, output_size=None)`` gives a :class:`~densehybrid.models.HybridOutput` (DiCNet models: a
:class:`~densehybrid.models.DistillationOutput`, declared as their ``output_type``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

# name -> "module:function"
MODELS: dict[str, str] = {
    "ladder_resnet18": "densehybrid.models.ladder:ladder_resnet18",
    "ladder_mobilenetv3": "densehybrid.models.ladder:ladder_mobilenetv3",
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


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODELS)


def get_model_entry(name: str) -> Callable[..., nn.Module]:
    """Resolve a registered model name to its entry point."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
    module_name, fn_name = MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered DenseHybrid model.

    Args:
        name: one of :func:`list_models`.
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
    model.model_kwargs = {"num_classes": num_classes, **{k: v for k, v in kwargs.items() if _is_plain(v)}}
    return model


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):  # e.g. a pair of file names; a Path inside would not load weights-only
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))

"""Load DenseFlow checkpoints as they are released: bare, nested in a dict, or with a ``flow.`` / ``module.`` prefix."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch
from torch import nn

from densehybrid.errors import CheckpointError
from densehybrid.models.checkpoint import WRAPPER_PREFIXES, read_checkpoint_file, split_checkpoint, strip_prefix

__all__ = ["FLOW_PREFIXES", "FLOW_STATE_KEYS", "describe_mismatch", "load_flow_state"]

#: Keys under which a training checkpoint may nest the flow's state dict, tried before the generic ones.
FLOW_STATE_KEYS = ("flow", "flow_state", "flow_state_dict")
#: Prefixes stripped when every key carries them: the joint model's ``flow.`` attribute and the wrapper prefixes.
FLOW_PREFIXES = ("flow.", *WRAPPER_PREFIXES)
_LISTED = 25


def _listing(title: str, lines: list[str]) -> str:
    shown = "".join(f"\n    {line}" for line in lines[:_LISTED])
    more = f"\n    ... ({len(lines) - _LISTED} more)" if len(lines) > _LISTED else ""
    return f"\n  {title} ({len(lines)}):{shown}{more}"


def describe_mismatch(flow: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> tuple[bool, bool, str]:
    """Compare a state dict with the flow's: ``(names_differ, shapes_differ, message)``; the message is empty if
    everything fits and otherwise lists the missing, unexpected and shape-mismatched keys, one per line."""
    own = flow.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs flow {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return False, False, ""
    message = (
        f"Expected {source} to fit {type(flow).__name__}, but got {len(missing)} missing, {len(unexpected)} "
        f"unexpected and {len(mismatched)} shape-mismatched entries."
    )
    for title, lines in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if lines:
            message += _listing(title, lines)
    config = getattr(flow, "config", None)
    if mismatched and config is not None:
        message += (
            f"\nThe flow was built with {config}; a checkpoint of another DenseFlow configuration needs a flow "
            "built with that configuration (the released flows use the defaults, `DenseFlow()`)."
        )
    return bool(missing or unexpected), bool(mismatched), message


def _flow_state(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(obj, Mapping):
        for key in FLOW_STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)) and inner:
                state, meta = split_checkpoint(inner)
                return state, {**meta, **{k: v for k, v in obj.items() if k != key}}
    return split_checkpoint(obj)


def load_flow_state(
    flow: nn.Module,
    source: str | PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a flow checkpoint (a file or an already loaded object) into ``flow``.

    The state dict may be bare, nested under ``"flow"``/``"flow_state"`` or one of the generic keys
    (``"state_dict"``, ``"model"``, ...), and its names may carry a ``flow.``, ``module.`` or ``_orig_mod.`` prefix
    (the released fine-tuning scripts strip ``flow.`` from ``--flow_state`` files the same way). Names and shapes are
    checked before anything is copied, so a failed load leaves the flow untouched.

    Args:
        flow: a :class:`~densehybrid.flows.DenseFlow` (or any module).
        source: checkpoint path, or what ``torch.load`` returned.
        strict: require the names to match exactly; with ``strict=False`` the shared names are loaded and the rest is
            reported in a ``UserWarning``. Shape mismatches raise either way.
        map_location: device to map tensors to while reading a file.

    Returns:
        the checkpoint's metadata (every entry besides the state dict).

    Raises:
        CheckpointError: when the file cannot be read, holds no state dict, or does not fit the flow; the message
            lists the missing, unexpected and shape-mismatched keys (checkpoint shape vs. flow shape).
    """
    if isinstance(source, Mapping):
        name, obj = "the flow checkpoint", source
    else:
        name, obj = f"flow checkpoint {str(source)!r}", read_checkpoint_file(source, map_location)
    state, metadata = _flow_state(obj)
    state = strip_prefix(state, FLOW_PREFIXES)
    names_differ, shapes_differ, message = describe_mismatch(flow, state, name)
    if shapes_differ or (strict and names_differ):
        raise CheckpointError(message)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    flow.load_state_dict(state, strict=strict)
    return metadata

"""Load checkpoints as they are published: raw state dicts, nested ones, DataParallel prefixes, safetensors.

A released file may be a bare ``state_dict`` or a dict that nests it under a key such as ``"state_dict"``,
``"model"`` or ``"model_state"`` next to metadata (epoch, optimizer, metrics). Parameter names may carry the
``module.`` prefix of ``nn.DataParallel``/``DistributedDataParallel`` or the ``_orig_mod.`` prefix of
``torch.compile``. :func:`load_checkpoint` accepts all of these, loads strictly by default, and when the names do not
fit, raises a :class:`~densehybrid.errors.CheckpointError` that lists what is missing and unexpected and names the
registered architecture whose parameter names fit the file best.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densehybrid.errors import CheckpointError

#: Keys under which checkpoints commonly nest their state dict, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "params")
#: Prefixes added to every name by wrappers: ``nn.DataParallel``/DDP and ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED = 10


def read_checkpoint_file(
    path: str | PathLike[str], map_location: str | torch.device = "cpu", weights_only: bool = True
) -> Any:
    """Read a checkpoint file (``torch.save`` output or ``.safetensors``) without interpreting it.

    Args:
        path: local file.
        map_location: device to map tensors to.
        weights_only: refuse pickled Python objects other than tensors and containers. Keep it on for files from
            the internet; turn it off only for files whose source you trust.

    Returns:
        whatever the file holds (usually a dict).

    Raises:
        CheckpointError: when the file is missing, unreadable, or holds objects ``weights_only`` refuses.
    """
    path = Path(path)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "missing"
        raise CheckpointError(f"Expected checkpoint {str(path)!r} to be an existing file, but it is {found}.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Expected checkpoint {str(path)!r} to hold weights, but the file is empty.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"Cannot read safetensors file {str(path)!r}: {err}") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        text = str(err)
        # A refused object says "Unsupported global/class/..."; bytes that are no pickle at all say "operand".
        if weights_only and "Weights only load failed" in text and "Unsupported operand" not in text:
            detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
            raise CheckpointError(
                f"Checkpoint {str(path)!r} holds Python objects besides tensors (e.g. NumPy scalars or argument "
                "objects in its metadata), which are not loaded by default because unpickling can run code. If you "
                f"trust the file's source, pass `weights_only=False`.{' Detail: ' + detail if detail else ''}"
            ) from err
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r} (truncated or not a PyTorch file?): {err}"
        ) from err
    except Exception as err:  # a damaged file makes torch's reader raise almost any type (KeyError, IndexError, ...)
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r} (truncated or not a PyTorch file?): {type(err).__name__}: {err}"
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def split_checkpoint(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate the state dict of a loaded checkpoint from its metadata.

    Args:
        obj: what ``torch.load`` returned: a state dict, a dict nesting one under :data:`STATE_DICT_KEYS`, or a
            module.

    Returns:
        ``(state_dict, metadata)``; metadata holds every other entry of the enclosing dicts (empty for a bare
        state dict).

    Raises:
        CheckpointError: when no state dict can be found.
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), {}
    if _is_state_dict(obj):
        return dict(obj), {}
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)) and (inner or isinstance(inner, nn.Module)):
                try:
                    state, inner_meta = split_checkpoint(inner)
                except CheckpointError:
                    continue
                metadata = {k: v for k, v in obj.items() if k != key}
                return state, {**inner_meta, **metadata}
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and all(isinstance(k, str) and "." in k for k in tensors):
            # A state dict saved with a few extra non-tensor entries beside the parameters.
            return tensors, {k: v for k, v in obj.items() if k not in tensors}
        keys = ", ".join(repr(k) for k in list(obj)[:_LISTED])
        raise CheckpointError(
            f"Expected the checkpoint to hold a state dict (tensors by parameter name, possibly under one of "
            f"{', '.join(STATE_DICT_KEYS)}), but got a dict with keys {keys}."
        )
    raise CheckpointError(f"Expected the checkpoint to hold a state dict, but got {type(obj).__name__}.")


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (see :func:`split_checkpoint`); prefixes are kept."""
    return split_checkpoint(obj)[0]


def strip_prefix(
    state_dict: Mapping[str, torch.Tensor], prefix: str | Sequence[str] = WRAPPER_PREFIXES
) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix that every key carries (repeatedly, e.g. ``module.module.`` or ``module._orig_mod.``).

    A prefix is only removed when *all* keys start with it, as a wrapper adds it to every name; a model whose own
    submodule happens to be called ``module`` keeps its names.

    Args:
        state_dict: parameter name -> tensor.
        prefix: one prefix or several to try.

    Returns:
        a new dict with the prefixes removed.

    Example:
        >>> strip_prefix({"module.conv.weight": torch.zeros(1)})
        {'conv.weight': tensor([0.])}
    """
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        for p in prefixes:
            if p and all(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items()}
                changed = True
    return state


@functools.cache
def _registered_shapes(name: str, num_classes: int = 2) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes of a registered model, built on the meta device (no memory, no weights)."""
    from densehybrid.models.registry import create_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(name, num_classes=num_classes)
    except Exception:  # an entry point with an unavailable optional dependency cannot be suggested
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _infer_num_classes(state: Mapping[str, torch.Tensor], name: str) -> int | None:
    """K of a checkpoint for registered model ``name``: read where the model's shapes depend on ``num_classes``."""
    two, three = _registered_shapes(name, 2), _registered_shapes(name, 3)
    if not two or not three:
        return None
    for key, shape in two.items():
        if key in state and shape != three.get(key) and state[key].ndim == len(shape):
            dims = [i for i, (a, b) in enumerate(zip(shape, three[key])) if a != b]
            if len(dims) == 1:
                return int(state[key].shape[dims[0]])
    return None


def _rank(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> tuple[float, float]:
    """(Jaccard similarity of the name sets, fraction of shared names whose shapes agree)."""
    common = state.keys() & shapes.keys()
    if not common:
        return 0.0, 0.0
    similarity = len(common) / len(state.keys() | shapes.keys())
    return similarity, sum(tuple(state[k].shape) == tuple(shapes[k]) for k in common) / len(common)


def suggest_model(state: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    """The registered model whose parameter names (then shapes) fit a state dict best.

    Models are ranked by the Jaccard similarity of the name sets; ties (e.g. the ViT sizes of Segmenter, which
    share every name) are broken by the fraction of shared names whose shapes agree.

    Args:
        state: parameter name -> tensor (wrapper prefixes already stripped).

    Returns:
        ``(name, similarity)`` with the name similarity in [0, 1], or None when no registered model shares a name.
    """
    best = _best_model(state)
    return None if best is None else (best[0], best[1][0])


def _best_model(state: Mapping[str, torch.Tensor]) -> tuple[str, tuple[float, float]] | None:
    from densehybrid.models.registry import list_models

    best = None
    for name in list_models():
        shapes = _registered_shapes(name)
        rank = _rank(state, shapes) if shapes else (0.0, 0.0)
        if rank[0] > 0 and (best is None or rank > best[1]):
            best = (name, rank)
    return best


def _listing(title: str, names: Sequence[str], separator: str = ", ") -> str:
    shown = separator.join(names[:_LISTED])
    more = f"{separator}... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return f"\n  {title} ({len(names)}): {shown}{more}"


def _fitting_submodule(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """The submodule path (up to two levels, e.g. ``student`` or ``teacher.encoder``) whose names equal the file's."""
    prefixes = sorted({".".join(k.split(".")[:depth]) for k in own for depth in (1, 2) if k.count(".") >= depth})
    for prefix in prefixes:
        names = {k[len(prefix) + 1 :] for k in own if k.startswith(prefix + ".")}
        if names and names == set(state):
            return prefix
    return None


def _mismatch_hints(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    for_cli: bool = False,
) -> list[str]:
    hints = []
    if missing and not unexpected and all(k.startswith("logits_ood.") for k in missing) and for_cli:
        hints.append(
            "The file is a closed-set checkpoint without the dataset-posterior head: the commands need a model "
            "fine-tuned with DenseHybrid (its head holds the anomaly score)."
        )
    elif missing and not unexpected and all(k.startswith("logits_ood.") for k in missing):
        hints.append(
            "The file is a closed-set checkpoint without the dataset-posterior head: load it with `strict=False` so "
            "that the head starts fresh (for DeepLabV3+ WRN38 use `create_model('deeplabv3plus_wrn38', "
            "num_classes=19, pretrained=PATH)`)."
        )
    own = model.state_dict()
    part = _fitting_submodule(own, state)
    if part is not None:
        hints.append(
            f"Its names are exactly those of the submodule `{part}` (e.g. one of the released DiCNet files): load it "
            f"with load_checkpoint(model.{part}, PATH)."
        )
    num_classes = getattr(model, "num_classes", None)
    differing = set()
    for k in mismatched:
        a, b = tuple(state[k].shape), tuple(own[k].shape)
        diffs = [(x, y) for x, y in zip(a, b) if x != y] if len(a) == len(b) else [(None, None), (None, None)]
        differing.update(diffs if len(diffs) == 1 else [(None, None)])
    if num_classes is not None and len(differing) == 1:
        (theirs, ours) = next(iter(differing))
        if ours == num_classes and theirs is not None:
            build = f"pass --num-classes {theirs}" if for_cli else f"build the model with num_classes={theirs}"
            hints.append(f"The checkpoint was trained for {theirs} classes: {build}.")
    best = _best_model(state)
    own_rank = _rank(state, {k: tuple(v.shape) for k, v in own.items()})
    if best is not None and best[0] != getattr(model, "model_name", None) and best[1] > own_rank:
        k = _infer_num_classes(state, best[0])
        build = (
            f"pass --model {best[0]}" + (f" --num-classes {k}" if k else "")
            if for_cli
            else f"build it with create_model({best[0]!r}, num_classes={k or '...'})"
        )
        hints.append(
            f"Its parameters fit the registered model {best[0]!r} best ({best[1][0]:.0%} of names shared, "
            f"{own_rank[0]:.0%} with this model): {build}."
        )
    elif (missing or unexpected) and (best is None or best[1][0] < 0.5):
        hints.append("No registered model fits its names: is it a checkpoint of another library or architecture?")
    return hints


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "the checkpoint", *, for_cli: bool = False
) -> tuple[list[str], list[str], list[str], str]:
    """Compare a state dict with a model's.

    Args:
        model: the model to load into.
        state: parameter name -> tensor (prefixes stripped).
        source: how to name the state dict in the message.
        for_cli: word the hints as command-line options (``--model``, ``--num-classes``) instead of Python calls.

    Returns:
        ``(missing, unexpected, mismatched, message)``: sorted name lists (``mismatched`` = present in both with
        different shapes) and a readable description with hints, empty when everything fits.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return missing, unexpected, mismatched, ""
    name = getattr(model, "model_name", None) or type(model).__name__
    message = (
        f"Expected {source} to fit model {name!r}, but got {len(missing)} missing, {len(unexpected)} unexpected "
        f"and {len(mismatched)} shape-mismatched entries."
    )
    if missing:
        message += _listing("missing keys", missing)
    if unexpected:
        message += _listing("unexpected keys", unexpected)
    if mismatched:
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
        message += _listing("shape mismatches", shapes, separator="; ")
    hints = _mismatch_hints(model, state, missing, unexpected, mismatched, for_cli)
    if hints:
        message += "\n" + "\n".join(hints)
    return missing, unexpected, mismatched, message


def load_checkpoint(
    model: nn.Module,
    path: str | PathLike[str],
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    *,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint file into ``model``, accepting the released file layouts as they are.

    The state dict is found as in :func:`split_checkpoint` (a bare state dict, or nested under ``"state_dict"``,
    ``"model"``, ``"model_state"``, ...), wrapper prefixes (``module.``, ``_orig_mod.``) are stripped, and the
    names and shapes are checked before anything is copied, so a failed load leaves the model untouched.

    Args:
        model: the model to fill.
        path: local checkpoint file (``torch.save`` output or ``.safetensors``).
        strict: require the names to match exactly. With ``strict=False`` the shared names are loaded and the rest
            is reported in a ``UserWarning``; shape mismatches raise either way.
        map_location: device to map tensors to while reading.
        weights_only: refuse pickled Python objects other than tensors (see :func:`read_checkpoint_file`).

    Returns:
        the checkpoint's metadata: every entry besides the state dict (epoch, metrics, ``model_name``, ...); empty
        for a bare state dict.

    Raises:
        CheckpointError: when the file cannot be read, holds no state dict, or does not fit the model; the message
            lists the first missing and unexpected keys with their counts and names the registered model whose
            parameter names fit best.

    Example:
        >>> from densehybrid.models import create_model
        >>> model = create_model("ldn121", num_classes=12)
        >>> metadata = load_checkpoint(model, "ldn121_streethazards.pt")  # doctest: +SKIP
    """
    state, metadata = split_checkpoint(read_checkpoint_file(path, map_location, weights_only=weights_only))
    state = strip_prefix(state)
    missing, unexpected, mismatched, message = check_state_dict(model, state, source=f"checkpoint {str(path)!r}")
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(message)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    model.load_state_dict(state, strict=strict)
    return metadata


#: Model arguments that only initialise training (weight files); a checkpoint holds every weight, so they are dropped.
INIT_ONLY_KWARGS = ("pretrained", "pretrained_backbone")


def model_from_checkpoint(
    checkpoint: Any,
    path: str | PathLike[str],
    model_name: str | None = None,
    num_classes: int | None = None,
    default_num_classes: int | None = None,
    *,
    for_cli: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint needs and load its weights (strict).

    The architecture is ``model_name`` or the ``model_name`` the checkpoint records (checkpoints written by the
    library's training loop), with the recorded ``model_kwargs`` when the names agree, less :data:`INIT_ONLY_KWARGS`.
    K is ``num_classes``, else the checkpoint's, else ``default_num_classes``.

    Args:
        checkpoint: what :func:`read_checkpoint_file` returned for ``path``.
        path: the file, named in errors.
        model_name: a registered model name; required when the checkpoint records none.
        num_classes: K, overriding the checkpoint's.
        default_num_classes: K when neither ``num_classes`` nor the checkpoint gives one.
        for_cli: phrase the hints of a mismatch as command-line options.

    Returns:
        ``(model, metadata)``: the model in eval mode on the CPU, and every checkpoint entry besides the state dict,
        with ``model_name``, ``num_classes``, ``num_classes_from`` (``"argument"``, ``"checkpoint"`` or
        ``"default"``) and ``model_kwargs`` (the arguments the model was built with) set.

    Raises:
        CheckpointError: no state dict, arguments the model does not take, or weights that do not fit.
        ValueError: no model name or no K can be determined, or an unknown model name.
    """
    from densehybrid.models.registry import create_model, list_models

    state, metadata = split_checkpoint(checkpoint)
    recorded = metadata.get("model_name") if isinstance(metadata.get("model_name"), str) else None
    name = model_name or recorded
    if name is None:
        raise ValueError(
            f"Expected `--model` for checkpoint {str(path)!r}, which does not record its architecture (a released "
            f"file?). Pass --model NAME, one of: {', '.join(list_models())}."
        )
    recorded_kwargs = metadata.get("model_kwargs") if isinstance(metadata.get("model_kwargs"), Mapping) else {}
    kwargs = {k: v for k, v in recorded_kwargs.items() if k not in INIT_ONLY_KWARGS} if name == recorded else {}
    recorded_k = kwargs.pop("num_classes", None) or recorded_kwargs.get("num_classes") or metadata.get("num_classes")
    recorded_k = recorded_k if isinstance(recorded_k, int) and not isinstance(recorded_k, bool) else None
    if num_classes is not None:
        k, source = num_classes, "argument"
    elif recorded_k is not None:
        k, source = recorded_k, "checkpoint"
    else:
        k, source = default_num_classes, "default"
    if k is None:
        raise ValueError(f"Expected `--num-classes` for checkpoint {str(path)!r}, which does not record it.")
    try:
        model = create_model(name, num_classes=k, **kwargs)
    except TypeError as exc:
        raise CheckpointError(
            f"Cannot rebuild model {name!r} with the arguments checkpoint {str(path)!r} records ({sorted(kwargs)}): "
            f"{exc}"
        ) from exc
    state = strip_prefix(state)
    *_, message = check_state_dict(model, state, source=f"checkpoint {str(path)!r}", for_cli=for_cli)
    if message:
        raise CheckpointError(message)
    model.load_state_dict(state)
    metadata = {**metadata, "model_name": name, "num_classes": k, "num_classes_from": source, "model_kwargs": kwargs}
    return model.eval(), metadata

"""Load checkpoints as they are published: raw state dicts, nested ones, DataParallel prefixes, safetensors.

A released file may be a bare ``state_dict`` or a dict that nests it under a key such as ``"state_dict"``,
``"model"`` or ``"model_state"`` next to metadata (epoch, optimizer, metrics). Parameter names may carry the
``module.`` prefix of ``nn.DataParallel``/``DistributedDataParallel`` or the ``_orig_mod.`` prefix of
``torch.compile``. :func:`load_checkpoint` accepts all of these, loads strictly by default, and when the names do not
fit, raises a :class:`~densehybrid.errors.CheckpointError` that lists what is missing and unexpected and names the
registered architecture whose parameter names fit the file best.

Every file the package writes has one layout (:data:`FORMAT_VERSION`), built by :func:`checkpoint_dict` and written by
:func:`write_checkpoint`; :func:`read_checkpoint` reads it, the released files and every layout the package wrote
before (see docs/training.md, "The one checkpoint format").
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densehybrid.errors import CheckpointError, OutputError
from densehybrid.labels import IGNORE_INDEX

#: Keys under which checkpoints commonly nest their state dict, tried in this order.
STATE_DICT_KEYS = (
    "state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "params",
    "flow", "flow_state", "flow_state_dict",
)  # fmt: skip
#: Prefixes added to every name by wrappers: ``nn.DataParallel``/DDP and ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED = 10


def _numpy_scalar_globals() -> list[Any]:
    """NumPy scalars and dtypes (metadata of released files, e.g. NVIDIA's): plain values, safe to rebuild."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import scalar
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def read_checkpoint_file(path: str | PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint file (``torch.save`` output or ``.safetensors``) without interpreting it.

    The one reader of weight files: always weights-only (tensors, containers, plain and NumPy scalars), so a file
    cannot run code when it is read. No recipe, option or checkpoint metadata can change that.

    Args:
        path: local file.
        map_location: device to map tensors to.

    Returns:
        whatever the file holds (usually a dict).

    Raises:
        CheckpointError: when the file is missing, unreadable, or holds Python objects besides weights.
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
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        # A refused object says "Unsupported global/class/..."; bytes that are no pickle at all say "operand".
        if "Weights only load failed" in text and "Unsupported operand" not in text:
            detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
            detail = detail.split(" which is not allowed")[0] if detail else ""
            raise CheckpointError(
                f"Checkpoint {str(path)!r} holds Python objects besides weights ({detail or 'pickled objects'}); "
                "densehybrid reads weight files weights-only because unpickling can run code. Use a file that holds "
                "only the weights (a state dict), saved from a source you trust."
            ) from err
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r}: it is truncated or not a PyTorch or safetensors file."
        ) from err
    except Exception as err:  # a damaged file makes torch's reader raise almost any type (KeyError, IndexError, ...)
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r}: it is truncated or not a PyTorch or safetensors file "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})."
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
    state, metadata = split_checkpoint(read_checkpoint_file(path, map_location))
    state = strip_prefix(state)
    missing, unexpected, mismatched, message = check_state_dict(model, state, source=f"checkpoint {str(path)!r}")
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(message)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    model.load_state_dict(state, strict=strict)
    return metadata


def _check_shapes_before_building(
    name: str, k: int, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Any, for_cli: bool
) -> None:
    """Refuse recorded model arguments whose parameter shapes do not fit the file's weights, without allocating them
    (a huge ``decoder_channels`` in a checkpoint's metadata would otherwise allocate gigabytes before the check).

    Raises:
        CheckpointError: the shapes differ.
    """
    from densehybrid.models.registry import create_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constructor loading weights into meta tensors warns that it is a no-op
            probe = create_model(name, num_classes=k, **kwargs)
    except Exception:  # a constructor that copies weights cannot run on the meta device: the real build checks
        return
    *_, message = check_state_dict(probe, state, source=f"checkpoint {str(path)!r}", for_cli=for_cli)
    if message:
        raise CheckpointError(
            f"Cannot rebuild model {name!r} with the arguments checkpoint {str(path)!r} records "
            f"({dict(kwargs)}): they do not fit its weights.\n{message}"
        )


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
        checkpoint: what :func:`read_checkpoint_file` or :func:`read_checkpoint` returned for ``path``.
        path: the file, named in errors.
        model_name: a registered model name; required when the checkpoint records none.
        num_classes: K, overriding the checkpoint's.
        default_num_classes: K when neither ``num_classes`` nor the checkpoint gives one.
        for_cli: phrase the hints of a mismatch as command-line options.

    Returns:
        ``(model, metadata)``: the model in eval mode on the CPU, and every checkpoint entry besides the state dict,
        read by :func:`read_checkpoint` whatever the file's layout (``format_version``, ``layout``, ``class_names``,
        ``palette``, ``ignore_index``, ``normalization``, ``method``, ``recipe``, :data:`CALIBRATION_KEY` when
        calibrated, the training state), with ``model_name``, ``num_classes``, ``num_classes_from``
        (``"argument"``, ``"checkpoint"`` or ``"default"``) and ``model_kwargs`` (the arguments the model was built
        with) set.

    Raises:
        CheckpointError: no state dict, arguments the model does not take, or weights that do not fit.
        ValueError: no model name or no K can be determined, or an unknown model name.
    """
    from densehybrid.models.registry import LOADER_KWARGS, create_model, list_models

    info = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, path=str(path))
    state = info.state_dict
    metadata = {**info.metadata, **info.training, **info.fields()}
    recorded = info.model_name
    name = model_name or recorded
    if name is None:
        raise ValueError(
            f"Expected `--model` for checkpoint {str(path)!r}, which does not record its architecture (a released "
            f"file?). Pass --model NAME, one of: {', '.join(list_models())}."
        )
    recorded_kwargs = metadata.get("model_kwargs") if isinstance(metadata.get("model_kwargs"), Mapping) else {}
    dropped = (*INIT_ONLY_KWARGS, *LOADER_KWARGS)  # metadata never chooses how a file is read
    kwargs = {k: v for k, v in recorded_kwargs.items() if k not in dropped} if name == recorded else {}
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
    if kwargs:  # arguments from the file: check the shapes they give on the meta device, before any allocation
        _check_shapes_before_building(name, k, kwargs, strip_prefix(state), path, for_cli)
    try:
        model = create_model(name, num_classes=k, **kwargs)
    except TypeError as exc:
        raise CheckpointError(
            f"Cannot rebuild model {name!r} with the arguments checkpoint {str(path)!r} records ({sorted(kwargs)}): "
            f"{exc}"
        ) from exc
    *_, message = check_state_dict(model, state, source=f"checkpoint {str(path)!r}", for_cli=for_cli)
    if message:
        raise CheckpointError(message)
    model.load_state_dict(state)
    metadata = {**metadata, "model_name": name, "num_classes": k, "num_classes_from": source, "model_kwargs": kwargs}
    return model.eval(), metadata


# -- the one checkpoint format ----------------------------------------------------------------------------------------
#: The ``format`` entry of every checkpoint the package writes.
CHECKPOINT_FORMAT = "densehybrid-checkpoint"
#: The layout :func:`checkpoint_dict` builds. 1: the first training layout (``"version": 1``, no class names, method
#: or recipe at the top level); 2: this one (``"format_version": 2``).
FORMAT_VERSION = 2
#: The entry holding the open-set calibration written by ``densehybrid calibrate``.
CALIBRATION_KEY = "open_set"
#: The entries that make a checkpoint resumable (what :func:`~densehybrid.engine.fit` needs to continue a run).
TRAINING_KEYS = (
    "objective",
    "optimizer",
    "scaler",
    "config",
    "epoch",
    "step_in_epoch",
    "global_step",
    "generator",
    "rng",
    "history",
    "epoch_sums",
    "world_size",
    "objective_state",
)
#: The layouts :func:`read_checkpoint` reads: name -> what writes (or wrote) it.
LAYOUTS: dict[str, str] = {
    "densehybrid-2": "the current format (format_version 2): every command of this package",
    "training-1": "a training checkpoint of the first format ('format': 'densehybrid-checkpoint', 'version': 1)",
    "calibrated-1": "a checkpoint calibrated before format_version existed (an 'open_set' entry beside the weights)",
    "flow-pretrain-1": "flow_last.pt of the flow pre-training loop ('format': 'densehybrid-flow-checkpoint')",
    "demo-stage-1": "a finished demo stage: the weights and the stage's 'settings'",
    "demo-flow-1": "a demo flow stage: the flow's weights, its 'flow_config' and the stage's 'settings'",
    "demo-distillation-1": "the demo's unfinished distillation run: the student's weights under 'student'",
    "released": "a file of another source: a bare or nested state dict (e.g. the released DenseHybrid weights)",
}


def _plain(value: Any) -> Any:
    """``value`` as plain containers of str/int/float/bool/None (so that a file loads weights-only)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "tolist"):  # NumPy arrays and scalars, tensors
        return value.tolist()
    return str(value)


def checkpoint_dict(
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    method: str = "",
    recipe: Mapping[str, Any] | None = None,
    class_names: Sequence[str] = (),
    palette: Sequence[Sequence[int]] = (),
    ignore_index: int = IGNORE_INDEX,
    calibration: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    normalization: Mapping[str, Sequence[float]] | None = None,
    architecture: str | None = None,
) -> dict[str, Any]:
    """The one checkpoint layout (version :data:`FORMAT_VERSION`), ready for :func:`write_checkpoint`.

    Args:
        model: the trained network (its ``model_name``, ``model_kwargs``, ``num_classes`` and ``data_config`` are
            recorded when it has them; a flow records its ``config``), or a bare state dict.
        method: the training method (``closed-set``, ``densehybrid``, ``dicnet``, ``denseflow-pretrain``, ...).
        recipe: the resolved recipe of the run.
        class_names, palette, ignore_index: the K class names, their (K, 3) RGB colours and the void label of the
            data the model was trained on (empty when unknown).
        calibration: the open-set calibration (score, threshold, rule, display range), stored under
            :data:`CALIBRATION_KEY`.
        training: the resumable state (:data:`TRAINING_KEYS`: optimiser, scheduler and flow states in
            ``objective_state``, sampler position, RNG states, history); None for a finished, non-resumable file.
        metadata: further plain values (e.g. what the run is for).
        model_name, model_kwargs, num_classes, normalization, architecture: override what ``model`` records (the
            architecture is the network's class name).

    Returns:
        a dict of tensors and plain values (loads with ``weights_only=True``).
    """
    is_module = isinstance(model, nn.Module)
    state = model.state_dict() if is_module else dict(model)
    kwargs = model_kwargs if model_kwargs is not None else getattr(model, "model_kwargs", None)
    if kwargs is None and isinstance(getattr(model, "config", None), Mapping):
        kwargs = model.config  # a flow records its constructor arguments as `config`
    names = [str(name) for name in class_names]
    checkpoint: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": state,
        "architecture": architecture or (type(model).__name__ if is_module else None),
        "model_name": model_name if model_name is not None else getattr(model, "model_name", None),
        "model_kwargs": _plain(kwargs),
        "num_classes": num_classes if num_classes is not None else getattr(model, "num_classes", None),
        "class_names": names,
        "palette": [[int(c) for c in colour] for colour in palette],
        "ignore_index": int(ignore_index),
        "normalization": _plain(normalization if normalization is not None else getattr(model, "data_config", None)),
        "method": str(method),
        "recipe": _plain(recipe) if recipe is not None else None,
        "metadata": _plain(metadata or {}),
    }
    if calibration is not None:
        checkpoint[CALIBRATION_KEY] = _plain(calibration)
    if training is not None:
        unknown = sorted(set(training) - set(TRAINING_KEYS))
        if unknown:
            raise ValueError(f"Expected training state entries among {', '.join(TRAINING_KEYS)}, but got {unknown}.")
        checkpoint.update(training)
    return checkpoint


def atomic_save(obj: Any, path: str | PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as exc:  # torch's writer reports a failed write (a full disk) as a RuntimeError
                if "write" not in str(exc).lower():
                    raise
                raise OutputError(
                    f"Cannot write {str(path)!r} (is the disk full?): {str(exc).splitlines()[0]}. The previous file "
                    "is unchanged."
                ) from exc
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_checkpoint(checkpoint: Mapping[str, Any], path: str | PathLike[str]) -> Path:
    """Write a :func:`checkpoint_dict` atomically: the one writer of every checkpoint the package produces.

    Raises:
        ValueError: ``checkpoint`` is not of the current format (build it with :func:`checkpoint_dict`).
    """
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Expected a checkpoint built by checkpoint_dict() (format {CHECKPOINT_FORMAT!r}, format_version "
            f"{FORMAT_VERSION}), but got format {checkpoint.get('format')!r}, version "
            f"{checkpoint.get('format_version')!r}."
        )
    return atomic_save(dict(checkpoint), path)


@dataclass
class Checkpoint:
    """What a checkpoint file holds, whatever its layout (see :func:`read_checkpoint`).

    Attributes:
        path: the file.
        layout: a key of :data:`LAYOUTS`.
        format_version: the layout's version: :data:`FORMAT_VERSION`, 1 for the package's earlier layouts, 0 for
            a file of another source.
        state_dict: the weights (wrapper prefixes stripped); for a flow, the flow's.
        model_name, model_kwargs, num_classes: the registered architecture and its arguments (None when unknown);
            ``architecture`` is the network's class name (e.g. ``DenseFlow``).
        class_names, palette, ignore_index: the classes of the training data (empty when the file does not say).
        normalization: the input normalisation (``{"mean": [...], "std": [...]}``), None when unknown.
        method: the training method ("" when unknown).
        recipe: the resolved recipe of the run, None when the file has none.
        calibration: the open-set calibration entry, None when not calibrated.
        training: the resumable state (:data:`TRAINING_KEYS`); empty for a finished file.
        metadata: every other entry (the ``"metadata"`` entry's contents at the top level).
    """

    path: str
    layout: str
    format_version: int
    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    architecture: str | None = None
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    ignore_index: int = IGNORE_INDEX
    normalization: dict[str, Any] | None = None
    method: str = ""
    recipe: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        """Whether the file holds the optimiser state a run resumes from."""
        return self.training.get("optimizer") is not None

    def fields(self) -> dict[str, Any]:
        """The descriptive entries as :func:`model_from_checkpoint` and the commands read them from metadata."""
        entries = {
            "format_version": self.format_version,
            "layout": self.layout,
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "class_names": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "normalization": self.normalization,
            "method": self.method,
            "recipe": self.recipe,
        }
        if self.num_classes is not None:
            entries["num_classes"] = self.num_classes
        if self.calibration is not None:
            entries[CALIBRATION_KEY] = self.calibration
        return entries

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``densehybrid info --json`` prints); builds no model."""
        parameters = sum(int(t.numel()) for t in self.state_dict.values() if t.is_floating_point())
        history = self.training.get("history") or []
        config = self.training.get("config") if isinstance(self.training.get("config"), Mapping) else {}
        epochs = config.get("epochs") or ((self.recipe or {}).get("optim") or {}).get("epochs")
        last = history[-1] if history and isinstance(history[-1], Mapping) else {}
        return _plain(
            {
                "path": self.path,
                "format_version": self.format_version,
                "layout": self.layout,
                "architecture": {
                    "model": self.model_name,
                    "class": self.architecture,
                    "kwargs": self.model_kwargs,
                    "num_classes": self.num_classes,
                    "parameters": parameters,
                    "tensors": len(self.state_dict),
                    "normalization": self.normalization,
                },
                "classes": {"names": self.class_names, "palette": self.palette, "ignore_index": self.ignore_index},
                "method": self.method,
                "calibration": self.calibration,
                "recipe": self.recipe,
                "training": {
                    "resumable": self.resumable,
                    "epoch": self.training.get("epoch"),
                    "epochs": epochs,
                    "step_in_epoch": self.training.get("step_in_epoch"),
                    "global_step": self.training.get("global_step"),
                    "last_epoch": dict(last),
                },
            }
        )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _layout(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return "released"
    if obj.get("format") == CHECKPOINT_FORMAT and "format_version" in obj:
        return "densehybrid-2"
    if obj.get("format") == CHECKPOINT_FORMAT and obj.get("version") == 1:
        return "training-1"
    if obj.get("format") == "densehybrid-flow-checkpoint":
        return "flow-pretrain-1"
    if isinstance(obj.get("student"), Mapping) and "epoch" in obj:
        return "demo-distillation-1"
    if isinstance(obj.get("settings"), Mapping) and "flow_config" in obj:
        return "demo-flow-1"
    if isinstance(obj.get("settings"), Mapping) and isinstance(obj.get("model"), Mapping):
        return "demo-stage-1"
    if isinstance(obj.get(CALIBRATION_KEY), Mapping):
        return "calibrated-1"
    return "released"


def read_checkpoint(
    source: str | PathLike[str] | Mapping[str, Any], *, map_location: str | torch.device = "cpu", path: str = ""
) -> Checkpoint:
    """Read any checkpoint (the current format, every earlier layout of this package, or a released file).

    The file is read weights-only (:func:`read_checkpoint_file`); no model is built.

    Args:
        source: the file, or what :func:`read_checkpoint_file` returned for it.
        map_location: device to map tensors to while reading a file.
        path: how to name an already loaded ``source`` in messages.

    Raises:
        CheckpointError: the file cannot be read, or holds no weights.
    """
    if isinstance(source, Mapping):
        obj, name = source, path or "the checkpoint"
    else:
        obj, name = read_checkpoint_file(source, map_location), str(source)
    layout = _layout(obj)
    entries = dict(obj) if isinstance(obj, Mapping) else {}
    if layout == "flow-pretrain-1":
        state, entries = strip_prefix(dict(entries.pop("flow"))), entries
        entries.setdefault("method", "denseflow-pretrain")
        entries.setdefault("architecture", "DenseFlow")
        entries.setdefault("model_kwargs", entries.pop("flow_config", None))
    elif layout == "demo-distillation-1":
        state = {f"student.{k}": v for k, v in strip_prefix(dict(entries.pop("student"))).items()}
        entries.setdefault("method", "dicnet")
    else:
        try:
            state, entries = split_checkpoint(obj)
        except CheckpointError as exc:
            raise CheckpointError(f"Checkpoint {name!r}: {exc}") from exc
        state = strip_prefix(state)
        if layout == "demo-flow-1":
            entries.setdefault("architecture", "DenseFlow")
            entries.setdefault("model_kwargs", entries.pop("flow_config", None))
    metadata = entries.get("metadata") if isinstance(entries.get("metadata"), Mapping) else {}
    recipe = entries.get("recipe") if isinstance(entries.get("recipe"), Mapping) else metadata.get("recipe")
    method = entries.get("method") or metadata.get("method") or entries.get("objective") or ""
    kwargs = entries.get("model_kwargs") if isinstance(entries.get("model_kwargs"), Mapping) else {}
    calibration = entries.get(CALIBRATION_KEY) if isinstance(entries.get(CALIBRATION_KEY), Mapping) else None
    class_names = entries.get("class_names") or (calibration or {}).get("class_names") or []
    palette = entries.get("palette") or (calibration or {}).get("palette") or []
    num_classes = _int_or_none(entries.get("num_classes")) or _int_or_none(kwargs.get("num_classes"))
    num_classes = num_classes or _int_or_none(metadata.get("num_classes"))
    normalization = entries.get("normalization", entries.get("data_config"))
    descriptive = {
        "format", "format_version", "version", "model_name", "model_kwargs", "num_classes", "architecture",
        "class_names", "palette", "ignore_index", "normalization", "data_config", "method", "recipe", CALIBRATION_KEY,
    }  # fmt: skip
    return Checkpoint(
        path=name,
        layout=layout,
        format_version=int(entries.get("format_version", 1 if layout != "released" else 0)),
        state_dict=state,
        model_name=entries.get("model_name") if isinstance(entries.get("model_name"), str) else None,
        model_kwargs=dict(kwargs),
        num_classes=num_classes,
        architecture=entries.get("architecture") if isinstance(entries.get("architecture"), str) else None,
        class_names=[str(n) for n in class_names],
        palette=[[int(c) for c in colour] for colour in palette],
        ignore_index=IGNORE_INDEX if _int_or_none(entries.get("ignore_index")) is None else entries["ignore_index"],
        normalization=dict(normalization) if isinstance(normalization, Mapping) else None,
        method=str(method),
        recipe=dict(recipe) if isinstance(recipe, Mapping) else None,
        calibration=dict(calibration) if calibration is not None else None,
        training={k: entries[k] for k in TRAINING_KEYS if k in entries},
        metadata={
            **{k: v for k, v in entries.items() if k not in descriptive and k not in TRAINING_KEYS and k != "metadata"},
            **metadata,
        },
    )

"""Run a resolved recipe: build the data, model and objective it describes, train with :func:`~densehybrid.engine.fit`,
validate each epoch, log, and report.

Everything a user can get wrong (the output folder, the dataset tree, the label values, the ``--init`` file, the
negatives) is checked before the first file is written. A run whose ``out`` folder already holds ``last.pt`` of the
same recipe resumes from it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densehybrid.engine import distributed, outputs
from densehybrid.engine.runtime import seed_everything, select_device
from densehybrid.engine.train import TrainConfig, fit
from densehybrid.errors import CheckpointError, DenseHybridError
from densehybrid.labels import IGNORE_INDEX
from densehybrid.recipes.methods import MethodContext, get_method

RUN_KIND = "densehybrid-training-run"
SUMMARY_NAME = "train-summary.json"
LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
_POSTERIOR_HEAD = "logits_ood."


#: What a run writes into its folder; ``--no-resume`` moves an earlier run's of these aside (nothing is deleted).
RUN_OUTPUTS = ("last.pt", "best.pt", LOG_NAME, SUMMARY_NAME, TENSORBOARD_DIR)
#: Recipe keys (in any section) and ``model.kwargs`` entries that name files or folders a run reads.
_INPUT_KEYS = ("init", "pretrained", "pretrained_backbone", "teacher_encoder", "teacher_decoder", "student")


# -- outputs (one place: where a run writes and how it checks that it can) ------------------------------------------
def input_paths(recipe: Mapping[str, Any], *paths: str | Path | None) -> list[str]:
    """Every file or folder a run of ``recipe`` reads: ``paths`` (data and negative roots, ``--init``) and the
    existing files and folders the recipe names (``model.init``, ``flow.init``, ``model.kwargs.pretrained_backbone``,
    ``distill.student``, the data roots of ``data.options``, ...)."""
    found = [str(p) for p in paths if p]
    for name, section in recipe.items():
        if not isinstance(section, Mapping):
            continue
        tables = [section, section.get("kwargs", {})] if name == "model" else [section]
        for table in tables:
            for key, value in table.items():
                if key in _INPUT_KEYS or (name == "data" and key == "options"):
                    found += [text for text in _strings(value) if Path(text).expanduser().exists()]
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings(item)]
    return []


def check_output_dir(out: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Apply the library's output-path policy to a run folder, then create it: a run resumes and owns its folder, so
    nothing in it is refused, but no input (data, ``--init``, ``--flow-init``, the recipe's weight files) may be the
    folder or lie inside it.

    Raises:
        OutputError: ``out`` is a file, holds or is one of ``inputs``, or is not writable.
    """
    out = outputs.check_output_dir(out, inputs=inputs, owns_folder=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


class RunLog:
    """JSON lines (``log.jsonl``) and TensorBoard event files of a run; writes on rank 0 only."""

    def __init__(self, out: Path | None) -> None:
        self.path = None if out is None or not distributed.is_main() else out / LOG_NAME
        self.lines = None if self.path is None else outputs.JsonLines(self.path)
        self.writer = None
        if self.path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install still trains
                warnings.warn("TensorBoard is not importable; logging to log.jsonl only.", UserWarning, stacklevel=2)
            else:
                self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.lines.append({k: _finite(v) for k, v in record.items()})
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
        if self.writer is not None:
            self.writer.close()


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# -- data -------------------------------------------------------------------------------------------------------------
class TrainingTargets:
    """Checks a training sample's labels against K and ignores anomaly pixels (id K) of the training split.

    Raises:
        ValueError: a label value outside ``[0, K]`` other than 255; the message names the file and the value.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, sample: dict) -> dict:
        target = sample["target"]
        bad = (target > self.num_classes) & (target != IGNORE_INDEX)
        if bool(bad.any()):
            value = int(target[bad][0])
            where = sample.get("path", sample.get("name", "a training sample"))
            raise ValueError(
                f"Expected label values in [0, {self.num_classes}) or 255 (ignore) for the model's "
                f"{self.num_classes} classes, but the label of {where!r} holds {value}."
            )
        target = torch.where(target == self.num_classes, torch.full_like(target, IGNORE_INDEX), target)
        return {**sample, "target": target}


def _compose(*steps: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def apply(sample: dict) -> dict:
        for step in steps:
            sample = step(sample)
        return sample

    return apply


def open_dataset(recipe: Mapping[str, Any], root: Path, split: str) -> Any:
    """The recipe's dataset (a benchmark loader or :class:`~densehybrid.data.datasets.FolderDataset`) on ``root``."""
    from densehybrid.data.datasets import FolderDataset, get_benchmark

    data = recipe["data"]
    if data["dataset"] == "folder":
        if data["options"]:
            raise ValueError(f"Expected no `data.options` for the folder dataset, but got {sorted(data['options'])}.")
        return FolderDataset(root, split)
    return get_benchmark(data["dataset"]).create(root, split, **data["options"])


def _num_classes(recipe: Mapping[str, Any], dataset: Any) -> int:
    wanted = recipe["model"]["num_classes"]
    found = getattr(dataset, "num_classes", None)
    if wanted and found and wanted != found:
        raise ValueError(
            f"Expected the {recipe['data']['dataset']} data to have model.num_classes = {wanted} classes, but it has "
            f"{found}. Set model.num_classes={found} or use matching data."
        )
    k = wanted or found
    if not k:
        raise ValueError("Expected `model.num_classes` (the dataset does not say how many classes it has).")
    return int(k)


def class_fields(dataset: Any, num_classes: int) -> dict[str, Any]:
    """The checkpoint fields naming the classes a run trains on: the dataset's class names (e.g. a folder tree's
    ``classes.txt``), its palette (else :func:`~densehybrid.labels.default_palette`) and the ignore id."""
    from densehybrid.labels import default_palette

    names = [str(name) for name in getattr(dataset, "class_names", ()) or ()]
    palette = getattr(dataset, "palette", None)
    if palette is None or len(palette) != num_classes:
        palette = default_palette(num_classes)
    return {
        "class_names": names if len(names) == num_classes else [],
        "palette": [[int(c) for c in colour] for colour in palette],
        "ignore_index": int(getattr(dataset, "ignore_index", IGNORE_INDEX)),
    }


# -- model ------------------------------------------------------------------------------------------------------------
def build_model(recipe: Mapping[str, Any], num_classes: int, init: str, loaded: list[str] | None = None) -> nn.Module:
    """The recipe's model, initialised from ``init`` as ``model.init_as`` says (``loaded``: a line saying what the
    checkpoint held and what was loaded is appended to it).

    Raises:
        CheckpointError: ``init`` is missing or holds weights of another architecture (only the dataset-posterior
            head may be missing from a checkpoint used as initialisation).
    """
    from densehybrid.models import create_model
    from densehybrid.models.checkpoint import check_state_dict, read_checkpoint

    model_cfg = recipe["model"]
    kwargs = dict(model_cfg["kwargs"])
    how = model_cfg["init_as"]
    if init and not Path(init).expanduser().is_file():
        raise CheckpointError(f"Expected `--init` {init!r} to be an existing weights file, but it is missing.")
    if init and how != "checkpoint":
        kwargs[how] = str(Path(init).expanduser())
    seed_everything(recipe["run"]["seed"])
    model = create_model(model_cfg["name"], num_classes=num_classes, **kwargs)
    if init and how == "checkpoint":
        state = read_checkpoint(init).state_dict
        missing, unexpected, mismatched, message = check_state_dict(model, state, source=f"`--init` {init!r}")
        missing_head = [k for k in missing if k.startswith(_POSTERIOR_HEAD)]
        missing = [k for k in missing if not k.startswith(_POSTERIOR_HEAD)]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"Expected `--init` {init!r} to hold weights of model {model_cfg['name']!r} with K={num_classes} (the "
                f"posterior head may be missing), but it does not fit.\n{message}"
            )
        model.load_state_dict(state, strict=False)
        if loaded is not None:
            loaded.append(_init_description(init, read_checkpoint(init), len(state), len(missing_head)))
        damaged = [key for key, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
        if damaged:
            raise CheckpointError(
                f"Expected finite weights in `--init` {init!r}, but {len(damaged)} tensor(s) hold NaN or infinite "
                f"values (e.g. {damaged[0]!r}): it was probably saved from a diverged run. Use an earlier checkpoint."
            )
    return model


def _init_description(init: str, info: Any, tensors: int, new_head: int) -> str:
    """``"loaded runs/closed/best.pt: 312 tensors (closed-set ladder_efficientnet_lite0, recipe generic, epoch 3 of
    5); the posterior head starts new"``."""
    what = [info.method or "", info.model_name or ""]
    recipe = info.recipe.get("name") if isinstance(info.recipe, Mapping) else None
    if recipe:
        what.append(f"recipe {recipe}")
    epoch = info.training.get("epoch") if info.training else None
    if epoch is not None:
        epochs = info.training.get("config", {}).get("epochs")
        what.append(f"epoch {epoch}" + (f" of {epochs}" if epochs else ""))
    described = ", ".join(part for part in what if part)
    head = f"; the posterior head ({new_head} tensors) starts new" if new_head else ""
    return f"loaded {init}: {tensors} tensors" + (f" ({described})" if described else "") + head


def weights_source(recipe: Mapping[str, Any], init: str) -> str:
    """Where the model's starting weights come from, in words (the start-up summary's ``weights`` line)."""
    from densehybrid.models.registry import get_model_entry

    model = recipe["model"]
    if init:
        option = "model.init" if init == model["init"] else "--init"
        return f"{option} {init}" if model["init_as"] == "checkpoint" else f"{model['init_as']} = {init} ({option})"
    for key in ("pretrained", "pretrained_backbone"):
        value = model["kwargs"].get(key)
        if isinstance(value, str) and value:
            return f"model.kwargs.{key} = {value}"
    try:
        entry = get_model_entry(model["name"])
        parameter = inspect.signature(entry).parameters.get("pretrained")
    except (TypeError, ValueError, ImportError):
        entry, parameter = None, None
    packaged = model["kwargs"].get("pretrained", parameter.default if parameter is not None else None)
    if packaged is True:
        return getattr(entry, "weights_source", "the model's pretrained weights (pretrained = true)")
    return "random initialisation (no pretrained weights; --init or model.kwargs.pretrained_backbone sets some)"


# -- bounds -----------------------------------------------------------------------------------------------------------
#: Bytes per pixel of a training crop: the image (3 float32), its label (int64) and, per class, the logits with their
#: gradient and softmax; on the CPU also the decoder's activations (about 64 float32 channels).
_INPUT_BYTES, _CLASS_BYTES, _CPU_ACTIVATION_BYTES = 3 * 4 + 8, 3 * 4, 64 * 4


def check_run_bounds(recipe: dict[str, Any], num_classes: int, device: torch.device, notes: list[str]) -> int:
    """Refuse sizes the machine cannot hold and counts the data cannot use, before any file is read in full.

    Bounds: ``run.num_workers`` by the CPU cores (per local process; the untouched default is lowered instead), the
    crop (``augment.crop``) and the negatives (``negatives.crop``/``resize`` times the batch and ``pastes``) by half
    the available memory, ``negatives.pastes`` by the crop area over the smallest pasted rectangle.

    Returns:
        the DataLoader workers per process (the recipe itself is not changed, so a run resumes on another machine).

    Raises:
        ResourceError: a bound is exceeded (the message says what was asked and what the machine has).
        ValueError: more pastes than the crop can take.
    """
    from densehybrid.engine.resources import check_pixels, worker_bound
    from densehybrid.recipes.schema import COMMON

    run, optim, augment = recipe["run"], recipe["optim"], recipe["augment"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers, note = worker_bound(run["num_workers"], COMMON["run"]["num_workers"].default, "run.num_workers", local)
    if note:
        notes.append(note)
    per_rank = max(1, optim["batch_size"] // max(1, distributed.world_size()))
    per_pixel = _INPUT_BYTES + _CLASS_BYTES * num_classes + (_CPU_ACTIVATION_BYTES if device.type == "cpu" else 0)
    crop = augment["crop"]
    if crop:
        check_pixels(
            per_rank * crop**2 * max(1, local),
            per_pixel,
            f"training batches of {per_rank} crops of {crop}x{crop} px",
            "Lower augment.crop or optim.batch_size.",
        )
    negatives = recipe.get("negatives")
    if negatives is not None and "pastes" in negatives:
        side = max(negatives["crop"], negatives["resize"])
        check_pixels(
            per_rank * negatives["pastes"] * 2 * side**2 * max(1, local),  # a resized negative: up to 2:1 aspect
            _INPUT_BYTES,
            f"{negatives['pastes']} negative(s) of up to {side} px per image",
            "Lower negatives.crop, negatives.resize or negatives.pastes.",
        )
        if crop:
            most = max(1, (crop // max(1, negatives["min_side"])) ** 2)
            if negatives["pastes"] > most:
                raise ValueError(
                    f"Expected recipe key `negatives.pastes` at most {most} (a {crop} px crop holds no more "
                    f"rectangles of negatives.min_side={negatives['min_side']} px), but got {negatives['pastes']}."
                )
    return workers


def check_batch_norm_batch(model: nn.Module, batch_size: int, accumulate: int = 1) -> None:
    """Refuse batches of one image per process (per accumulated slice) for a model that trains batch normalisation
    (its statistics need more than one value per channel; a pooled branch has exactly one per image).

    Raises:
        ValueError: ``optim.batch_size`` gives one image per slice and the model trains a BatchNorm layer.
    """
    per_rank = batch_size // max(1, distributed.world_size() * accumulate)
    if per_rank >= 2:
        return
    trained = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in module.parameters())
    ]
    if trained:
        raise ValueError(
            f"Expected recipe key `optim.batch_size` to give at least 2 images per process and slice, but it gives "
            f"{per_rank} (batch {batch_size} over {distributed.world_size()} process(es) x {accumulate} accumulated "
            "slice(s)), and the model trains batch "
            f"normalisation ({trained[0]}, ...), which needs more than one value per channel."
        )


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclass
class RunInputs:
    """Where a recipe runs: the command line's paths and limits."""

    data_root: Path | None = None
    neg_root: Path | None = None
    init: str = ""
    out: Path | None = None
    max_steps: int | None = None
    accumulate: int = 1
    device: str = "auto"
    progress: bool = True
    resume: bool = True
    console: Callable[[str], None] | None = None
    """Where the run tells its progress in lines (the start-up summary, one line per epoch, the resume); None: silent.
    Only the main process of a distributed run writes."""


def _trained_fields(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a run to resume: everything except the descriptive top-level keys."""
    return {k: v for k, v in recipe.items() if isinstance(v, Mapping)}


#: Keys that only say where a run's starting weights are read from (like ``--init``): a resumed run continues from
#: its own ``last.pt``, so they are not compared (a copied run folder, whose paths moved, still resumes). Nor is
#: ``run.num_workers``: the workers change how fast samples load, not which (each sample's augmentation is seeded by
#: its index), and ``"auto"`` derives them from the machine the run resumes on.
_START_PATHS = {("model", "init"), ("flow", "init"), ("run", "num_workers")}


def recipe_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The trained keys (``section.key``) whose values differ between two resolved recipes, as
    ``"optim.lr: 0.0004 -> 1e-05"`` lines, sorted; empty when a run of ``old`` may resume as ``new``. The paths of
    the starting weights (``model.init``, ``flow.init``) and ``run.num_workers`` are not compared."""
    old, new = json.loads(json.dumps(_trained_fields(old))), json.loads(json.dumps(_trained_fields(new)))
    lines = []
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if (section, key) in _START_PATHS:
                continue
            if before.get(key, "(none)") != after.get(key, "(none)"):
                lines.append(f"{section}.{key}: {before.get(key, '(none)')!r} -> {after.get(key, '(none)')!r}")
    return lines


def _check_resumable(out: Path, recipe: Mapping[str, Any]) -> int | None:
    """The global step of ``out/last.pt`` when it exists and belongs to the same resolved recipe (None when there is
    none); raise, naming the keys that differ, when it belongs to another one.

    This is the library's one resume rule: a run resumes (or, finished, is reused) only with the same resolved
    recipe; ``--no-resume`` (``RunInputs.resume=False``) starts it anew.
    """
    from densehybrid.models.checkpoint import read_checkpoint

    path = out / "last.pt"
    if not path.is_file():
        return None
    checkpoint = read_checkpoint(path)
    previous = checkpoint.recipe
    if not isinstance(previous, Mapping):
        raise DenseHybridError(
            f"Expected `--out` {str(out)!r} to be empty or to hold a run of the same recipe, but its last.pt records "
            "no recipe. Use another --out, or --no-resume to start over."
        )
    differences = recipe_differences(previous, recipe)
    if differences:
        shown = "; ".join(differences[:10]) + (f" (and {len(differences) - 10} more)" if len(differences) > 10 else "")
        raise DenseHybridError(
            f"Expected `--out` {str(out)!r} to be empty or to hold a run of the same recipe, but its last.pt was "
            f"written by a recipe that differs in {len(differences)} key(s): {shown}. Use another --out, or "
            "--no-resume to start over."
        )
    return int(checkpoint.training.get("global_step", 0))


def _trim_log(path: Path, global_step: int) -> None:
    """Drop the step records a killed run logged after its last checkpoint (they are trained again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("kind") in ("train", "val") and record.get("step", 0) > global_step:
            continue
        kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


@dataclass
class _TrainingData:
    """What :func:`_open_training_data` opened and derived."""

    recipe: dict[str, Any]  # with augment.crop and run.num_workers derived where "auto"
    sources: dict[str, str]  # section.key -> where a derived value came from
    train: Any  # the augmented training set
    val: Any  # the validation set, or None
    num_classes: int
    workers: int  # DataLoader workers per process
    val_anomaly_pixels: int | None  # pixels of label K in val; None without validation


def _open_training_data(recipe: dict[str, Any], inputs: RunInputs, device: Any, notes: list[str]) -> _TrainingData:
    """The training and validation sets: the trees are opened, the ``"auto"`` crop and workers derived
    (:func:`~densehybrid.recipes.derived.derive_from_data`), the run's bounds checked (:func:`check_run_bounds`),
    every file checked (counting val's anomaly pixels) and one sample decoded, so a broken file, a bad label or an
    oversized value fails, named, before anything is written."""
    from densehybrid.data.datasets import check_dataset_files
    from densehybrid.data.transforms import AugmentedDataset, SegmentationAugment
    from densehybrid.recipes.derived import derive_from_data

    data_root = inputs.data_root
    train_set = open_dataset(recipe, data_root, recipe["data"]["train_split"])
    num_classes = _num_classes(recipe, train_set)
    recipe, sources = derive_from_data(recipe, train_set)
    workers = check_run_bounds(recipe, num_classes, device, notes)
    val_set = None
    if recipe["run"]["validate"] and recipe["data"]["val_split"]:
        optional = recipe["data"]["dataset"] == "folder" and not (data_root / "val").is_dir()
        if not optional:
            val_set = open_dataset(recipe, data_root, recipe["data"]["val_split"])
    augment = recipe["augment"]
    pipeline = _compose(
        TrainingTargets(num_classes),
        SegmentationAugment(augment["crop"], augment["scale"], augment["fill"], augment["flip"]),
    )
    train_data = AugmentedDataset(train_set, pipeline, seed=recipe["run"]["seed"])
    # every label, image and class list is checked now: a damaged file fails with its name before the first step
    check_dataset_files(train_set, "training files", inputs.progress)
    anomalies = None
    if val_set is not None:
        anomalies = check_dataset_files(val_set, "validation files", inputs.progress, count_id=num_classes)
    train_data[0]  # decode one sample now: the augmentation and the label range fail before the run starts
    return _TrainingData(recipe, sources, train_data, val_set, num_classes, workers, anomalies)


def train_config(
    recipe: Mapping[str, Any], device: Any, inputs: RunInputs, validated: bool, workers: int | None = None
) -> TrainConfig:
    """The :class:`~densehybrid.engine.TrainConfig` of a run of a resolved recipe: the recipe's keys through
    :meth:`TrainConfig.from_recipe <densehybrid.engine.TrainConfig.from_recipe>`, the run's device, step limit and
    progress bar and gradient accumulation from ``inputs`` (``validated``: a best checkpoint is kept; ``workers``: the DataLoader workers
    bounded by :func:`check_run_bounds`, None: the recipe's ``run.num_workers``)."""
    bounded = {} if workers is None else {"num_workers": workers}  # the recipe itself is unchanged
    return TrainConfig.from_recipe(
        recipe,
        device=str(device),
        **bounded,
        max_steps=inputs.max_steps,
        accumulate=inputs.accumulate,
        progress=inputs.progress,
        best_metric=recipe["run"]["best_metric"] if validated else None,
    )


def _prepare_out(out: Path | None, recipe: Mapping[str, Any], resume: bool, notes: list[str]) -> int | None:
    """The global step the run resumes from ``out/last.pt`` at (the one resume rule), or None for a fresh run. With
    ``resume`` off (``--no-resume``) an earlier run's files are moved aside (:func:`densehybrid.engine.outputs.move_aside`,
    noted in ``notes``), never deleted."""
    resumed_step = _check_resumable(out, recipe) if out is not None and resume else None
    if out is not None and distributed.is_main():
        if resumed_step is not None:
            _trim_log(out / LOG_NAME, resumed_step)
        elif not resume:
            aside = outputs.move_aside(out, [*RUN_OUTPUTS, *(p.name for p in sorted(out.glob("samples_epoch*.png")))])
            if aside is not None:
                notes.append(f"--no-resume: the earlier run's files were moved to {str(aside)!r}")
    distributed.barrier()
    return resumed_step


def _build_model(
    recipe: dict[str, Any], inputs: RunInputs, num_classes: int, device: Any, out: Path | None, loaded: list[str]
):
    method = get_method(recipe["method"])
    init = inputs.init or recipe["model"]["init"]
    if method.build_model is not None:
        context = MethodContext(
            recipe,
            None,
            num_classes,
            device,
            inputs.neg_root,
            inputs.data_root,
            out_dir=out,
            init=init,
            progress=inputs.progress,
        )
        model = method.build_model(context)
    else:
        model = build_model(recipe, num_classes, init, loaded)
    check_batch_norm_batch(model, recipe["optim"]["batch_size"], inputs.accumulate)
    return model.to(device)


def train_recipe(recipe: dict[str, Any], inputs: RunInputs, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train as ``recipe`` says; return the run summary (also what ``train-summary.json`` holds).

    One run writes into an output folder at a time: the main process holds its lock file
    (:func:`densehybrid.engine.outputs.folder_lock`) for the whole run.

    Args:
        recipe: a resolved recipe (:func:`densehybrid.recipes.load_recipe`).
        inputs: data/negative roots, ``--init``, output folder and limits.
        stop: polled after every step; True writes a checkpoint and ends the run (e.g. on SIGINT).

    Raises:
        ValueError, DenseHybridError: bad inputs, before anything is written.
        OutputError: another run holds the output folder.
    """
    if inputs.out is None or int(os.environ.get("RANK", "0")) != 0:
        return _train_recipe(recipe, inputs, stop)
    check_output_dir(inputs.out, input_paths(recipe, inputs.data_root, inputs.neg_root, inputs.init))
    with outputs.folder_lock(inputs.out):
        return _train_recipe(recipe, inputs, stop)


def _train_recipe(recipe: dict[str, Any], inputs: RunInputs, stop: Callable[[], bool] | None) -> dict[str, Any]:
    from densehybrid.recipes.derived import derive_from_run

    started = time.perf_counter()
    method = get_method(recipe["method"])
    out = (
        check_output_dir(inputs.out, input_paths(recipe, inputs.data_root, inputs.neg_root, inputs.init))
        if inputs.out is not None
        else None
    )
    if inputs.data_root is None:
        raise ValueError(f"Expected `--data-root DIR` (the {recipe['data']['dataset']} tree), but got none.")
    device = select_device(inputs.device)
    distributed.init_from_env(device)
    device = distributed.local_device(device)
    notes: list[str] = []
    data = _open_training_data(recipe, inputs, device, notes)
    num_classes, val_set = data.num_classes, data.val
    effective = method
    real_only = data.recipe.get("negatives", {}).get("source", "real") == "real"
    if method.uses_negatives and inputs.neg_root is None and not data.recipe["negatives"]["required"] and real_only:
        effective = get_method("closed-set")
        notes.append("no --neg-root: closed-set training (pass --neg-root DIR for DenseHybrid training)")
    init = inputs.init or recipe["model"]["init"]
    recipe, sources = derive_from_run(data.recipe, effective.uses_negatives, init, data.val_anomaly_pixels)
    sources = {**data.sources, **sources}
    loaded: list[str] = []
    model = _build_model(recipe, inputs, num_classes, device, out, loaded)
    context = MethodContext(
        recipe, model, num_classes, device, inputs.neg_root, inputs.data_root, out, progress=inputs.progress
    )
    objective = effective.build(context)
    config = train_config(recipe, device, inputs, val_set is not None, data.workers)
    resumed_step = _prepare_out(out, recipe, inputs.resume, notes)
    resume = resumed_step is not None
    console = inputs.console if distributed.is_main() else None
    if console is not None:
        lines = startup_lines(recipe, inputs, data, effective.name, init, loaded, objective, config, sources)
        lines += [f"note: {note}" for note in notes if note not in "\n".join(lines)]
        for line in lines:
            console(line)
    log = RunLog(out)
    run = recipe["run"]
    last_step = [resumed_step or 0]  # validation is logged at the step it follows, as training (TensorBoard's x-axis)

    def on_step(step: int, logs: dict[str, float]) -> None:
        last_step[0] = step
        log.write("train", step, logs)

    def on_epoch_end(epoch: int, trained: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if hasattr(objective, "on_epoch_end"):  # e.g. a second network's per-epoch schedule or sample grid
            metrics.update(objective.on_epoch_end(epoch, trained) or {})
        if val_set is None:
            return metrics
        validation = validate_model(trained, val_set, num_classes, device, run["val_limit"] or None, run["amp"])
        log.write("val", last_step[0], {"epoch": epoch + 1, **validation})
        return {**metrics, **validation}

    derived = {key: {"value": _value(recipe, key), "from": why} for key, why in sources.items()}
    metadata = {"kind": RUN_KIND, "recipe": recipe, "num_classes": num_classes, "method": effective.name}
    metadata.update(class_fields(data.train.dataset, num_classes), derived=derived)
    try:
        result = fit(
            model,
            data.train,
            objective,
            config,
            out_dir=out,
            resume=resume,
            on_epoch_end=on_epoch_end,
            metadata=metadata,
            on_step=on_step,
            stop=stop,
            sync_bn=run["sync_bn"],
            echo=console,
        )
    finally:
        log.close()
    summary = _summary(recipe, result, config, effective.name, resume, device, num_classes, out, len(data.train))
    return summary | {
        "seconds": time.perf_counter() - started,
        "notes": notes,
        "derived": derived,
        "val_anomaly_pixels": data.val_anomaly_pixels,
    }


def _value(recipe: Mapping[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return recipe[section][key]


def _count(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def startup_lines(
    recipe: Mapping[str, Any],
    inputs: RunInputs,
    data: _TrainingData,
    method: str,
    init: str,
    loaded: list[str],
    objective: Any,
    config: TrainConfig,
    sources: Mapping[str, str],
) -> list[str]:
    """The start-up summary of a run: the data found, the classes, the model and where its weights come from, what
    ``--init`` loaded, the negatives, and every setting a newcomer asks about with where it came from (the recipe, or
    derived from the data, from the machine, or because ``--init`` was given)."""

    def source(*keys: str) -> str:
        found = [sources[key] for key in keys if key in sources]
        return f"  [{'; '.join(dict.fromkeys(found))}]" if found else "  [recipe]"

    optim, augment = recipe["optim"], recipe["augment"]
    train_set = data.train.dataset
    names = [str(name) for name in getattr(train_set, "class_names", ()) or ()]
    classes = f"{data.num_classes} classes" + (f": {', '.join(names)}" if names else "")
    if data.val is None:
        val = "no validation split (no per-epoch validation, no best.pt)"
    else:
        anomalies = data.val_anomaly_pixels or 0
        val = f"{len(data.val)} val images ({anomalies} anomaly pixels, label value {data.num_classes})"
    lines = [
        f"densehybrid train: recipe {recipe['name']} (method {method}) on {config.device}",
        f"  data       {inputs.data_root}: {len(train_set)} training images, {val}",
        f"  classes    {classes}",
        f"  model      {recipe['model']['name']} (K={data.num_classes})  [recipe]",
        f"  weights    {weights_source(recipe, init)}",
    ]
    lines += [f"  --init     {line}" for line in loaded]
    if get_method(recipe["method"]).uses_negatives:
        stream = getattr(objective, "negatives", None)
        found = _count(getattr(stream, "dataset", None)) if stream is not None else None
        if method == "closed-set":
            lines.append(
                "  negatives  no --neg-root: closed-set training (pass --neg-root DIR for DenseHybrid training)"
            )
        elif found is not None:
            where = inputs.neg_root if inputs.neg_root is not None else inputs.data_root
            lines.append(f"  negatives  {where}: {found} images, {recipe['negatives']['pastes']} pasted per image")
        else:
            lines.append(f"  negatives  {recipe['negatives']['source']} (negatives.source)")
    crop = augment["crop"]
    lines += [
        f"  crop       {f'{crop} px' if crop else 'whole images'}, scale {augment['scale'][0]:g}-"
        f"{augment['scale'][1]:g}" + source("augment.crop"),
        f"  optimiser  {optim['optimizer']} lr {optim['lr']:g}, backbone {optim['lr'] * optim['backbone_lr_ratio']:g}, "
        f"{optim['schedule']}" + source("optim.lr", "optim.backbone_lr_ratio"),
        f"  length     {optim['epochs']} epochs of {len(data.train) // optim['batch_size']} steps, batch "
        f"{optim['batch_size']}" + source(),
        f"  workers    {data.workers} DataLoader workers per process" + source("run.num_workers"),
    ]
    if config.best_metric is not None:
        lines.append(f"  best.pt    the epoch with the highest {config.best_metric}" + source("run.best_metric"))
    if inputs.out is not None:
        lines.append(f"  out        {inputs.out}")
    return lines


def _summary(
    recipe: dict[str, Any],
    result: Any,
    config: TrainConfig,
    method: str,
    resume: bool,
    device: Any,
    num_classes: int,
    out: Path | None,
    samples: int,
) -> dict[str, Any]:
    best = None
    if config.best_metric is not None:
        scored = [h for h in result.history if isinstance(h.get(config.best_metric), float)]
        scored = [h for h in scored if math.isfinite(h[config.best_metric])]
        if scored:
            top = max(scored, key=lambda h: h[config.best_metric])
            best = {"metric": config.best_metric, "value": top[config.best_metric], "epoch": top["epoch"]}
    return {
        "kind": RUN_KIND,
        "recipe": recipe["name"],
        "method": method,
        "finished": result.finished,
        "interrupted": result.interrupted,
        "resumed": bool(resume),
        "epoch": result.epoch,
        "epochs": config.epochs,
        "global_step": result.global_step,
        "steps_per_epoch": samples // config.batch_size,
        "world_size": distributed.world_size(),
        "accumulate": config.accumulate,
        "device": str(device),
        "num_classes": num_classes,
        "checkpoint": None if out is None else str(out / "last.pt"),
        "best_checkpoint": None if best is None or out is None else str(out / "best.pt"),
        "best": best,
        "history": result.history,
        "seconds": 0.0,
        "notes": [],
        "resolved_recipe": recipe,
    }


def closing_lines(summary: Mapping[str, Any], inputs: RunInputs) -> list[str]:
    """The end of a run on the console: the checkpoint it keeps and the exact next command(s) to run.

    An unfinished run: the same command continues it. A closed-set run of a recipe that trains DenseHybrid with
    negatives (``generic`` without ``--neg-root``): the fine-tuning command. A run that trained an anomaly score:
    ``calibrate`` on the training data's validation split, then ``predict`` with the calibrated checkpoint.
    """
    recipe = summary["resolved_recipe"]
    kept = summary["best_checkpoint"] or summary["checkpoint"]
    if kept is None:
        return []
    best = summary.get("best")
    why = f" (best {best['metric']} {best['value']:.4f} at epoch {best['epoch']})" if best else " (the last epoch)"
    lines = [f"kept checkpoint: {kept}{why}"]
    if not summary["finished"]:
        return [
            f"stopped at step {summary['global_step']}: run the same command again to continue from "
            f"{summary['checkpoint']}"
        ]
    data = ["--data-root", str(inputs.data_root)]
    if summary["method"] == "closed-set" and get_method(recipe["method"]).uses_negatives:
        out = Path(summary["checkpoint"]).parent
        command = ["densehybrid", "train", "--recipe", recipe["name"], *data, "--neg-root", "NEGATIVES"]
        command += ["--init", kept, "--out", str(out.with_name(f"{out.name}-densehybrid"))]
        lines.append("next: fine-tune it as DenseHybrid (NEGATIVES: a folder of photos of other things):")
        lines.append(f"  {shlex.join(command)}")
        return lines
    if not get_method(summary["method"]).uses_negatives:
        return lines
    from densehybrid.calibrate import calibrated_path

    calibrate = ["densehybrid", "calibrate", "--checkpoint", kept, "--benchmark", recipe["data"]["dataset"]]
    calibrate += ["--root", str(inputs.data_root)]
    for key, value in recipe["data"]["options"].items():
        calibrate += ["--option", f"{key}={value}"]
    predict = ["densehybrid", "predict", "--checkpoint", str(calibrated_path(kept)), "PHOTOS", "--out", "predictions"]
    lines.append("next: calibrate the open-set threshold on the validation split, then predict (PHOTOS: new images):")
    lines += [f"  {shlex.join(calibrate)}", f"  {shlex.join(predict)}"]
    if summary.get("val_anomaly_pixels") == 0:
        lines.append(
            f"  (calibrate needs anomaly pixels in the validation labels: mark unknown objects with label value "
            f"{summary['num_classes']})"
        )
    return lines


def validate_model(
    model: nn.Module, dataset: Any, num_classes: int, device: torch.device, limit: int | None, amp: bool
) -> dict[str, float]:
    """Per-epoch validation (see :func:`densehybrid.engine.validation.validate`)."""
    from densehybrid.engine.validation import validate

    return validate(model, dataset, num_classes, device, limit=limit, amp=amp)

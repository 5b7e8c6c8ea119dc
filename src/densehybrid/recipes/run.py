"""Run a resolved recipe: build the data, model and objective it describes, train with :func:`~densehybrid.engine.fit`,
validate each epoch, log, and report.

Everything a user can get wrong (the output folder, the dataset tree, the label values, the ``--init`` file, the
negatives) is checked before the first file is written. A run whose ``out`` folder already holds ``last.pt`` of the
same recipe resumes from it.
"""

from __future__ import annotations

import json
import math
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


# -- outputs (one place: where a run writes and how it checks that it can) ------------------------------------------
def check_output_dir(out: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Apply the library's output-path policy to a run folder (a run resumes its own folder, so nothing in it is
    refused), then create it.

    Raises:
        OutputError: ``out`` is a file, one of ``inputs``, or not writable.
    """
    out = outputs.check_output_dir(out, inputs=inputs)
    out.mkdir(parents=True, exist_ok=True)
    return out


class RunLog:
    """JSON lines (``log.jsonl``) and TensorBoard event files of a run; writes on rank 0 only."""

    def __init__(self, out: Path | None) -> None:
        self.path = None if out is None or not distributed.is_main() else out / LOG_NAME
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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
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
def build_model(recipe: Mapping[str, Any], num_classes: int, init: str) -> nn.Module:
    """The recipe's model, initialised from ``init`` as ``model.init_as`` says.

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
        missing = [k for k in missing if not k.startswith(_POSTERIOR_HEAD)]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"Expected `--init` {init!r} to hold weights of model {model_cfg['name']!r} with K={num_classes} (the "
                f"posterior head may be missing), but it does not fit.\n{message}"
            )
        model.load_state_dict(state, strict=False)
    return model


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclass
class RunInputs:
    """Where a recipe runs: the command line's paths and limits."""

    data_root: Path | None = None
    neg_root: Path | None = None
    init: str = ""
    out: Path | None = None
    max_steps: int | None = None
    device: str = "auto"
    progress: bool = True
    resume: bool = True


def _trained_fields(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a run to resume: everything except the descriptive top-level keys."""
    return {k: v for k, v in recipe.items() if isinstance(v, Mapping)}


#: Keys that only say where a run's starting weights are read from (like ``--init``): a resumed run continues from
#: its own ``last.pt``, so they are not compared (a copied run folder, whose paths moved, still resumes).
_START_PATHS = {("model", "init"), ("flow", "init")}


def recipe_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The trained keys (``section.key``) whose values differ between two resolved recipes, as
    ``"optim.lr: 0.0004 -> 1e-05"`` lines, sorted; empty when a run of ``old`` may resume as ``new``. The paths of
    the starting weights (``model.init``, ``flow.init``) are not compared."""
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


def _open_training_data(recipe: Mapping[str, Any], data_root: Path) -> tuple[Any, Any, int]:
    """(augmented training set, validation set or None, K): the trees are opened and one sample is decoded, so a
    broken file or a bad label fails before anything is written."""
    from densehybrid.data.transforms import AugmentedDataset, SegmentationAugment

    train_set = open_dataset(recipe, data_root, recipe["data"]["train_split"])
    num_classes = _num_classes(recipe, train_set)
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
    train_data[0]
    return train_data, val_set, num_classes


def train_config(recipe: Mapping[str, Any], device: Any, inputs: RunInputs, validated: bool) -> TrainConfig:
    """The :class:`~densehybrid.engine.TrainConfig` of a run of a resolved recipe: the recipe's keys through
    :meth:`TrainConfig.from_recipe <densehybrid.engine.TrainConfig.from_recipe>`, the run's device, step limit and
    progress bar from ``inputs`` (``validated``: a best checkpoint is kept)."""
    return TrainConfig.from_recipe(
        recipe,
        device=str(device),
        max_steps=inputs.max_steps,
        progress=inputs.progress,
        best_metric=recipe["run"]["best_metric"] if validated else None,
    )


def _prepare_out(out: Path | None, recipe: Mapping[str, Any], resume: bool) -> int | None:
    """The global step the run resumes from ``out/last.pt`` at (the one resume rule), or None for a fresh run, which
    clears what a run writes."""
    resumed_step = _check_resumable(out, recipe) if out is not None and resume else None
    if out is not None and distributed.is_main():
        if resumed_step is not None:
            _trim_log(out / LOG_NAME, resumed_step)
        elif not resume:
            for name in ("last.pt", "best.pt", LOG_NAME, SUMMARY_NAME):
                (out / name).unlink(missing_ok=True)
    distributed.barrier()
    return resumed_step


def _build_model(recipe: dict[str, Any], inputs: RunInputs, num_classes: int, device: Any, out: Path | None):
    method = get_method(recipe["method"])
    init = inputs.init or recipe["model"]["init"]
    if method.build_model is not None:
        context = MethodContext(
            recipe, None, num_classes, device, inputs.neg_root, inputs.data_root, out_dir=out, init=init
        )
        return method.build_model(context).to(device)
    return build_model(recipe, num_classes, init).to(device)


def train_recipe(recipe: dict[str, Any], inputs: RunInputs, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train as ``recipe`` says; return the run summary (also what ``train-summary.json`` holds).

    Args:
        recipe: a resolved recipe (:func:`densehybrid.recipes.load_recipe`).
        inputs: data/negative roots, ``--init``, output folder and limits.
        stop: polled after every step; True writes a checkpoint and ends the run (e.g. on SIGINT).

    Raises:
        ValueError, DenseHybridError: bad inputs, before anything is written.
    """
    started = time.perf_counter()
    method = get_method(recipe["method"])
    out = (
        check_output_dir(inputs.out, [inputs.data_root, inputs.neg_root, inputs.init or None])
        if inputs.out is not None
        else None
    )
    if inputs.data_root is None:
        raise ValueError(f"Expected `--data-root DIR` (the {recipe['data']['dataset']} tree), but got none.")
    device = select_device(inputs.device)
    distributed.init_from_env(device)
    device = distributed.local_device(device)
    train_data, val_set, num_classes = _open_training_data(recipe, inputs.data_root)
    model = _build_model(recipe, inputs, num_classes, device, out)
    effective = method
    notes: list[str] = []
    real_only = recipe.get("negatives", {}).get("source", "real") == "real"
    if method.uses_negatives and inputs.neg_root is None and not recipe["negatives"]["required"] and real_only:
        effective = get_method("closed-set")
        notes.append("no --neg-root: closed-set training (pass --neg-root DIR for DenseHybrid training)")
    context = MethodContext(recipe, model, num_classes, device, inputs.neg_root, inputs.data_root, out)
    objective = effective.build(context)
    config = train_config(recipe, device, inputs, val_set is not None)
    resumed_step = _prepare_out(out, recipe, inputs.resume)
    resume = resumed_step is not None
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

    metadata = {"kind": RUN_KIND, "recipe": recipe, "num_classes": num_classes, "method": effective.name}
    metadata.update(class_fields(train_data.dataset, num_classes))
    try:
        result = fit(
            model,
            train_data,
            objective,
            config,
            out_dir=out,
            resume=resume,
            on_epoch_end=on_epoch_end,
            metadata=metadata,
            on_step=on_step,
            stop=stop,
            sync_bn=run["sync_bn"],
        )
    finally:
        log.close()
    return _summary(recipe, result, config, effective.name, resume, device, num_classes, out, len(train_data)) | {
        "seconds": time.perf_counter() - started,
        "notes": notes,
    }


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


def validate_model(
    model: nn.Module, dataset: Any, num_classes: int, device: torch.device, limit: int | None, amp: bool
) -> dict[str, float]:
    """Per-epoch validation (see :func:`densehybrid.engine.validation.validate`)."""
    from densehybrid.engine.validation import validate

    return validate(model, dataset, num_classes, device, limit=limit, amp=amp)

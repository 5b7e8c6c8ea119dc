"""The demo: DenseHybrid end to end on the built-in road-scene benchmark, on a CPU, in minutes.

The demo is a pipeline of shipped recipes, each stage trained by :func:`densehybrid.recipes.run.train_recipe` (the
same code as ``densehybrid train``) into its own folder of ``out_dir``:

1. generate (and cache) the benchmark in ``data_dir``: road scenes and val/test scenes with two anomaly families;
2. ``demo-closed-set`` (``closed-set/``): the segmenter (ImageNet EfficientNet-Lite0 backbone) with cross-entropy;
3. ``demo-finetune`` (``finetune/``): DenseHybrid fine-tuning of it, the benchmark's negatives pasted into every scene;
4. fit SML statistics on the training set, calibrate the open-set threshold at 95% TPR on val;
5. evaluate every score on test (per anomaly family and pooled), closed mIoU and open-mIoU, for both models;
6. write the report (Markdown, HTML, JSON, figures) and print the table.

A stage whose folder holds a finished run of the same resolved recipe is reused (and said so); an interrupted one
continues; one of another recipe is refused with the keys that differ (``resume=False``, ``--no-resume``, retrains).
Each stage can be run by hand with the command ``results.json`` records for it (``stages``), e.g.
``densehybrid train --recipe demo-closed-set --data-root OUT/data --out X``, and gives the same weights.

With ``dicnet=True`` a DiCNet student is also distilled from the closed-set model (``demo-dicnet``, ``dicnet/``) and
its ``dicnet`` score is evaluated (rows with ``model = "dicnet"``). With ``negatives="synthetic"`` or ``"mixed"`` a
small DenseFlow is pre-trained first (``demo-flow-pretrain``, ``flow-pretrain/``) and stage 3 is the released joint
fine-tuning (``demo-finetune-flow``, ``finetune-synthetic/`` or ``finetune-mixed/``). ``compare_negatives=True``
fine-tunes the same closed-set model with real, synthetic and mixed negatives and reports every score of each. With
``seeds > 1`` stages 2-5 run once per training seed on the same benchmark (``seeds/seed-S/``), and the report gives
the mean and the standard deviation over seeds.

:class:`DemoConfig` holds the benchmark and report settings; the training settings are the presets' values, changed
by recipe overrides (``--set``-style strings per preset) that the demo's training options map onto
(:data:`TRAINING_OPTIONS`).
"""

from __future__ import annotations

import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densehybrid.data import ROADSCENE_CLASSES, ROADSCENE_PALETTE, RoadSceneBenchmark
from densehybrid.engine.evaluate import EvaluationResult, evaluate, model_outputs
from densehybrid.engine.outputs import remove_stale_temporaries
from densehybrid.engine.resources import check_memory
from densehybrid.engine.runtime import seed_everything, select_device
from densehybrid.errors import NonFiniteError
from densehybrid.labels import ANOMALY, IGNORE_INDEX, anomaly_target
from densehybrid.openset import calibrate_threshold, predict_open_set
from densehybrid.scores import SMLStatistics, fit_sml_statistics, get_score, list_scores

FAMILIES = {1: "real", 2: "procedural"}
#: Scores that read only the logits: meaningful for the closed-set model too.
LOGIT_SCORES = ("msp", "max_logit", "energy", "entropy", "sml", "generative")
#: The DiCNet student of the demo (see the ``demo-dicnet`` preset).
DICNET_STUDENT = "efficientnet_lite0"
#: Sources of the fine-tuning negatives: the real pasted crops, flow samples, or a mixture of both.
NEGATIVE_SOURCES = ("real", "synthetic", "mixed")
#: Patch sides of the flow negatives start here (the released 16 px) and step by 8 px.
FLOW_MIN_SIDE = 16
#: Samples in each grid of flow samples shown in the report.
FLOW_GRID_SAMPLES = 16

#: The demo's stages: preset, folder (a fine-tuning folder adds the source of its negatives) and the offset of its
#: training seed from the run's seed.
CLOSED, FINETUNE, FLOW, FINETUNE_FLOW, DICNET = (
    "demo-closed-set",
    "demo-finetune",
    "demo-flow-pretrain",
    "demo-finetune-flow",
    "demo-dicnet",
)
STAGE_FOLDERS = {CLOSED: "closed-set", FINETUNE: "finetune", FLOW: "flow-pretrain", DICNET: "dicnet"}
SEED_OFFSETS = {CLOSED: 0, FINETUNE: 1, FLOW: 0, FINETUNE_FLOW: 1, DICNET: 2}
_SEGMENTER_STAGES = (CLOSED, FINETUNE, FINETUNE_FLOW)
_FINETUNE_STAGES = (FINETUNE, FINETUNE_FLOW)


def _flow_side(size: int) -> int:
    """The largest flow patch side for real negatives of side ``size``: rounded down to the flow's stride (8)."""
    return max(FLOW_MIN_SIDE, int(size) // 8 * 8)


#: The demo's training options and the recipe keys they set: option -> [(preset, key, value from the option)].
TRAINING_OPTIONS: dict[str, list[tuple[str, str, Any]]] = {
    "model": [(p, "model.name", str) for p in _SEGMENTER_STAGES],
    "closed_epochs": [(CLOSED, "optim.epochs", int)],
    "finetune_epochs": [(p, "optim.epochs", int) for p in _FINETUNE_STAGES],
    "batch_size": [(p, "optim.batch_size", int) for p in (*_SEGMENTER_STAGES, DICNET)],
    "lr": [(CLOSED, "optim.lr", float)],
    "finetune_lr": [(p, "optim.lr", float) for p in _FINETUNE_STAGES],
    "negative_size": [(p, "negatives.crop", int) for p in _FINETUNE_STAGES]
    + [(FINETUNE_FLOW, "flow.max_side", _flow_side)],
    "beta": [(p, "loss.beta", float) for p in _FINETUNE_STAGES],
    "lambda_": [(p, "loss.lambda", float) for p in _FINETUNE_STAGES],
    "dicnet_epochs": [(DICNET, "optim.epochs", int)],
    "synthetic_fraction": [(FINETUNE_FLOW, "negatives.synthetic_fraction", float)],
    "flow_epochs": [(FLOW, "optim.epochs", int)],
    "flow_crop": [(FLOW, "augment.crop", int), (FLOW, "flow.grid_size", int)],
    "flow_batch_size": [(FLOW, "optim.batch_size", int)],
    "flow_lr": [(FLOW, "optim.lr", float), (FLOW, "optim.lr_min", float)],
    "flow_finetune_lr": [(FINETUNE_FLOW, "flow.lr", float)],
}
#: Where the default of each training option is read (the first key it sets).
_OPTION_SOURCE = {name: targets[0][:2] for name, targets in TRAINING_OPTIONS.items()}
#: The released fine-tuning recipe whose learning rate and loss weights ``--released-settings`` restores.
RELEASED_RECIPE = "ldn121-streethazards-finetune"


def released_settings() -> dict[str, float]:
    """The released fine-tuning rate and loss weights (:data:`RELEASED_RECIPE`) as demo training options.

    The demo's presets deviate from them for its step budget (docs/demo.md, "Settings study on val").
    """
    from densehybrid.recipes import load_recipe

    recipe = load_recipe(RELEASED_RECIPE)
    return {"finetune_lr": recipe["optim"]["lr"], "beta": recipe["loss"]["beta"], "lambda_": recipe["loss"]["lambda"]}


#: ``--quick``: smaller benchmark and report, and these training options.
QUICK_SETTINGS = dict(image_size=(64, 128), train_images=32, val_images=8, test_images=8, num_examples=3)
QUICK_TRAINING = dict(
    closed_epochs=2,
    finetune_epochs=1,
    negative_size=32,
    dicnet_epochs=1,
    flow_epochs=1,
    flow_crop=32,
    flow_batch_size=8,
)


def _lookup(recipe: Mapping[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return recipe[section][key]


def _toml(value: Any) -> str:
    """A value as a TOML literal for a ``--set`` string."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def training_overrides(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """The recipe overrides (``KEY=VALUE`` per preset) that the demo's training options stand for.

    Raises:
        ValueError: an unknown option.
    """
    overrides: dict[str, list[str]] = {}
    for name, value in options.items():
        if name not in TRAINING_OPTIONS:
            raise ValueError(f"Unknown demo training option {name!r}. Available: {', '.join(TRAINING_OPTIONS)}.")
        if name == "finetune_epochs" and value == 0:
            continue  # no fine-tuning: DemoConfig.finetune is False
        for preset, key, convert in TRAINING_OPTIONS[name]:
            overrides.setdefault(preset, []).append(f"{key}={_toml(convert(value))}")
    return overrides


@dataclass
class DemoConfig:
    """Settings of one demo run: the benchmark, the pipeline's stages and the report. Build it with :meth:`create`
    (or :meth:`quick`, the smoke-test variant), which also takes the training options of :data:`TRAINING_OPTIONS`.

    The presets' training settings were chosen on the validation split (``eval_split="val"``), never on test; see
    docs/demo.md.

    Attributes:
        out_dir: report, stage folders and the cached benchmark go here.
        data_dir: where the generated benchmark is cached (default ``out_dir/data``).
        seed: seeds the benchmark and the first training run (each stage's ``run.seed`` is ``seed`` + its offset).
        seeds: training runs, with seeds ``seed, seed + 1, ...`` on the same benchmark; the report gives mean and
            standard deviation over them.
        image_size: (H, W) of the generated scenes.
        train_images, val_images, test_images: split sizes.
        target_tpr: TPR at which the open-set threshold is calibrated on val.
        eval_split: the split the anomaly and segmentation numbers are measured on: "test", or "val" to choose
            settings without looking at test.
        finetune: run the fine-tuning stage (``--finetune-epochs 0`` turns it off: the fine-tuned rows are then those
            of the closed-set model).
        dicnet: also distil a DiCNet student from the closed-set model (``demo-dicnet``) and evaluate its score.
        negatives: source of the fine-tuning negatives: "real", "synthetic" (a jointly trained flow) or "mixed".
        compare_negatives: also fine-tune the same closed-set model with the other two sources and report each.
        device: "auto", "cpu" or "cuda".
        num_examples: test images shown in the report.
        resume: reuse finished stages and continue interrupted ones (False: retrain every stage).
        progress: progress bars, stage banners and time estimates (on stderr).
        overrides: preset name -> recipe overrides (``KEY=VALUE``) of the demo's training settings.
    """

    out_dir: Path = Path("demo_out")
    data_dir: Path | None = None
    seed: int = 0
    seeds: int = 1
    image_size: tuple[int, int] = (128, 256)
    train_images: int = 400
    val_images: int = 100
    test_images: int = 100
    target_tpr: float = 0.95
    eval_split: str = "test"
    finetune: bool = True
    dicnet: bool = False
    negatives: str = "real"
    compare_negatives: bool = False
    device: str = "auto"
    num_examples: int = 6
    resume: bool = True
    progress: bool = True
    overrides: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def create(cls, quick: bool = False, released: bool = False, **settings: Any) -> DemoConfig:
        """A configuration from fields and training options (``closed_epochs=2``, ``lr=1e-3``, ...); ``quick``
        starts from the smoke-test settings (:data:`QUICK_SETTINGS`, :data:`QUICK_TRAINING`), ``released`` from the
        released fine-tuning rate and loss weights (:func:`released_settings`); given options win over both."""
        names = {f.name for f in fields(cls)}
        given = {**(QUICK_SETTINGS if quick else {}), **{k: v for k, v in settings.items() if k in names}}
        options = {**(QUICK_TRAINING if quick else {}), **(released_settings() if released else {})}
        options.update({k: v for k, v in settings.items() if k not in names})
        _check_options(options, given)
        if options.get("finetune_epochs") == 0:
            given["finetune"] = False
        overrides = training_overrides(options)
        for preset, extra in given.pop("overrides", {}).items():
            overrides.setdefault(preset, []).extend(extra)
        return cls(**given, overrides=overrides)

    @classmethod
    def quick(cls, **settings: Any) -> DemoConfig:
        """A smoke-test run: small images, small splits, few epochs (under a minute on 2 CPU cores)."""
        return cls.create(quick=True, **settings)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else self.out_dir / "data"
        self.image_size = tuple(self.image_size)
        self.overrides = {k: list(v) for k, v in self.overrides.items()}
        for name in ("train_images", "val_images", "test_images", "seeds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {getattr(self, name)}.")
        value = self.target_tpr
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"Expected `target_tpr` in (0, 1], but got {value!r}.")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"Expected `eval_split` to be 'test' or 'val', but got {self.eval_split!r}.")
        if self.negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"Expected `negatives` to be one of {NEGATIVE_SOURCES}, but got {self.negatives!r}.")
        for preset in self.presets:  # every stage's recipe resolves before anything is written
            self.recipe(preset)
        batch = self.setting("batch_size")
        if self.train_images < batch:
            raise ValueError(f"Expected `train_images` >= `batch_size` ({batch}), but got {self.train_images}.")
        side = self.setting("negative_size")
        images = self.train_images + self.val_images + self.test_images
        # uint8 scenes, targets and family maps (5 bytes a pixel), plus the 1000 cached negatives (16 bytes a pixel)
        check_memory(
            images * self.image_size[0] * self.image_size[1] * 5 + 1000 * side**2 * 16,
            f"the benchmark ({images} scenes of {self.image_size[0]}x{self.image_size[1]}) and the negatives "
            f"(side {side})",
            "Lower --image-size, the image counts or --negative-size.",
        )

    @property
    def presets(self) -> list[str]:
        """The presets this configuration trains (per seed)."""
        presets = [CLOSED]
        if self.uses_flow:
            presets.append(FLOW)
        if self.finetune:
            presets += [FINETUNE_FLOW if s != "real" else FINETUNE for s in self.negative_sources]
        return presets + ([DICNET] if self.dicnet else [])

    def recipe(self, preset: str, extra: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
        """The resolved recipe of ``preset`` with the demo's overrides, ``extra`` and the stage's seed."""
        from densehybrid.recipes import load_recipe

        seed = f"run.seed={self.seed + SEED_OFFSETS[preset]}"
        return load_recipe(preset, [*self.overrides.get(preset, ()), seed, *extra])

    def setting(self, option: str) -> Any:
        """The value of a training option (:data:`TRAINING_OPTIONS`) in this configuration's recipes."""
        if option == "finetune_epochs" and not self.finetune:
            return 0
        preset, key = _OPTION_SOURCE[option]
        return _lookup(self.recipe(preset), key)

    @property
    def synthetic_fraction(self) -> float:
        """b of the "mixed" source."""
        return self.setting("synthetic_fraction")

    @property
    def negative_sources(self) -> list[str]:
        """The negative sources fine-tuned with: ``negatives`` first, then the others with ``compare_negatives``."""
        if not self.compare_negatives:
            return [self.negatives]
        return [self.negatives] + [s for s in NEGATIVE_SOURCES if s != self.negatives]

    @property
    def uses_flow(self) -> bool:
        """Whether any fine-tuning run of this configuration needs the flow."""
        return self.finetune and any(s != "real" for s in self.negative_sources)

    @property
    def training_seeds(self) -> list[int]:
        """The seed of every training run."""
        return [self.seed + i for i in range(self.seeds)]


def _check_options(options: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """The demo's own limits on its training options (the recipes check the rest when they resolve)."""
    image_size = tuple(settings.get("image_size", DemoConfig.image_size))
    for name in ("closed_epochs", "batch_size", "dicnet_epochs", "flow_epochs", "flow_batch_size"):
        if name in options and int(options[name]) < 1:
            raise ValueError(f"Expected `{name}` to be >= 1, but got {options[name]}.")
    if options.get("finetune_epochs", 1) < 0:
        raise ValueError(f"Expected `finetune_epochs` to be >= 0, but got {options['finetune_epochs']}.")
    for name in ("lr", "finetune_lr", "beta", "lambda_", "flow_lr", "flow_finetune_lr", "synthetic_fraction"):
        value = options.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")
    for name in ("lr", "finetune_lr", "flow_lr", "flow_finetune_lr"):
        if options.get(name, 1.0) <= 0:
            raise ValueError(f"Expected `{name}` > 0, but got {options[name]}.")
    if not 0.0 <= options.get("synthetic_fraction", 0.5) <= 1.0:
        raise ValueError(f"Expected `synthetic_fraction` in [0, 1], but got {options['synthetic_fraction']!r}.")
    side = options.get("negative_size")
    if side is not None and side <= 16:  # rectangles have sides 16, 24, ... below the crop side, as released
        raise ValueError(f"Expected `negative_size` > 16 px, but got {side}.")
    if side is not None and side > max(image_size):
        raise ValueError(
            f"Expected `negative_size` at most the larger scene side ({max(image_size)} px), but got {side}: a larger "
            "negative is cropped to the scene anyway."
        )
    crop = options.get("flow_crop")
    if crop is not None and (crop < 8 or crop % 8 or crop > min(image_size)):
        raise ValueError(
            f"Expected `flow_crop` to be a positive multiple of 8 (the flow's stride) at most the smaller scene side "
            f"({min(image_size)} px), but got {crop}."
        )
    negatives = settings.get("negatives", "real")
    if side is not None and (negatives != "real" or settings.get("compare_negatives")):
        if _flow_side(side) > min(image_size):
            raise ValueError(
                f"Expected the largest flow patch ({_flow_side(side)} px, from `negative_size`) to fit the smaller "
                f"scene side ({min(image_size)} px), but it does not. Lower --negative-size."
            )


@dataclass
class DemoResult:
    """Numbers and files of a demo run.

    ``rows`` hold the mean over seeds (``ap``, ``fpr95``, ``auroc``) and, with several seeds, the standard
    deviations ``ap_std``, ``fpr95_std``, ``auroc_std``; ``rows_per_seed`` the rows of every seed.
    """

    rows: list[dict[str, Any]]
    segmentation: dict[str, Any]
    threshold: float
    timings: dict[str, float]
    files: dict[str, Path]
    table: str
    verdict: list[str] = field(default_factory=list)
    rows_per_seed: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)
    comparison: str = ""


class _Announcer:
    """Stage banners with the elapsed time and an estimate of the time left, on stderr."""

    def __init__(self, enabled: bool, total_units: float) -> None:
        self.enabled, self.total_units = enabled, total_units
        self.start = time.perf_counter()
        self.done_units = 0.0
        self.seconds_per_unit: float | None = None

    def rate(self, seconds_per_unit: float) -> None:
        self.seconds_per_unit = seconds_per_unit

    def advance(self, units: float, seconds: float | None = None) -> None:
        """Count finished work; ``seconds`` (when the work was really done, not reused) refines the rate."""
        self.done_units += units
        if seconds is not None and units > 0:
            self.seconds_per_unit = seconds / units

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def banner(self, title: str, detail: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        left = ""
        if self.seconds_per_unit is not None:
            remaining = max(self.total_units - self.done_units, 0.0) * self.seconds_per_unit
            left = f", about {_duration(remaining)} left"
        self.say(f"== {title}{': ' + detail if detail else ''}  [{_duration(elapsed)} elapsed{left}]")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _work_units(config: DemoConfig) -> tuple[float, float, float]:
    """(closed-set, fine-tuning, scoring) work of one seed in image passes (a forward pass costs a third of a step;
    fine-tuning steps pay for the negatives too)."""
    train = config.train_images
    closed = config.setting("closed_epochs") * train
    finetune = config.setting("finetune_epochs") * train * 1.1
    scoring = (2 * train + config.val_images + 2 * config.test_images) / 3
    return closed, finetune, scoring


def _dicnet_units(config: DemoConfig) -> float:
    """DiCNet work of one seed in image passes: a teacher forward and a light student step per image, then scoring."""
    if not config.dicnet:
        return 0.0
    return config.setting("dicnet_epochs") * config.train_images * 0.6 + config.test_images / 3


def _family_groups(batch: Mapping[str, Any], binary: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluate each anomaly family against all inlier pixels: the other family's pixels are ignored."""
    family = batch["family"].to(binary.device)
    groups = {}
    for fid, name in FAMILIES.items():
        t = binary.clone()
        t[(binary == ANOMALY) & (family != fid)] = IGNORE_INDEX
        groups[name] = t
    groups["all"] = binary
    return groups


# ------------------------------------------------------------------------------------------------- the pipeline
@dataclass
class _StageRun:
    """A trained (or reused) stage: its recipe, its folder's ``last.pt``, the command that trains it by hand."""

    recipe: dict[str, Any]
    checkpoint: Path
    seconds: float
    reused: bool
    record: dict[str, Any]


class _Pipeline:
    """The demo's stages on one benchmark: resolves each stage's recipe and trains it with ``train_recipe``."""

    def __init__(self, config: DemoConfig, digest: str, device: torch.device, say: _Announcer) -> None:
        self.config, self.digest, self.device, self.say = config, digest, device, say
        self.records: list[dict[str, Any]] = []

    def stage(
        self,
        config: DemoConfig,
        preset: str,
        folder: Path,
        banner: tuple[str, str],
        init: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> _StageRun:
        """Train ``preset`` into ``folder`` (or reuse the finished run of the same recipe there)."""
        from densehybrid.recipes.run import RunInputs, train_recipe

        t0 = time.perf_counter()
        pinned = (f"data.options.digest={_toml(self.digest)}", *extra)
        recipe = config.recipe(preset, pinned)
        self.say.banner(*banner)
        checkpoint = folder / "last.pt"
        reused = config.resume and _finished(checkpoint, recipe)
        if reused:
            self.say.say(f"   reused the finished stage {checkpoint} (same recipe; --no-resume retrains it)")
        else:
            inputs = RunInputs(
                data_root=config.data_dir,
                init="" if init is None else str(init),
                out=folder,
                device=str(self.device),
                progress=config.progress,
                resume=config.resume,
            )
            summary = train_recipe(recipe, inputs)
            if not summary["finished"]:
                raise RuntimeError(
                    f"Expected stage {preset!r} to finish, but it stopped at step {summary['global_step']}."
                )
            _check_finite_weights(checkpoint)
        sets = [*config.overrides.get(preset, ()), f"run.seed={config.seed + SEED_OFFSETS[preset]}", *pinned]
        command = ["densehybrid", "train", "--recipe", preset, "--data-root", str(config.data_dir)]
        command += [*(["--init", str(init)] if init is not None else []), "--out", str(folder)]
        command += [arg for item in sets for arg in ("--set", item)]
        record = {"recipe": preset, "out": str(folder), "init": None if init is None else str(init), "set": sets}
        record["command"] = shlex.join(command)
        if record not in self.records:  # a comparison reuses the closed-set stage: listed once
            self.records.append(record)
        return _StageRun(recipe, checkpoint, time.perf_counter() - t0, reused, record)


def _finished(checkpoint: Path, recipe: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is the end of a finished run of ``recipe`` (the same resolved recipe)."""
    from densehybrid.errors import CheckpointError
    from densehybrid.models.checkpoint import read_checkpoint
    from densehybrid.recipes.run import recipe_differences

    if not checkpoint.is_file():
        return False
    try:
        info = read_checkpoint(checkpoint)
    except CheckpointError:
        return False  # a damaged file: train_recipe says what is wrong with it
    if not isinstance(info.recipe, Mapping) or recipe_differences(info.recipe, recipe):
        return False  # train_recipe refuses it, naming the keys that differ
    return int(info.training.get("epoch") or 0) >= recipe["optim"]["epochs"] and not info.training.get("step_in_epoch")


def _check_finite_weights(checkpoint: Path) -> None:
    from densehybrid.models.checkpoint import read_checkpoint

    state = read_checkpoint(checkpoint).state_dict
    damaged = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor.float()).all())]
    if damaged:
        raise NonFiniteError(
            f"Expected finite weights at the end of stage {checkpoint.parent.name!r}, but {len(damaged)} tensor(s) "
            f"hold NaN or infinite values (first: {damaged[0]}): training diverged. Lower the learning rate and "
            "re-run with --no-resume."
        )


def _load_model(checkpoint: Path, device: torch.device) -> torch.nn.Module:
    """The segmenter (or DiCNet) a stage trained, in eval mode on ``device``."""
    from densehybrid.models.checkpoint import model_from_checkpoint, read_checkpoint

    model, _ = model_from_checkpoint(read_checkpoint(checkpoint), checkpoint)
    return model.to(device).eval()


def _load_flow(recipe: Mapping[str, Any], checkpoint: Path) -> torch.nn.Module:
    """The flow of a flow pre-training or flow fine-tuning run's ``last.pt``."""
    from densehybrid.recipes.flow_methods import build_flow, load_flow_init

    flow, _ = build_flow({**recipe["flow"], "init": ""})
    load_flow_init(flow, str(checkpoint))
    return flow


def _write_flow_grid(flow: torch.nn.Module, side: int, seed: int, path: Path) -> Path:
    """A grid of ``FLOW_GRID_SAMPLES`` flow samples of ``side``² from fixed latents (``seed``)."""
    from densehybrid.engine.flow_joint import save_sample_grid

    flow.eval()
    with torch.no_grad():
        samples = flow.sample(FLOW_GRID_SAMPLES, (side, side), generator=torch.Generator().manual_seed(seed))
    return save_sample_grid(samples / 255.0, path, nrow=4)


def _finetune_folder(source: str) -> str:
    """The folder of a fine-tuning stage: ``finetune`` for real negatives, ``finetune-SOURCE`` otherwise."""
    return "finetune" if source == "real" else f"finetune-{source}"


def _comparison_section(per_source: Mapping[str, list[dict[str, Any]]], synthetic_fraction: float):
    """The report section comparing the fine-tuned model's scores across negative sources (AP and FPR95 in %)."""
    from densehybrid.report import ReportSection

    sources = list(per_source)
    lookups = {s: {(r["model"], r["score"], r["family"]): r for r in rows} for s, rows in per_source.items()}
    first = per_source[sources[0]]
    keys = [(r["score"], r["family"]) for r in first if r["model"] == "densehybrid"]

    def cell(row: Mapping[str, Any] | None, metric: str) -> str:
        value = None if row is None else row.get(metric)
        if value is None or not math.isfinite(float(value)):
            return "n/a"
        text = f"{100 * float(value):.2f}"
        std = None if row is None else row.get(f"{metric}_std")
        if std is not None and math.isfinite(float(std)):
            text += f" ± {100 * float(std):.2f}"
        return text

    header = ["score", "family"] + [f"{s} {m}" for s in sources for m in ("AP", "FPR95")]
    body = [
        [score, family]
        + [cell(lookups[s].get(("densehybrid", score, family)), m) for s in sources for m in ("ap", "fpr95")]
        for score, family in keys
    ]
    labels = {"real": "real", "synthetic": "synthetic", "mixed": f"mixed (b = {synthetic_fraction:g})"}
    return ReportSection(
        "Negatives compared",
        paragraphs=[
            "The same closed-set model fine-tuned with each source of negatives: "
            + ", ".join(labels[s] for s in sources)
            + ". Every score of each fine-tuned model on the evaluation split, in %; AP higher is better, FPR95 lower "
            "is better. Each run has its own SML statistics and threshold; the closed-set model (main table) is "
            "common to all."
        ],
        tables=[(header, body)],
        label_columns=2,
    )


def _rows(result: EvaluationResult, model_name: str) -> list[dict[str, Any]]:
    rows = []
    for score, by_group in result.anomaly.items():
        for group, m in by_group.items():
            rows.append(
                {
                    "model": model_name,
                    "score": score,
                    "family": group,
                    "ap": m["ap"],
                    "fpr95": m["fpr95"],
                    "auroc": m["auroc"],
                }
            )
    return rows


#: Components of the hybrid score and the logit baselines it is compared with.
_RIVALS = ("discriminative", "generative", "msp", "max_logit", "energy", "entropy", "sml")


def _verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Does the hybrid score beat every other score of both models (pooled AP and FPR95), and both of its components
    on each family? One line per comparison; means over seeds when rows carry them."""
    lookup = {(r["model"], r["score"], r["family"]): r for r in rows}
    hybrid = lookup.get(("densehybrid", "densehybrid", "all"))
    if hybrid is None:
        return []
    lines = []
    rivals = [("densehybrid", s) for s in _RIVALS] + [("closed-set", s) for s in LOGIT_SCORES]
    for model, score in rivals:
        other = lookup.get((model, score, "all"))
        if other is None:
            continue
        lines.append(f"hybrid vs {score} ({_MODEL_LABELS[model]}), pooled: {_compare(hybrid, other)}")
    pooled = [r for key, r in lookup.items() if key[2] == "all" and key[:2] != ("densehybrid", "densehybrid")]
    lines += [_margin(hybrid, pooled, metric, higher) for metric, higher in (("ap", True), ("fpr95", False))]
    dicnet = lookup.get(("dicnet", "dicnet", "all"))
    if dicnet is not None:  # only with --dicnet
        lines.append(f"hybrid vs dicnet ({_MODEL_LABELS['dicnet']}), pooled: {_compare(hybrid, dicnet)}")
        for family in FAMILIES.values():
            mine, other = lookup.get(("densehybrid", "densehybrid", family)), lookup.get(("dicnet", "dicnet", family))
            if mine is not None and other is not None:
                lines.append(f"hybrid vs dicnet ({_MODEL_LABELS['dicnet']}), {family}: {_compare(mine, other)}")
    for family in FAMILIES.values():
        mine = lookup.get(("densehybrid", "densehybrid", family))
        for component in ("discriminative", "generative"):
            other = lookup.get(("densehybrid", component, family))
            if mine is not None and other is not None:
                lines.append(
                    f"hybrid vs {component} ({_MODEL_LABELS['densehybrid']}), {family}: {_compare(mine, other)}"
                )
    return lines


def _margin(hybrid: Mapping[str, Any], others: list[dict[str, Any]], metric: str, higher: bool) -> str:
    """Whether the hybrid's pooled ``metric`` is the best of all ``others`` by more than the runner-up's standard
    deviation over seeds (rows of one seed carry none: then by any margin, and the line says so)."""
    name = {"ap": "AP", "fpr95": "FPR95"}[metric]
    finite = [r for r in others if r.get(metric) is not None and math.isfinite(r[metric])]
    mine = hybrid.get(metric)
    if not finite or mine is None or not math.isfinite(mine):
        return f"goal, pooled {name}: n/a"
    sign = 1.0 if higher else -1.0
    runner = max(finite, key=lambda r: sign * r[metric])
    std = runner.get(f"{metric}_std")
    lead = sign * (mine - runner[metric])
    needed = 0.0 if std is None or not math.isfinite(std) else std
    met = lead > needed
    spread = f" ± {100 * std:.2f}" if std is not None and math.isfinite(std) else ""
    rule = "more than one std of the runner-up" if std is not None else "any margin (one seed: no spread)"
    return (
        f"goal, pooled {name}: hybrid best by {rule}: {'met' if met else 'not met'} (hybrid {100 * mine:.2f}, "
        f"runner-up {runner['score']} ({_MODEL_LABELS[runner['model']]}) {100 * runner[metric]:.2f}{spread})"
    )


_MODEL_LABELS = {
    "densehybrid": "fine-tuned model",
    "closed-set": "closed-set model",
    "dicnet": "DiCNet student of the closed-set model",
}


def _compare(mine: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    def better(metric: str, higher: bool) -> str:
        a, b = mine.get(metric), other.get(metric)
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return "n/a"
        return "better" if (a > b if higher else a < b) else "not better"

    def pct(row: Mapping[str, Any], metric: str) -> str:
        value = row.get(metric)
        return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"

    return (
        f"AP {pct(mine, 'ap')} vs {pct(other, 'ap')} ({better('ap', True)}), "
        f"FPR95 {pct(mine, 'fpr95')} vs {pct(other, 'fpr95')} ({better('fpr95', False)})"
    )


def _aggregate(per_seed: Mapping[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean over seeds of every row (same keys, in the first seed's order); with several seeds also ``*_std``
    (sample standard deviation, ddof=1) and ``seeds`` (how many finite values the mean is over)."""
    runs = list(per_seed.values())
    lookup = [{(r["model"], r["score"], r["family"]): r for r in rows} for rows in runs]
    out = []
    for row in runs[0]:
        key = (row["model"], row["score"], row["family"])
        merged = dict(row)
        for metric in ("ap", "fpr95", "auroc"):
            values = [r[key][metric] for r in lookup if key in r and r[key][metric] is not None]
            values = [float(v) for v in values if math.isfinite(float(v))]
            merged[metric] = float(np.mean(values)) if values else float("nan")
            if len(runs) > 1:
                merged[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        if len(runs) > 1:
            merged["seeds"] = len(runs)
        out.append(merged)
    return out


def _swallowed_classes(open_iou: Mapping[str, float], closed_iou: Mapping[str, float]) -> list[str]:
    """Classes whose IoU the open-set prediction loses most of: the threshold turns them into "unknown"."""
    lines = []
    for name, closed in closed_iou.items():
        opened = open_iou.get(name)
        if closed is None or opened is None or not (math.isfinite(closed) and math.isfinite(opened)):
            continue
        if closed > 0.2 and opened < 0.5 * closed:
            lines.append(f"{name} (IoU {100 * closed:.1f} closed-set, {100 * opened:.1f} open-set)")
    return lines


@dataclass
class _SeedRun:
    rows: list[dict[str, Any]]
    segmentation: dict[str, Any]
    threshold: float
    timings: dict[str, float]
    hybrid_eval: EvaluationResult
    hybrid_model: torch.nn.Module
    flow_grids: dict[str, Path] = field(default_factory=dict)


def _train_stages(
    pipeline: _Pipeline, config: DemoConfig, out: Path, source: str, main: bool
) -> tuple[dict[str, torch.nn.Module], dict[str, float], dict[str, Path]]:
    """Stages 2-3 (and the flow and DiCNet stages) for one training seed: the trained models, timings, flow grids."""
    tag = f" (seed {config.seed})" if config.seeds > 1 else ""
    say, device, timings, grids = pipeline.say, pipeline.device, {}, {}
    epochs = config.setting("closed_epochs")
    closed = pipeline.stage(
        config,
        CLOSED,
        out / STAGE_FOLDERS[CLOSED],
        (f"closed-set training{tag}", f"{epochs} epochs over {config.train_images} scenes, recipe {CLOSED}"),
    )
    closed_units, finetune_units, _ = _work_units(config)
    say.advance(closed_units, None if closed.reused else closed.seconds)
    timings["closed-set training"] = closed.seconds
    models = {"closed-set": _load_model(closed.checkpoint, device)}
    flow_init: tuple[str, ...] = ()
    if config.finetune and source != "real":
        flow = pipeline.stage(
            config,
            FLOW,
            out / STAGE_FOLDERS[FLOW],
            (f"flow pre-training{tag}", f"DenseFlow.small(), {config.setting('flow_epochs')} epochs, recipe {FLOW}"),
        )
        timings["flow pre-training"] = flow.seconds
        side = flow.recipe["augment"]["crop"]
        grids["pretrained"] = _write_flow_grid(
            _load_flow(flow.recipe, flow.checkpoint), side, config.seed, out / "figures" / "flow_samples_pretrained.png"
        )
        flow_init = (f"flow.init={_toml(str(flow.checkpoint))}", f"negatives.source={_toml(source)}")
    if config.finetune:
        preset = FINETUNE if source == "real" else FINETUNE_FLOW
        label = {"real": "", "synthetic": " with flow negatives", "mixed": " with mixed negatives"}[source]
        tuned = pipeline.stage(
            config,
            preset,
            out / _finetune_folder(source),
            (f"DenseHybrid fine-tuning{label}{tag}", f"{config.setting('finetune_epochs')} epochs, recipe {preset}"),
            init=closed.checkpoint,
            extra=flow_init,
        )
        timings["DenseHybrid fine-tuning"] = tuned.seconds
        say.advance(finetune_units, None if tuned.reused else tuned.seconds)
        models["densehybrid"] = _load_model(tuned.checkpoint, device)
        if source != "real":
            flow_side = config.recipe(FLOW)["augment"]["crop"]
            tuned_flow = _load_flow(tuned.recipe, tuned.checkpoint)
            grids["finetuned"] = _write_flow_grid(
                tuned_flow, flow_side, config.seed, out / "figures" / f"flow_samples_{source}.png"
            )
    else:
        models["densehybrid"] = copy.deepcopy(models["closed-set"])
    if config.dicnet and main:
        dicnet = pipeline.stage(
            config,
            DICNET,
            out / STAGE_FOLDERS[DICNET],
            (
                f"DiCNet distillation{tag}",
                f"{config.setting('dicnet_epochs')} epochs, {DICNET_STUDENT} student imitating the frozen "
                f"closed-set model's pre-logit features, recipe {DICNET}",
            ),
            init=closed.checkpoint,
        )
        timings["DiCNet distillation"] = dicnet.seconds
        say.advance(_dicnet_units(config))
        models["dicnet"] = _load_model(dicnet.checkpoint, device)
    return models, timings, grids


def _train_and_evaluate(
    pipeline: _Pipeline, config: DemoConfig, datasets: Mapping[str, Any], out: Path, source: str, main: bool = True
) -> _SeedRun:
    """Stages 2-5 for one training seed (``config.seed``) and one source of negatives, training into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    models, timings, grids = _train_stages(pipeline, config, out, source, main)
    rows, segmentation, threshold, hybrid_eval, more = _evaluate_models(pipeline, config, datasets, models)
    timings.update(more)
    return _SeedRun(rows, segmentation, threshold, timings, hybrid_eval, models["densehybrid"], grids)


def _evaluate_models(pipeline: _Pipeline, config: DemoConfig, datasets: Mapping[str, Any], models: dict) -> tuple:
    """Stages 4-5: SML statistics, the threshold on val, every score of every model on the evaluation split."""
    say, timings, num_classes = pipeline.say, {}, len(ROADSCENE_CLASSES)
    tag = f" (seed {config.seed})" if config.seeds > 1 else ""
    train_set, val_set, eval_set = datasets["train"], datasets["val"], datasets[config.eval_split]
    closed_model, hybrid_model = models["closed-set"], models["densehybrid"]
    t0 = time.perf_counter()
    say.banner(f"calibration{tag}", "SML statistics on train, open-set threshold on val")
    common = dict(device=pipeline.device, batch_size=config.setting("batch_size"), progress=config.progress)
    sml_stats = {name: _fit_sml(models[name], train_set, common) for name in ("closed-set", "densehybrid")}
    threshold = calibrate_threshold(
        (
            (get_score("densehybrid")(out_.logits, out_.ood_logits), anomaly_target(batch["target"], num_classes))
            for batch, out_ in model_outputs(hybrid_model, val_set, desc="calibrate", **common)
        ),
        target_tpr=config.target_tpr,
    )
    timings["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say.banner(
        f"evaluation on {config.eval_split}{tag}",
        f"every score, {'all three' if 'dicnet' in models else 'both'} models, per anomaly family",
    )
    closed_eval = evaluate(
        closed_model,
        eval_set,
        [s for s in LOGIT_SCORES if s in list_scores()],
        num_classes=num_classes,
        groups=_family_groups,
        score_options={"sml": {"statistics": sml_stats["closed-set"]}},
        **common,
    )
    hybrid_eval = evaluate(
        hybrid_model,
        eval_set,
        list_scores(),
        num_classes=num_classes,
        groups=_family_groups,
        score_options={"sml": {"statistics": sml_stats["densehybrid"]}},
        threshold=threshold,
        sample_pixels=200_000,
        seed=config.seed,
        **common,
    )
    rows = _rows(closed_eval, "closed-set") + _rows(hybrid_eval, "densehybrid")
    if "dicnet" in models:
        dicnet_eval = evaluate(
            models["dicnet"], eval_set, ["dicnet"], num_classes=num_classes, groups=_family_groups, **common
        )
        rows += _rows(dicnet_eval, "dicnet")
    timings["evaluation"] = time.perf_counter() - t0
    say.advance(_work_units(config)[2])
    segmentation = {
        "closed_miou": hybrid_eval.closed_set["miou"],
        "open_miou": hybrid_eval.open_set["open_miou"],
        "anomaly_iou": hybrid_eval.open_set["anomaly_iou"],
        "closed_miou_before_finetuning": closed_eval.closed_set["miou"],
        "threshold": threshold,
        "threshold_tpr": config.target_tpr,
        "per_class_iou": dict(zip(ROADSCENE_CLASSES, hybrid_eval.closed_set["iou"])),
        "per_class_open_iou": dict(zip(ROADSCENE_CLASSES, hybrid_eval.open_set["open_iou"])),
    }
    return rows, segmentation, threshold, hybrid_eval, timings


def run_demo(config: DemoConfig, command: str = "densehybrid demo") -> DemoResult:
    """Run every stage of the demo and write the report to ``config.out_dir``.

    The first training seed trains into ``out_dir``'s stage folders; every further seed ``s`` into
    ``out_dir/seeds/seed-s``. The report (figures, examples, threshold, segmentation) shows the first seed; the
    anomaly table shows the mean (and, with several seeds, the standard deviation) over seeds.
    """
    import dataclasses

    from densehybrid.data.datasets import get_benchmark
    from densehybrid.data.roadscene import benchmark_digest

    timings: dict[str, float] = {}
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "figures"):
        remove_stale_temporaries(folder)  # left by saves killed mid-write (train_recipe cleans the stage folders)
    remove_stale_temporaries(config.data_dir, "*.tmp")  # the benchmark cache writes NAME.tmp
    seed_everything(config.seed)
    device = select_device(config.device)
    closed_units, finetune_units, scoring_units = _work_units(config)
    # a joint flow step costs about 2.7 real-negative steps (docs/flows.md)
    tuned = sum((2.7 if s != "real" else 1.0) * finetune_units + scoring_units for s in config.negative_sources)
    say = _Announcer(config.progress, config.seeds * (closed_units + tuned + _dicnet_units(config)))
    say.say(
        f"densehybrid demo: {len(config.training_seeds)} training run(s) of {config.setting('closed_epochs')} "
        f"closed-set + {config.setting('finetune_epochs')} fine-tuning epochs, then evaluation on "
        f"{config.eval_split}; report in {out}"
    )
    t0 = time.perf_counter()
    say.banner(
        "benchmark",
        f"{config.train_images}/{config.val_images}/{config.test_images} scenes of "
        f"{config.image_size[0]}x{config.image_size[1]} px in {config.data_dir}",
    )
    benchmark = RoadSceneBenchmark(
        config.data_dir,
        seed=config.seed,
        image_size=config.image_size,
        sizes={"train": config.train_images, "val": config.val_images, "test": config.test_images},
    )
    if benchmark.is_prepared():
        say.say(f"   reused the generated benchmark in {config.data_dir}")
    benchmark.prepare()
    spec = get_benchmark("roadscene")
    datasets = {split: spec.create(config.data_dir, split) for split in ("train", "val", "test")}
    timings["benchmark"] = time.perf_counter() - t0
    pipeline = _Pipeline(config, benchmark_digest(config.data_dir), device, say)

    runs: dict[int, _SeedRun] = {}
    # with compare_negatives: the fine-tunings with the other sources, from the same closed-set model (reused)
    other_runs: dict[str, dict[int, _SeedRun]] = {source: {} for source in config.negative_sources[1:]}
    for index, seed in enumerate(config.training_seeds):
        seed_out = out if index == 0 else out / "seeds" / f"seed-{seed}"
        seeded = dataclasses.replace(config, seed=seed)
        runs[seed] = _train_and_evaluate(pipeline, seeded, datasets, seed_out, config.negatives)
        for stage, seconds in runs[seed].timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        for source in config.negative_sources[1:]:
            say.say(f"   compare negatives: fine-tuning with {source} negatives from the same closed-set model")
            other_runs[source][seed] = _train_and_evaluate(pipeline, seeded, datasets, seed_out, source, main=False)
            for stage, seconds in other_runs[source][seed].timings.items():
                key = f"{source} negatives: {stage}"
                timings[key] = timings.get(key, 0.0) + seconds
    return _report(config, command, datasets, runs, other_runs, timings, pipeline)


def _report(
    config: DemoConfig,
    command: str,
    datasets: Mapping[str, Any],
    runs: Mapping[int, _SeedRun],
    other_runs: Mapping[str, Mapping[int, _SeedRun]],
    timings: dict[str, float],
    pipeline: _Pipeline,
) -> DemoResult:
    """Stage 6: the report of every seed's runs, written to ``config.out_dir``."""
    from densehybrid.report import ReportData, ScoreSample, format_table, write_report

    out = config.out_dir
    t0 = time.perf_counter()
    pipeline.say.banner("report", f"{out / 'report.html'}")
    first = runs[config.seed]
    per_seed = {seed: run.rows for seed, run in runs.items()}
    rows = _aggregate(per_seed)
    segmentation = first.segmentation
    samples = {
        name: ScoreSample(scores=s, labels=labels, family=None)
        for name, (s, labels, _ids) in first.hybrid_eval.samples.items()
    }
    examples = _examples(
        first.hybrid_model,
        datasets[config.eval_split],
        first.threshold,
        len(ROADSCENE_CLASSES),
        config.num_examples,
        pipeline.device,
    )
    verdict = _verdict(rows)
    swallowed = _swallowed_classes(segmentation["per_class_open_iou"], segmentation["per_class_iou"])
    remarks = []
    if swallowed:
        remarks.append(
            "The open-set prediction turns much of these known classes into 'unknown' (their scores pass the "
            "threshold calibrated at TPR " + f"{config.target_tpr:.2f}" + "): " + "; ".join(swallowed) + "."
        )
    notes = [*_notes(config), *remarks, *verdict]
    sections, extra = _negatives_report(config, runs, other_runs, rows)
    notes += _negatives_notes(config)
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    data = ReportData(
        title="DenseHybrid on the built-in road-scene benchmark",
        command=command,
        rows=rows,
        segmentation=segmentation,
        class_names=list(ROADSCENE_CLASSES),
        palette=np.asarray(ROADSCENE_PALETTE[: len(ROADSCENE_CLASSES)], dtype=np.uint8),
        samples=samples,
        examples=examples,
        config=config_dict,
        timings=timings,
        notes=notes,
        family_names=dict(FAMILIES),
        extra={
            "seeds": config.training_seeds,
            "rows_per_seed": {str(seed): seed_rows for seed, seed_rows in per_seed.items()},
            "thresholds_per_seed": {str(seed): run.threshold for seed, run in runs.items()},
            "eval_split": config.eval_split,
            "verdict": verdict,
            "remarks": remarks,
            "stages": pipeline.records,
            **extra,
        },
        sections=sections,
    )
    files = write_report(data, out, report_stage=("report", t0))
    table = format_table(rows, families=["real", "procedural", "all"])
    comparison = ""
    for section in sections:
        if section.title == "Negatives compared":
            header, body = section.tables[0]
            comparison = "\n".join("| " + " | ".join(cells) + " |" for cells in [header, *body])
    return DemoResult(
        rows, segmentation, first.threshold, timings, files, table, verdict, per_seed, remarks, comparison
    )


def _notes(config: DemoConfig) -> list[str]:
    """The report's fixed notes: spread, models, families, split, threshold, the DiCNet student."""
    if config.seeds > 1:
        spread = (
            f"Anomaly table: mean ± standard deviation over {config.seeds} training seeds "
            f"({', '.join(map(str, config.training_seeds))}) on the same benchmark (seed {config.seed}). The "
            "segmentation numbers, threshold, figures and examples are those of the first seed; they carry no spread."
        )
    else:
        spread = (
            "One training seed: no number in this report carries a spread (run with --seeds N for mean ± std over "
            "N training seeds)."
        )
    notes = [
        spread,
        "Scores are evaluated on the DenseHybrid fine-tuned model ('densehybrid' rows) and, for logit-only scores, "
        "on the closed-set model before fine-tuning ('closed-set' rows).",
        "Families: 'real' = objects cut from photographs, 'procedural' = synthetic shapes unlike any training "
        "negative, 'all' = both. Metrics are pooled over all pixels of the split; every family is ranked against "
        "all inlier pixels.",
        f"Evaluated on the {config.eval_split} split."
        + (" (Settings are chosen on val; test numbers are reported.)" if config.eval_split == "test" else ""),
        f"Open-set threshold calibrated on val at TPR {config.target_tpr:.2f} of the densehybrid score.",
        "The energy and generative scores are the same function of the logits (-logsumexp); their curves coincide.",
        "Every stage is a shipped recipe trained by `densehybrid train`'s code; results.json `stages` holds the "
        "command that trains each one by hand.",
    ]
    if config.dicnet:
        notes.append(
            f"'dicnet' rows (--dicnet): a DiCNet student ({DICNET_STUDENT} to stride 8, ImageNet-initialised, "
            f"pyramid pooling) distilled for {config.setting('dicnet_epochs')} epoch(s) from the frozen closed-set "
            "model's pre-logit features (recipe demo-dicnet: Adam 1e-4, weight decay 1e-5, horizontal flips: the "
            "released optimiser; the released 150 epochs do not fit a CPU); score: mean squared teacher-student "
            "feature difference. It sees no negatives."
        )
    return notes


def _negatives_notes(config: DemoConfig) -> list[str]:
    """A note on the negatives when a flow is involved (none for the default real-negative run)."""
    if not config.uses_flow:
        return []
    text = f"Fine-tuning negatives: {config.negatives}"
    if config.negatives == "mixed":
        text += f" (each pasted negative synthetic with probability {config.synthetic_fraction:g})"
    if config.negatives != "real":
        text += "; flow: a DenseFlow.small() pre-trained on the training scenes, then trained jointly (docs/flows.md)"
    if config.compare_negatives:
        text += "; also fine-tuned with the other sources from the same closed-set model (section Negatives compared)"
    return [text + "."]


def _negatives_report(
    config: DemoConfig,
    runs: Mapping[int, _SeedRun],
    other_runs: Mapping[str, Mapping[int, _SeedRun]],
    rows: list[dict[str, Any]],
) -> tuple[list, dict[str, Any]]:
    """Report sections (flow samples, the comparison of negative sources) and their ``results.json`` keys."""
    from densehybrid.report import ReportSection

    sections, extra = [], {"negatives": config.negatives}
    if config.negatives == "mixed":
        extra["synthetic_fraction"] = config.synthetic_fraction
    first = config.seed
    grids = dict(runs[first].flow_grids)
    for source, seed_runs in other_runs.items():
        for kind, path in seed_runs[first].flow_grids.items():
            grids.setdefault(kind if kind == "pretrained" else f"finetuned_{source}", path)
    if "finetuned" in grids:
        grids[f"finetuned_{config.negatives}"] = grids.pop("finetuned")
    if grids:
        flow_crop = config.setting("flow_crop")
        flow_max_side = _lookup(config.recipe(FINETUNE_FLOW), "flow.max_side")
        captions = {"pretrained": "after pre-training (maximum likelihood on crops of the training scenes)"}
        images = []
        for kind, path in grids.items():
            caption = captions.get(kind, f"after joint fine-tuning with {kind.removeprefix('finetuned_')} negatives")
            images.append((f"{FLOW_GRID_SAMPLES} samples of DenseFlow.small(), {caption}", path))
        sections.append(
            ReportSection(
                "Flow samples",
                paragraphs=[
                    f"Samples of {flow_crop}x{flow_crop} px from the same fixed latents (seed "
                    f"{config.seed}); pasted negatives have sides {FLOW_MIN_SIDE}-{flow_max_side} px."
                ],
                images=images,
            )
        )
        out = config.out_dir
        extra["flow_samples"] = {k: Path(p).resolve().relative_to(out.resolve()).as_posix() for k, p in grids.items()}
    if other_runs:
        per_source = {config.negatives: rows}
        for source, seed_runs in other_runs.items():
            per_source[source] = _aggregate({seed: run.rows for seed, run in seed_runs.items()})
        ordered = {s: per_source[s] for s in NEGATIVE_SOURCES if s in per_source}
        sections.append(_comparison_section(ordered, config.synthetic_fraction))
        thresholds = {config.negatives: {str(s): r.threshold for s, r in runs.items()}}
        for source, seed_runs in other_runs.items():
            thresholds[source] = {str(s): r.threshold for s, r in seed_runs.items()}
        extra["negatives_comparison"] = {
            "sources": list(ordered),
            "synthetic_fraction": config.synthetic_fraction,
            "rows": ordered,
            "thresholds_per_seed": {s: thresholds[s] for s in ordered},
        }
    return sections, extra


def _fit_sml(model: torch.nn.Module, dataset, common: Mapping[str, Any]) -> SMLStatistics:
    batches = ((out.logits, batch["target"]) for batch, out in model_outputs(model, dataset, desc="fit sml", **common))
    return fit_sml_statistics(batches)


def _examples(model, dataset, threshold: float, num_classes: int, count: int, device) -> list:
    """The first test images that contain anomalies of each family, alternating, for the report grid."""
    from densehybrid.report import Example

    picked = []
    score_fn = get_score("densehybrid")
    model.eval()
    with torch.inference_mode():
        for i in range(len(dataset)):
            if len(picked) >= count:
                break
            sample = dataset[i]
            image = sample["image"][None].to(device)
            out = model(image)
            scores = score_fn(out.logits.float(), out.ood_logits.float())
            pred = predict_open_set(out.logits, scores, threshold)[0].cpu().numpy()
            families = sorted({FAMILIES.get(int(f), "?") for f in sample["family"].unique().tolist() if f})
            picked.append(
                Example(
                    image=(sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                    target=sample["target"].numpy().astype(np.int64),
                    prediction=pred.astype(np.int64),
                    score=scores[0].cpu().numpy().astype(np.float32),
                    title=f"test #{i} ({', '.join(families) or 'no anomaly'})",
                )
            )
    return picked


__all__ = ["FAMILIES", "DemoConfig", "DemoResult", "run_demo"]

"""The demo: DenseHybrid end to end on the built-in road-scene benchmark, on a CPU, in minutes.

Stages (each timed, each resumable: finished stages are reused from ``out_dir`` on a re-run, and said so):

1. generate (and cache) the benchmark: road scenes, training negatives, val/test scenes with two anomaly families;
2. train the segmenter (ImageNet EfficientNet-Lite0 backbone by default) closed-set (cross-entropy);
3. fine-tune it with DenseHybrid: negatives pasted into every training image, the released code's loss;
4. fit SML statistics on the training set, calibrate the open-set threshold at 95% TPR on val;
5. evaluate every score on test (per anomaly family and pooled), closed mIoU and open-mIoU, for both models;
6. write the report (Markdown, HTML, JSON, figures) and print the table.

With ``dicnet=True`` a DiCNet student is also distilled from the closed-set model (frozen teacher: its pre-logit
features) after stage 3, and its ``dicnet`` score is evaluated on the same split and families (rows with
``model = "dicnet"``). It is off by default: the default run is at its CPU time budget.

With ``negatives="synthetic"`` or ``"mixed"`` a small DenseFlow is first pre-trained on the training scenes (its own
reusable stage), and stage 3 is the released joint fine-tuning: flow samples (or, for ``mixed``, each pasted negative
synthetic with probability ``synthetic_fraction``) are pasted, and the flow is trained jointly (see docs/flows.md).
``compare_negatives=True`` fine-tunes the same closed-set model with real, synthetic and mixed negatives and reports
every score of each.

With ``seeds > 1`` stages 2-5 run once per training seed on the same benchmark, and the report gives the mean and
the standard deviation over seeds of every number in the anomaly table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densehybrid.data import (
    ROADSCENE_CLASSES,
    ROADSCENE_PALETTE,
    RoadSceneBenchmark,
    RoadSceneDataset,
    RoadSceneNegatives,
)
from densehybrid.engine import ClosedSetObjective, DenseHybridObjective, NegativeStream, TrainConfig, fit
from densehybrid.engine.distill import (
    DISTILLATION_LR,
    DISTILLATION_WEIGHT_DECAY,
    distillation_optimizer,
    distillation_step,
)
from densehybrid.engine.evaluate import EvaluationResult, evaluate, model_outputs
from densehybrid.engine.outputs import remove_stale_temporaries
from densehybrid.engine.resources import check_memory
from densehybrid.engine.runtime import atomic_torch_save, seed_everything, select_device
from densehybrid.errors import CheckpointError, NonFiniteError
from densehybrid.labels import ANOMALY, IGNORE_INDEX, anomaly_target
from densehybrid.losses import DenseHybridLoss
from densehybrid.models import create_model
from densehybrid.models.checkpoint import read_checkpoint_file
from densehybrid.models.dicnet import DiCNet
from densehybrid.negatives import NegativePaster
from densehybrid.openset import calibrate_threshold, predict_open_set
from densehybrid.scores import SMLStatistics, fit_sml_statistics, get_score, list_scores

FAMILIES = {1: "real", 2: "procedural"}
#: Version of the training negatives (pool, crops, masks): a fine-tuned stage made with others is not reused.
NEGATIVES_VERSION = 2
#: Scores that read only the logits: meaningful for the closed-set model too.
LOGIT_SCORES = ("msp", "max_logit", "energy", "entropy", "sml", "generative")
#: The DiCNet student of the demo: EfficientNet-Lite0 up to its stride-8 stage (ImageNet weights from the installed
#: package, like the closed-set backbone), pyramid pooling and a 3x3 convolution to the teacher's feature width.
DICNET_STUDENT = "efficientnet_lite0"
#: Sources of the fine-tuning negatives: the real pasted crops, flow samples, or a mixture of both.
NEGATIVE_SOURCES = ("real", "synthetic", "mixed")


@dataclass
class DemoConfig:
    """Settings of one demo run. ``quick()`` gives the smoke-test variant.

    The defaults were chosen on the validation split (``eval_split="val"``), never on test; see docs/demo.md.

    Attributes:
        out_dir: report, checkpoints and the cached benchmark go here.
        data_dir: where the generated benchmark is cached (default ``out_dir/data``).
        seed: seeds the benchmark and the first training run.
        seeds: training runs, with seeds ``seed, seed + 1, ...`` on the same benchmark; the report gives mean and
            standard deviation over them.
        image_size: (H, W) of the generated scenes.
        train_images, val_images, test_images: split sizes.
        model: registered model name (default: the ladder model on ImageNet EfficientNet-Lite0).
        closed_epochs: closed-set training epochs.
        finetune_epochs: DenseHybrid fine-tuning epochs.
        batch_size: images per step.
        lr: closed-set learning rate of decoder and heads (backbone at 1/4, cosine decay, as released).
        finetune_lr: fine-tuning learning rate (backbone at 1/4, cosine decay).
        negative_size: side of the pasted negative crops (px).
        beta: weight of the negative likelihood term (released code: 0.03).
        lambda_: weight of the dataset-posterior term (released code: 10 * beta = 0.3).
        target_tpr: TPR at which the open-set threshold is calibrated on val.
        eval_split: the split the anomaly and segmentation numbers are measured on: "test", or "val" to choose
            settings without looking at test.
        dicnet: also distil a DiCNet student from the closed-set model and evaluate its ``dicnet`` score (off by
            default: the default run is at its 10-minute CPU budget).
        dicnet_epochs: DiCNet distillation epochs (Adam 1e-4, weight decay 1e-5, horizontal flips: the released
            optimiser; the released 150 epochs do not fit a CPU).
        device: "auto", "cpu" or "cuda".
        num_examples: test images shown in the report.
        resume: reuse finished stages and continue interrupted training from ``out_dir``.
        progress: progress bars, stage banners and time estimates (on stderr).
        negatives: source of the fine-tuning negatives: "real" (pasted crops of photographs), "synthetic" (samples of
            a jointly trained flow) or "mixed" (each pasted negative synthetic with probability
            ``synthetic_fraction``).
        synthetic_fraction: b of the "mixed" source, in [0, 1].
        compare_negatives: also fine-tune the same closed-set model with the other two sources and report each.
        flow_epochs: epochs of the flow's maximum-likelihood pre-training on the training scenes.
        flow_crop: side of the pre-training crops and of the report's flow samples (a multiple of 8).
        flow_batch_size: crops per pre-training step.
        flow_lr: pre-training learning rate (Adamax; the released rate for a randomly initialised flow).
        flow_finetune_lr: the flow's learning rate in joint fine-tuning (Adamax; released: 1e-5, × 0.99 per epoch).
    """

    out_dir: Path = Path("demo_out")
    data_dir: Path | None = None
    seed: int = 0
    seeds: int = 1
    image_size: tuple[int, int] = (128, 256)
    train_images: int = 400
    val_images: int = 100
    test_images: int = 100
    model: str = "ladder_efficientnet_lite0"
    closed_epochs: int = 5
    finetune_epochs: int = 3
    batch_size: int = 8
    lr: float = 4e-4
    finetune_lr: float = 1e-5
    negative_size: int = 64
    beta: float = 0.03
    lambda_: float = 0.3
    target_tpr: float = 0.95
    eval_split: str = "test"
    dicnet: bool = False
    dicnet_epochs: int = 5
    device: str = "auto"
    num_examples: int = 6
    resume: bool = True
    progress: bool = True
    negatives: str = "real"
    synthetic_fraction: float = 0.5
    compare_negatives: bool = False
    flow_epochs: int = 3
    flow_crop: int = 64
    flow_batch_size: int = 16
    flow_lr: float = 1e-3
    flow_finetune_lr: float = 1e-5

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke-test run: small images, small splits, few epochs (under a minute on 2 CPU cores)."""
        base = dict(
            image_size=(64, 128),
            train_images=32,
            val_images=8,
            test_images=8,
            closed_epochs=2,
            finetune_epochs=1,
            negative_size=32,
            num_examples=3,
            dicnet_epochs=1,
            flow_epochs=1,
            flow_crop=32,
            flow_batch_size=8,
        )
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else self.out_dir / "data"
        self.image_size = tuple(self.image_size)
        for name in (
            "train_images",
            "val_images",
            "test_images",
            "closed_epochs",
            "batch_size",
            "seeds",
            "dicnet_epochs",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {getattr(self, name)}.")
        if self.finetune_epochs < 0:
            raise ValueError(f"Expected `finetune_epochs` to be >= 0, but got {self.finetune_epochs}.")
        if self.train_images < self.batch_size:
            raise ValueError(
                f"Expected `train_images` >= `batch_size` ({self.batch_size}), but got {self.train_images}."
            )
        if self.negative_size <= 16:
            # rectangles are drawn with sides 16, 24, ... below the crop side, as in the released code
            raise ValueError(f"Expected `negative_size` > 16 px, but got {self.negative_size}.")
        for name in ("lr", "finetune_lr", "beta", "lambda_", "target_tpr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")
        for name in ("lr", "finetune_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Expected `{name}` > 0, but got {getattr(self, name)}.")
        if not 0 < self.target_tpr <= 1:
            raise ValueError(f"Expected `target_tpr` in (0, 1], but got {self.target_tpr}.")
        if self.negative_size > max(self.image_size):
            raise ValueError(
                f"Expected `negative_size` at most the larger scene side ({max(self.image_size)} px), but got "
                f"{self.negative_size}: a larger negative is cropped to the scene anyway."
            )
        images = self.train_images + self.val_images + self.test_images
        # uint8 scenes, targets and family maps (5 bytes a pixel), plus the 500 cached negatives of side
        # 2 * negative_size (16 bytes a pixel, see RoadSceneNegatives)
        planned = images * self.image_size[0] * self.image_size[1] * 5 + 500 * (2 * self.negative_size) ** 2 * 16
        check_memory(
            planned,
            f"the benchmark ({images} scenes of {self.image_size[0]}x{self.image_size[1]}) and the negatives "
            f"(side {2 * self.negative_size})",
            "Lower --image-size, the image counts or --negative-size.",
        )
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"Expected `eval_split` to be 'test' or 'val', but got {self.eval_split!r}.")
        self._check_flow_settings()

    def _check_flow_settings(self) -> None:
        if self.negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"Expected `negatives` to be one of {NEGATIVE_SOURCES}, but got {self.negatives!r}.")
        b = self.synthetic_fraction
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and 0.0 <= b <= 1.0):
            raise ValueError(f"Expected `synthetic_fraction` in [0, 1], but got {b!r}.")
        for name in ("flow_epochs", "flow_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {getattr(self, name)}.")
        if self.flow_crop < 8 or self.flow_crop % 8:
            raise ValueError(
                f"Expected `flow_crop` to be a positive multiple of 8 (the flow's stride), got {self.flow_crop}."
            )
        if self.flow_crop > min(self.image_size):
            raise ValueError(
                f"Expected `flow_crop` at most the smaller scene side ({min(self.image_size)} px), but got "
                f"{self.flow_crop}."
            )
        for name in ("flow_lr", "flow_finetune_lr"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value!r}.")
        if self.uses_flow and _flow_max_side(self) > min(self.image_size):
            raise ValueError(
                f"Expected the largest flow patch ({_flow_max_side(self)} px, from `negative_size`) to fit the smaller "
                f"scene side ({min(self.image_size)} px), but it does not. Lower --negative-size."
            )

    @property
    def negative_sources(self) -> list[str]:
        """The negative sources fine-tuned with: ``negatives`` first, then the others with ``compare_negatives``."""
        if not self.compare_negatives:
            return [self.negatives]
        return [self.negatives] + [s for s in NEGATIVE_SOURCES if s != self.negatives]

    @property
    def uses_flow(self) -> bool:
        """Whether any fine-tuning run of this configuration needs the flow."""
        return any(s != "real" for s in self.negative_sources)

    @property
    def training_seeds(self) -> list[int]:
        """The seed of every training run."""
        return [self.seed + i for i in range(self.seeds)]


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
    closed = config.closed_epochs * train
    finetune = config.finetune_epochs * train * 1.1
    scoring = (2 * train + config.val_images + 2 * config.test_images) / 3
    return closed, finetune, scoring


def _dicnet_units(config: DemoConfig) -> float:
    """DiCNet work of one seed in image passes: a teacher forward and a light student step per image, then scoring."""
    return config.dicnet_epochs * config.train_images * 0.6 + config.test_images / 3 if config.dicnet else 0.0


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


def _train_config(config: DemoConfig, epochs: int, lr: float, seed_offset: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=config.batch_size,
        lr=lr,
        seed=config.seed + seed_offset,
        device=config.device,
        progress=config.progress,
        checkpoint_every=25,
        num_workers=0,  # the generated scenes are in memory
    )


def _stage_settings(config: DemoConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's result depends on: a finished stage is reused only when they are unchanged."""
    settings = {
        "model": config.model,
        "seed": config.seed,
        "image_size": list(config.image_size),
        "train_images": config.train_images,
        "batch_size": config.batch_size,
        "closed_epochs": config.closed_epochs,
        "lr": config.lr,
    }
    if stage == "densehybrid":
        settings.update(
            finetune_epochs=config.finetune_epochs,
            finetune_lr=config.finetune_lr,
            negative_size=config.negative_size,
            beta=config.beta,
            lambda_=config.lambda_,
        )
    if stage == "dicnet":
        settings.update(
            dicnet_epochs=config.dicnet_epochs,
            dicnet_student=DICNET_STUDENT,
            dicnet_lr=DISTILLATION_LR,
            dicnet_weight_decay=DISTILLATION_WEIGHT_DECAY,
        )
    return settings


def _reuse_stage(model: torch.nn.Module, path: Path, train_dir: Path, settings: dict[str, Any]) -> bool:
    """Load a finished stage into ``model`` if it was made with ``settings``; otherwise clear its stale state."""
    if path.exists():
        stored = read_checkpoint_file(path)
        if stored.get("settings") == settings:
            model.load_state_dict(stored["model"])
            return True
        # kept until the retrained stage replaces it atomically: an interrupted re-run leaves the old one intact
    # an interrupted run of the same settings resumes; one of other settings must not
    last = train_dir / "last.pt"
    if last.exists():
        try:
            same = read_checkpoint_file(last).get("metadata", {}).get("demo_settings") == settings
        except CheckpointError:
            same = False  # a damaged partial run of any settings: start that stage over
        if not same:
            last.unlink()
    return False


def _mark_finished(path: Path, model: torch.nn.Module, settings: dict[str, Any], history: list) -> None:
    damaged = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor.float()).all())]
    if damaged:
        raise NonFiniteError(
            f"Expected finite weights at the end of stage {path.stem!r}, but {len(damaged)} tensor(s) hold NaN or "
            f"infinite values (first: {damaged[0]}): training diverged, so the stage is not saved. Lower the "
            "learning rate."
        )
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "model_name": getattr(model, "model_name", None),
            "model_kwargs": getattr(model, "model_kwargs", None),
            "data_config": model.data_config,
            "settings": settings,
            "history": history,
        },
        path,
    )


# ----------------------------------------------------------------------------------------- synthetic negatives
#: Patch sides of the flow negatives start here (the released 16 px) and step by 8 px.
FLOW_MIN_SIDE = 16
#: Samples in each grid of flow samples shown in the report.
FLOW_GRID_SAMPLES = 16


def _flow_max_side(config: DemoConfig) -> int:
    """The largest flow patch side: the real negatives' crop side, rounded down to the flow's stride (8)."""
    return max(FLOW_MIN_SIDE, config.negative_size // 8 * 8)


def _finetune_name(source: str) -> str:
    """Stem of a fine-tuning stage's checkpoint and training folder; the real-negative stage keeps its old name."""
    return "densehybrid" if source == "real" else f"densehybrid_{source}"


def _flow_stage_settings(config: DemoConfig, data_seed: int) -> dict[str, Any]:
    return {
        "flow": "DenseFlow.small",
        "seed": config.seed,
        "data_seed": data_seed,
        "image_size": list(config.image_size),
        "train_images": config.train_images,
        "flow_epochs": config.flow_epochs,
        "flow_crop": config.flow_crop,
        "flow_batch_size": config.flow_batch_size,
        "flow_lr": config.flow_lr,
    }


def _flow_finetune_settings(config: DemoConfig, flow_settings: dict[str, Any]) -> dict[str, Any]:
    """What a synthetic or mixed fine-tuning stage depends on beyond the real one's settings."""
    settings = {
        "negatives_source": config.negatives,
        "flow_pretraining": flow_settings,
        "flow_finetune_lr": config.flow_finetune_lr,
        "flow_sides": [FLOW_MIN_SIDE, _flow_max_side(config)],
    }
    if config.negatives == "mixed":
        settings["synthetic_fraction"] = config.synthetic_fraction
    return settings


@dataclass
class _FlowStage:
    flow: torch.nn.Module
    settings: dict[str, Any]
    grid: Path
    seconds: float


def _write_flow_grid(flow: torch.nn.Module, config: DemoConfig, path: Path) -> Path:
    """A grid of ``FLOW_GRID_SAMPLES`` flow samples of ``flow_crop``² from fixed latents (seed ``config.seed``)."""
    from densehybrid.engine.flow_joint import save_sample_grid

    was_training = flow.training
    flow.eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(config.seed)
        samples = flow.sample(FLOW_GRID_SAMPLES, (config.flow_crop, config.flow_crop), generator=generator)
    flow.train(was_training)
    return save_sample_grid(samples / 255.0, path, nrow=4)


def _flow_pretraining_stage(
    config: DemoConfig, data_seed: int, train_set, out: Path, device, say: _Announcer, tag: str
) -> _FlowStage:
    """Pre-train ``DenseFlow.small()`` by maximum likelihood on random crops of the training scenes, or reuse it.

    The finished flow is ``out/flow_pretrained.pt`` (reused when its settings are unchanged); an interrupted run
    resumes from ``out/train_flow/flow_last.pt`` (which also holds a sample grid per epoch). The report's grid of the
    pre-trained flow's samples is ``out/figures/flow_samples_pretrained.png``.
    """
    from densehybrid.engine.flow_joint import pretrain_flow
    from densehybrid.engine.outputs import remove_stale_temporaries
    from densehybrid.flows import DenseFlow

    t0 = time.perf_counter()
    settings = _flow_stage_settings(config, data_seed)
    path, train_dir = out / "flow_pretrained.pt", out / "train_flow"
    say.banner(
        f"flow pre-training{tag}",
        f"DenseFlow.small(), {config.flow_epochs} epochs of {config.flow_crop}x{config.flow_crop} crops of the "
        "training scenes, bits/dim",
    )
    with torch.random.fork_rng(devices=[]):  # the flow's initialisation, seeded without moving the run's RNG
        torch.manual_seed(config.seed)
        flow = DenseFlow.small()
    if config.resume and _reuse_stage(flow, path, train_dir, settings):
        say.say(f"   reused the finished stage {path} (same settings; --no-resume retrains it)")
    else:
        # pretrain_flow resumes from train_dir/flow_last.pt: only when that partial run had these settings
        stamp, partial = train_dir / "settings.json", train_dir / "flow_last.pt"
        train_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(train_dir)
        same = stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(settings))
        if partial.exists() and not (config.resume and same):
            partial.unlink()
        stamp.write_text(json.dumps(settings))
        result = pretrain_flow(
            flow,
            train_set,
            out_dir=train_dir,
            epochs=config.flow_epochs,
            batch_size=config.flow_batch_size,
            crop_size=config.flow_crop,
            lr=config.flow_lr,
            grid_samples=FLOW_GRID_SAMPLES,
            seed=config.seed,
            device=device,
            resume=config.resume,
            progress=config.progress,
        )
        _check_finite_weights(flow, path)
        atomic_torch_save(
            {"model": flow.state_dict(), "flow_config": flow.config, "settings": settings, "history": result.history},
            path,
        )
        if result.history:
            values = ", ".join(f"{record['bpd']:.3f}" for record in result.history)
            say.say(f"   flow bits/dim by epoch: {values}")
    flow.to(device)
    grid = _write_flow_grid(flow, config, out / "figures" / "flow_samples_pretrained.png")
    return _FlowStage(flow, settings, grid, time.perf_counter() - t0)


def _check_finite_weights(model: torch.nn.Module, path: Path) -> None:
    damaged = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor.float()).all())]
    if damaged:
        raise NonFiniteError(
            f"Expected finite weights at the end of stage {path.stem!r}, but {len(damaged)} tensor(s) hold NaN or "
            f"infinite values (first: {damaged[0]}): training diverged, so the stage is not saved. Lower the "
            "learning rate."
        )


def _joint_flow_objective(config: DemoConfig, flow_stage: _FlowStage, device):
    """The released joint iteration (segmenter step on no-grad flow patches or a mixture, then the flow step) with
    the demo's loss weights; the flow continues from its pre-trained weights at ``flow_finetune_lr``."""
    from densehybrid.engine.flow_joint import FLOW_LR_DECAY, build_flow_optimizer
    from densehybrid.engine.flow_objectives import JointFlowObjective
    from densehybrid.flows import FlowNegatives, MixedNegatives

    flow = copy.deepcopy(flow_stage.flow).to(device).train()  # the pre-trained flow stays as it is for other runs
    synthetic = FlowNegatives(flow, patches_per_image=1, min_side=FLOW_MIN_SIDE, max_side=_flow_max_side(config))
    negatives: Any = synthetic
    real = None
    side = config.negative_size
    if config.negatives == "mixed":
        negatives = MixedNegatives(synthetic, config.synthetic_fraction)  # the real pasting's defaults (NegativePaster)
        real = NegativeStream(RoadSceneNegatives(seed=config.seed, size=(side, side), length=1000), crop_size=side)
    optimizer = build_flow_optimizer(flow, lr=config.flow_finetune_lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=FLOW_LR_DECAY["traffic"])
    return JointFlowObjective(
        DenseHybridLoss(beta=config.beta, lambda_=config.lambda_),
        flow,
        optimizer,
        scheduler,
        negatives,
        real_negatives=real,
    )


def _save_finetuned_flow(flow: torch.nn.Module, path: Path, settings: dict[str, Any]) -> None:
    _check_finite_weights(flow, path)
    atomic_torch_save({"model": flow.state_dict(), "flow_config": flow.config, "settings": settings}, path)


def _load_finetuned_flow(flow_stage: _FlowStage, path: Path, settings: dict[str, Any]) -> torch.nn.Module | None:
    """The jointly fine-tuned flow of a reused stage, or None when it is missing or of other settings."""
    if not path.exists():
        return None
    try:
        stored = read_checkpoint_file(path)
    except CheckpointError:
        return None
    if stored.get("settings") != settings:
        return None
    flow = copy.deepcopy(flow_stage.flow)
    flow.load_state_dict(stored["model"])
    return flow


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


def _train_and_evaluate(
    config: DemoConfig, data_seed: int, datasets: Mapping[str, Any], out: Path, device, say: _Announcer
) -> _SeedRun:
    """Stages 2-5 for one training seed (``config.seed``), writing checkpoints to ``out``."""
    timings: dict[str, float] = {}
    train_set, val_set = datasets["train"], datasets["val"]
    eval_set = datasets[config.eval_split]
    num_classes = len(ROADSCENE_CLASSES)
    config = dataclasses.replace(config, out_dir=out, data_dir=config.data_dir)
    closed_units, finetune_units, scoring_units = _work_units(config)
    tag = f" (seed {config.seed})" if config.seeds > 1 else ""
    out.mkdir(parents=True, exist_ok=True)

    # stage 2: closed-set training
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    closed_model = create_model(config.model, num_classes=num_classes)
    closed_path = out / "closed_set.pt"
    closed_settings = {**_stage_settings(config, "closed"), "data_seed": data_seed}
    say.banner(
        f"closed-set training{tag}",
        f"{config.closed_epochs} epochs over {len(train_set)} scenes, {config.model}",
    )
    if config.resume and _reuse_stage(closed_model, closed_path, out / "train_closed_set", closed_settings):
        say.say(f"   reused the finished stage {closed_path} (same settings; --no-resume retrains it)")
        say.advance(closed_units)
    else:
        if say.seconds_per_unit is None:
            say.rate(_probe_step_seconds(closed_model, train_set, config.batch_size, device) / config.batch_size)
            say.banner("closed-set training started", "time estimate from one timed step")
        result = fit(
            closed_model,
            train_set,
            ClosedSetObjective(),
            _train_config(config, config.closed_epochs, config.lr, 0),
            out_dir=out / "train_closed_set",
            resume=config.resume,
            metadata={"demo_settings": closed_settings},
        )
        _mark_finished(closed_path, closed_model, closed_settings, result.history)
        say.advance(closed_units, time.perf_counter() - t0)
    timings["closed-set training"] = time.perf_counter() - t0

    # stage 3: DenseHybrid fine-tuning from the closed-set weights (after the flow's pre-training for flow negatives)
    flow_stage, flow_grids = None, {}
    if config.negatives != "real":
        flow_stage = _flow_pretraining_stage(config, data_seed, train_set, out, device, say, tag)
        timings["flow pre-training"] = flow_stage.seconds
        flow_grids["pretrained"] = flow_stage.grid
    t0 = time.perf_counter()
    hybrid_model = create_model(config.model, num_classes=num_classes)
    hybrid_model.load_state_dict(closed_model.state_dict())
    stem = _finetune_name(config.negatives)
    hybrid_path = out / f"{stem}.pt"
    hybrid_settings = {**_stage_settings(config, "densehybrid"), "data_seed": data_seed, "negatives": NEGATIVES_VERSION}
    if flow_stage is not None:
        hybrid_settings.update(_flow_finetune_settings(config, flow_stage.settings))
    source = {"real": "", "synthetic": " with flow negatives", "mixed": " with mixed negatives"}[config.negatives]
    say.banner(
        f"DenseHybrid fine-tuning{source}{tag}",
        f"{config.finetune_epochs} epochs, one pasted negative per scene, loss weights (1, {config.beta}, "
        f"{config.lambda_})"
        + (f", synthetic with probability {config.synthetic_fraction:g}" if config.negatives == "mixed" else ""),
    )
    reused = config.resume and _reuse_stage(hybrid_model, hybrid_path, out / f"train_{stem}", hybrid_settings)
    if reused and flow_stage is not None and config.finetune_epochs:
        tuned_flow = _load_finetuned_flow(flow_stage, out / f"flow_{config.negatives}.pt", hybrid_settings)
        if tuned_flow is not None:
            flow_grids["finetuned"] = _write_flow_grid(
                tuned_flow, config, out / "figures" / f"flow_samples_{config.negatives}.png"
            )
    if reused:
        say.say(f"   reused the finished stage {hybrid_path} (same settings; --no-resume retrains it)")
        say.advance(finetune_units)
    elif config.finetune_epochs:
        if say.seconds_per_unit is None:  # the closed-set stage was reused: time one step for the estimate
            say.rate(_probe_step_seconds(hybrid_model, train_set, config.batch_size, device) / config.batch_size)
            say.banner("DenseHybrid fine-tuning started", "time estimate from one timed step")
        side = config.negative_size
        if flow_stage is None:
            negatives = RoadSceneNegatives(seed=config.seed, size=(side, side), length=1000)
            objective = DenseHybridObjective(
                DenseHybridLoss(beta=config.beta, lambda_=config.lambda_),
                NegativeStream(negatives, crop_size=side),
                NegativePaster(),
            )
        else:
            objective = _joint_flow_objective(config, flow_stage, device)
        result = fit(
            hybrid_model,
            train_set,
            objective,
            _train_config(config, config.finetune_epochs, config.finetune_lr, 1),
            out_dir=out / f"train_{stem}",
            resume=config.resume,
            metadata={"demo_settings": hybrid_settings},
            on_epoch_end=None if flow_stage is None else objective.on_epoch_end,
        )
        _mark_finished(hybrid_path, hybrid_model, hybrid_settings, result.history)
        if flow_stage is not None:
            _save_finetuned_flow(objective.flow, out / f"flow_{config.negatives}.pt", hybrid_settings)
            flow_grids["finetuned"] = _write_flow_grid(
                objective.flow, config, out / "figures" / f"flow_samples_{config.negatives}.png"
            )
        say.advance(finetune_units, time.perf_counter() - t0 if say.seconds_per_unit is None else None)
    timings["DenseHybrid fine-tuning"] = time.perf_counter() - t0

    # stage 3b (--dicnet): DiCNet, a student distilled from the frozen closed-set model
    dicnet_model = None
    if config.dicnet:
        t0 = time.perf_counter()
        torch.manual_seed(config.seed + 2)  # the student's initialisation, whether earlier stages ran or were reused
        dicnet_model = _dicnet_model(closed_model)
        dicnet_path = out / "dicnet.pt"
        dicnet_settings = {**_stage_settings(config, "dicnet"), "data_seed": data_seed}
        say.banner(
            f"DiCNet distillation{tag}",
            f"{config.dicnet_epochs} epochs, {DICNET_STUDENT} student imitating the frozen closed-set model's "
            "pre-logit features",
        )
        train_dir = out / "train_dicnet"
        if config.resume and _reuse_stage(dicnet_model, dicnet_path, train_dir, dicnet_settings):
            say.say(f"   reused the finished stage {dicnet_path} (same settings; --no-resume retrains it)")
            say.advance(_dicnet_units(config))
        else:
            if not config.resume and (train_dir / "last.pt").exists():
                (train_dir / "last.pt").unlink()
            history = _distil(dicnet_model, train_set, config, dicnet_settings, train_dir, device)
            _mark_finished(dicnet_path, dicnet_model, dicnet_settings, history)
            say.advance(_dicnet_units(config))
        timings["DiCNet distillation"] = time.perf_counter() - t0

    # stage 4: SML statistics and threshold calibration
    t0 = time.perf_counter()
    say.banner(f"calibration{tag}", "SML statistics on train, open-set threshold on val")
    common = dict(device=device, batch_size=config.batch_size, progress=config.progress)
    sml_stats = {
        name: _fit_sml(model, train_set, common)
        for name, model in (("closed-set", closed_model), ("densehybrid", hybrid_model))
    }
    threshold = calibrate_threshold(
        (
            (get_score("densehybrid")(out_.logits, out_.ood_logits), anomaly_target(batch["target"], num_classes))
            for batch, out_ in model_outputs(hybrid_model, val_set, desc="calibrate", **common)
        ),
        target_tpr=config.target_tpr,
    )
    timings["calibration"] = time.perf_counter() - t0

    # stage 5: evaluation
    t0 = time.perf_counter()
    say.banner(
        f"evaluation on {config.eval_split}{tag}",
        f"every score, {'all three' if config.dicnet else 'both'} models, per anomaly family",
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
    if dicnet_model is not None:
        dicnet_eval = evaluate(
            dicnet_model, eval_set, ["dicnet"], num_classes=num_classes, groups=_family_groups, **common
        )
        rows += _rows(dicnet_eval, "dicnet")
    timings["evaluation"] = time.perf_counter() - t0
    say.advance(scoring_units)
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
    return _SeedRun(rows, segmentation, threshold, timings, hybrid_eval, hybrid_model, flow_grids)


def _dicnet_model(teacher: torch.nn.Module) -> DiCNet:
    """DiCNet on the demo's closed-set model (a frozen copy) with the light ImageNet-initialised student."""
    import copy

    from densehybrid.models.dicnet import TimmStudent, teacher_feature_channels
    from densehybrid.models.efficientnet_lite import efficientnet_lite0_state_dict

    student = TimmStudent(DICNET_STUDENT, teacher_feature_channels(teacher))
    encoder = student.encoder.state_dict()
    student.encoder.load_state_dict(
        {k: v for k, v in efficientnet_lite0_state_dict().items() if k in encoder}, strict=False
    )
    return DiCNet(copy.deepcopy(teacher), student)


def _distil(model: DiCNet, dataset, config: DemoConfig, settings: dict[str, Any], train_dir: Path, device) -> list:
    """Distil ``model.student`` for ``config.dicnet_epochs`` epochs (released optimiser, random horizontal flips).

    Resumes from ``train_dir/last.pt`` (written atomically after every epoch) when it was made with ``settings``.
    Returns the mean loss of every epoch.
    """
    model.to(device)
    optimizer = distillation_optimizer(model)
    history: list[dict[str, float]] = []
    last = train_dir / "last.pt"
    start = 0
    state = read_checkpoint_file(last) if config.resume and last.exists() else None
    if state is not None and state.get("metadata", {}).get("demo_settings") == settings:
        model.student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    generator = torch.Generator().manual_seed(config.seed + 2)
    for epoch in range(start, config.dicnet_epochs):
        generator.manual_seed(config.seed + 2 + 1000 * epoch)  # the same batches after a resume
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
        losses = []
        for batch in _progress(loader, config.progress, f"distil {epoch + 1}/{config.dicnet_epochs}"):
            images = batch["image"].to(device)
            flip = torch.rand(images.shape[0], generator=generator) < 0.5
            images[flip.to(device)] = images[flip.to(device)].flip(-1)
            losses.append(distillation_step(model, images, optimizer))
        loss = float(np.mean(losses))
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"Expected a finite distillation loss in epoch {epoch + 1}, but got {loss}: the student diverged."
            )
        history.append({"epoch": epoch + 1, "loss": loss})
        train_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {
                "student": model.student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "metadata": {"demo_settings": settings},
            },
            last,
        )
    return history


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _probe_step_seconds(model: torch.nn.Module, dataset, batch_size: int, device) -> float:
    """Seconds of one training step of a copy of ``model`` (the model itself is left untouched)."""
    import copy

    probe = copy.deepcopy(model).to(device).train()
    images = torch.stack([dataset[i % len(dataset)]["image"] for i in range(batch_size)]).to(device)
    t0 = time.perf_counter()
    out = probe(images)
    (out.logits.float().mean() + out.ood_logits.float().mean()).backward()
    return time.perf_counter() - t0


def run_demo(config: DemoConfig, command: str = "densehybrid demo") -> DemoResult:
    """Run every stage of the demo and write the report to ``config.out_dir``.

    The first training seed keeps its checkpoints in ``out_dir``; every further seed ``s`` in
    ``out_dir/seeds/seed-s``. The report (figures, examples, threshold, segmentation) shows the first seed; the
    anomaly table shows the mean (and, with several seeds, the standard deviation) over seeds.
    """
    from densehybrid.report import ReportData, ScoreSample, format_table, write_report

    timings: dict[str, float] = {}
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for folder in (
        out,
        out / "train_closed_set",
        out / "train_densehybrid",
        out / "train_dicnet",
        out / "train_flow",
        out / "figures",
    ):
        remove_stale_temporaries(folder)  # left by saves killed mid-write
    remove_stale_temporaries(config.data_dir, "*.tmp")  # the benchmark cache writes NAME.tmp
    seed_everything(config.seed)
    device = select_device(config.device)
    closed_units, finetune_units, scoring_units = _work_units(config)
    sources = config.negative_sources
    # a joint flow step costs about 2.7 real-negative steps (docs/flows.md)
    tuned = sum((2.7 if s != "real" else 1.0) * finetune_units + scoring_units for s in sources)
    say = _Announcer(config.progress, config.seeds * (closed_units + tuned + _dicnet_units(config)))
    say.say(
        f"densehybrid demo: {len(config.training_seeds)} training run(s) of {config.closed_epochs} closed-set + "
        f"{config.finetune_epochs} fine-tuning epochs, then evaluation on {config.eval_split}; report in {out}"
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
    datasets = {s: RoadSceneDataset(benchmark, s) for s in ("train", "val", "test")}
    timings["benchmark"] = time.perf_counter() - t0

    runs: dict[int, _SeedRun] = {}
    # with compare_negatives: the fine-tunings with the other sources, from the same closed-set model (reused)
    other_runs: dict[str, dict[int, _SeedRun]] = {source: {} for source in sources[1:]}
    for index, seed in enumerate(config.training_seeds):
        seed_out = out if index == 0 else out / "seeds" / f"seed-{seed}"
        runs[seed] = _train_and_evaluate(
            dataclasses.replace(config, seed=seed), config.seed, datasets, seed_out, device, say
        )
        for stage, seconds in runs[seed].timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        for source in sources[1:]:
            say.say(f"   compare negatives: fine-tuning with {source} negatives from the same closed-set model")
            other = dataclasses.replace(config, seed=seed, negatives=source, compare_negatives=False)
            other_runs[source][seed] = _train_and_evaluate(other, config.seed, datasets, seed_out, device, say)
            for stage, seconds in other_runs[source][seed].timings.items():
                key = f"{source} negatives: {stage}"
                timings[key] = timings.get(key, 0.0) + seconds

    # stage 6: report
    t0 = time.perf_counter()
    say.banner("report", f"{out / 'report.html'}")
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
        device,
    )
    verdict = _verdict(rows)
    swallowed = _swallowed_classes(segmentation["per_class_open_iou"], segmentation["per_class_iou"])
    remarks = []
    if swallowed:
        remarks.append(
            "The open-set prediction turns much of these known classes into 'unknown' (their scores pass the "
            "threshold calibrated at TPR " + f"{config.target_tpr:.2f}" + "): " + "; ".join(swallowed) + "."
        )
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
        *(
            [
                f"'dicnet' rows (--dicnet): a DiCNet student ({DICNET_STUDENT} to stride 8, ImageNet-initialised, "
                f"pyramid pooling) distilled for {config.dicnet_epochs} epoch(s) from the frozen closed-set model's "
                "pre-logit features (Adam 1e-4, weight decay 1e-5, horizontal flips: the released optimiser; the "
                "released 150 epochs do not fit a CPU); score: mean squared teacher-student feature difference. "
                "It sees no negatives."
            ]
            if config.dicnet
            else []
        ),
        *remarks,
        *verdict,
    ]
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
        captions = {"pretrained": "after pre-training (maximum likelihood on crops of the training scenes)"}
        images = []
        for kind, path in grids.items():
            caption = captions.get(kind, f"after joint fine-tuning with {kind.removeprefix('finetuned_')} negatives")
            images.append((f"{FLOW_GRID_SAMPLES} samples of DenseFlow.small(), {caption}", path))
        sections.append(
            ReportSection(
                "Flow samples",
                paragraphs=[
                    f"Samples of {config.flow_crop}x{config.flow_crop} px from the same fixed latents (seed "
                    f"{config.seed}); pasted negatives have sides {FLOW_MIN_SIDE}-{_flow_max_side(config)} px."
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

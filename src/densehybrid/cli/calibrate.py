"""``densehybrid calibrate``: store the open-set threshold and heatmap range in a new checkpoint."""

from __future__ import annotations

import argparse

from densehybrid.cli._common import (
    add_label_check_argument,
    add_loop_arguments,
    add_model_arguments,
    add_overwrite_argument,
    check_sml_arguments,
    command_ranks,
    dataset_options,
    input_scale,
    load_model,
    load_score_options,
    naming_checkpoint,
    positive_float,
    positive_int,
)

HELP = "calibrate the open-set threshold on a labelled split and write a calibrated checkpoint"
DESCRIPTION = (
    "Run a checkpoint over a labelled split, choose the open-set threshold (default: the first threshold whose "
    "true-positive rate on the anomaly pixels exceeds --tpr, as the released StreetHazards code; --best-f1: the best "
    "pixel F1) and the heatmap's score range (1st-99th percentiles of the evaluated pixels, widened to include the "
    "threshold), and write them into a NEW checkpoint (atomically; the original is never written; an existing --out "
    "only with --overwrite), so that "
    "`densehybrid predict` and `densehybrid export` need no threshold flags. --benchmark roadscene calibrates on the "
    "demo's generated benchmark (--root demo_out/data)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.data.datasets import list_benchmarks

    parser.add_argument(
        "--benchmark",
        required=True,
        help=f"labelled data: a registered benchmark ({', '.join(list_benchmarks())}; roadscene is the demo's)",
    )
    parser.add_argument("--root", required=True, help="the benchmark's dataset root")
    parser.add_argument(
        "--split", default=None, help="labelled split to calibrate on (default: val/validation where there is one)"
    )
    add_model_arguments(parser)
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--tpr", type=float, default=0.95, help="target true-positive rate of the threshold")
    rule.add_argument("--best-f1", action="store_true", help="choose the threshold of the best pixel F1 instead")
    parser.add_argument("--score", default="densehybrid", help="anomaly score the threshold applies to")
    parser.add_argument("--sml-statistics", default=None, help="file with SMLStatistics.to_dict() for --score sml")
    parser.add_argument(
        "--calibration-scale",
        type=positive_float,
        default=1.0,
        help="resize factor of the score/label maps before calibration (released StreetHazards code: 0.5)",
    )
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="loader option, repeatable")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N frames (a quick look)")
    parser.add_argument("--input-scale", type=input_scale, default=1.0, help="resize the model input")
    parser.add_argument("--out", default=None, help="calibrated checkpoint to write (default: NAME-calibrated.pt)")
    add_overwrite_argument(parser, "an existing --out checkpoint")
    add_label_check_argument(parser)
    add_loop_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from densehybrid.calibrate import calibrate_checkpoint, calibrated_path
    from densehybrid.engine.distributed import is_main
    from densehybrid.engine.outputs import check_output_file
    from densehybrid.scores import get_score

    if not args.best_f1 and not 0.0 < args.tpr < 1.0:
        raise ValueError(f"Expected `--tpr` in (0, 1), but got {args.tpr}.")
    if args.calibration_scale > 1.0:
        raise ValueError(f"Expected `--calibration-scale` in (0, 1], but got {args.calibration_scale}.")
    get_score(args.score)
    check_sml_arguments([args.score], args.sml_statistics)
    out = check_output_file(
        args.out or calibrated_path(args.checkpoint),
        inputs=[args.checkpoint, args.root, args.sml_statistics],
        overwrite=args.overwrite,
    )
    score_options = {}
    if args.sml_statistics is not None:
        _, info = load_model(args.checkpoint, args.model, args.num_classes)
        score_options = load_score_options([args.score], args.sml_statistics, info["num_classes"])["sml"]

    def announce(result: dict) -> None:
        rule = f"TPR > {result['target_tpr']}" if result["method"] == "tpr" else "best F1"
        low, high = result["display_range"]
        print(
            f"calibrated {result['model']} (K={result['num_classes']}) on {result['benchmark']} {result['split']} "
            f"({result['num_images']} images, {result['anomaly_pixels']} anomaly pixels): score {result['score']}, "
            f"threshold {result['threshold']:.6g} at {rule}, heatmap range [{low:.6g}, {high:.6g}]; inference: "
            f"{result['window']}",
            flush=True,
        )

    with command_ranks(args.device) as device, naming_checkpoint(args.checkpoint):
        result = calibrate_checkpoint(
            args.checkpoint,
            args.benchmark,
            args.root,
            out,
            split=args.split,
            model=args.model,
            num_classes=args.num_classes,
            score=args.score,
            score_options=score_options,
            method="f1" if args.best_f1 else "tpr",
            target_tpr=args.tpr,
            calibration_scale=args.calibration_scale,
            dataset_options=dataset_options(args),
            limit=args.limit,
            input_scale=args.input_scale,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
            progress=not args.no_progress,
            window=args.window,
            overwrite=args.overwrite,
            report=announce,
        )
        if not is_main():  # rank 0 announced the calibration and wrote the checkpoint
            return 0
    print(f"calibrated checkpoint: {result['out']} (the original {result['checkpoint']} is unchanged)")
    return 0

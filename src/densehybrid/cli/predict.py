"""``densehybrid predict``: anomaly heatmaps and open-set segmentations of one's own images."""

from __future__ import annotations

import argparse
import os
import sys

from densehybrid.cli._common import (
    MAX_INPUT_SCALE,
    _usable_cores,
    add_model_arguments,
    add_overwrite_argument,
    add_window_argument,
    input_scale,
    load_score_options,
    naming_checkpoint,
    non_negative_int,
    positive_int,
    worker_count,
)

HELP = "predict your own images: anomaly heatmap, open-set segmentation and overlay per image"
DESCRIPTION = (
    "Run a checkpoint, or a graph written by `densehybrid export` (--checkpoint model.onnx runs ONNX Runtime, a "
    "TorchScript model.pt runs TorchScript, with the score, threshold, classes and palette the file records), on "
    "image files, folders (recursive) or glob patterns. For each image it writes, under OUT and "
    "the input's relative path, NAME_heatmap.png (the anomaly score on one colour scale for the whole run: the "
    "checkpoint's calibrated range, else --display-range, else the 1st-99th percentiles of the first image), with a "
    "colour bar below it showing that scale and the threshold, NAME_segmentation.png (known classes in colour, "
    "unknown pixels in cyan) with a legend of the class names below it, and NAME_overlay.png; with --save-raw "
    "also NAME_scores.npy (float32 scores) and NAME_labels.png (ids 0..K-1, unknown = K). One predictions.jsonl line "
    "per image and summary.json; an image with more than half of its pixels marked unknown is reported as possibly "
    "outside the model's training domain. Unreadable inputs are reported in one line each, skipped and counted; the exit "
    "status is then 1 (--strict stops at the first). The threshold is the checkpoint's (densehybrid calibrate) "
    "unless --threshold is given. OUT may not hold the results of an earlier run (predictions.jsonl, summary.json, an "
    "image's outputs) unless --overwrite, which replaces them and removes the earlier run's outputs this run does "
    "not write again, or --resume, which continues an interrupted run. Outputs are checked before the checkpoint is "
    "read and written atomically; each image's line is added to predictions.jsonl as soon as its files are written; "
    "one run writes into OUT at a time. Under `torchrun --nproc-per-node N -m densehybrid predict ...` the inputs are "
    "split into N contiguous blocks, each process writes its block's outputs and process 0 merges predictions.jsonl "
    "and summary.json in input order (docs/scale.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--out", required=True, help="output folder")
    add_overwrite_argument(parser, "the results of an earlier run in --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out: images its predictions.jsonl (or the records it left) lists with "
        "all their outputs are skipped, the others predicted (also with another number of torchrun processes)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--score",
        default=None,
        help="anomaly score (default: the calibrated one, else the model's own: densehybrid, or dicnet for DiCNet)",
    )
    parser.add_argument("--sml-statistics", default=None, help="file with SMLStatistics.to_dict() for --score sml")
    parser.add_argument(
        "--threshold", type=float, default=None, help="open-set threshold, overriding the checkpoint's calibration"
    )
    parser.add_argument(
        "--display-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="score range of the heatmap colour scale (default: the checkpoint's calibration)",
    )
    parser.add_argument("--save-raw", action="store_true", help="also write the float32 score map and the label map")
    parser.add_argument(
        "--no-legend",
        action="store_true",
        help="no colour bar under the heatmap and no legend of class names under the segmentation (both images then "
        "have the input's size)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=4_194_304,
        help="images with more pixels run at full resolution in overlapping tiles of at most this many pixels",
    )
    parser.add_argument("--tile-overlap", type=non_negative_int, default=64, help="pixels shared by neighbouring tiles")
    parser.add_argument(
        "--input-scale",
        type=input_scale,
        default=1.0,
        help=f"resize the model input by this factor in (0, {MAX_INPUT_SCALE:g}] (at least 1 px per image side, within "
        "half the available memory); outputs keep the image size",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable input")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
    parser.add_argument(
        "--num-workers",
        type=worker_count,
        default=_default_workers(),
        help="processes decoding images (at most the CPU cores available; 0: a reader thread)",
    )
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_window_argument(parser)


def run(args: argparse.Namespace) -> int:
    from densehybrid.engine import distributed
    from densehybrid.engine.resources import worker_bound
    from densehybrid.engine.runtime import select_device
    from densehybrid.predict import check_prediction_out
    from densehybrid.scores import get_score

    if args.score is not None:
        get_score(args.score)  # an unknown name fails before the checkpoint is read
    if args.overwrite and args.resume:
        raise ValueError("Expected at most one of `--overwrite` and `--resume`, but got both.")
    read_files = [args.checkpoint, args.sml_statistics]
    check_prediction_out(
        args.inputs,
        args.out,
        save_raw=args.save_raw,
        overwrite=args.overwrite,
        read_files=read_files,
        resume=args.resume,
    )
    device = select_device(args.device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.launched_by_torchrun() else 1
    num_workers, note = worker_bound(args.num_workers, _default_workers(), "--num-workers", local)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    # a single process passes the name on (an exported ONNX file runs on the CPU for "auto"); a rank its own GPU
    with distributed.process_group(device) as local:
        status = _predict(args, local if distributed.is_distributed() else args.device, num_workers, read_files)
        distributed.barrier()  # every rank is done with the group before any leaves it
        return status


def _default_workers() -> int:
    return min(2, _usable_cores())


def _predict(args: argparse.Namespace, device: object, num_workers: int, read_files: list) -> int:
    from densehybrid.engine import distributed
    from densehybrid.predict import Predictor, predict_files

    options = {}
    if args.display_range is not None:
        options["display_range"] = tuple(args.display_range)
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        device=device,
        model=args.model,
        num_classes=args.num_classes,
        score=args.score,
        threshold=args.threshold,
        max_pixels=args.max_pixels,
        tile_overlap=args.tile_overlap,
        input_scale=args.input_scale,
        amp=args.amp,
        window=args.window,
        **options,
    )
    predictor.score_options = load_score_options([predictor.score], args.sml_statistics, predictor.num_classes).get(
        predictor.score, {}
    )
    with naming_checkpoint(args.checkpoint):
        summary = predict_files(
            predictor,
            args.inputs,
            args.out,
            save_raw=args.save_raw,
            batch_size=args.batch_size,
            num_workers=num_workers,
            strict=args.strict,
            progress=not args.no_progress,
            report=lambda line: print(line, file=sys.stderr),
            overwrite=args.overwrite,
            read_files=read_files,
            legend=not args.no_legend,
            resume=args.resume,
        )
    if distributed.is_main():
        print("\n".join(summary.lines()))
    return 1 if summary.failures else 0

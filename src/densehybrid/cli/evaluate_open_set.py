"""``densehybrid evaluate-open-set``: open-mIoU with a threshold calibrated on held-out data, two folds."""

from __future__ import annotations

import argparse
from typing import Any

from densehybrid.cli._common import (
    add_data_arguments,
    add_loop_arguments,
    add_model_arguments,
    add_overwrite_argument,
    check_sml_arguments,
    command_ranks,
    dataset_options,
    format_table,
    load_model,
    load_score_options,
    naming_checkpoint,
    percent,
    positive_float,
    result_document,
    write_json,
)

HELP = "open-set segmentation: open-mIoU with a calibrated threshold (StreetHazards two towns, COCO20/80)"
DESCRIPTION = (
    "Open-set evaluation: pixels whose anomaly score exceeds a threshold become the unknown class, and open-mIoU "
    "counts undetected anomalies and false detections against the known classes. streethazards runs the released "
    "DenseHybrid protocol: the threshold is calibrated on test town t5 (score and label maps downsampled by "
    "--calibration-scale, default 0.5; first threshold with TPR > --tpr) and applied to town t6 at full resolution, "
    "then the other way round; the result is the image-weighted average of the two folds, with the closed-set mIoU "
    "of both towns. coco20 runs, by default, the released TPAMI protocol (--coco-protocol released): the threshold "
    "is calibrated on the same val2017 split it evaluates (pooled pixels, stuff ignored, first threshold with TPR >= "
    "--tpr, maps at full size); --coco-protocol halves runs two folds over the halves of val2017 instead (ours). "
    "folder (your own tree) runs two folds over the halves of its val split (ours): calibrated on one half (first "
    "threshold with TPR > --tpr), evaluated on the other. "
    "roadscene (the demo's generated benchmark, --root OUT/data) calibrates on val and evaluates test, as the demo. "
    "NaN IoUs count as 0 in the open-mIoU, as the TPAMI-era scripts (--nan-iou skip: the ECCV nanmean). Prints a "
    "table, writes JSON."
)

_BENCHMARKS = ("streethazards", "coco20", "folder", "roadscene")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.evaluation.open_set import CALIBRATION_RULES, COCO_PROTOCOLS
    from densehybrid.metrics.segmentation import NAN_IOU_RULES
    from densehybrid.openset import CALIBRATION_METHODS

    parser.add_argument("--benchmark", required=True, choices=_BENCHMARKS, help="open-set benchmark")
    add_data_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--score", default="densehybrid", help="anomaly score that decides 'unknown'")
    parser.add_argument(
        "--calibration",
        choices=CALIBRATION_METHODS,
        default="tpr",
        help="threshold rule on the calibration part: tpr (first threshold with TPR > --tpr, released) or f1 (best F1)",
    )
    parser.add_argument("--tpr", type=float, default=0.95, help="target true-positive rate of the calibration")
    parser.add_argument(
        "--calibration-rule",
        choices=CALIBRATION_RULES,
        default=None,
        help="first threshold with TPR > --tpr (above) or >= --tpr (at_least); default: as released, above for "
        "streethazards (and folder), at_least for coco20",
    )
    parser.add_argument(
        "--coco-protocol",
        choices=COCO_PROTOCOLS,
        default="released",
        help="coco20: calibrate on the evaluated split as released (TPAMI table), or two folds over its halves",
    )
    parser.add_argument(
        "--nan-iou",
        choices=NAN_IOU_RULES,
        default="zero",
        help="open-mIoU: count a known class absent from targets and predictions as 0 (TPAMI-era scripts, default) "
        "or skip it (ECCV nanmean)",
    )
    parser.add_argument(
        "--calibration-scale",
        type=positive_float,
        default=None,
        help="resize factor of the calibration score/label maps (default: 0.5 streethazards, 1.0 otherwise)",
    )
    parser.add_argument("--sml-statistics", default=None, help="file with SMLStatistics.to_dict() for --score sml")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file to write (default: evaluate-open-set-BENCHMARK.json in the current folder)",
    )
    add_overwrite_argument(parser, "the JSON file")
    add_loop_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from densehybrid.data.datasets import get_benchmark
    from densehybrid.engine.distributed import is_main
    from densehybrid.engine.outputs import check_output_file
    from densehybrid.evaluation import coco_open_set, folder_open_set, roadscene_open_set, streethazards_open_set
    from densehybrid.scores import get_score

    if not 0.0 < args.tpr < 1.0:
        raise ValueError(f"Expected `--tpr` in (0, 1), but got {args.tpr}.")
    if args.calibration_scale is not None and args.calibration_scale > 1.0:
        raise ValueError(f"Expected `--calibration-scale` in (0, 1], but got {args.calibration_scale}.")
    spec = get_benchmark(args.benchmark)
    get_score(args.score)  # an unknown name fails here, before the checkpoint is read
    check_sml_arguments([args.score], args.sml_statistics)
    options = dataset_options(args)
    out = check_output_file(
        args.out or f"evaluate-open-set-{spec.name}.json",
        inputs=[args.checkpoint, args.sml_statistics, args.root],
        overwrite=args.overwrite,
    )
    model, info = load_model(args.checkpoint, args.model, args.num_classes, spec.num_known_classes)
    score_options = load_score_options([args.score], args.sml_statistics, info["num_classes"])
    protocols = {
        "streethazards": streethazards_open_set,
        "coco20": coco_open_set,
        "folder": folder_open_set,
        "roadscene": roadscene_open_set,
    }
    protocol = protocols[spec.name]
    kwargs: dict[str, Any] = {"nan_iou": args.nan_iou}
    if args.calibration_scale is not None:
        kwargs["calibration_scale"] = args.calibration_scale
    if args.calibration_rule is not None:
        kwargs["calibration_rule"] = args.calibration_rule
    if spec.name == "coco20":
        kwargs["coco_protocol"] = args.coco_protocol
    with command_ranks(args.device) as device, naming_checkpoint(args.checkpoint):
        result = protocol(
            args.root,
            model,
            args.score,
            dataset_options=options,
            limit=args.limit,
            input_scale=args.input_scale,
            target_tpr=args.tpr,
            method=args.calibration,
            score_options=score_options,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
            progress=not args.no_progress,
            window=args.window,
            **kwargs,
        )
        if not is_main():  # every rank holds the merged result; rank 0 reports and writes it
            return 0
    document = result_document("evaluate-open-set", info, result, args, options)
    print(format_results(document), flush=True)  # printed first: a failed write must not lose the results
    path = write_json(out, document)
    print(f"JSON: {path}")
    return 0


def format_results(result: dict[str, Any]) -> str:
    """The stdout report of :func:`run`: one row per fold, then the weighted open-mIoU and pooled closed mIoU."""
    if result["calibration_method"] == "tpr":
        sign = ">=" if result.get("calibration_rule") == "at_least" else ">"
        rule = f"TPR {sign} {result['target_tpr']}"
    else:
        rule = "best F1"
    lines = [
        f"{result['benchmark']} open-set: score {result['score']}, threshold at {rule} on the calibration part "
        f"(maps x{result['calibration_scale']}), model {result['model']} (K={result['num_classes']})"
    ]
    if result.get("input_scale", 1.0) != 1.0:
        lines.append(f"model input resized by {result['input_scale']}: not comparable to full-resolution numbers")
    if result.get("window"):
        lines.append(f"inference: {result['window']}")
    header = ["calibrate -> evaluate", "threshold", "images", "open-mIoU", "anomaly IoU", "closed mIoU"]
    rows = [
        [
            f"{fold['calibration']} -> {fold['evaluation']}",
            f"{fold['threshold']:.4g}",
            str(fold["num_images"]),
            percent(fold["open_miou"]),
            percent(fold["anomaly_iou"]),
            percent(fold["closed_miou"]),
        ]
        for fold in result["folds"]
    ]
    rows.append(
        [
            "both (weighted; closed pooled)",
            "",
            str(result["num_images"]),
            percent(result["open_miou"]),
            percent(result["anomaly_iou"]),
            percent(result["closed_miou"]),
        ]
    )
    lines += ["", format_table(header, rows)]
    return "\n".join(lines)

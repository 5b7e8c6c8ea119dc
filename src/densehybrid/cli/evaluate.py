"""``densehybrid evaluate``: a checkpoint on a benchmark under the benchmark's own protocol; a table and a JSON file."""

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
    parse_metric_options,
    percent,
    result_document,
    write_json,
)

HELP = "evaluate a checkpoint on a benchmark with its official protocol (AP, FPR95, AUROC, sIoU/PPV/F1, mIoU)"
DESCRIPTION = (
    "Run a checkpoint over a benchmark at full resolution and measure anomaly detection with the benchmark's own "
    "protocol: pixels pooled over the split (Fishyscapes, RoadAnomaly, COCO20/80), per-image means (StreetHazards), "
    "or the SMIYC toolkit's binned pooled curve plus component metrics (SMIYC tracks, LostAndFound). Semantic "
    "benchmarks also get the closed-set mIoU; Cityscapes gets only that. Prints a table (percentages) to stdout, "
    "progress bars to stderr, and writes every number to a JSON file. Benchmarks: "
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.data.datasets import BENCHMARKS, list_benchmarks
    from densehybrid.metrics import COMPONENT_TRACKS, PROTOCOLS

    parser.description = (
        DESCRIPTION
        + ", ".join(f"{name} ({BENCHMARKS[name].protocol})" for name in list_benchmarks() if BENCHMARKS[name].protocol)
        + "."
    )
    evaluable = [name for name in list_benchmarks() if BENCHMARKS[name].protocol is not None]
    parser.add_argument("--benchmark", required=True, help=f"one of: {', '.join(evaluable)}")
    add_data_arguments(parser)
    parser.add_argument("--split", default=None, help="split to evaluate (default: the benchmark's evaluation split)")
    add_model_arguments(parser)
    parser.add_argument(
        "--score",
        action="append",
        default=None,
        help="anomaly score, repeatable (default: the model's own, densehybrid or dicnet; none for cityscapes; see "
        "`densehybrid scores`)",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default=None, help="metric protocol (default: the benchmark's own)"
    )
    parser.add_argument(
        "--metric-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of the protocol's metric, repeatable (e.g. variant=streethazards for per_image, bits=20 for "
        "pooled, float16=false for smiyc)",
    )
    parser.add_argument(
        "--components",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SMIYC component metrics (sIoU, PPV, mean F1) at the best-F1 threshold; a second pass over the frames "
        "(default: on for the smiyc protocol)",
    )
    parser.add_argument(
        "--component-track",
        choices=tuple(COMPONENT_TRACKS),
        default=None,
        help="component size limits: anomaly 500/100 px, obstacle 50/10 px (default: the benchmark's SMIYC track)",
    )
    parser.add_argument("--sml-statistics", default=None, help="file with SMLStatistics.to_dict() for --score sml")
    parser.add_argument(
        "--out", default=None, help="JSON file to write (default: evaluate-BENCHMARK-SPLIT.json in the current folder)"
    )
    add_overwrite_argument(parser, "the JSON file")
    add_loop_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from densehybrid.data.datasets import get_benchmark
    from densehybrid.engine.distributed import is_main
    from densehybrid.engine.outputs import check_output_file
    from densehybrid.evaluation import evaluate_benchmark, resolve_request
    from densehybrid.models.output import output_fields
    from densehybrid.scores import default_score

    spec = get_benchmark(args.benchmark)
    # Everything that needs neither data nor weights is checked first: a checkpoint can take a while to read.
    _, scores, _, _ = resolve_request(spec, args.score, args.protocol, args.components, args.component_track)
    check_sml_arguments(scores, args.sml_statistics)
    options = dataset_options(args)
    metric_options = parse_metric_options(args.metric_option)
    out = check_output_file(
        args.out or f"evaluate-{spec.name}-{args.split or spec.split}.json",
        inputs=[args.checkpoint, args.sml_statistics, args.root],
        overwrite=args.overwrite,
    )
    model, info = load_model(args.checkpoint, args.model, args.num_classes, spec.num_known_classes)
    if args.score is None and scores:  # the default score follows the model's outputs (dicnet for DiCNet)
        scores = [default_score(output_fields(model))]
    score_options = load_score_options(scores, args.sml_statistics, info["num_classes"])
    with command_ranks(args.device) as device, naming_checkpoint(args.checkpoint):
        result = evaluate_benchmark(
            spec,
            args.root,
            model,
            scores,
            split=args.split,
            dataset_options=options,
            protocol=args.protocol,
            protocol_options=metric_options,
            score_options=score_options,
            components=args.components,
            component_track=args.component_track,
            limit=args.limit,
            input_scale=args.input_scale,
            amp=args.amp,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            window=args.window,
        )
        if not is_main():  # every rank holds the merged result; rank 0 reports and writes it
            return 0
    document = result_document("evaluate", info, result, args, options)
    print(format_results(document), flush=True)  # printed first: a failed write must not lose the results
    path = write_json(out, document)
    print(f"JSON: {path}")
    return 0


def format_results(result: dict[str, Any]) -> str:
    """The compact stdout report of :func:`run`: one row per score (percentages), then the closed-set mIoU."""
    lines = [
        f"{result['benchmark']} ({result['split']}): {result['num_images']} images, protocol {result['protocol']}, "
        f"model {result['model']} (K={result['num_classes']})"
    ]
    if not result["complete"]:
        expected = result["expected_images"]
        of = f" of the {expected} in a complete split" if expected else ""
        lines.append(f"partial evaluation ({result['num_images']} images{of}): not comparable to published numbers")
    if result["input_scale"] != 1.0:
        lines.append(f"model input resized by {result['input_scale']}: not comparable to full-resolution numbers")
    if result.get("window"):
        lines.append(f"inference: {result['window']}")
    components = result.get("components") or {}
    if result["anomaly"]:
        header = ["score", "AP", "FPR95", "AUROC"] + (["sIoU", "PPV", "mean F1"] if components else [])
        rows = []
        for name, metrics in result["anomaly"].items():
            row = [name, percent(metrics.get("ap")), percent(metrics.get("fpr95")), percent(metrics.get("auroc"))]
            if components:
                parts = components.get(name) or {}
                row += [percent(parts.get("siou")), percent(parts.get("ppv")), percent(parts.get("mean_f1"))]
            rows.append(row)
        lines += ["", format_table(header, rows)]
        if components:
            lines.append(f"components: SMIYC {result['component_track']} track, at each score's best-F1 threshold")
    if result.get("closed_set"):
        lines += ["", f"closed-set mIoU: {percent(result['closed_set']['miou'])}"]
    return "\n".join(lines)

"""``densehybrid doctor BENCHMARK ROOT``: check a downloaded benchmark tree and say how to fix it."""

from __future__ import annotations

import argparse
import json

HELP = "check a downloaded benchmark (layout, file counts, image/label pairing, label values)"
DESCRIPTION = (
    "Check a downloaded benchmark: the expected directories, that every image has its label and every label its "
    "image, the number of frames against a complete download, and the label ids of a sample of frames. Prints each "
    "problem with its file and a fix; exits 1 when there is an error. Benchmarks: "
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.data.datasets import BENCHMARKS, list_benchmarks

    parser.description = (
        DESCRIPTION
        + ", ".join(f"{name} ({BENCHMARKS[name].description})" for name in list_benchmarks())
        + ". For folder, both splits are checked by default and the anomaly pixels of each are counted."
    )
    parser.add_argument(
        "benchmark", metavar="BENCHMARK", help=f"one of: {', '.join(list_benchmarks())} (folder: your own data)"
    )
    parser.add_argument("root", metavar="ROOT", help="the dataset root (see docs/datasets.md for each tree)")
    parser.add_argument("--split", default=None, help="split to check (default: the benchmark's evaluation split)")
    parser.add_argument(
        "--max-label-checks", type=int, default=20, help="label files to decode and check (0: skip decoding)"
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="accept fewer frames than a complete download (a warning instead of an error)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="loader option, repeatable (e.g. layout=official, laf_root=DIR, cityscapes_root=DIR, anomaly_id=N)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from densehybrid.data.datasets import parse_dataset_options
    from densehybrid.doctor import diagnose

    report = diagnose(
        args.benchmark,
        args.root,
        split=args.split,
        max_label_checks=args.max_label_checks,
        allow_partial=args.allow_partial,
        options=parse_dataset_options(args.option),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1

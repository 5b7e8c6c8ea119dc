"""``densehybrid export-smiyc``: run a model on a benchmark and write its anomaly maps in the SMIYC toolkit format."""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
from pathlib import Path

HELP = "write anomaly maps as SMIYC toolkit .hdf5 files (anomaly_p/{method}/{dataset}/{frame}.hdf5)"
DESCRIPTION = (
    "Run a checkpoint on every frame of a benchmark and write the anomaly score of each pixel to "
    "OUT/anomaly_p/METHOD/DATASET/FRAME.hdf5 (HDF5 dataset 'value', float16, gzip), the tree the SegmentMeIfYouCan "
    "toolkit reads (set DIR_OUTPUTS=OUT) and Codabench accepts. float16 keeps about 3 significant digits: the command "
    "warns when the cast merges distinct scores; --squash rank or sigmoid maps scores monotonically (one map fitted "
    "on the first frame, applied to all) into float16's precise range."
)

# benchmark -> the toolkit dataset that evaluates the exported files locally (labels public)
_TOOLKIT_SPLITS = {
    "smiyc-anomaly": "AnomalyTrack-validation",
    "smiyc-obstacle": "ObstacleTrack-validation",
    "laf-test": "LostAndFound-test",
    "laf-noknown": "LostAndFound-testNoKnown",
    "fs-laf": "FishyLAFAnomaly-val",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.cli._common import (
        add_overwrite_argument,
        add_window_argument,
        device_option,
        finite_float,
        non_negative_int,
        positive_int,
    )
    from densehybrid.data.datasets import list_benchmarks
    from densehybrid.smiyc_export import SMIYC_DATASETS, SQUASHES

    exportable = [name for name in list_benchmarks() if name in _TOOLKIT_SPLITS or name == "folder"]
    parser.add_argument("--benchmark", required=True, help=f"one of: {', '.join(exportable)}")
    parser.add_argument("--root", required=True, help="the benchmark's dataset root")
    parser.add_argument(
        "--model",
        default=None,
        help="registered model name (see `densehybrid models`); default: the name the checkpoint records "
        "(checkpoints written by densehybrid)",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file to load into the model")
    parser.add_argument("--method", required=True, help="method name the SMIYC toolkit is run with")
    parser.add_argument("--out", required=True, help="output root (the toolkit's DIR_OUTPUTS)")
    add_overwrite_argument(parser, "the maps of an earlier export of the same method and dataset (all of them)")
    parser.add_argument(
        "--split", default=None, help="split to export (default: the frames of a submission, e.g. 'all' for SMIYC)"
    )
    parser.add_argument("--score", default="densehybrid", help="anomaly score (see `densehybrid scores`)")
    parser.add_argument("--squash", choices=("none", *SQUASHES), default="none", help="monotone map before float16")
    parser.add_argument("--squash-center", type=finite_float, default=None, help="sigmoid centre (default: fitted)")
    parser.add_argument("--squash-scale", type=finite_float, default=None, help="sigmoid temperature (default: fitted)")
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="known classes of the model (default: the checkpoint's, else the benchmark's)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help=f"SMIYC dataset folder to write into (default: the frames' own; one of {', '.join(SMIYC_DATASETS)})",
    )
    parser.add_argument("--device", type=device_option, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="export only the first N frames (a quick check)"
    )
    parser.add_argument("--compression-level", type=non_negative_int, default=9, help="gzip level 0..9")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="loader option, repeatable")
    add_window_argument(parser)


def run(args: argparse.Namespace) -> int:
    from densehybrid.cli._common import command_ranks, load_model, naming_checkpoint
    from densehybrid.data.datasets import get_benchmark, parse_dataset_options
    from densehybrid.engine.distributed import barrier, broadcast_from_main, is_main
    from densehybrid.engine.outputs import check_output_dir, remove_stale_temporaries, staging_dir, swap_in
    from densehybrid.models.window import describe_window
    from densehybrid.openset import OpenSetModel
    from densehybrid.scores import score_info
    from densehybrid.smiyc_export import SMIYC_DATASETS, SmiycWriter, Squash, anomaly_map_path, write_smiyc_maps

    spec = get_benchmark(args.benchmark)
    split = args.split or spec.export_split or spec.split
    if args.squash != "sigmoid" and (args.squash_center is not None or args.squash_scale is not None):
        raise ValueError(f"Expected `--squash-center`/`--squash-scale` only with --squash sigmoid, not {args.squash}.")
    info = score_info(args.score)
    if info.requires_fit:
        raise ValueError(
            f"Expected a score that needs no fitted statistics, but {args.score!r} does; choose another --score."
        )
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"Expected `--num-classes` to be a positive integer, but got {args.num_classes}.")

    # Labels are not read: an export needs only the images, so a bad label file must not stop it.
    dataset = spec.create(args.root, split, **parse_dataset_options(args.option))
    frames = dataset.frames[: args.limit] if args.limit else dataset.frames
    targets = [args.dataset or frame.smiyc_dataset or spec.smiyc_dataset for frame in frames]
    if None in targets:
        raise ValueError(
            f"Expected a SMIYC dataset for every frame, but benchmark {spec.name!r} has none for some frames: pass "
            f"--dataset NAME (one of {', '.join(SMIYC_DATASETS)})."
        )
    # Every dataset folder this export writes is replaced as a whole, so no map of an earlier export stays beside
    # the new ones (the toolkit would evaluate a mixture).
    out_root = Path(args.out).expanduser()
    folders = sorted({anomaly_map_path(out_root, args.method, target, "frame").parent for target in targets})
    out = check_output_dir(
        out_root,
        inputs=[args.checkpoint, args.root],
        outputs=[str(folder.relative_to(out_root)) for folder in folders],
        overwrite=args.overwrite,
    )
    method_dir = out / "anomaly_p" / args.method
    with command_ranks(args.device) as device:
        main = is_main()  # under torchrun: every rank writes its block of frames; rank 0 alone stages and reports
        if main:
            remove_stale_temporaries(method_dir.parent, f".{glob.escape(args.method)}.*.tmp")
        model, _ = load_model(args.checkpoint, args.model, args.num_classes, spec.num_known_classes)
        try:
            open_set = OpenSetModel(model, info.name, window=args.window)
        except ValueError as exc:
            raise ValueError(f"Checkpoint {str(args.checkpoint)!r}: {exc}") from exc
        if main:
            print(f"inference: {describe_window(open_set.window)}", file=sys.stderr)
        squash = None if args.squash == "none" else Squash(args.squash, args.squash_center, args.squash_scale)
        staged = broadcast_from_main(staging_dir(method_dir) if main else None)
        try:
            writer = SmiycWriter(
                staged, args.method, squash=squash, compression_level=args.compression_level, check_float16=True
            )
            with naming_checkpoint(args.checkpoint):
                write_smiyc_maps(open_set, dataset, frames, targets, writer, device=device, desc=f"export {spec.name}")
            summary = writer.summary()
            barrier()  # every rank's maps are in the staged folder
            if main:
                for folder in folders:
                    swap_in(staged / "anomaly_p" / args.method / folder.name, folder)
        finally:
            if main:
                shutil.rmtree(staged, ignore_errors=True)
        if not main:
            return 0
    summary["out"] = str(method_dir)
    print(json.dumps(summary, indent=2))
    if spec.name in _TOOLKIT_SPLITS:
        print(
            f"Evaluate with the SMIYC toolkit: DIR_OUTPUTS={args.out} python -m road_anomaly_benchmark metric "
            f"PixBinaryClass {args.method} {_TOOLKIT_SPLITS[spec.name]}",
            file=sys.stderr,
        )
    return 0

"""``densehybrid export-smiyc``: run a model on a benchmark and write its anomaly maps in the SMIYC toolkit format."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from densehybrid.data.datasets import get_benchmark, list_benchmarks, parse_dataset_options
from densehybrid.smiyc_export import SMIYC_DATASETS, SQUASHES, SmiycWriter, Squash

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
    parser.add_argument("--benchmark", required=True, help=f"one of: {', '.join(list_benchmarks())}")
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
    parser.add_argument(
        "--split", default=None, help="split to export (default: the frames of a submission, e.g. 'all' for SMIYC)"
    )
    parser.add_argument("--score", default="densehybrid", help="anomaly score (see `densehybrid scores`)")
    parser.add_argument("--squash", choices=("none", *SQUASHES), default="none", help="monotone map before float16")
    parser.add_argument("--squash-center", type=float, default=None, help="sigmoid centre (default: fitted)")
    parser.add_argument("--squash-scale", type=float, default=None, help="sigmoid temperature (default: fitted)")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="known classes of the model (default: the checkpoint's, else the benchmark's)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help=f"SMIYC dataset folder to write into (default: the frames' own; one of {', '.join(SMIYC_DATASETS)})",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--limit", type=int, default=None, help="export only the first N frames (a quick check)")
    parser.add_argument("--compression-level", type=int, default=9, help="gzip level 0..9")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="loader option, repeatable")


def run(args: argparse.Namespace) -> int:
    from densehybrid.cli._common import load_model
    from densehybrid.engine.runtime import select_device
    from densehybrid.models.output import output_fields
    from densehybrid.scores import check_score_inputs, compute_score, score_info

    spec = get_benchmark(args.benchmark)
    split = args.split or spec.export_split or spec.split
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"Expected `--limit` to be a positive integer, but got {args.limit}.")
    if args.squash != "sigmoid" and (args.squash_center is not None or args.squash_scale is not None):
        raise ValueError(f"Expected `--squash-center`/`--squash-scale` only with --squash sigmoid, not {args.squash}.")
    info = score_info(args.score)
    if info.requires_fit:
        raise ValueError(
            f"Expected a score that needs no fitted statistics, but {args.score!r} does; choose another --score."
        )
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"Expected `--num-classes` to be a positive integer, but got {args.num_classes}.")

    dataset = spec.create(args.root, split, **parse_dataset_options(args.option))
    frames = dataset.frames[: args.limit] if args.limit else dataset.frames
    targets = [args.dataset or frame.smiyc_dataset or spec.smiyc_dataset for frame in frames]
    if None in targets:
        raise ValueError(
            f"Expected a SMIYC dataset for every frame, but benchmark {spec.name!r} has none for some frames: pass "
            f"--dataset NAME (one of {', '.join(SMIYC_DATASETS)})."
        )

    device = select_device(args.device)
    model, _ = load_model(args.checkpoint, args.model, args.num_classes, spec.num_known_classes)
    model.to(device).eval()
    check_score_inputs([info.name], output_fields(model), f"checkpoint {str(args.checkpoint)!r}")
    squash = None if args.squash == "none" else Squash(args.squash, args.squash_center, args.squash_scale)
    writer = SmiycWriter(
        args.out, args.method, squash=squash, compression_level=args.compression_level, check_float16=True
    )
    with torch.inference_mode():
        for index in tqdm(range(len(frames)), desc=f"export {spec.name}", unit="frame", file=sys.stderr):
            sample = dataset[index]
            image = sample["image"].unsqueeze(0).to(device)
            output = model(image, output_size=tuple(image.shape[-2:]))
            scores = compute_score(info.name, output)[0]
            writer.write(sample["name"], scores, dataset=targets[index])
    print(json.dumps(writer.summary(), indent=2))
    if spec.name in _TOOLKIT_SPLITS:
        print(
            f"Evaluate with the SMIYC toolkit: DIR_OUTPUTS={args.out} python -m road_anomaly_benchmark metric "
            f"PixBinaryClass {args.method} {_TOOLKIT_SPLITS[spec.name]}",
            file=sys.stderr,
        )
    return 0

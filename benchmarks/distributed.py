"""Commands under ``torchrun``: 2 processes vs 1, measured side by side in one script.

Each part is a self-contained function of :data:`PARTS` (``--part NAME``; all parts by default) returning its rows of
the table "2 processes vs 1" (``ratio`` = time with 2 processes / time with 1; below 1 means faster).

* ``evaluate``: ``torchrun --standalone --nproc-per-node W -m densehybrid evaluate --benchmark folder`` on a
  generated folder tree (random images and labels, anomaly id K), W = 1 and 2, the same checkpoint and settings.
  Wall time per image is the slope between a run over ``--frames`` frames and one over half of them (``--limit``),
  so the start-up (torchrun, imports, reading the checkpoint) cancels out; the median over ``--repeats``
  repetitions, the order of 1 and 2 processes alternating. Every process gets ``--threads-per-process`` intra-op
  threads (``OMP_NUM_THREADS``; 1 by default, as ``torchrun`` sets it), so 2 processes use twice the cores of 1, as
  2 GPUs are twice the hardware of 1; on a machine with fewer free cores than processes the 2-process number mostly
  measures contention. ``identical_json`` says whether both wrote the same JSON (they must: same threads per
  process, the same batches).
* ``predict``: ``torchrun --standalone --nproc-per-node W -m densehybrid predict`` on ``--frames`` generated PNG files
  (random pixels), W = 1 and 2, the same checkpoint (random weights) and settings; wall time per image as for
  ``evaluate``. ``identical_json`` says whether both wrote the same files (every PNG byte for byte,
  ``predictions.jsonl`` without its timings).
* ``flow-train``: the step time of joint flow fine-tuning (``demo-finetune-flow``: the segmenter step with flow
  negatives, then the flow step, DenseFlow.small()) on a generated folder tree, the same global batch for both; the
  median interval between ``log.jsonl`` records, the first 2 steps excluded.

Usage::

    python benchmarks/distributed.py                          # every part
    python benchmarks/distributed.py --part evaluate --frames 32 --size 256 512 --json distributed.json
    python benchmarks/distributed.py --part flow-train --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from training import NUM_CLASSES as TRAINING_CLASSES  # benchmarks/training.py: its generated training tree
from training import _folder_tree as _training_tree

NUM_CLASSES = 5


def _torchrun(world: int, command: list[str], threads: int) -> float:
    """Wall seconds of ``torchrun --nproc-per-node world -m densehybrid COMMAND``, ``threads`` per process."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run([*launch, "-m", "densehybrid", *command], env=env, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed in {world} process(es):\n{done.stderr.decode()[-3000:]}")
    return time.perf_counter() - start


def _step_time(log: Path) -> float:
    """Median seconds between consecutive training records of a run's ``log.jsonl`` (the first 2 steps excluded)."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    times = [r["time"] for r in records if r["kind"] == "train"]
    return statistics.median(np.diff(times[2:]).tolist())


def _folder_tree(root: Path, frames: int, size: tuple[int, int]) -> Path:
    """``classes.txt``, one training image and ``val/`` with ``frames`` random images and labels (anomaly id K)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(NUM_CLASSES)) + "\n")
    for folder, n in ((root, 1), (root / "val", frames)):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(exist_ok=True)
        for i in range(n):
            image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            label = rng.integers(0, NUM_CLASSES + 1, size, dtype=np.uint8)
            Image.fromarray(image).save(folder / "images" / f"{i:04d}.png")
            Image.fromarray(label).save(folder / "labels" / f"{i:04d}.png")
    return root


def _seconds_per_image(run: Callable[[int, int], float], frames: int, repeats: int) -> dict[int, float]:
    """Median wall seconds per image with 1 and 2 processes: the slope between ``run(world, frames)`` and
    ``run(world, frames // 2)`` (start-up cancels out), 1 and 2 processes interleaved, the order alternating."""
    half = frames // 2
    slopes: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for world in (1, 2) if repeat % 2 == 0 else (2, 1):
            walls = {n: run(world, n) for n in (half, frames)}
            slopes[world].append((walls[frames] - walls[half]) / (frames - half))
    return {world: statistics.median(values) for world, values in slopes.items()}


def evaluate_part(args: argparse.Namespace) -> list[dict]:
    """Seconds per image of ``densehybrid evaluate`` with 1 and 2 processes (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = _folder_tree(Path(tmp) / "tree", args.frames, tuple(args.size))
        checkpoint = _checkpoint(Path(tmp), args.model)

        def run(world: int, limit: int) -> float:
            command = ["evaluate", "--benchmark", "folder", "--root", str(tree), "--checkpoint", str(checkpoint),
                       "--limit", str(limit), "--out", str(Path(tmp) / f"w{world}-{limit}.json"),
                       "--device", "cpu", "--num-workers", "0", "--no-progress", "--overwrite"]  # fmt: skip
            return _torchrun(world, command, args.threads_per_process)

        per_image = _seconds_per_image(run, args.frames, args.repeats)
        one, two = (json.loads((Path(tmp) / f"w{w}-{args.frames}.json").read_text()) for w in (1, 2))
    row = {
        "part": "evaluate",
        "what": f"wall s / image, {args.model}, {args.size[0]}x{args.size[1]}, {args.frames} frames, median of {args.repeats}",
        "one_process": per_image[1],
        "two_processes": per_image[2],
        "ratio": per_image[2] / per_image[1],
        # False when the processes ran with different intra-op threads (float32 kernels then round differently)
        "identical_json": one == two,
    }
    return [row]


def _checkpoint(folder: Path, model_name: str) -> Path:
    """A random-weight checkpoint of ``model_name`` (seed 0)."""
    from densehybrid.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=NUM_CLASSES)
    path = folder / "model.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path


def _prediction_files(out: Path) -> dict[str, object]:
    """Every output file of a ``predict`` folder, ``predictions.jsonl`` without the per-image timings."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in out.glob("*.png")}
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    files["predictions.jsonl"] = [{**line, "seconds": None} for line in lines]
    return files


def predict_part(args: argparse.Namespace) -> list[dict]:
    """Seconds per image of ``densehybrid predict`` with 1 and 2 processes (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        half = args.frames // 2
        folders = {n: Path(tmp) / f"images-{n}" for n in (half, args.frames)}
        for n, folder in folders.items():
            folder.mkdir()
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*args.size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
        checkpoint = _checkpoint(Path(tmp), args.model)

        def run(world: int, n: int) -> float:
            command = ["predict", "--checkpoint", str(checkpoint), str(folders[n]), "--out", str(Path(tmp) / f"w{world}-{n}"),
                       "--overwrite", "--device", "cpu", "--num-workers", "0", "--no-progress", "--display-range", "-5", "0"]  # fmt: skip
            return _torchrun(world, command, args.threads_per_process)

        per_image = _seconds_per_image(run, args.frames, args.repeats)
        one, two = (_prediction_files(Path(tmp) / f"w{w}-{args.frames}") for w in (1, 2))
    row = {
        "part": "predict",
        "what": f"wall s / image, {args.model}, {args.size[0]}x{args.size[1]}, {args.frames} images, median of "
        f"{args.repeats}",
        "one_process": per_image[1],
        "two_processes": per_image[2],
        "ratio": per_image[2] / per_image[1],
        "identical_json": one == two,
    }
    return [row]


def flow_train_part(args: argparse.Namespace) -> list[dict]:
    """Step time of joint flow fine-tuning in 1 and 2 processes (the same global batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = _training_tree(Path(tmp) / "flow-tree", args.batch_size * (args.steps + 1), args.crop)
        items = [
            "data.dataset=folder", f"model.num_classes={TRAINING_CLASSES}", "model.init_as=pretrained",
            "model.name=ladder_mobilenetv3", "model.kwargs={decoder_channels = 32}", f"augment.crop={args.crop}",
            f"optim.batch_size={args.batch_size}", "optim.epochs=1", "run.num_workers=0", "run.checkpoint_every=0",
            "run.validate=false", f"flow.max_side={min(64, args.crop)}",
        ]  # fmt: skip
        seconds = {}
        for world in (1, 2):
            out = Path(tmp) / f"flow-train-{world}"
            command = ["train", "--recipe", "demo-finetune-flow", "--data-root", str(tree), "--out", str(out)]
            command += ["--device", "cpu", "--no-progress", "--max-steps", str(args.steps)]
            _torchrun(world, command + [a for item in items for a in ("--set", item)], args.threads_per_process)
            seconds[world] = _step_time(out / "log.jsonl")
    row = {
        "part": "flow-train",
        "what": f"s / step, joint flow fine-tuning (global batch {args.batch_size}, {args.crop} px, {args.steps} steps)",
        "one_process": seconds[1],
        "two_processes": seconds[2],
        "ratio": seconds[2] / seconds[1],
    }
    return [row]


#: Parts of the table "2 processes vs 1": name -> function(args) -> rows (``part``, ``what``, ``one_process``,
#: ``two_processes``, ``ratio``).
PARTS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "evaluate": evaluate_part,
    "predict": predict_part,
    "flow-train": flow_train_part,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), action="append", default=None, help="repeatable; default all")
    parser.add_argument("--model", default="ladder_mobilenetv3")
    parser.add_argument(
        "--frames", type=int, default=16, help="evaluate, predict: frames of the larger run (half: smaller)"
    )
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=10, help="flow-train: training steps per run")
    parser.add_argument("--crop", type=int, default=64, help="flow-train: crop side in px")
    parser.add_argument("--batch-size", type=int, default=4, help="flow-train: global batch")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions, alternating the order; medians")
    parser.add_argument(
        "--threads-per-process", type=int, default=1, help="intra-op threads of every process (torchrun's default: 1)"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    rows = [row for name in (args.part or list(PARTS)) for row in PARTS[name](args)]
    print("| part | what | 1 process | 2 processes | ratio 2/1 | identical output |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        same = {True: "yes", False: "no"}.get(row.get("identical_json"), "-")
        print(f"| {row['part']} | {row['what']} | {row['one_process']:.4f} | {row['two_processes']:.4f} | "
              f"{row['ratio']:.3f} | {same} |")  # fmt: skip
    if args.json:
        report = {"settings": vars(args), "torch": torch.__version__, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

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

Usage::

    python benchmarks/distributed.py                          # every part
    python benchmarks/distributed.py --part evaluate --frames 32 --size 256 512 --json distributed.json
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

NUM_CLASSES = 5


def _torchrun(world: int, command: list[str], threads: int) -> float:
    """Wall seconds of ``torchrun --nproc-per-node world -m densehybrid COMMAND``, ``threads`` per process."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([*launch, "-m", "densehybrid", *command], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


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


def evaluate_part(args: argparse.Namespace) -> list[dict]:
    """Seconds per image of ``densehybrid evaluate`` with 1 and 2 processes (see the module docstring)."""
    from densehybrid.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        tree = _folder_tree(Path(tmp) / "tree", args.frames, tuple(args.size))
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=NUM_CLASSES)
        checkpoint = Path(tmp) / "model.pt"
        torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs},
                   checkpoint)  # fmt: skip
        half = args.frames // 2
        slopes: dict[int, list[float]] = {1: [], 2: []}
        for repeat in range(args.repeats):  # the order of 1 and 2 processes alternates between repetitions
            for world in (1, 2) if repeat % 2 == 0 else (2, 1):
                walls = {}
                for limit in (half, args.frames):
                    command = ["evaluate", "--benchmark", "folder", "--root", str(tree), "--checkpoint",
                               str(checkpoint), "--limit", str(limit), "--out", str(Path(tmp) / f"w{world}-{limit}.json"),
                               "--device", "cpu", "--num-workers", "0", "--no-progress", "--overwrite"]  # fmt: skip
                    walls[limit] = _torchrun(world, command, args.threads_per_process)
                slopes[world].append((walls[args.frames] - walls[half]) / (args.frames - half))
        per_image = {world: statistics.median(values) for world, values in slopes.items()}
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


#: Parts of the table "2 processes vs 1": name -> function(args) -> rows (``part``, ``what``, ``one_process``,
#: ``two_processes``, ``ratio``).
PARTS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "evaluate": evaluate_part,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), action="append", default=None, help="repeatable; default all")
    parser.add_argument("--model", default="ladder_mobilenetv3")
    parser.add_argument("--frames", type=int, default=16, help="evaluate: frames of the larger run (half: smaller)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
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

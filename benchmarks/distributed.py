"""Commands under ``torchrun``: 2 processes vs 1, measured side by side in one script.

Each part is a self-contained function of :data:`PARTS` (``--part NAME``; all parts by default) returning its rows of
the table "2 processes vs 1" (``ratio`` = time with 2 processes / time with 1; below 1 means faster).

* ``predict``: ``torchrun --standalone --nproc-per-node W -m densehybrid predict`` on ``--frames`` generated PNG files
  (random pixels), W = 1 and 2, the same checkpoint (random weights) and settings. Wall time per image is the slope
  between a run over ``--frames`` images and one over half of them, so the start-up (torchrun, imports, reading the
  checkpoint) cancels out, the median of ``--repeats`` repetitions with 1 and 2 processes interleaved; each process gets ``threads / W`` intra-op threads (``OMP_NUM_THREADS``). On a machine
  with fewer free cores than processes the 2-process number mostly measures contention. ``identical_output`` says
  whether both wrote the same files (every PNG byte for byte, ``predictions.jsonl`` without its timings).

Usage::

    python benchmarks/distributed.py                          # every part
    python benchmarks/distributed.py --part predict --frames 16 --size 256 512 --json distributed.json
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
    """Wall seconds of ``torchrun --nproc-per-node world -m densehybrid COMMAND``."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // world)))
    start = time.perf_counter()
    subprocess.run([*launch, "-m", "densehybrid", *command], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def _checkpoint(folder: Path, model_name: str) -> Path:
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
        slopes: dict[int, list[float]] = {1: [], 2: []}
        for repeat in range(args.repeats):  # 1 and 2 processes interleaved, the order alternating each repetition
            for world in (1, 2) if repeat % 2 == 0 else (2, 1):
                walls = {}
                for n, folder in folders.items():
                    out = Path(tmp) / f"w{world}-{n}"
                    command = ["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out), "--overwrite",
                               "--device", "cpu", "--num-workers", "0", "--no-progress", "--display-range", "-5", "0"]  # fmt: skip
                    walls[n] = _torchrun(world, command, args.threads)
                slopes[world].append((walls[args.frames] - walls[half]) / (args.frames - half))
        per_image = {world: statistics.median(values) for world, values in slopes.items()}
        one, two = (_prediction_files(Path(tmp) / f"w{w}-{args.frames}") for w in (1, 2))
    return [
        {
            "part": "predict",
            "what": f"wall s / image, {args.model}, {args.size[0]}x{args.size[1]}, {args.frames} images, median of "
            f"{args.repeats}",
            "one_process": per_image[1],
            "two_processes": per_image[2],
            "ratio": per_image[2] / per_image[1],
            "identical_output": one == two,
        }
    ]


#: Parts of the table "2 processes vs 1": name -> function(args) -> rows (``part``, ``what``, ``one_process``,
#: ``two_processes``, ``ratio``, optionally ``identical_output``).
PARTS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "predict": predict_part,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), action="append", default=None, help="repeatable; default all")
    parser.add_argument("--model", default="ladder_mobilenetv3")
    parser.add_argument("--frames", type=int, default=16, help="images of the larger run (half: the smaller)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (median), 1 and 2 processes interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads in total")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    rows = [row for name in (args.part or list(PARTS)) for row in PARTS[name](args)]
    print("| part | what | 1 process | 2 processes | ratio 2/1 | identical output |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        same = {True: "yes", False: "no"}.get(row.get("identical_output", row.get("identical_json")), "-")
        print(
            f"| {row['part']} | {row['what']} | {row['one_process']:.4f} | {row['two_processes']:.4f} | "
            f"{row['ratio']:.2f} | {same} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}) + "\n"
        )


if __name__ == "__main__":
    main()

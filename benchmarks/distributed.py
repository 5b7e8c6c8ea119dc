"""2 processes vs 1: the heavy commands under ``torchrun --standalone`` with 2 processes and with 1, side by side.

Each part is a function ``part(args, tmp) -> row`` in :data:`PARTS`; a row holds the measure, the 1-process and the
2-process value and their ratio (2 / 1: below 1 means 2 processes are faster).

- ``flow-train``: the step time of joint flow fine-tuning (``demo-finetune-flow``: the segmenter step with flow
  negatives, then the flow step, DenseFlow.small()) on a generated folder tree, the same global batch for both; the
  median interval between ``log.jsonl`` records, the first 2 steps excluded.

Each process gets ``--threads`` intra-op threads (default: the machine's threads split over the processes). On a
machine with fewer free cores than processes the 2-process number mostly measures contention, and on a loaded machine
multi-threaded processes stall (``--threads 1`` compares 1 core with 2).

Usage::

    python benchmarks/distributed.py                         # every part, CPU (gloo), 64 px crops, batch 4
    python benchmarks/distributed.py --parts flow-train --steps 12 --threads 1 --json distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from training import NUM_CLASSES, _folder_tree  # benchmarks/training.py: the generated folder tree


def _torchrun(world: int, command: list[str], threads: int | None) -> None:
    """``torchrun --standalone --nproc-per-node world -m densehybrid COMMAND``, ``threads`` intra-op threads per process
    (None: the machine's threads split over the processes)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, torch.get_num_threads() // world)))
    done = subprocess.run([*launch, "-m", "densehybrid", *command], env=env, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed in {world} process(es):\n{done.stderr.decode()[-3000:]}")


def _step_time(log: Path) -> float:
    """Median seconds between consecutive training records of a run's ``log.jsonl`` (the first 2 steps excluded)."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    times = [r["time"] for r in records if r["kind"] == "train"]
    return statistics.median(np.diff(times[2:]).tolist())


def flow_train(args: argparse.Namespace, tmp: Path) -> dict:
    """Step time of joint flow fine-tuning in 1 and 2 processes (same global batch)."""
    tree = _folder_tree(tmp / "flow-tree", args.batch_size * (args.steps + 1), args.crop)
    items = [
        "data.dataset=folder", f"model.num_classes={NUM_CLASSES}", "model.init_as=pretrained",
        "model.name=ladder_mobilenetv3", "model.kwargs={decoder_channels = 32}", f"augment.crop={args.crop}",
        f"optim.batch_size={args.batch_size}", "optim.epochs=1", "run.num_workers=0", "run.checkpoint_every=0",
        "run.validate=false", f"flow.max_side={min(64, args.crop)}",
    ]  # fmt: skip
    seconds = {}
    for world in (1, 2):
        out = tmp / f"flow-train-{world}"
        command = ["train", "--recipe", "demo-finetune-flow", "--data-root", str(tree), "--out", str(out)]
        command += ["--device", "cpu", "--no-progress", "--max-steps", str(args.steps)]
        _torchrun(world, command + [a for item in items for a in ("--set", item)], args.threads)
        seconds[world] = _step_time(out / "log.jsonl")
    return {
        "part": "flow-train",
        "measure": f"ms/step, joint flow fine-tuning (global batch {args.batch_size}, {args.crop} px)",
        "one": seconds[1] * 1e3,
        "two": seconds[2] * 1e3,
        "ratio": seconds[2] / seconds[1],
    }


#: The parts of this benchmark, by name (``--parts``).
PARTS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {"flow-train": flow_train}


def table(rows: list[dict]) -> str:
    lines = ["| part | measure | 1 process | 2 processes | ratio 2/1 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['part']} | {r['measure']} | {r['one']:.0f} | {r['two']:.0f} | {r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed training run")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per process (default: split)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    report = {"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts:
            report["rows"].append(PARTS[name](args, Path(tmp)))
    print(table(report["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Training throughput: our loop (:func:`densehybrid.engine.fit`) vs a plain PyTorch loop doing the same work, and
2 data-parallel gloo processes vs 1 process.

1. **Loop overhead.** Both loops train the same model (same initial weights) on the same augmented samples
   (:class:`~densehybrid.data.transforms.AugmentedDataset` with the released jitter crop and flip), paste the same
   kind of negatives (:class:`~densehybrid.engine.NegativeStream` + :class:`~densehybrid.negatives.NegativePaster`)
   and minimise the same :class:`~densehybrid.losses.DenseHybridLoss` with Adam. The plain loop is a DataLoader
   with ``shuffle=True`` and the textbook step; ours adds the seeded resumable order, per-step RNG handling, logging
   hooks and the checks. Neither writes checkpoints. The two are timed in alternating order, ``--repeats`` times,
   and the median steps per second are compared (ratio = ours / plain; >= 0.95 means no measurable overhead).
2. **Data parallel.** ``torchrun --standalone --nproc-per-node W -m densehybrid train --recipe generic`` on a
   generated folder tree, W = 1 and 2, the same global batch; the step time is the median interval between the
   ``log.jsonl`` records (the first steps excluded). On a machine with fewer free cores than processes the 2-process
   number mostly measures contention.

Usage::

    python benchmarks/training.py                       # CPU, 64 px crops, batch 4
    python benchmarks/training.py --crop 128 --steps 20 --repeats 5 --json training.json
    python benchmarks/training.py --skip-distributed
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from densehybrid.data.transforms import AugmentedDataset, NegativeCrop, SegmentationAugment
from densehybrid.engine import DenseHybridObjective, NegativeStream, TrainConfig, fit
from densehybrid.engine.batches import collate
from densehybrid.losses import DenseHybridLoss
from densehybrid.models import create_model
from densehybrid.negatives import NegativePaster

NUM_CLASSES = 4


class RandomScenes(Dataset):
    """Random images and labels (the content does not change the timings)."""

    def __init__(self, n: int, size: tuple[int, int], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, *size, generator=g)
        self.targets = torch.randint(0, NUM_CLASSES, (n, *size), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i]}


class RandomNegatives(Dataset):
    def __init__(self, n: int, size: tuple[int, int]) -> None:
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.rand(3, *size, generator=g), torch.randint(0, 5, size, generator=g)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _parts(args):
    train = AugmentedDataset(RandomScenes(args.batch_size * args.steps, (args.crop + 16, args.crop + 32)),
                             SegmentationAugment(args.crop, (0.5, 2.0), (124, 116, 104)))  # fmt: skip
    negatives = NegativeStream(RandomNegatives(8, (96, 128)), args.crop // 2,
                               transform=NegativeCrop(args.crop // 2, resize=args.crop, scale=(1.0, 1.0)))  # fmt: skip
    loss = DenseHybridLoss(beta=0.03, lambda_=0.3)
    paster = NegativePaster()
    return train, negatives, loss, paster


def _model(args):
    torch.manual_seed(0)
    return create_model(args.model, num_classes=NUM_CLASSES, **json.loads(args.model_kwargs))


def run_ours(args) -> float:
    train, negatives, loss, paster = _parts(args)
    model = _model(args)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-4, device=args.device, progress=False,
                         hflip=False, seed=0)  # fmt: skip
    start = time.perf_counter()
    result = fit(model, train, DenseHybridObjective(loss, negatives, paster), config)
    return result.global_step / (time.perf_counter() - start)


def run_plain(args) -> float:
    train, negatives, loss, paster = _parts(args)
    model = _model(args).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    model.train()
    steps = 0
    start = time.perf_counter()
    for batch in loader:
        images, target = batch["image"].to(args.device), batch["target"].to(args.device)
        neg_images, neg_segments = negatives.draw(images.shape[0], generator)
        pasted = paster(images, target, neg_images.to(args.device), neg_segments.to(args.device), generator=generator)
        out = model(pasted.images, output_size=tuple(target.shape[-2:]))
        total = loss(out.logits, out.ood_logits, pasted.target, pasted.negative_mask).total
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def loop_overhead(args) -> dict:
    ours, plain = [], []
    run_plain(args)  # warm-up (allocator, kernels)
    for repeat in range(args.repeats):
        order = (run_ours, run_plain) if repeat % 2 == 0 else (run_plain, run_ours)
        for fn in order:
            (ours if fn is run_ours else plain).append(fn(args))
    result = {
        "ours_steps_per_s": statistics.median(ours),
        "plain_steps_per_s": statistics.median(plain),
        "ours_all": ours,
        "plain_all": plain,
    }
    result["ratio"] = result["ours_steps_per_s"] / result["plain_steps_per_s"]
    return result


def _folder_tree(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, NUM_CLASSES, (size, size), dtype=np.uint8)).save(root / "labels" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(NUM_CLASSES)) + "\n")
    return root


def distributed_step_time(args, world: int, tree: Path, out: Path) -> float:
    kwargs = json.loads(args.model_kwargs)
    sets = [f"augment.crop={args.crop}", "augment.scale=[1, 1]", f"optim.batch_size={args.batch_size}",
            "optim.epochs=1", "run.num_workers=0", "run.checkpoint_every=0", "run.validate=false",
            f"model.name={args.model}"] + [f"model.kwargs.{k}={json.dumps(v)}" for k, v in kwargs.items()]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "densehybrid", "train", "--recipe", "generic", "--data-root", str(tree), "--out", str(out),
               "--device", "cpu", "--no-progress"] + [a for s in sets for a in ("--set", s)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, torch.get_num_threads() // world)))
    subprocess.run(command, check=True, env=env, capture_output=True)
    times = [json.loads(line)["time"] for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(np.diff(times[2:]).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ladder_mobilenetv3")
    parser.add_argument("--model-kwargs", default='{"decoder_channels": 32}', help="JSON keyword arguments")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-distributed", action="store_true")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    report = {"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    report["loop"] = loop_overhead(args)
    loop = report["loop"]
    print(f"loop: ours {loop['ours_steps_per_s']:.2f} steps/s, plain {loop['plain_steps_per_s']:.2f} steps/s, "
          f"ratio {loop['ratio']:.3f} (median of {args.repeats})")  # fmt: skip
    if not args.skip_distributed:
        with tempfile.TemporaryDirectory() as tmp:
            tree = _folder_tree(Path(tmp) / "tree", args.batch_size * (args.steps + 2), args.crop)
            one = distributed_step_time(args, 1, tree, Path(tmp) / "w1")
            two = distributed_step_time(args, 2, tree, Path(tmp) / "w2")
        report["distributed"] = {"step_s_1": one, "step_s_2": two, "ratio_2_over_1": two / one}
        print(f"gloo, global batch {args.batch_size}: 1 process {one * 1e3:.1f} ms/step, 2 processes "
              f"{two * 1e3:.1f} ms/step, ratio {two / one:.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

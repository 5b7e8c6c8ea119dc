"""Pooled AP / AUROC / FPR95 at benchmark scale: densehybrid.metrics against sklearn, pytorch-ood and torchmetrics.

Synthetic frames of 1024x2048 pixels (DenseHybrid-like log-domain float32 scores, ~3% anomaly pixels in a few
rectangles, the top 12% of rows void = 255) are generated deterministically, one at a time. Each method runs in a
fresh child process so that its wall time and peak resident memory are its own:

* ``ours``: :class:`densehybrid.metrics.AnomalyMetrics` (fixed 2**24-bin histogram), ``update`` per frame;
* ``exact``: the reference values, from one in-place numpy sort of packed (order key, label) int64 values (8 bytes
  per valid pixel, the leanest exact method here; its memory grows with the pixels);
* ``functional``: the exact functions of :mod:`densehybrid.metrics.functional` on the concatenated valid pixels
  (float32 scores, uint8 labels: 5 bytes per pixel of input), built piece by piece in bounded extra memory;
* ``sklearn``: ``average_precision_score`` + ``roc_curve`` (+ ``auc``) on the concatenated valid pixels;
* ``pytorch_ood``: pytorch-ood 0.4 ``OODSegmentationMetrics(device="cpu", void_label=255)`` (AP = its trapezoidal
  ``AUPR-OUT``);
* ``torchmetrics``: exact ``BinaryAveragePrecision``/``BinaryAUROC``/``BinaryROC`` (``thresholds=None``) in one
  ``MetricCollection``; it applies a sigmoid to scores outside [0, 1], which creates ties where float32 saturates.

Peers whose memory grows with the pixels run on the first ``--peer-frames`` frames. Their time is extrapolated to
the full run as ``t * (n_full / n) * log(n_full) / log(n)`` (the n log n sort dominates) and their memory linearly,
and the table says so. Differences are taken against the exact values on the same pixels. Data generation is not
timed. Requires the ``bench`` extras: ``pip install -e ".[bench]"``.

Usage::

    python benchmarks/metrics.py                                # 100 frames (2.1e8 px), peers on 10 frames
    python benchmarks/metrics.py --frames 5 --peer-frames 2     # quick run
    python benchmarks/metrics.py --methods ours exact --json metrics.json
    python benchmarks/metrics.py --accuracy                     # error of the binned state vs the bin width
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

METHODS = ("ours", "exact", "functional", "sklearn", "pytorch_ood", "torchmetrics")
PEERS = ("sklearn", "pytorch_ood", "torchmetrics")
LABELS = {
    "ours": "densehybrid `AnomalyMetrics` (ours)",
    "exact": "exact reference (in-place numpy sort)",
    "functional": "densehybrid exact functions `average_precision`/`auroc`/`fpr_at_tpr` (ours)",
    "sklearn": "scikit-learn `average_precision_score` + `roc_curve`",
    "pytorch_ood": "pytorch-ood `OODSegmentationMetrics`",
    "torchmetrics": "torchmetrics exact `BinaryAveragePrecision`/`AUROC`/`ROC`",
}
PACKAGES = {"sklearn": "scikit-learn", "pytorch_ood": "pytorch-ood", "torchmetrics": "torchmetrics"}


def make_frame(index: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic frame: (H, W) float32 scores and (H, W) uint8 target in {0, 1, 255}."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    target = torch.zeros(height, width, dtype=torch.uint8)
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        h = int(torch.randint(height // 20, height // 6, (1,), generator=g))
        w = int(torch.randint(width // 30, width // 8, (1,), generator=g))
        top = int(torch.randint(height // 8, height - h, (1,), generator=g))
        left = int(torch.randint(0, width - w, (1,), generator=g))
        target[top : top + h, left : left + w] = 1
    target[: int(0.12 * height)] = 255
    scores = torch.randn(height, width, generator=g).mul_(1.5).sub_(2.0)
    scores += 3.0 * (target == 1) + 0.3 * float(torch.randn((), generator=g))
    return scores, target


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Method(ABC):
    """``feed`` one frame at a time, then ``finish`` -> (ap, auroc, fpr95, extra)."""

    @abstractmethod
    def feed(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Take one (H, W) frame."""

    @abstractmethod
    def finish(self) -> tuple[float, float, float, dict[str, Any]]:
        """Compute AP, AUROC, FPR95 and method-specific extras."""


class Ours(Method):
    def __init__(self) -> None:
        from densehybrid.metrics import AnomalyMetrics

        self.metric = AnomalyMetrics()

    def feed(self, scores, target):
        self.metric.update(scores[None], target[None])

    def finish(self):
        r = self.metric.compute()
        bounds = {k: r[k] for k in ("ap_error_bound", "auroc_error_bound", "fpr95_error_bound", "bits", "exact")}
        return r["ap"], r["auroc"], r["fpr95"], bounds


class Collecting(Method):
    """Keeps the valid pixels of every frame, as exact pooled metrics must."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def feed(self, scores, target):
        keep = target != 255
        self.scores.append(scores[keep])
        self.labels.append(target[keep])

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        scores, labels = torch.cat(self.scores), torch.cat(self.labels)
        self.scores, self.labels = [], []
        return scores, labels


class Functional(Collecting):
    """The exact functional metrics (piecewise exact curve) on the gathered pixels; FPR95 by the TPR >= 0.95 rule.

    Extra fields: the resident memory just before the three calls (the gathered input included) and its peak during
    them (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), so the functions' own memory is the
    difference.
    """

    def finish(self):
        from densehybrid.metrics import auroc, average_precision, fpr_at_tpr

        scores, labels = self.gathered()
        before = current_rss_mb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM)
        kwargs = dict(ignore_index=None, validate_args=False)
        ap = average_precision(scores, labels, **kwargs)
        au = auroc(scores, labels, **kwargs)
        fpr = fpr_at_tpr(scores, labels, 0.95, **kwargs)
        with open("/proc/self/status") as f:
            during = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        return ap, au, fpr, {"rss_before_calls_mb": before, "peak_rss_during_calls_mb": during}


class Exact(Method):
    """Exact pooled metrics with 8 bytes per pixel: one in-place sort of packed (order key, label) int64 values.

    The reference values of the table. The order keys are those of :mod:`densehybrid.metrics._keys` (the float32
    order, ties shared); the sorted array is walked from the highest score down in blocks of whole tie groups.
    """

    block = 1 << 22  # pixels per step of the walk (grown when one tie group is larger)

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def feed(self, scores, target):
        from densehybrid.metrics._keys import order_keys

        keep = target != 255
        packed = order_keys(scores[keep]).to(torch.int64)
        packed.mul_(2).add_(target[keep].to(torch.int64))
        self.parts.append(packed.numpy())

    def finish(self):
        packed = np.concatenate(self.parts)
        self.parts = []
        packed.sort()  # in place, ascending
        num_pos = int(np.count_nonzero(packed & 1))
        num_neg = packed.size - num_pos
        ap = area = 0.0
        tp = fp = 0
        fpr95 = math.nan
        high = packed.size
        block = self.block
        while high > 0:
            low = max(high - block, 0)
            if low > 0:  # start the block at a tie-group boundary so that no group is split
                keys = packed[low:high] >> 1
                changes = np.flatnonzero(keys[1:] != keys[:-1])
                if changes.size == 0:
                    block *= 2
                    continue
                low += int(changes[0]) + 1
            keys, labels = packed[low:high] >> 1, packed[low:high] & 1
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            pos = np.add.reduceat(labels, starts)[::-1].astype(np.float64)  # highest group first
            neg = np.diff(np.r_[starts, keys.size])[::-1] - pos
            tps, fps = tp + np.cumsum(pos), fp + np.cumsum(neg)
            ap += float(np.sum(pos * tps / (tps + fps)))
            area += float(np.sum(neg * (2 * tps - pos)))
            if math.isnan(fpr95) and tps[-1] >= 0.95 * num_pos:
                fpr95 = float(fps[np.argmax(tps / num_pos >= 0.95)]) / num_neg
            tp, fp = tps[-1], fps[-1]
            high = low
        return ap / num_pos, area / (2 * num_pos * num_neg), fpr95, {}


class Sklearn(Collecting):
    def finish(self):
        from sklearn.metrics import auc, average_precision_score, roc_curve

        scores, labels = self.gathered()
        y, s = labels.numpy(), scores.numpy()
        ap = average_precision_score(y, s)
        fpr, tpr, _ = roc_curve(y, s)
        index = int(np.searchsorted(tpr, 0.95))
        return float(ap), float(auc(fpr, tpr)), float(fpr[index]), {}


class PytorchOOD(Method):
    def __init__(self) -> None:
        from pytorch_ood.metrics import OODSegmentationMetrics

        self.metric = OODSegmentationMetrics(device="cpu", void_label=255)

    def feed(self, scores, target):
        labels = target.to(torch.int64)
        labels[labels == 1] = -1  # pytorch-ood marks OOD with negative labels
        self.metric.update(scores[None], labels[None])

    def finish(self):
        r = self.metric.compute()
        return float(r["AUPR-OUT"]), float(r["AUROC"]), float(r["FPR95TPR"]), {}


class Torchmetrics(Method):
    def __init__(self) -> None:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryROC

        self.metric = MetricCollection(
            {
                "ap": BinaryAveragePrecision(ignore_index=255),
                "auroc": BinaryAUROC(ignore_index=255),
                "roc": BinaryROC(ignore_index=255),
            },
            compute_groups=True,
        )

    def feed(self, scores, target):
        self.metric.update(scores.reshape(-1), target.reshape(-1).to(torch.int64))

    def finish(self):
        r = self.metric.compute()
        fpr, tpr, _ = r["roc"]
        index = int(torch.searchsorted(tpr.contiguous(), torch.tensor([0.95], dtype=tpr.dtype)))
        return float(r["ap"]), float(r["auroc"]), float(fpr[index]), {}


WORKERS = {
    "ours": Ours,
    "exact": Exact,
    "functional": Functional,
    "sklearn": Sklearn,
    "pytorch_ood": PytorchOOD,
    "torchmetrics": Torchmetrics,
}


def run_worker(method: str, frames: int, height: int, width: int, seed: int) -> dict[str, Any]:
    """Feed ``frames`` frames to one method in this process and measure it."""
    runner = WORKERS[method]()
    make_frame(0, 8, 8, seed)  # warm up the generator code path before the baseline is read
    baseline = current_rss_mb()
    seconds, evaluated = 0.0, 0
    for index in range(frames):
        scores, target = make_frame(index, height, width, seed)
        evaluated += int((target != 255).sum())
        start = time.perf_counter()
        runner.feed(scores, target)
        seconds += time.perf_counter() - start
        del scores, target
    start = time.perf_counter()
    ap, auroc, fpr95, extra = runner.finish()
    seconds += time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "method": method,
        "frames": frames,
        "pixels": frames * height * width,
        "evaluated_pixels": evaluated,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "ap": ap,
        "auroc": auroc,
        "fpr95": fpr95,
        **extra,
    }


def spawn(method: str, frames: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--frames", str(frames)]
    command += ["--size", str(args.size[0]), str(args.size[1]), "--seed", str(args.seed)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "frames": frames, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolate(row: dict[str, Any], full_pixels: int) -> tuple[float, float]:
    """(seconds, MB above baseline) scaled from the row's pixels to ``full_pixels`` (n log n time, linear memory)."""
    ratio = full_pixels / row["pixels"]
    seconds = row["seconds"] * ratio * math.log(full_pixels) / math.log(row["pixels"])
    return seconds, (row["peak_rss_mb"] - row["baseline_rss_mb"]) * ratio


def table(rows: list[dict[str, Any]], full: dict[str, Any]) -> str:
    exact_by_frames = {r["frames"]: r for r in rows if r["method"] == "exact" and "error" not in r}
    ours = next((r for r in rows if r["method"] == "ours" and "error" not in r), None)
    lines = [
        "| method | frames (pixels) | time (s) | time at full size (s) | peak RSS (MB) | above baseline (MB) | at full "
        "size (MB) | AP | AUROC | FPR95 | abs. dAP | abs. dAUROC | abs. dFPR95 | speed-up of ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = LABELS[r["method"]]
        if "error" in r:
            lines.append(f"| {name} | {r['frames']} | failed: {' '.join(r['error'])} |" + " |" * 11)
            continue
        above = r["peak_rss_mb"] - r["baseline_rss_mb"]
        if r["method"] == "exact" and r["pixels"] != full["pixels"]:
            lines.append(
                f"| {name}, on the peers' frames | {r['frames']} ({r['evaluated_pixels']:.2e}) | {r['seconds']:.2f} | - "
                f"| {r['peak_rss_mb']:.0f} | {above:.0f} | - | {r['ap']:.6f} | {r['auroc']:.6f} | {r['fpr95']:.6f} "
                "| - | - | - | - |"
            )
            continue
        if r["pixels"] == full["pixels"]:
            full_time, full_mem, note = r["seconds"], above, ""
        else:
            full_time, full_mem = extrapolate(r, full["pixels"])
            note = " (extrapolated)"
        reference = exact_by_frames.get(r["frames"])
        deltas = ["-"] * 3
        if reference is not None and r["method"] != "exact":
            deltas = [f"{abs(r[k] - reference[k]):.1e}" for k in ("ap", "auroc", "fpr95")]
        speedup = f"{full_time / ours['seconds']:.0f}x" if ours is not None and r is not ours else "-"
        lines.append(
            f"| {name} | {r['frames']} ({r['evaluated_pixels']:.2e}) | {r['seconds']:.2f} | "
            f"{full_time:.1f}{note} | {r['peak_rss_mb']:.0f} | {above:.0f} | {full_mem:.0f}{note} | {r['ap']:.6f} | "
            f"{r['auroc']:.6f} | {r['fpr95']:.6f} | {deltas[0]} | {deltas[1]} | {deltas[2]} | {speedup} |"
        )
    return "\n".join(lines)


def accuracy_study(bits: list[int], pixels: int, seed: int) -> str:
    """Markdown table: |pooled - exact| per score distribution and bin width, with the reported bounds."""
    from densehybrid.metrics import AnomalyMetrics, _curve
    from densehybrid.metrics.functional import exact_curve

    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(pixels, generator=g) < 0.05).to(torch.int64)
    noise = torch.randn(pixels, generator=g)
    distributions = {
        "gaussian N(0,1) vs N(2,1)": noise + 2 * labels,
        "log-domain N(-2,1.5) vs N(1,1.5)": noise * 1.5 - 2 + 3 * labels,
        "gaussian shifted by +100": noise + 2 * labels + 100,
        "sigmoid probabilities p": torch.sigmoid(3 * noise + 6 * labels),
        "the same p passed as -log1p(-p)": -torch.log1p(-torch.sigmoid(3 * noise + 6 * labels)),
        "the same p in float16": torch.sigmoid(3 * noise + 6 * labels).half(),
        "minus the same p (-p, e.g. minus max-softmax)": -torch.sigmoid(3 * noise + 6 * labels),
        "probabilities near 0: sigmoid(3 N + 6 y - 16)": torch.sigmoid(3 * noise + 6 * labels - 16),
        "magnitudes exp(20 N(0,1))": torch.exp(20 * noise + 5 * labels),
    }
    lines = [
        "| scores | bits | abs. dAP (bound) | abs. dAUROC (bound) | abs. dFPR95 (bound) |",
        "|---|---|---|---|---|",
    ]
    for name, scores in distributions.items():
        curve = exact_curve(scores, labels)
        exact = (
            _curve.average_precision(curve),
            _curve.auroc(curve),
            _curve.fpr_at_index(curve, _curve.index_at_tpr(curve, 0.95)),
        )
        for b in bits:
            metric = AnomalyMetrics(bits=b)
            metric.update(scores.reshape(1, 1, -1), labels.reshape(1, 1, -1))
            r = metric.compute()
            cells = [
                f"{abs(r[key] - value):.1e} ({r[key + '_error_bound']:.1e})"
                for key, value in zip(("ap", "auroc", "fpr95"), exact)
            ]
            lines.append(f"| {name} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def functional_memory(pixels: int, seed: int) -> dict[str, Any]:
    """Peak memory of the exact functional metrics on ``pixels`` float32 scores and uint8 labels built in place.

    Run in its own process (``--functional-memory N``): the inputs are allocated once (5 bytes per pixel), the
    resident set size is read, the peak is reset (``/proc/self/clear_refs``), and the peak during
    ``average_precision``, ``auroc`` and ``fpr_at_tpr`` is read back (``VmHWM``).
    """
    from densehybrid.metrics import auroc, average_precision, fpr_at_tpr

    g = torch.Generator().manual_seed(seed)
    scores = torch.empty(pixels, dtype=torch.float32)
    labels = torch.empty(pixels, dtype=torch.uint8)
    step = 1 << 22
    for start in range(0, pixels, step):  # DenseHybrid-like scores of magnitude 5-40, ~5% anomalies scoring higher
        n = min(step, pixels - start)
        anomaly = torch.rand(n, generator=g) < 0.05
        labels[start : start + n] = anomaly.to(torch.uint8)
        scores[start : start + n] = 20 + 5 * torch.randn(n, generator=g) + 8 * anomaly
    before = current_rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    kwargs = dict(ignore_index=None, validate_args=False)
    ap, au = average_precision(scores, labels, **kwargs), auroc(scores, labels, **kwargs)
    fpr = fpr_at_tpr(scores, labels, 0.95, **kwargs)
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    return {
        "pixels": pixels,
        "input_mb": pixels * 5 / 2**20,
        "rss_before_mb": before,
        "peak_during_mb": peak,
        "seconds": seconds,
        "ap": ap,
        "auroc": au,
        "fpr95": fpr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100, help="frames for ours and the exact reference")
    parser.add_argument("--peer-frames", type=int, default=10, help="frames for sklearn/pytorch-ood/torchmetrics")
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    parser.add_argument("--json", help="also write all rows to this file")
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="instead: |pooled - exact| for several score distributions and bin widths (2**21 pixels each)",
    )
    parser.add_argument(
        "--functional-memory",
        type=float,
        metavar="N",
        help="instead: peak memory of the exact functional metrics on N pixels (e.g. 1e8), in this process",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.functional_memory:
        print(json.dumps(functional_memory(int(args.functional_memory), args.seed)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.frames, args.size[0], args.size[1], args.seed)))
        return
    if args.accuracy:
        print(accuracy_study([16, 20, 24], 1 << 21, args.seed))
        return
    rows = []
    jobs = [(m, args.peer_frames if m in PEERS else args.frames) for m in args.methods]
    if any(m in PEERS for m in args.methods) and args.peer_frames != args.frames:
        jobs.append(("exact", args.peer_frames))  # reference values on the peers' pixels
    for method, frames in jobs:
        print(f"running {method} on {frames} frames ...", file=sys.stderr, flush=True)
        rows.append(spawn(method, frames, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    full = {"pixels": args.frames * args.size[0] * args.size[1]}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for method in sorted({m for m in args.methods if m in PACKAGES}):
        try:
            versions.append(f"{PACKAGES[method]} {version(PACKAGES[method])}")
        except PackageNotFoundError:
            versions.append(f"{PACKAGES[method]} (not installed)")
    threads = args.threads or torch.get_num_threads()
    print(
        f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), numpy {np.__version__}, "
        f"{', '.join(versions)}; full size = {full['pixels']:.2e} pixels"
    )
    print(table(rows, full))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Inference overhead of DenseHybrid over the closed-set model: the official LDN-121 and DeepLabV3+ WRN38, and the
third-party families (segmentation_models_pytorch, transformers, torchvision) through their registered names.

Two paths share the same network and input and are timed interleaved in one process (the order alternates each
repetition so that thermal or load drift hits both alike):

* **closed-set**: pre-logit features -> classifier -> bilinear upsampling of the K logits (the model's own
  ``align_corners``) -> arg-max over classes.
* **DenseHybrid**: the same, plus the dataset-posterior head on the same features, upsampling of its 2 channels, the
  hybrid score ``s_H = log_softmax(ood_logits)[:, 1] - logsumexp(logits)`` at full resolution and the open-set map
  (the closed-set prediction with pixels above a threshold set to K). ``logsumexp`` reuses the per-pixel maximum
  that the arg-max computes anyway: ``m + log(sum(exp(logits - m)))``, the same stable formula as
  ``torch.logsumexp`` without its second maximum pass.

Because end-to-end timings of a 20-100 s CPU forward carry a few percent of noise, the extra work alone (head,
upsampling, score, open-set map on the already computed features and logits) is also timed, many times, and reported
relative to the closed-set time. Parameter counts come from the models (the released class counts: 12 for LDN-121,
19 for DeepLabV3+; 19, Cityscapes', for the third-party models, built at their libraries' default sizes). Weights
are random: timings do not depend on them. For the smp models the closed-set path is the smp model's own forward
(its head upsamples the logits itself, so the final resize is a no-op).

Usage::

    python benchmarks/overhead.py                       # both models at 1024x2048 on the CPU
    python benchmarks/overhead.py --device cuda --repeats 20 --warmup 5
    python benchmarks/overhead.py --models ldn121 --size 512 1024 --json overhead.json
    python benchmarks/overhead.py --models third-party --size 512 1024 --repeats 3   # needs densehybrid[smp,hf]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from densehybrid.models import create_model

#: name -> (number of classes of the released model, align_corners of the model's own upsampling)
MODELS = {"ldn121": (12, False), "deeplabv3plus_wrn38": (19, True)}
#: third-party family members at their libraries' default sizes, K = 19 (Cityscapes)
THIRD_PARTY = {
    name: (19, False)
    for name in (
        "smp:Unet:resnet34",
        "smp:FPN:resnet34",
        "smp:DeepLabV3Plus:resnet34",
        "hf:segformer",
        "hf:upernet",
        "tv:fcn_resnet50",
        "tv:lraspp_mobilenet_v3_large",
    )
}
ALL_MODELS = {**MODELS, **THIRD_PARTY}


def device_name(device: torch.device) -> str:
    """A readable description of where the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def benchmark(
    name: str, size: tuple[int, int], device: torch.device, repeats: int, warmup: int, extra_repeats: int
) -> dict:
    """Time the closed-set and the DenseHybrid forward of one model; see the module docstring."""
    num_classes, align = ALL_MODELS[name]
    model = create_model(name, num_classes=num_classes).eval().to(device)
    head_params = sum(p.numel() for p in model.logits_ood.parameters())
    closed_params = sum(p.numel() for p in model.parameters()) - head_params
    images = torch.rand(1, 3, *size, device=device)
    threshold = 0.0  # any value: the cost of the comparison does not depend on it

    def upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align)

    def closed_set() -> torch.Tensor:
        logits = upsample(model.forward_head(model.forward_features(images)))
        # `max(1)` gives the arg-max; on the CPU it is several times faster than `argmax(1)` across channels.
        return logits.max(1).indices

    def extra(
        features: torch.Tensor, logits: torch.Tensor, top: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ood_logits = upsample(model.forward_ood_head(features))
        # logsumexp(logits) reusing the per-pixel maximum that the arg-max already computed (same stable formula).
        log_likelihood = top + (logits - top.unsqueeze(1)).exp_().sum(1).log_()
        score = ood_logits.log_softmax(1)[:, 1] - log_likelihood
        return score, prediction.masked_fill(score > threshold, num_classes)

    def densehybrid() -> tuple[torch.Tensor, torch.Tensor]:
        features = model.forward_features(images)
        logits = upsample(model.forward_head(features))
        top, prediction = logits.max(1)
        return extra(features, logits, top, prediction)

    closed_times, hybrid_times = [], []
    with torch.inference_mode():
        # Warm-up forwards (at least one): their features and logits also serve to time the extra work alone.
        for _ in range(max(warmup, 1)):
            features = model.forward_features(images)
            logits = upsample(model.forward_head(features))
            top, prediction = logits.max(1)
        job = functools.partial(extra, features, logits, top, prediction)
        job()
        extra_times = [_timed(job, device)[0] for _ in range(extra_repeats)]
        del job, features, logits, top, prediction  # free them before the end-to-end timings
        for r in range(repeats):
            pair = [("closed", closed_set), ("hybrid", densehybrid)]
            for label, fn in pair if r % 2 == 0 else reversed(pair):
                seconds, _ = _timed(fn, device)
                (closed_times if label == "closed" else hybrid_times).append(seconds)
    closed_ms, hybrid_ms = statistics.median(closed_times) * 1e3, statistics.median(hybrid_times) * 1e3
    extra_ms = statistics.median(extra_times) * 1e3
    ratios = [h / c for c, h in zip(closed_times, hybrid_times)]
    return {
        "model": name,
        "num_classes": num_classes,
        "size": list(size),
        "device": device_name(device),
        "repeats": repeats,
        "warmup": warmup,
        "closed_params": closed_params,
        "head_params": head_params,
        "closed_ms": closed_ms,
        "hybrid_ms": hybrid_ms,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "extra_ms": extra_ms,
        "extra_min_ms": min(extra_times) * 1e3,
        "extra_over_closed": extra_ms / closed_ms,
        "closed_times_s": closed_times,
        "hybrid_times_s": hybrid_times,
    }


def markdown(rows: list[dict]) -> str:
    """The results as the table in ``docs/models.md``."""
    lines = [
        "| model (K) | input | closed-set params | + head params | closed-set ms | DenseHybrid ms | ratio "
        "(median, min-max) | extra work alone ms, median (min) | extra / closed-set |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['num_classes']}) | {r['size'][0]}x{r['size'][1]} | {r['closed_params']:,} | "
            f"+{r['head_params']:,} ({r['head_params'] / r['closed_params']:.4%}) | {r['closed_ms']:,.0f} | "
            f"{r['hybrid_ms']:,.0f} | {r['ratio_median']:.4f} ({r['ratio_min']:.4f}-{r['ratio_max']:.4f}) | "
            f"{r['extra_ms']:,.1f} ({r['extra_min_ms']:,.1f}) | {r['extra_over_closed']:.3%} |"
        )
    devices = sorted({r["device"] for r in rows})
    runs = sorted({f"{r['repeats']} interleaved pairs after {max(r['warmup'], 1)} warm-up forward(s)" for r in rows})
    lines.append("")
    lines.append(f"Device: {'; '.join(devices)}. Timing: {'; '.join(runs)}; batch 1, float32, inference mode.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=[*ALL_MODELS, "third-party"],
        help="models to time ('third-party': every third-party family member listed in THIRD_PARTY)",
    )
    parser.add_argument("--size", nargs=2, type=int, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved closed-set/DenseHybrid pairs per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed closed-set forwards before timing (>= 1 run)")
    parser.add_argument("--extra-repeats", type=int, default=10, help="timings of the extra work alone")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.extra_repeats < 1:
        parser.error("Expected --repeats >= 1, --warmup >= 0 and --extra-repeats >= 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    names = [n for entry in args.models for n in (THIRD_PARTY if entry == "third-party" else [entry])]
    for name in dict.fromkeys(names):
        rows.append(benchmark(name, tuple(args.size), device, args.repeats, args.warmup, args.extra_repeats))
        print(f"done: {name}\n{markdown(rows[-1:]).splitlines()[2]}", flush=True)  # a killed run keeps its rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""Cost of synthetic negatives: flow sampling throughput and the joint step against a real-negative step.

Two measurements, in one process:

* **Sampling throughput**: patches per second that ``DenseFlow.sample`` draws (no gradients, as in the segmenter
  step) at 64×64 and 128×128 pixels, for the chosen flow configuration.
* **Step cost**: one optimisation step of the same small segmenter (the MobileNetV3 ladder, 32 decoder channels) on
  the same batch with (a) one *real* negative pasted per image (:func:`densehybrid.negatives.paste_negatives`, the
  DenseHybrid loss, Adam step) and (b) the released *joint* iteration (:func:`densehybrid.engine.flow_joint.
  flow_joint_step`: segmenter step on no-grad flow patches, then the flow step on new differentiable patches with
  JSD + MLE and an Adamax step). The two are timed interleaved (the order alternates each repetition) and their
  median times are reported with the ratio joint / real. The patch size is fixed (``--patch``) so that the
  ratio does not depend on random sizes; negatives for (a) are random crops held in memory (no data loading).

Weights are random: timings do not depend on them. The default flow is the released configuration for the sampling
throughput and ``DenseFlow.small()`` for the step cost (the released flow's step takes minutes on a CPU).

Usage::

    python benchmarks/flows.py                                  # CPU, defaults below
    python benchmarks/flows.py --device cuda --repeats 10 --step-flow released --crop 512 --patch 64
    python benchmarks/flows.py --json flows.json
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

from densehybrid.engine.flow_joint import build_flow_optimizer, flow_joint_step
from densehybrid.flows import DenseFlow, FlowNegatives
from densehybrid.losses import DenseHybridLoss
from densehybrid.models import create_model
from densehybrid.negatives import paste_negatives


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def make_flow(name: str, device: torch.device) -> DenseFlow:
    torch.manual_seed(0)
    flow = DenseFlow() if name == "released" else DenseFlow.small()
    return flow.to(device)


def sampling_throughput(flow: DenseFlow, sizes: list[int], count: int, repeats: int, device: torch.device) -> dict:
    """Median patches/s of ``flow.sample(count, (s, s))`` per size."""
    flow.eval()
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    for size in sizes:
        _timed(functools.partial(flow.sample, 1, (size, size), generator=g), device)  # warm-up
        draw = functools.partial(flow.sample, count, (size, size), generator=g)
        times = [_timed(draw, device) for _ in range(repeats)]
        out[size] = {"patches_per_s": count / statistics.median(times), "seconds": times, "count": count}
    return out


def step_cost(
    flow: DenseFlow, crop: int, batch: int, patch: int, num_classes: int, repeats: int, device: torch.device
) -> dict:
    """Median seconds of a real-negative step and of the joint step on the same segmenter and batch."""
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=num_classes, decoder_channels=32).to(device).train()
    images = torch.rand(batch, 3, crop, crop, device=device)
    target = torch.randint(0, num_classes, (batch, crop, crop), device=device)
    real = torch.rand(batch, 3, crop // 2, crop // 2, device=device)
    real_segments = torch.randint(0, 4, (batch, crop // 2, crop // 2), device=device)
    loss = DenseHybridLoss(beta=0.01, lambda_=0.1)
    seg_opt = torch.optim.Adam(model.parameters(), lr=1e-7, eps=1e-7)
    flow_opt = build_flow_optimizer(flow, lr=1e-7)
    source = FlowNegatives(flow, min_side=patch, max_side=patch)
    g = torch.Generator(device=device).manual_seed(0)
    flow.train()

    def real_step() -> None:
        seg_opt.zero_grad(set_to_none=True)
        pasted = paste_negatives(images, target, real, real_segments, generator=g)
        out = model(pasted.images, output_size=(crop, crop))
        loss(out.logits, out.ood_logits, pasted.target, pasted.negative_mask).total.backward()
        seg_opt.step()

    def joint_step() -> None:
        flow_joint_step(
            model,
            flow,
            images,
            target,
            loss=loss,
            segmenter_optimizer=seg_opt,
            flow_optimizer=flow_opt,
            negatives=source,
            generator=g,
        )

    real_step()
    joint_step()  # warm-up (and ActNorm initialisation)
    times: dict[str, list[float]] = {"real": [], "joint": []}
    for r in range(repeats):
        order = ("real", "joint") if r % 2 == 0 else ("joint", "real")
        for name in order:
            times[name].append(_timed(real_step if name == "real" else joint_step, device))
    real_s, joint_s = statistics.median(times["real"]), statistics.median(times["joint"])
    return {"real_step_s": real_s, "joint_step_s": joint_s, "ratio": joint_s / real_s, "seconds": times}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample-flow", choices=["released", "small"], default="released")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--count", type=int, default=4, help="patches per sampling call")
    parser.add_argument("--step-flow", choices=["released", "small"], default="small")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64, help="patch side of the joint step (fixed)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {"device": device_name(device), "args": vars(args)}

    flow = make_flow(args.sample_flow, device)
    result["sampling"] = {
        "flow": args.sample_flow,
        **sampling_throughput(flow, args.sizes, args.count, args.repeats, device),
    }
    print(f"# {result['device']}")
    for size in args.sizes:
        print(
            f"sampling ({args.sample_flow} flow) {size}x{size}: {result['sampling'][size]['patches_per_s']:.2f} patches/s"
        )

    flow = make_flow(args.step_flow, device)
    cost = step_cost(flow, args.crop, args.batch, args.patch, args.classes, args.repeats, device)
    result["step"] = {"flow": args.step_flow, **cost}
    print(
        f"step (batch {args.batch}, crop {args.crop}, patch {args.patch}, {args.step_flow} flow): "
        f"real {cost['real_step_s'] * 1e3:.0f} ms, joint {cost['joint_step_s'] * 1e3:.0f} ms, "
        f"ratio {cost['ratio']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

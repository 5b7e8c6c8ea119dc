"""Memory per process of the released training recipes: the fixed part computed from the models, and the activations
of one training pass at the released crop with a batch of 1, measured on the CPU.

For each released recipe (``densehybrid recipes``) this builds its model (``model.name`` with ``model.kwargs``) and,
for the ``-flow`` recipes and ``denseflow-pretrain``, the DenseFlow of ``flow.config``, then reports

* **fixed**: parameters (trainable / all) and, in float32, the bytes of the weights, of their gradients, of the
  optimiser's state (Adam/Adamax: 2 tensors per trainable parameter, SGD with momentum: 1) and of the gradient
  buckets of ``DistributedDataParallel`` (one more copy of the trainable parameters' gradients): every rank holds all
  of them, whatever the number of ranks;
* **one pass**: the rise of the resident memory (``VmHWM`` after a reset through ``/proc/self/clear_refs``, minus
  ``VmRSS`` before) over one ``train()`` forward and backward pass on one random image at the released crop (the
  full frame where the recipe does not crop: 720x1280 for StreetHazards), each network in its own process, with a
  fixed glibc mmap threshold so that freed tensors leave the resident memory, and BatchNorm on its running statistics
  (a batch of 1 has none at a 1x1 pooling grid; the tensors kept for the backward pass are the same). The rise minus
  the gradients is the memory of the activations kept for the backward pass (with the recipe's gradient
  checkpointing) and the pass's temporaries, per image. A GPU adds its own workspaces (cuDNN, the caching
  allocator's rounding), so take it as an estimate; the last column estimates a rank as the fixed part plus
  ``--batch-per-rank`` times the activations.

The segmentation pass uses the cross-entropy of the logits plus the mean of the dataset-posterior logits (the
DenseHybrid objective's tensors, without the pasted negatives); DiCNet the distillation loss of the student; the
flow its bits per dimension on one patch.

Usage::

    python benchmarks/memory.py                               # every released recipe (minutes on a CPU)
    python benchmarks/memory.py --recipe ldn121-streethazards --json memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

#: Released recipes -> (network, input height, width) per measured network: "model" is the recipe's model, "flow"
#: its DenseFlow (the largest patch of the joint fine-tuning, 216 px, or the pre-training crop).
RELEASED = {
    "ldn121-streethazards": [("model", 768, 768)],
    "ldn121-streethazards-finetune": [("model", 768, 768)],
    "ldn121-streethazards-finetune-flow": [("model", 768, 768), ("flow", 216, 216)],
    "dlv3p-cityscapes-finetune": [("model", 512, 512)],
    "dlv3p-cityscapes-finetune-flow": [("model", 512, 512), ("flow", 216, 216)],
    "segmenter-coco20": [("model", 512, 512)],
    "segmenter-coco20-finetune": [("model", 512, 512)],
    "segmenter-coco20-finetune-flow": [("model", 512, 512), ("flow", 216, 216)],
    "dicnet-streethazards": [("model", 720, 1280)],
    "denseflow-pretrain": [("flow", 64, 64)],
}
_STATES = {"adam": 2, "adamw": 2, "adamax": 2, "sgd": 1}


def _recipe(name: str) -> dict:
    from densehybrid.recipes import load_recipe

    return load_recipe(name)


def _network(recipe: dict, which: str) -> torch.nn.Module:
    if which == "flow":
        from densehybrid.recipes.flow_methods import build_flow

        return build_flow({**recipe["flow"], "init": ""})[0]
    from densehybrid.models import create_model

    model = recipe["model"]
    kwargs = {k: v for k, v in model["kwargs"].items() if k not in ("pretrained", "pretrained_backbone")}
    return create_model(model["name"], num_classes=model["num_classes"] or 19, **kwargs)


def _optimizer(recipe: dict, which: str) -> str:
    if which == "flow":
        return "adamax"  # both the pre-training and the joint fine-tuning train the flow with Adamax
    return recipe["optim"]["optimizer"]


def _fixed(network: torch.nn.Module, optimizer: str) -> dict:
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    mib = 4 / 2**20
    return {
        "parameters": total,
        "trainable": trainable,
        "weights_mib": total * mib,
        "gradients_mib": trainable * mib,
        "optimizer_mib": _STATES[optimizer] * trainable * mib,
        "ddp_buckets_mib": trainable * mib,
    }


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss(network: torch.nn.Module, which: str, height: int, width: int) -> torch.Tensor:
    if which == "flow":
        return network.bits_per_dim(torch.randint(0, 256, (1, 3, height, width)))
    out = network(torch.rand(1, 3, height, width))
    if hasattr(out, "student_features"):
        from densehybrid.models.dicnet import distillation_loss

        return distillation_loss(out.student_features, out.teacher_features.detach())
    target = torch.randint(0, out.logits.shape[1], (1, *out.logits.shape[-2:]))
    return torch.nn.functional.cross_entropy(out.logits, target) + out.ood_logits.mean()


def measure(recipe_name: str, which: str, height: int, width: int) -> dict:
    """One network of one recipe, in this process: the fixed part and the rise of one forward and backward pass."""
    torch.manual_seed(0)
    recipe = _recipe(recipe_name)
    network = _network(recipe, which).train()
    for module in network.modules():  # a batch of 1 has no statistics at a 1x1 pooling grid; same saved tensors
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    optimizer_name = _optimizer(recipe, which)
    fixed = _fixed(network, optimizer_name)
    before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    _loss(network, which, height, width).backward()
    rise = (_memory_kib("VmHWM") - before) / 1024
    return {
        "recipe": recipe_name,
        "network": f"{which} ({type(network).__name__})",
        "input": f"{height}x{width}",
        "optimizer": optimizer_name,
        **fixed,
        "forward_backward_rise_mib": rise,
        "activations_mib": rise - fixed["gradients_mib"],  # what the pass kept beyond the gradients
        "rss_before_mib": before / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", choices=sorted(RELEASED), default=None, help="repeatable")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--batch-per-rank", type=int, default=4, help="images per rank of the last column")
    parser.add_argument("--one", nargs=4, metavar=("RECIPE", "NETWORK", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, which, height, width = args.one
        print(json.dumps(measure(name, which, int(height), int(width))))
        return
    rows = []
    print("| recipe | network | input | parameters (M) | optimiser | weights + grads + optimiser state + DDP buckets "
          f"(MiB) | forward + backward, 1 image: rise (MiB) | activations per image (MiB) | estimate per rank, "
          f"{args.batch_per_rank} images per rank (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.recipe or list(RELEASED):
        for which, height, width in RELEASED[name]:
            command = [sys.executable, __file__, "--one", name, which, str(height), str(width)]
            # A fixed mmap threshold returns every freed tensor to the system, so the resident memory follows the
            # live tensors (glibc's adaptive threshold would keep freed ones resident).
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)
            rows.append(row)
            fixed = row["weights_mib"] + row["gradients_mib"] + row["optimizer_mib"] + row["ddp_buckets_mib"]
            per_gpu = fixed + args.batch_per_rank * row["activations_mib"]
            print(f"| {name} | {row['network']} | {row['input']} | {row['parameters'] / 1e6:.1f} | {row['optimizer']} | "
                  f"{fixed:.0f} | {row['forward_backward_rise_mib']:.0f} | {row['activations_mib']:.0f} | "
                  f"{per_gpu:.0f} |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Speed of ``densehybrid predict`` and of the exported ONNX graph, as ratios measured in one process.

1. **predict overhead** at 1024x2048 on the CPU: ``predict_files`` (decoding PNG files, the forward pass, the score
   and open-set map, colouring, writing the heatmap, segmentation and overlay PNGs and the JSONL line, as a
   pipeline) against the bare ``model(images)`` forward on the same images already in memory. Goal: at most 10%
   overhead.
2. **ONNX Runtime vs PyTorch eager** at 512x1024 on the CPU for the demo's model (``ladder_resnet18``) and LDN-121:
   the exported graph (scores and labels) in ONNX Runtime against the same ``OpenSetModel`` in eager PyTorch.
3. **predict from an exported graph vs from the checkpoint** at 512x1024 on the CPU (``ladder_resnet18``):
   ``densehybrid predict``'s ``predict_files`` with ``Predictor.from_checkpoint(model.onnx)`` against
   ``Predictor.from_checkpoint(model.pt)``, on the same PNG files, images per second.

Weights are random (timings do not depend on them); both paths of a comparison run interleaved, the order
alternating each repetition, with the same number of threads. Keep ``--repeats`` small on a shared machine.

Usage::

    python benchmarks/predict.py                         # parts 1-3, 3 repetitions
    python benchmarks/predict.py --part onnx --repeats 5 --json predict-bench.json
    python benchmarks/predict.py --part parity           # export parity of the three models, both formats
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densehybrid.export import export_model, load_exported
from densehybrid.models import create_model
from densehybrid.openset import OpenSetModel
from densehybrid.predict import Predictor, predict_files

DEMO_MODEL = "ladder_resnet18"


def _median_seconds(samples: list[float]) -> float:
    return statistics.median(samples)


def predict_overhead(model_name: str, size: tuple[int, int], images: int, repeats: int, threads: int) -> dict:
    """Seconds per image of ``predict_files`` and of the bare forward, on ``images`` random PNG files."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).eval()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(images)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, array in enumerate(arrays):
            Image.fromarray(array).save(folder / f"{i}.png")
        predictor = Predictor(model, threshold=0.0, display_range=(-5.0, 0.0), device="cpu")
        tensors = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in arrays]
        with torch.no_grad():
            model(tensors[0])  # warm-up
        bare, full = [], []
        for r in range(repeats):
            order = ("bare", "predict") if r % 2 == 0 else ("predict", "bare")
            for path in order:
                start = time.perf_counter()
                if path == "bare":
                    with torch.no_grad():
                        for t in tensors:
                            model(t)
                    bare.append((time.perf_counter() - start) / images)
                else:
                    predict_files(predictor, [folder], Path(tmp) / "out", num_workers=0, progress=False, overwrite=True)
                    full.append((time.perf_counter() - start) / images)
    forward, predicted = _median_seconds(bare), _median_seconds(full)
    return {
        "model": model_name,
        "size": list(size),
        "images": images,
        "repeats": repeats,
        "threads": threads,
        "forward_s_per_image": forward,
        "predict_s_per_image": predicted,
        "forward_images_per_s": 1 / forward,
        "predict_images_per_s": 1 / predicted,
        "overhead": predicted / forward - 1,
    }


def onnx_vs_eager(model_name: str, num_classes: int, size: tuple[int, int], repeats: int, threads: int) -> dict:
    """Median latency of one (1, 3, H, W) image through the exported graph: ONNX Runtime vs eager PyTorch."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes).eval()
    graph = OpenSetModel(model, threshold=0.0).eval()
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, Path(tmp) / "model.onnx", "onnx", threshold=0.0)
        run = load_exported(path, "onnx", threads=threads)
        array = images.numpy()
        run(array)  # warm-up
        with torch.no_grad():
            graph(images)
        eager, ort = [], []
        for r in range(repeats):
            order = ("eager", "ort") if r % 2 == 0 else ("ort", "eager")
            for which in order:
                start = time.perf_counter()
                if which == "eager":
                    with torch.no_grad():
                        graph(images)
                    eager.append(time.perf_counter() - start)
                else:
                    run(array)
                    ort.append(time.perf_counter() - start)
    eager_s, ort_s = _median_seconds(eager), _median_seconds(ort)
    return {
        "model": model_name,
        "size": list(size),
        "repeats": repeats,
        "threads": threads,
        "eager_s": eager_s,
        "onnxruntime_s": ort_s,
        "speedup": eager_s / ort_s,
    }


def exported_vs_checkpoint(model_name: str, size: tuple[int, int], images: int, repeats: int, threads: int) -> dict:
    """Images per second of ``predict_files`` on the checkpoint and on its ONNX export, same PNG files."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        checkpoint = Path(tmp) / "model.pt"
        torch.save(
            {"model": model.state_dict(), "model_name": model_name, "model_kwargs": model.model_kwargs}, checkpoint
        )
        onnx_path = export_model(model, Path(tmp) / "model.onnx", "onnx", threshold=0.0)
        options = {"device": "cpu", "display_range": (-5.0, 0.0)}
        predictors = {
            "checkpoint": Predictor.from_checkpoint(checkpoint, threshold=0.0, **options),
            "onnx": Predictor.from_checkpoint(onnx_path, **options),
        }
        times: dict[str, list[float]] = {name: [] for name in predictors}
        for name, predictor in predictors.items():  # warm-up
            predict_files(predictor, [folder], Path(tmp) / name, progress=False, overwrite=True)
        for r in range(repeats):
            order = list(predictors) if r % 2 == 0 else list(reversed(predictors))
            for name in order:
                start = time.perf_counter()
                predict_files(predictors[name], [folder], Path(tmp) / name, progress=False, overwrite=True)
                times[name].append((time.perf_counter() - start) / images)
    checkpoint_s, onnx_s = _median_seconds(times["checkpoint"]), _median_seconds(times["onnx"])
    return {
        "model": model_name,
        "size": list(size),
        "images": images,
        "repeats": repeats,
        "threads": threads,
        "checkpoint_images_per_s": 1 / checkpoint_s,
        "onnx_images_per_s": 1 / onnx_s,
        "speedup": checkpoint_s / onnx_s,
    }


def parity(model_name: str, num_classes: int, fmt: str) -> dict:
    """The parity report of one export (random weights, threshold at the median score of a random image)."""
    from densehybrid.export import check_parity, eager_reference

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes).eval()
    scores, _, _ = eager_reference(model, torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(1)))
    threshold = float(scores.median())
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, Path(tmp) / f"model.{fmt}", fmt, threshold=threshold)
        report = check_parity(model, path, fmt, threshold=threshold)
    return {"model": model_name, **report.to_dict()}


PARITY_MODELS = ((DEMO_MODEL, 10), ("ldn121", 12), ("deeplabv3plus_wrn38", 19))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "predict", "onnx", "exported", "parity"), default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=2, help="images per predict repetition")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"torch": torch.__version__, "threads": args.threads}
    if args.part in ("all", "predict"):
        r = predict_overhead(DEMO_MODEL, (1024, 2048), args.images, args.repeats, args.threads)
        results["predict"] = r
        print(
            f"predict {r['model']} 1024x2048: bare forward {r['forward_images_per_s']:.3f} images/s, predict "
            f"{r['predict_images_per_s']:.3f} images/s, overhead {100 * r['overhead']:.1f}% (goal <= 10%)"
        )
    if args.part in ("all", "onnx"):
        results["onnx"] = []
        for name, k in ((DEMO_MODEL, 10), ("ldn121", 12)):
            r = onnx_vs_eager(name, k, (512, 1024), args.repeats, args.threads)
            results["onnx"].append(r)
            print(
                f"onnx {name} 512x1024: eager {r['eager_s']:.3f} s, ONNX Runtime {r['onnxruntime_s']:.3f} s, "
                f"speed-up x{r['speedup']:.2f}"
            )
    if args.part in ("all", "exported"):
        r = exported_vs_checkpoint(DEMO_MODEL, (512, 1024), max(args.images, 2), args.repeats, args.threads)
        results["exported"] = r
        print(
            f"predict {r['model']} 512x1024: from the checkpoint {r['checkpoint_images_per_s']:.3f} images/s, from "
            f"ONNX {r['onnx_images_per_s']:.3f} images/s, x{r['speedup']:.2f}"
        )
    if args.part == "parity":
        results["parity"] = []
        for name, k in PARITY_MODELS:
            for fmt in ("onnx", "torchscript"):
                r = parity(name, k, fmt)
                results["parity"].append(r)
                errors = ", ".join(f"{e:.1e}" for e in r["relative_error"])
                print(
                    f"parity {name} {fmt}: {'passed' if r['passed'] else 'FAILED'}, relative error {errors}, label "
                    f"mismatches {r['label_mismatches']}, exempt pixels {r['tolerated_pixels']}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""``densehybrid export``: a checkpoint as an ONNX or TorchScript file, checked against PyTorch."""

from __future__ import annotations

import argparse

from densehybrid.cli._common import add_model_arguments, add_overwrite_argument, naming_checkpoint, positive_int

HELP = "export a checkpoint to ONNX or TorchScript (scores and open-set labels), with a parity check"
DESCRIPTION = (
    "Write a graph from RGB images (N, 3, H, W) float32 in [0, 1] (dynamic N, H, W; normalisation inside) to the "
    "anomaly score map 'scores' (N, H, W) and the open-set label map 'labels' (N, H, W) int64, unknown = K. The "
    "threshold is baked in when the checkpoint is calibrated (densehybrid calibrate) or --threshold is given; "
    "otherwise 'labels' is the closed-set argmax. Afterwards the file is run (ONNX Runtime or TorchScript) on random "
    "images of two sizes and compared with PyTorch: score relative error <= 1e-4 and equal labels except at pixels "
    "within 1e-4 of the threshold. An existing --out is replaced only with --overwrite (never the checkpoint); the "
    "file is written atomically. ONNX needs the extra: pip install 'densehybrid[export]'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.export import DEFAULT_OPSET, EXPORT_FORMATS

    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="file format")
    parser.add_argument("--out", required=True, help="file to write (e.g. model.onnx, model.pt)")
    add_overwrite_argument(parser, "an existing --out file")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--score", default=None, help="anomaly score (default: the calibrated one, else densehybrid)")
    parser.add_argument("--threshold", type=float, default=None, help="open-set threshold to bake in (overrides)")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check after export")


def run(args: argparse.Namespace) -> int:
    from densehybrid.engine.outputs import check_output_file
    from densehybrid.export import check_parity, export_model, require_onnx
    from densehybrid.predict import Predictor
    from densehybrid.scores import get_score

    if args.format == "onnx":
        require_onnx()  # before the checkpoint is read
    if args.score is not None:
        get_score(args.score)
    out = check_output_file(args.out, inputs=[args.checkpoint], overwrite=args.overwrite)
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        device="cpu",
        model=args.model,
        num_classes=args.num_classes,
        score=args.score,
        threshold=args.threshold,
    )
    if predictor.model is None:
        raise ValueError(
            f"Expected a checkpoint for --checkpoint, but {args.checkpoint!r} is already an exported graph "
            f"({predictor.inference})."
        )
    model, score, threshold = predictor.model, predictor.score, predictor.threshold
    extra = {
        "class_names": predictor.class_names,
        "palette": predictor.palette.tolist(),
        "display_range": list(predictor.display_range) if predictor.display_range is not None else None,
    }
    with naming_checkpoint(args.checkpoint):
        path = export_model(model, out, args.format, score=score, threshold=threshold, opset=args.opset, metadata=extra)
    where = f"threshold {threshold:.6g} ({predictor.threshold_source})" if threshold is not None else "no threshold"
    print(f"exported {getattr(model, 'model_name', 'model')} ({args.format}, score {score}, {where}) to {path}")
    if predictor.window is not None:
        print(
            f"note: the graph runs the whole image; this model's released inference uses {predictor.window.describe()}"
            " (densehybrid predict/evaluate with --window auto)"
        )
    if args.no_parity:
        return 0
    with naming_checkpoint(args.checkpoint):
        report = check_parity(model, path, args.format, score=score, threshold=threshold)
    print("\n".join(report.lines()))
    return 0 if report.passed else 1

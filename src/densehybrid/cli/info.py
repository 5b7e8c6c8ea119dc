"""``densehybrid info CHECKPOINT``: what a checkpoint file holds, read without building the model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

HELP = "show what a checkpoint holds: architecture, classes, method, calibration, recipe, training progress"
DESCRIPTION = (
    "Read a checkpoint (weights-only, no model is built, so it is fast for any size) and print its format version "
    "and layout, the architecture (registered model name, constructor arguments, number of classes and parameters, "
    "input normalisation), the class names with the palette and ignore id, the training method, the open-set "
    "calibration (score, threshold, rule, display range) when calibrated, the resolved recipe, and the training "
    "progress (epoch, step, whether the file can resume a run). Reads the current format, every earlier layout of "
    "densehybrid and released checkpoints (which record only their weights)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt, .pth or .safetensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _values(values: Any) -> str:
    if isinstance(values, list):
        return "[" + ", ".join(_number(v) for v in values) + "]"
    return json.dumps(values) if isinstance(values, (str, Mapping)) else _number(values)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The text of ``densehybrid info`` for :meth:`~densehybrid.models.checkpoint.Checkpoint.summary`."""
    arch, classes, training = summary["architecture"], summary["classes"], summary["training"]
    lines = [f"checkpoint     {summary['path']} (format_version {summary['format_version']}, {summary['layout']})"]
    model = arch["model"] or arch["class"] or "not recorded (pass --model to the commands)"
    k = f", {arch['num_classes']} classes" if arch["num_classes"] is not None else ""
    lines.append(f"architecture   {model}{k}, {arch['parameters'] / 1e6:.2f} M parameters in {arch['tensors']} tensors")
    kwargs = {key: value for key, value in (arch["kwargs"] or {}).items() if key != "num_classes"}
    if kwargs:
        lines.append(f"  arguments    {json.dumps(kwargs)}")
    if arch["normalization"]:
        norm = arch["normalization"]
        mean, std = _values(norm.get("mean")), _values(norm.get("std"))
        lines.append(f"  input        mean {mean}, std {std} (applied inside the model)")
    names = classes["names"]
    if names:
        lines.append(f"classes        {len(names)}: {', '.join(names)} (ignore id {classes['ignore_index']})")
    else:
        lines.append(f"classes        names not recorded (ignore id {classes['ignore_index']})")
    if classes["palette"]:
        colours = ", ".join("#" + "".join(f"{int(v):02x}" for v in colour) for colour in classes["palette"])
        lines.append(f"  palette      {colours}")
    lines.append(f"method         {summary['method'] or 'not recorded'}")
    calibration = summary["calibration"]
    if calibration:
        rule = calibration.get("method", "tpr")
        if rule == "tpr" and calibration.get("target_tpr") is not None:
            rule = f"first threshold with TPR > {calibration['target_tpr']:g}"
        where = (
            f" on {calibration.get('benchmark', '?')}/{calibration.get('split', '?')}"
            if calibration.get("benchmark")
            else ""
        )
        low, high = calibration["display_range"]
        lines.append(
            f"calibration    score {calibration['score']}, threshold {_number(calibration['threshold'])} ({rule})"
            f"{where}, display range [{_number(low)}, {_number(high)}]"
        )
    else:
        lines.append("calibration    none (densehybrid calibrate adds one)")
    recipe = summary["recipe"]
    if recipe:
        lines.append(f"recipe         {recipe.get('name') or '(unnamed)'} (method {recipe.get('method', '?')})")
        for section, table in recipe.items():
            if isinstance(table, Mapping):
                items = ", ".join(f"{key}={_values(value)}" for key, value in table.items() if value not in ("", {}))
                lines.append(f"  {section:12s} {items}")
    else:
        lines.append("recipe         none recorded")
    if training["epoch"] is None and training["global_step"] is None:
        lines.append("training       no progress recorded")
    else:
        of = f"/{training['epochs']}" if training["epochs"] else ""
        state = "resumable" if training["resumable"] else "not resumable"
        lines.append(f"training       epoch {training['epoch']}{of}, step {training['global_step']} ({state})")
        last = {k: v for k, v in training["last_epoch"].items() if isinstance(v, (int, float)) and k != "epoch"}
        if last:
            lines.append("  last epoch   " + ", ".join(f"{k} {_number(v)}" for k, v in last.items()))
    return lines


def run(args: argparse.Namespace) -> int:
    from densehybrid.models.checkpoint import read_checkpoint

    summary = read_checkpoint(args.checkpoint).summary()
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False, default=str))
    else:
        print("\n".join(summary_lines(summary)))
    return 0

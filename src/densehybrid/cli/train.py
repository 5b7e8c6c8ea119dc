"""``densehybrid train``: train or fine-tune a model with a recipe (a released one, or a recipe file of your own)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from densehybrid.cli._common import add_label_check_argument, device_option, json_ready, positive_int, write_json

HELP = "train or fine-tune a model with a recipe (the released ones: `densehybrid recipes`)"
DESCRIPTION = (
    "Train as a recipe says: the released recipes follow the released DenseHybrid training scripts, `generic` trains "
    "any registered model on your own folder tree. Writes last.pt (every run.checkpoint_every steps and at each "
    "epoch end), best.pt (best validation epoch), log.jsonl, TensorBoard events and train-summary.json into --out. "
    "It prints a start-up summary (data, classes, model and its weights, negatives, and every setting with where it "
    'came from: the recipe, or derived from the data, the machine or --init for the recipe\'s "auto" values), one '
    "line per epoch (loss, validation, time, ETA), and at the end the kept checkpoint and the next command. "
    "Re-running the same command resumes an unfinished run; Ctrl-C stops after the current step with a checkpoint. "
    "Multi-GPU: torchrun --nproc-per-node N -m densehybrid train ... (optim.batch_size is the global batch)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", required=True, help="a recipe name (see `densehybrid recipes`) or a .toml/.json file"
    )
    parser.add_argument("--data-root", default=None, help="the training dataset's root (see docs/training.md)")
    parser.add_argument("--neg-root", default=None, help="the negatives' root (ADE20k, or any image folder)")
    parser.add_argument("--init", default=None, help="weights to start from (overrides the recipe's model.init)")
    parser.add_argument(
        "--flow-init",
        default=None,
        help="flow weights for recipes with a [flow] section (overrides flow.init): a released DenseFlow file or the "
        "last.pt of a denseflow-pretrain or flow fine-tuning run",
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/RECIPE)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="override a recipe key, repeatable (e.g. optim.lr=1e-5, augment.crop=256, model.kwargs.image_size=256)",
    )
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop after N steps in total (smoke runs)")
    parser.add_argument(
        "--accumulate",
        type=positive_int,
        default=1,
        metavar="N",
        help="split each process's share of optim.batch_size into N slices whose gradients are accumulated (less "
        "memory; 1 process with --accumulate 2 trains as 2 processes; a run may resume with another N)",
    )
    parser.add_argument("--device", type=device_option, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if --out holds an unfinished run (its files are moved into --out/earlier-run-STAMP)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    add_label_check_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


class _StopFlag:
    """Set by the first SIGINT (the run stops after the current step); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def handle(self, signum, frame) -> None:
        from densehybrid.engine.runtime import request_stop

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        request_stop()  # a long step (many negative pastes) stops too, dropping the unfinished step
        print("\nStopping after this step (Ctrl-C again to abort without a checkpoint)...", file=sys.stderr)


def _console(line: str) -> None:
    """A line of the run's console on stdout, clear of the progress bars on stderr."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)


def run(args: argparse.Namespace) -> int:
    from densehybrid.engine import distributed
    from densehybrid.recipes import load_recipe
    from densehybrid.recipes.run import (
        SUMMARY_NAME,
        RunInputs,
        check_output_dir,
        closing_lines,
        input_paths,
        train_recipe,
    )

    recipe = load_recipe(args.recipe, args.overrides or [])
    if args.flow_init:
        if "flow" not in recipe:
            raise ValueError(
                f"Expected a recipe with a [flow] section for `--flow-init`, but recipe {recipe['name']!r} (method "
                f"{recipe['method']!r}) trains no flow."
            )
        recipe["flow"]["init"] = args.flow_init
    if args.void_unknown_ids:
        if recipe["data"]["dataset"] == "folder":
            raise ValueError(
                "Expected `--void-unknown-ids` with a benchmark dataset, but the recipe trains on a folder tree, whose "
                "label values are checked against its classes.txt (255 marks pixels to ignore)."
            )
        recipe["data"]["options"]["void_unknown_ids"] = True
    if args.print_config:
        print(json.dumps(json_ready(recipe), indent=2))
        return 0
    out = Path(args.out) if args.out else Path("runs") / recipe["name"]
    check_output_dir(out, input_paths(recipe, args.data_root, args.neg_root, args.init))
    inputs = RunInputs(
        data_root=Path(args.data_root).expanduser() if args.data_root else None,
        neg_root=Path(args.neg_root).expanduser() if args.neg_root else None,
        init=args.init or "",
        out=out,
        max_steps=args.max_steps,
        accumulate=args.accumulate,
        device=args.device,
        progress=not args.no_progress,
        resume=not args.no_resume,
        console=_console,
    )
    flag = _StopFlag()
    previous = signal.signal(signal.SIGINT, flag.handle)
    try:
        summary = train_recipe(recipe, inputs, stop=flag)
    finally:
        from densehybrid.engine.runtime import clear_stop

        signal.signal(signal.SIGINT, previous)
        clear_stop()
        distributed_run = distributed.is_distributed()
    if distributed.is_main():
        path = write_json(out / SUMMARY_NAME, summary)
        state = "finished" if summary["finished"] else ("interrupted" if summary["interrupted"] else "stopped")
        best = summary["best"]
        best_text = f", best {best['metric']} {best['value']:.4f} (epoch {best['epoch']})" if best else ""
        print(
            f"{recipe['name']}: {state} at epoch {summary['epoch']}/{summary['epochs']}, step {summary['global_step']}"
            f"{best_text}. Checkpoint: {summary['checkpoint']}. Summary: {path}"
        )
        for note in summary["notes"]:
            print(f"note: {note}")
        for line in closing_lines(summary, inputs):
            print(line)
    if distributed_run:
        distributed.shutdown()
    return 130 if summary["interrupted"] else 0

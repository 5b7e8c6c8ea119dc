"""Settings study of the demo on its val split (never test): fine-tuning settings over several training seeds.

Each setting is one ``densehybrid demo --eval-split val --seeds N`` run in its own folder, on one shared benchmark
(``--data-dir``). Most settings differ only in the fine-tuning, so the closed-set stages of every seed are trained
once: with ``--reuse DEMO_OUT`` they are copied from an earlier demo run of the same benchmark and seeds (the demo
reuses a finished stage only when its resolved recipe is the same, and says so). The table reports, pooled over both
anomaly families of val, mean ± std over the seeds, the AP and FPR95 of the fine-tuned model's hybrid score and of its
two components, and closed mIoU / open-mIoU of the first seed.

Every setting starts from the released fine-tuning rate and loss weights (``--released-settings``) and from
:data:`BASE`, the epoch split of the demo when the study was run (5 closed-set, 3 fine-tuning epochs), so that its
rows stay reproducible when the demo's defaults move. A setting that changes the closed-set stage
(``closed_epochs``) trains its own closed-set stages instead of copying them.

Usage::

    densehybrid demo --seeds 3 --released-settings --closed-epochs 5 --finetune-epochs 3 --out /tmp/dq   # once
    python benchmarks/demo_study.py --data-dir /tmp/dq/data --reuse /tmp/dq --out /tmp/study --seeds 3
    python benchmarks/demo_study.py ... --settings released lr-1e-4           # a subset of SETTINGS
    python benchmarks/demo_study.py --quick --out /tmp/sq --seeds 2 --settings released lr-1e-3  # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from densehybrid.demo import CLOSED, TRAINING_OPTIONS

#: The settings compared: name -> demo training options (``densehybrid demo --help``) on top of the released
#: fine-tuning rate and loss weights (every run is a ``densehybrid demo --released-settings`` run).
SETTINGS: dict[str, dict[str, float]] = {
    "released": {},
    "lr-1e-4": {"finetune_lr": 1e-4},
    "lr-3e-4": {"finetune_lr": 3e-4},
    "lr-1e-3": {"finetune_lr": 1e-3},
    "lr-3e-3": {"finetune_lr": 3e-3},
    # at the best rate: the loss weights around the released 0.03 / 0.3
    "lr-1e-3-beta-0.01": {"finetune_lr": 1e-3, "beta": 0.01},
    "lr-1e-3-beta-0.1": {"finetune_lr": 1e-3, "beta": 0.1},
    "lr-1e-3-lambda-0.1": {"finetune_lr": 1e-3, "lambda_": 0.1},
    "lr-1e-3-lambda-1": {"finetune_lr": 1e-3, "lambda_": 1.0},
    # the negatives' size (the crop side, 64 px released-like default)
    "lr-1e-3-neg-40": {"finetune_lr": 1e-3, "negative_size": 40},
    "lr-1e-3-neg-96": {"finetune_lr": 1e-3, "negative_size": 96},
    # the split of the epochs between closed-set training (5) and fine-tuning (3)
    "lr-1e-3-closed-3-ft-5": {"finetune_lr": 1e-3, "closed_epochs": 3, "finetune_epochs": 5},
    "lr-1e-3-closed-1-ft-7": {"finetune_lr": 1e-3, "closed_epochs": 1, "finetune_epochs": 7},
    "lr-1e-3-closed-7-ft-1": {"finetune_lr": 1e-3, "closed_epochs": 7, "finetune_epochs": 1},
}
#: The epoch split every setting starts from (the demo's default when the study was run); ``--quick`` keeps its own.
BASE = {"closed_epochs": 5, "finetune_epochs": 3}
#: Options that change the closed-set stage: a setting that sets one of them differently from :data:`BASE` trains
#: its own closed-set stages.
CLOSED_SET_OPTIONS = tuple(name for name, targets in TRAINING_OPTIONS.items() if any(t[0] == CLOSED for t in targets))
SCORES = ("densehybrid", "generative", "discriminative")


def _stage_folders(out: Path, seeds: int) -> list[Path]:
    """The closed-set stage folders of a demo run with ``seeds`` training seeds, relative to its ``--out``."""
    return [Path("closed-set")] + [Path("seeds") / f"seed-{s}" / "closed-set" for s in range(1, seeds)]


def _run(name: str, options: dict[str, float], args: argparse.Namespace) -> dict:
    out = args.out / name
    own_closed_set = any(key in options and options[key] != BASE.get(key) for key in CLOSED_SET_OPTIONS)
    options = options if args.quick else {**BASE, **options}
    if args.reuse is not None and not own_closed_set:
        for stage in _stage_folders(args.reuse, args.seeds):
            if (args.reuse / stage / "last.pt").exists() and not (out / stage).exists():
                shutil.copytree(args.reuse / stage, out / stage)
    flags = [f"--{key.rstrip('_').replace('_', '-')}={value}" for key, value in options.items()]
    command = [sys.executable, "-m", "densehybrid", "demo", "--eval-split", "val", "--seeds", str(args.seeds)]
    command += ["--released-settings"]
    command += ["--out", str(out), "--data-dir", str(args.data_dir or args.out / "data"), "--no-progress", *flags]
    command += ["--quick"] if args.quick else []
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    rows = {r["score"]: r for r in results["rows"] if r["model"] == "densehybrid" and r["family"] == "all"}
    segmentation = results["segmentation"]
    return {
        "setting": name,
        "options": options,
        "seconds": seconds,
        "scores": {
            s: {k: rows[s].get(k) for k in ("ap", "ap_std", "fpr95", "fpr95_std", "auroc", "auroc_std")} for s in SCORES
        },
        "closed_miou": segmentation.get("closed_miou"),
        "open_miou": segmentation.get("open_miou"),
    }


def _cell(score: dict, metric: str) -> str:
    std = score.get(f"{metric}_std")
    return f"{100 * score[metric]:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def table(rows: list[dict]) -> str:
    head = (
        "| setting | "
        + " | ".join(f"{s} AP | {s} FPR95" for s in SCORES)
        + " | closed mIoU | open-mIoU | open/closed |"
    )
    lines = [head, "|---|" + "---:|" * (2 * len(SCORES) + 3)]
    for row in rows:
        cells = [f"{_cell(row['scores'][s], 'ap')} | {_cell(row['scores'][s], 'fpr95')}" for s in SCORES]
        closed, opened = row["closed_miou"], row["open_miou"]
        seg = [f"{100 * v:.2f}" if isinstance(v, float) else "-" for v in (closed, opened)]
        seg.append(f"{opened / closed:.2f}" if isinstance(closed, float) and isinstance(opened, float) else "-")
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " | " + " | ".join(seg) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder: one demo run per setting, study.json")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="the shared benchmark (a demo's OUT/data; default: OUT/data)"
    )
    parser.add_argument("--reuse", type=Path, default=None, help="a demo --out whose closed-set stages to copy")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="smoke run: every demo at --quick size")
    args = parser.parse_args()
    record = args.out / "study.json"  # settings of earlier invocations into the same --out are kept
    earlier = json.loads(record.read_text())["rows"] if record.exists() else []
    rows = {row["setting"]: row for row in earlier}
    for name in args.settings:
        rows[name] = _run(name, SETTINGS[name], args)
        print(f"{name}: {rows[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
        record.write_text(json.dumps({"seeds": args.seeds, "rows": list(rows.values())}, indent=2) + "\n")
    print(table([rows[name] for name in SETTINGS if name in rows]))


if __name__ == "__main__":
    main()

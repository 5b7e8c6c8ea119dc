"""Settings study of the demo on its val split (never test): fine-tuning settings over several training seeds.

Each setting is one ``densehybrid demo --eval-split val --seeds N`` run in its own folder, on one shared benchmark
(``--data-dir``). Only the fine-tuning differs between settings, so the closed-set stages of every seed are trained
once: with ``--reuse DEMO_OUT`` they are copied from an earlier demo run of the same benchmark and seeds (the demo
reuses a finished stage only when its resolved recipe is the same, and says so). The table reports, pooled over both
anomaly families of val, mean ± std over the seeds, the AP and FPR95 of the fine-tuned model's hybrid score and of its
two components, and closed mIoU / open-mIoU of the first seed.

Usage::

    densehybrid demo --seeds 3 --out /tmp/dq                                  # once: the benchmark and closed-set stages
    python benchmarks/demo_study.py --data-dir /tmp/dq/data --reuse /tmp/dq --out /tmp/study --seeds 3
    python benchmarks/demo_study.py ... --settings released lr-1e-4           # a subset of SETTINGS
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: The settings compared: name -> demo training options (``densehybrid demo --help``); ``released`` is the default.
SETTINGS: dict[str, dict[str, float]] = {
    "released": {},
    "lr-1e-4": {"finetune_lr": 1e-4},
    "lr-3e-4": {"finetune_lr": 3e-4},
    "lr-1e-3": {"finetune_lr": 1e-3},
    "lr-3e-3": {"finetune_lr": 3e-3},
    "beta-0.1": {"beta": 0.1},
    "lambda-1": {"lambda_": 1.0},
}
SCORES = ("densehybrid", "generative", "discriminative")


def _stage_folders(out: Path, seeds: int) -> list[Path]:
    """The closed-set stage folders of a demo run with ``seeds`` training seeds, relative to its ``--out``."""
    return [Path("closed-set")] + [Path("seeds") / f"seed-{s}" / "closed-set" for s in range(1, seeds)]


def _run(name: str, options: dict[str, float], args: argparse.Namespace) -> dict:
    out = args.out / name
    if args.reuse is not None:
        for stage in _stage_folders(args.reuse, args.seeds):
            if (args.reuse / stage / "last.pt").exists() and not (out / stage).exists():
                shutil.copytree(args.reuse / stage, out / stage)
    flags = [f"--{key.rstrip('_').replace('_', '-')}={value}" for key, value in options.items()]
    command = [sys.executable, "-m", "densehybrid", "demo", "--eval-split", "val", "--seeds", str(args.seeds)]
    command += ["--out", str(out), "--data-dir", str(args.data_dir), "--no-progress", *flags]
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
    head = "| setting | " + " | ".join(f"{s} AP | {s} FPR95" for s in SCORES) + " | closed mIoU | open-mIoU |"
    lines = [head, "|---|" + "---:|" * (2 * len(SCORES) + 2)]
    for row in rows:
        cells = [f"{_cell(row['scores'][s], 'ap')} | {_cell(row['scores'][s], 'fpr95')}" for s in SCORES]
        seg = [f"{100 * v:.2f}" if isinstance(v, float) else "-" for v in (row["closed_miou"], row["open_miou"])]
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " | " + " | ".join(seg) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder: one demo run per setting, study.json")
    parser.add_argument("--data-dir", type=Path, required=True, help="the shared benchmark (a demo's OUT/data)")
    parser.add_argument("--reuse", type=Path, default=None, help="a demo --out whose closed-set stages to copy")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
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

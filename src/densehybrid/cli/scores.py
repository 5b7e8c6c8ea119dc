"""``densehybrid scores``: list the anomaly score names accepted by ``--score``, with what each one needs."""

from __future__ import annotations

import argparse
import json

from densehybrid.scores import SCORE_INFO, list_scores

HELP = "list the anomaly score names accepted by --score"
DESCRIPTION = (
    "List the registered anomaly scores (higher = more anomalous). 'needs ood head' marks scores that read the "
    "dataset-posterior logits of a DenseHybrid model; 'needs fit' marks scores that need statistics fitted on "
    "training data."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")


def run(args: argparse.Namespace) -> int:
    infos = [SCORE_INFO[name] for name in list_scores()]
    if args.json:
        rows = [
            {
                "name": info.name,
                "description": info.description,
                "requires_ood_logits": info.requires_ood_logits,
                "requires_fit": info.requires_fit,
            }
            for info in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for info in infos:
        needs = [label for label, flag in (("ood head", info.requires_ood_logits), ("fit", info.requires_fit)) if flag]
        suffix = f"  [needs {', '.join(needs)}]" if needs else ""
        print(f"{info.name:16s} {info.description}{suffix}")
    return 0

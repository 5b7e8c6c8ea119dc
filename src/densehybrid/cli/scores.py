"""``densehybrid scores``: list the anomaly score names accepted by ``--score``, with what each one needs."""

from __future__ import annotations

import argparse
import json

HELP = "list the anomaly score names accepted by --score"
DESCRIPTION = (
    "List the registered anomaly scores (higher = more anomalous). 'needs ood head' marks scores that read the "
    "dataset-posterior logits of a DenseHybrid model; 'needs features' marks scores that compare the teacher and "
    "student features of a DiCNet model; 'needs fit' marks scores that need statistics fitted on training data."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")


def run(args: argparse.Namespace) -> int:
    from densehybrid.scores import SCORE_INFO, list_scores

    infos = [SCORE_INFO[name] for name in list_scores(None)]
    if args.json:
        rows = [
            {
                "name": info.name,
                "description": info.description,
                "requires_ood_logits": info.requires_ood_logits,
                "requires_fit": info.requires_fit,
                "inputs": list(info.inputs),
            }
            for info in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for info in infos:
        flags = (("ood head", info.requires_ood_logits), ("features", info.reads_features), ("fit", info.requires_fit))
        needs = [label for label, flag in flags if flag]
        suffix = f"  [needs {', '.join(needs)}]" if needs else ""
        print(f"{info.name:16s} {info.description}{suffix}")
    return 0

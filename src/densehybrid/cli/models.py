"""``densehybrid models``: list the registered model names."""

from __future__ import annotations

import argparse

HELP = "list the model names accepted by --model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from densehybrid.models import MODELS

    for name in sorted(MODELS):
        print(f"{name:32s} {MODELS[name]}")
    return 0

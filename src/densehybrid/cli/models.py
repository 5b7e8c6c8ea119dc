"""``densehybrid models``: list the registered model names and the model families."""

from __future__ import annotations

import argparse

HELP = "list the model names accepted by --model, and the families whose members are named PREFIX:MEMBER"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from densehybrid.models import MODELS
    from densehybrid.models.third_party import FAMILY_HELP

    for name in sorted(MODELS):
        print(f"{name:32s} {MODELS[name]}")
    print("\nfamilies (name a member as shown; model.kwargs / create_model(**kwargs) pass the rest):")
    for pattern, description in FAMILY_HELP.values():
        print(f"{pattern:32s} {description}")
    return 0

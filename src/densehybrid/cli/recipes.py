"""``densehybrid recipes``: the training recipes, one line each, or their resolved configurations as JSON."""

from __future__ import annotations

import argparse
import json

from densehybrid.cli._common import json_ready

HELP = "list the training recipes and the released command each stands for (--json: resolved configurations)"
DESCRIPTION = (
    "One line per recipe: its name, its training method and the released training command it stands for. --json "
    "prints every resolved value (a recipe's `base` chain laid under it) and, under `param_groups`, the learning rate "
    "each optimiser parameter group starts at; copy a recipe with `densehybrid train --recipe NAME --print-config > mine.json`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="RECIPE", help="only these recipes (names or files)")
    parser.add_argument("--json", action="store_true", help="print the resolved configurations as JSON")
    parser.add_argument("--methods", action="store_true", help="list the training methods instead")


def run(args: argparse.Namespace) -> int:
    from densehybrid.recipes import get_method, list_methods, list_recipes, load_recipe, optimizer_groups

    if args.methods:
        width = max(len(name) for name in list_methods())
        for name in list_methods():
            print(f"{name:<{width}}  {get_method(name).description}")
        return 0
    names = args.names or list_recipes()
    recipes = {name: load_recipe(name) for name in names}
    if args.json:
        shown = {name: {**recipe, "param_groups": optimizer_groups(recipe)} for name, recipe in recipes.items()}
        print(json.dumps(json_ready(shown), indent=2))
        return 0
    width = max(len(r["name"]) for r in recipes.values())
    methods = max(len(r["method"]) for r in recipes.values())
    for recipe in recipes.values():
        seed = recipe["seed_command"] or f"(not a released recipe: {recipe['description']})"
        print(f"{recipe['name']:<{width}}  {recipe['method']:<{methods}}  {seed}")
    return 0

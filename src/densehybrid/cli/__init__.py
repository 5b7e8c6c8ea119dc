"""The ``densehybrid`` command line.

Each command lives in its own module under ``densehybrid.cli`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Commands only parse options and report; the work is done by the
library. Errors a user can fix print one ``Error: ...`` line to stderr and exit 1 (usage errors exit 2); set
``--debug`` or ``DENSEHYBRID_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from densehybrid import __version__
from densehybrid.errors import DenseHybridError

# command name -> module under densehybrid.cli
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "toy2d": "toy2d",
    "evaluate": "evaluate",
    "evaluate-open-set": "evaluate_open_set",
    "export-smiyc": "export_smiyc",
    "doctor": "doctor",
    "models": "models",
    "scores": "scores",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only where it informs: not for None, flags, or help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return super()._get_help_string(action)


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"densehybrid.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"densehybrid.cli.{module}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per available command."""
    parser = argparse.ArgumentParser(
        prog="densehybrid",
        description="Dense open-set semantic segmentation: DenseHybrid anomaly scores, training with negatives, "
        "open-set evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"densehybrid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``densehybrid`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # a bare `densehybrid` asks what the tool does: help on stdout, success (like `git` or `pip`)
        parser.print_help(sys.stdout)
        return 0
    debug = args.debug or os.environ.get("DENSEHYBRID_DEBUG") == "1"
    try:
        return int(args._run(args) or 0)
    except (DenseHybridError, ValueError, TypeError, FileNotFoundError) as exc:
        if debug:
            raise
        print(f"Error: {exc}", file=sys.stderr)
        print("(run with --debug or DENSEHYBRID_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130

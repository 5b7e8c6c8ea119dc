"""The ``densehybrid`` command line.

Each command lives in its own module under ``densehybrid.cli`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Commands only parse options and report; the work is done by the
library. :func:`main` is the one place where failures become exit codes (see :data:`EXIT_CODES`): a failure the user
can fix (bad data, checkpoint, output path, option value, resources, a diverging run) prints one ``Error: ...`` line
to stderr; anything else is a bug and prints one ``Internal error: ...`` line asking for a report. ``--debug`` (or
``DENSEHYBRID_DEBUG=1``) re-raises with the full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import linecache
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from densehybrid import __version__
from densehybrid.errors import DenseHybridError

#: Exit status of ``densehybrid COMMAND``: documented in docs/usage.md.
EXIT_CODES: dict[int, str] = {
    0: "success (doctor: no error found)",
    1: "a failure the user can fix: bad input data, checkpoint, output path, option value, not enough memory or "
    "cores, a diverging or non-finite run (doctor: the tree has errors)",
    2: "usage error: unknown command or option, malformed option value",
    70: "internal error: a bug in densehybrid (please report it; --debug shows the traceback)",
    130: "interrupted (Ctrl-C)",
    141: "the reader of the output closed it early (e.g. `densehybrid recipes --json | head`); nothing is printed",
}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 70, 130, 141
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: :data:`densehybrid.metrics.streaming.COARSE_METRICS_WARNING`, spelled here so that the CLI's start imports no torch.
_COARSE_METRICS_WARNING = "The binned pooled metrics may differ from the exact ones"

# command name -> module under densehybrid.cli
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "toy2d": "toy2d",
    "evaluate": "evaluate",
    "evaluate-open-set": "evaluate_open_set",
    "export-smiyc": "export_smiyc",
    "predict": "predict",
    "calibrate": "calibrate",
    "export": "export",
    "info": "info",
    "doctor": "doctor",
    "models": "models",
    "scores": "scores",
    "train": "train",
    "recipes": "recipes",
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


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per available command.

    Args:
        commands: the commands whose options are built; None builds all. The others get only their one-line help,
            so that ``densehybrid --help`` and ``densehybrid COMMAND ...`` import only what that command needs
            (a command module imports torch in ``add_arguments`` or ``run``, never at import).
    """
    wanted = None if commands is None else set(commands)
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
        if wanted is None or name in wanted:
            module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level options take no value)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def _raised_by_densehybrid(traceback: TracebackType | None) -> bool:
    """True when the innermost frame of ``traceback`` is a ``raise`` statement of densehybrid's own code.

    That is a deliberate, worded error. A ``ValueError`` raised by NumPy's or torch's C code inside our code (a
    broadcast of mismatched shapes) has our frame innermost too, but not on a ``raise`` line.
    """
    last = None
    while traceback is not None:
        last, traceback = traceback, traceback.tb_next
    if last is None:
        return False
    filename = last.tb_frame.f_code.co_filename
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    return ours and linecache.getline(filename, last.tb_lineno).lstrip().startswith("raise")


def _from_worker(text: str) -> tuple[str, str | None] | None:
    """``(message, raising file)`` of an error PyTorch re-raised from a DataLoader worker (its text holds the
    worker's traceback), or None for any other error."""
    if "Original Traceback" not in text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    files = [line for line in lines if line.startswith('File "')]
    origin = files[-1].split('"')[1] if files else None
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return (rest if sep and " " not in head else last), origin


def _expected_failure(exc: BaseException) -> str | None:
    """The one-line message of a failure the user can fix, or None when ``exc`` is a bug.

    ``ValueError``/``TypeError`` are the library's documented errors for bad arguments, but only when densehybrid
    raised them itself; one escaping from NumPy or torch means an input was not validated, which is a bug.
    """
    import torch

    worker = _from_worker(str(exc))
    if worker is not None:
        message, origin = worker
        ours = origin is not None and Path(origin).resolve().is_relative_to(_PACKAGE_DIR)
        if isinstance(exc, DenseHybridError) or (ours and isinstance(exc, (ValueError, TypeError, RuntimeError))):
            return message
        return None
    if isinstance(exc, DenseHybridError):
        return str(exc)
    if isinstance(exc, (ValueError, TypeError)) and _raised_by_densehybrid(exc.__traceback__):
        return str(exc)
    if isinstance(exc, FloatingPointError):
        return str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or _allocation_failure(exc):
        return (
            f"Out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): lower --batch-size, "
            "--input-scale or the image sizes, or use a device with more memory."
        )
    if isinstance(exc, OSError):
        where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
        return f"Cannot access{where}: {exc.strerror or exc}."
    return None


def _allocation_failure(exc: BaseException) -> bool:
    """True for torch's allocator errors, which are ``RuntimeError`` s ("DefaultCPUAllocator: can't allocate
    memory", "CUDA out of memory")."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``densehybrid`` console script; returns an exit status of :data:`EXIT_CODES`."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do, and keep Python from complaining when it
        # flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured)
            pass
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:  # building the parser imports torch and the models: a Ctrl-C there is an interruption, not a traceback
        parser = build_parser([name for name in (_command_in(words),) if name is not None])
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    args = parser.parse_args(argv)
    if args.command is None:
        # a bare `densehybrid` asks what the tool does: help on stdout, success (like `git` or `pip`)
        parser.print_help(sys.stdout)
        return 0
    debug = args.debug or os.environ.get("DENSEHYBRID_DEBUG") == "1"
    # One run computes pooled metrics many times (every validation, stage and score): say it once.
    warnings.filterwarnings("once", message=_COARSE_METRICS_WARNING, category=UserWarning)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as exc:
        if debug:
            raise
        message = _expected_failure(exc)
        if message is not None:
            print(f"Error: {message}", file=sys.stderr)
            return EXIT_ERROR
        worker = _from_worker(str(exc))
        text = worker[0] if worker else (str(exc).strip().splitlines() or [""])[0]
        print(
            f"Internal error: {type(exc).__name__}: {text} (a bug in densehybrid {__version__}: please report it "
            "with the command line; run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL

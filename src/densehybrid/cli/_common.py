"""Options and helpers shared by the commands that run a checkpoint: model loading, loop settings, JSON, tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densehybrid.errors import DenseHybridError, NonFiniteError, OutputError

if TYPE_CHECKING:  # torch is imported by the commands that run a model, not by the command line's start
    from torch import nn

# Keyword arguments recorded with a model that point at weight files used only to initialise training.


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinities refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


#: Largest ``--input-scale``: the model input grows with its square (x4 = 16 times the pixels of the frame).
MAX_INPUT_SCALE = 4.0


def input_scale(text: str) -> float:
    """argparse type: ``--input-scale`` in (0, :data:`MAX_INPUT_SCALE`]."""
    value = positive_float(text)
    if value > MAX_INPUT_SCALE:
        raise argparse.ArgumentTypeError(f"expected a factor in (0, {MAX_INPUT_SCALE:g}], got {text!r}")
    return value


def device_option(text: str) -> str:
    """argparse type: a device name torch knows and this machine has (checked before any work)."""
    from densehybrid.engine.runtime import select_device

    try:
        select_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def window_option(text: str) -> Any:
    """argparse type of ``--window``: ``auto``, ``none`` or ``SIZE[:STRIDE[:MERGE]]``
    (:func:`densehybrid.models.window.parse_window`)."""
    from densehybrid.models.window import parse_window

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The help of ``--window``, shared by every command that runs a model over images.
WINDOW_HELP = (
    "sliding-window inference: auto (default: the model's released setting, for the Segmenter 512x512 windows with "
    "stride 320 merged as probabilities as the released COCO20 evaluation, the whole image for the other models), "
    "none (whole image), or SIZE[:STRIDE[:MERGE]] with MERGE probabilities or logits"
)


def add_window_argument(parser: argparse.ArgumentParser) -> None:
    """``--window``."""
    parser.add_argument("--window", type=window_option, default="auto", help=WINDOW_HELP)


def worker_count(text: str) -> int:
    """argparse type: DataLoader workers, 0 up to the usable CPU cores."""
    from densehybrid.engine.resources import check_num_workers
    from densehybrid.errors import ResourceError

    value = non_negative_int(text)
    try:
        return check_num_workers(value)
    except ResourceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str = "the output file") -> None:
    """``--overwrite``: allow replacing existing results (inputs are never overwritten)."""
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} if it exists (an input is never overwritten)"
    )


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    """``--checkpoint``, ``--model`` and ``--num-classes``."""
    from densehybrid.models import list_models

    parser.add_argument("--checkpoint", required=True, help="checkpoint file to load (released file or our own)")
    parser.add_argument(
        "--model",
        required=model_required,
        default=None,
        help=f"registered model name (one of: {', '.join(list_models())}; or a family member such as "
        "smp:Unet:resnet34, hf:segformer, tv:fcn_resnet50: see `densehybrid models`)"
        + ("" if model_required else "; default: the name the checkpoint records (checkpoints written by densehybrid)"),
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="known classes K of the model (default: the checkpoint's, else the benchmark's)",
    )


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--batch-size``, ``--num-workers``, ``--amp``, ``--no-progress`` and ``--window``."""
    parser.add_argument("--device", type=device_option, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="frames per forward pass (frames of a batch share one size)"
    )
    parser.add_argument(
        "--num-workers",
        type=worker_count,
        default=min(2, _usable_cores()),
        help="DataLoader worker processes (at most the CPU cores available)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="bfloat16 autocast on CUDA (faster; scores differ slightly from the float32 released evaluation)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_window_argument(parser)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--root``, ``--option``, ``--limit`` and ``--input-scale``."""
    parser.add_argument("--root", required=True, help="the benchmark's dataset root (see docs/datasets.md)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="loader option, repeatable (e.g. cityscapes_root=DIR, encoding=hendrycks)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N frames (a quick look, not comparable)"
    )
    parser.add_argument(
        "--input-scale",
        type=input_scale,
        default=1.0,
        help=f"resize the model input by this factor in (0, {MAX_INPUT_SCALE:g}]; metrics stay at the labels' full "
        "resolution",
    )
    add_label_check_argument(parser)


def add_label_check_argument(parser: argparse.ArgumentParser) -> None:
    """``--void-unknown-ids``: the one switch of the label check every command runs on the label files it reads."""
    parser.add_argument(
        "--void-unknown-ids",
        action="store_true",
        help="treat label ids outside the benchmark's encoding as void instead of stopping with an error "
        "(the numbers then ignore those pixels)",
    )


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loader options of ``--option KEY=VALUE`` plus the label check's ``--void-unknown-ids``."""
    from densehybrid.data.datasets import parse_dataset_options

    options: dict[str, Any] = dict(parse_dataset_options(args.option))
    if getattr(args, "void_unknown_ids", False):
        options["void_unknown_ids"] = True
    return options


def _usable_cores() -> int:
    from densehybrid.engine.resources import usable_cpu_count

    return usable_cpu_count()


def load_model(
    checkpoint: str | os.PathLike[str],
    model_name: str | None = None,
    num_classes: int | None = None,
    default_num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint needs and load it, reading the file once.

    The architecture is ``model_name`` or the ``model_name`` the checkpoint records (checkpoints written by
    ``densehybrid``'s training loop), with the recorded ``model_kwargs`` (e.g. ``decoder_channels``) when the names
    agree; weight-file arguments used only for initialisation (``pretrained``, ``pretrained_backbone``) are dropped,
    since the checkpoint holds every weight. K is ``num_classes``, else the checkpoint's, else
    ``default_num_classes``.

    Args:
        checkpoint: checkpoint file (released state dicts, nested dicts, ``module.`` prefixes, safetensors).
        model_name: a registered model name; required when the checkpoint records none.
        num_classes: K, overriding the checkpoint's.
        default_num_classes: K when neither ``num_classes`` nor the checkpoint gives one (the benchmark's).

    Returns:
        ``(model, info)``: the model in eval mode on the CPU and a JSON-ready dict (``model``, ``checkpoint``,
        ``num_classes``, ``model_kwargs``, ``num_classes_from``).

    Raises:
        CheckpointError: the file is missing, unreadable, holds no state dict or does not fit the model.
        ValueError: no model name or no K can be determined, or an unknown model name.
    """
    from densehybrid.models.checkpoint import model_from_checkpoint, read_checkpoint_file

    model, metadata = model_from_checkpoint(
        read_checkpoint_file(checkpoint), checkpoint, model_name, num_classes, default_num_classes, for_cli=True
    )
    source = {"argument": "--num-classes", "checkpoint": "checkpoint", "default": "benchmark"}
    info = {
        "model": metadata["model_name"],
        "checkpoint": str(checkpoint),
        "num_classes": metadata["num_classes"],
        "num_classes_from": source[metadata["num_classes_from"]],
        "model_kwargs": {key: value for key, value in metadata["model_kwargs"].items() if _plain(value)},
    }
    return model, info


@contextlib.contextmanager
def naming_checkpoint(checkpoint: str | os.PathLike[str]) -> Iterator[None]:
    """Name ``checkpoint`` in a :class:`~densehybrid.errors.NonFiniteError` raised by the block (NaN outputs)."""
    try:
        yield
    except NonFiniteError as exc:
        raise NonFiniteError(f"Checkpoint {str(checkpoint)!r} gives unusable outputs. {exc}") from exc


@contextlib.contextmanager
def command_ranks(device: str) -> Iterator[Any]:
    """Run a command's work in the process group when ``torchrun`` launched it; yield this process's device.

    Every rank runs the command (each over its block of the data, see :mod:`densehybrid.engine.distributed`);
    only rank 0 prints and writes (the command asks :func:`densehybrid.engine.distributed.is_main`), and the other
    ranks, which compute the same merged results, keep their warnings to themselves.
    """
    import warnings

    from densehybrid.engine import distributed
    from densehybrid.engine.runtime import select_device

    with distributed.process_group(select_device(device)) as local, warnings.catch_warnings():
        if not distributed.is_main():
            warnings.simplefilter("ignore")
        yield local


def check_sml_arguments(scores: Sequence[str], sml_statistics: str | os.PathLike[str] | None) -> None:
    """Check that ``--sml-statistics`` is given exactly when ``sml`` is among the scores (before loading weights).

    Raises:
        ValueError: ``sml`` without a statistics file, or a file without ``sml``.
    """
    from densehybrid.scores import score_info

    wanted = [score_info(name).name for name in scores]
    if sml_statistics is None and "sml" in wanted:
        raise ValueError(
            "Expected `--sml-statistics FILE` for score 'sml' (per-class max-logit statistics fitted on training "
            "data, see SML in docs/method.md), but got none."
        )
    if sml_statistics is not None and "sml" not in wanted:
        raise ValueError("Expected `--sml-statistics` only together with `--score sml`.")


def load_score_options(
    scores: Sequence[str], sml_statistics: str | os.PathLike[str] | None, num_classes: int
) -> dict[str, dict[str, Any]]:
    """Per-score keyword options: the ``sml`` statistics read from a file saved with ``SMLStatistics.to_dict``.

    Raises:
        ValueError: ``sml`` without a statistics file, a file given without ``sml``, or statistics for another K.
        DenseHybridError: the statistics file is missing or unreadable.
    """

    from densehybrid.scores import SMLStatistics

    check_sml_arguments(scores, sml_statistics)
    if sml_statistics is None:
        return {}
    path = Path(sml_statistics)
    if not path.is_file():
        raise DenseHybridError(f"Expected `--sml-statistics` {str(path)!r} to be an existing file, but it is missing.")
    from densehybrid.models.checkpoint import read_checkpoint_file

    try:
        state = read_checkpoint_file(path)
    except DenseHybridError as exc:  # a damaged file
        raise DenseHybridError(f"Cannot read SML statistics {str(path)!r}: {exc}") from exc
    if isinstance(state, Mapping) and "sml_statistics" in state:
        state = state["sml_statistics"]
    try:
        statistics = SMLStatistics.from_dict(state)
    except (TypeError, ValueError) as exc:
        raise DenseHybridError(f"Expected SML statistics (means, stds, counts) in {str(path)!r}: {exc}") from exc
    if statistics.num_classes != num_classes:
        raise ValueError(
            f"Expected SML statistics for the model's {num_classes} classes, but {str(path)!r} covers "
            f"{statistics.num_classes}."
        )
    return {"sml": {"statistics": statistics}}


def parse_metric_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings to keyword options, values read as int, float, true/false/none or text.

    Raises:
        ValueError: an item without ``=`` or a repeated key.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"Expected `--metric-option` as KEY=VALUE (e.g. variant=streethazards), but got {item!r}.")
        if key in options:
            raise ValueError(f"Expected each `--metric-option` key once, but got {key!r} twice.")
        options[key] = _literal(text.strip())
    return options


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple))


def json_ready(value: Any) -> Any:
    """``value`` with NaN/infinity as None and tuples as lists, so the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_ready(value.item())
    return value


def result_document(
    command: str, info: Mapping[str, Any], result: Mapping[str, Any], args: argparse.Namespace, options: Any
) -> dict[str, Any]:
    """The JSON document of an evaluation command: what ran, its results and the settings that shape them."""
    from densehybrid import __version__

    return {
        "command": command,
        "densehybrid_version": __version__,
        **info,
        **result,
        "settings": {
            "root": str(args.root),
            "options": options,
            "limit": args.limit,
            "device": args.device,
            "batch_size": args.batch_size,
            "amp": args.amp,
        },
    }


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as strict, indented JSON, atomically (a temporary file renamed over ``path``).

    Check the path with :func:`densehybrid.engine.outputs.check_output_file` before the work; this only writes.

    Raises:
        OutputError: the file cannot be written (missing permission, a directory in the way, a full disk, ...).
    """
    path = Path(path)
    text = json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n"
    try:
        from densehybrid.engine.outputs import atomic_write_text

        return atomic_write_text(path, text)
    except OSError as exc:
        raise OutputError(f"Cannot write `--out` {str(path)!r}: {exc.strerror or exc}.") from exc


def percent(value: Any) -> str:
    """A metric in [0, 1] as a percentage with two decimals; ``-`` when undefined."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{100.0 * value:.2f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])

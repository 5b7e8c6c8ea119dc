"""Export a checkpoint to ONNX or TorchScript: the library side of ``densehybrid export``.

The exported graph maps RGB images (N, 3, H, W) float32 in [0, 1], with dynamic N, H and W, to

* ``scores`` (N, H, W) float32, the anomaly score (higher = more anomalous), and
* ``labels`` (N, H, W) int64, the open-set segmentation: the closed-set argmax, with pixels whose score exceeds the
  threshold set to the unknown id K (the threshold is a constant of the graph; without one the labels are the
  closed-set argmax), and
* ``closed_set`` (N, H, W) int64, the closed-set argmax.

:class:`ExportedModel` runs such a file like the eager ``OpenSetModel`` (``densehybrid predict --checkpoint
model.onnx``), with the metadata stored in it.

The graph is :class:`~densehybrid.openset.OpenSetModel`, the inference object every command runs, traced: the
model's input normalisation, the score and the open-set rule are inside it. Both formats are traced
(``torch.jit.trace``; ONNX through PyTorch's TorchScript-based exporter). The models are traceable by construction:
the aspect-ratio pyramid pooling of the ladder models and LDN-121 (:func:`densehybrid.models.hybrid.aspect_pool`)
reads the feature-map size as a tensor while tracing, so the pooling grid follows every input's aspect ratio as in
eager PyTorch. :func:`check_parity` then compares the file with the eager ``OpenSetModel`` on random images of two
sizes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densehybrid.engine.outputs import atomic_path
from densehybrid.errors import CheckpointError, DenseHybridError
from densehybrid.openset import OpenSetModel, OpenSetOutput

__all__ = [
    "EXPORT_FORMATS",
    "GRAPH_OUTPUTS",
    "PARITY_TOLERANCE",
    "ExportGraph",
    "ExportedModel",
    "ParityReport",
    "check_parity",
    "export_model",
    "exported_format",
    "load_exported",
    "onnxruntime_available",
    "read_exported_metadata",
    "require_onnx",
]

EXPORT_FORMATS = ("onnx", "torchscript")
#: The outputs of an exported graph, in order (files of earlier versions have the first two).
GRAPH_OUTPUTS = ("scores", "labels", "closed_set")
#: Largest allowed relative error of the exported scores (max |exported - eager| / max |eager|).
PARITY_TOLERANCE = 1e-4
#: (N, H, W) of the random images of the parity check: two sizes and aspect ratios, two batch sizes.
PARITY_SIZES: tuple[tuple[int, int, int], ...] = ((1, 96, 160), (2, 128, 96))
DEFAULT_OPSET = 17
_INSTALL_HINT = "Install the export extra: pip install 'densehybrid[export]'."


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported (it is the optional extra ``densehybrid[export]``)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_onnx() -> None:
    """Raise :class:`DenseHybridError` with the install command when ONNX or ONNX Runtime is missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DenseHybridError(
            f"Expected the packages {', '.join(missing)} for ONNX export and its parity check, but they are not "
            f"installed. {_INSTALL_HINT}"
        )


# --------------------------------------------------------------------------------------------------------------------
# The exported graph


class ExportGraph(nn.Module):
    """The outputs an exported file has, from :class:`~densehybrid.openset.OpenSetModel`: images (N, 3, H, W) in
    [0, 1] -> (scores (N, H, W) float32, labels (N, H, W) int64, closed_set (N, H, W) int64).

    Args:
        open_set: the inference object (without a sliding window: its Python loop would be frozen into the graph).
    """

    def __init__(self, open_set: OpenSetModel) -> None:
        super().__init__()
        if open_set.window is not None:
            raise ValueError(
                f"Expected an OpenSetModel without a sliding window for export, but it has {open_set.window.describe()}"
                ": the exported graph runs the whole image."
            )
        self.open_set = open_set

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        result = self.open_set(images)
        return result.scores, result.labels, result.closed_set


def _metadata(graph: OpenSetModel, model: nn.Module, extra: Mapping[str, Any]) -> dict[str, str]:
    data = {
        "producer": "densehybrid",
        "model": getattr(model, "model_name", type(model).__name__),
        "num_classes": graph.num_classes,
        "score": graph.score,
        "threshold": graph.threshold,
        "unknown_label": graph.num_classes,
        "input": "images (N, 3, H, W) float32 RGB in [0, 1]",
        "outputs": "scores (N, H, W) float32, higher = more anomalous; labels (N, H, W) int64, unknown = num_classes; "
        "closed_set (N, H, W) int64",
        **extra,
    }
    return {key: json.dumps(value) for key, value in data.items()}


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    fmt: str = "onnx",
    *,
    score: str = "densehybrid",
    threshold: float | None = None,
    score_options: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    example_size: tuple[int, int, int] = (1, 160, 288),
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Trace :class:`~densehybrid.openset.OpenSetModel` (through :class:`ExportGraph`) into ``path`` (atomically).

    Args:
        model: a DenseHybrid model.
        path: output file (``.onnx`` or ``.pt``/``.ts`` by convention).
        fmt: ``"onnx"`` or ``"torchscript"``.
        score, threshold, score_options: see :class:`~densehybrid.openset.OpenSetModel`.
        opset: ONNX opset version.
        example_size: (N, H, W) of the tracing input (any size works; one whose feature maps differ in size from
            the pooling grids avoids shortcuts being frozen into the graph).
        metadata: extra entries stored in the file (ONNX ``metadata_props``, TorchScript extra file
            ``densehybrid.json``), e.g. class names.

    Returns:
        the path written.

    Raises:
        ValueError: an unknown format.
        NonFiniteError: the model gives NaN or infinite outputs on the tracing example.
        DenseHybridError: ONNX packages missing, or the export fails.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Expected `fmt` to be one of {', '.join(EXPORT_FORMATS)}, but got {fmt!r}.")
    if fmt == "onnx":
        require_onnx()
    path = Path(path)
    open_set = OpenSetModel(model, score, threshold, score_options)
    graph = ExportGraph(open_set)
    n, h, w = example_size
    example = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    training = model.training
    graph.eval()
    with torch.no_grad():
        open_set.model_outputs(example)  # a model with damaged weights (NaN outputs) is refused before export
    props = _metadata(open_set, model, metadata or {})
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # tracing warns about every Python-level shape check it freezes; the parity check is what verifies
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                traced = torch.jit.trace(graph, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"densehybrid.json": json.dumps(props)})
            else:
                _export_onnx(graph, example, str(tmp), opset, props)
    except Exception as exc:
        if isinstance(exc, DenseHybridError):
            raise
        name = getattr(model, "model_name", type(model).__name__)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # tracer errors append whole graphs
        raise DenseHybridError(f"Cannot export {name} to {fmt} at {str(path)!r}: {detail}") from exc
    finally:
        model.train(training)
    return path


def _export_onnx(graph: nn.Module, example: torch.Tensor, path: str, opset: int, props: Mapping[str, str]) -> None:
    import onnx

    axes = {0: "N", 1: "H", 2: "W"}
    torch.onnx.export(
        graph,
        (example,),
        path,
        dynamo=False,
        opset_version=opset,
        input_names=["images"],
        output_names=list(GRAPH_OUTPUTS),
        dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}, **{name: axes for name in GRAPH_OUTPUTS}},
    )
    proto = onnx.load(path)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"densehybrid.{key}", value
    onnx.save(proto, path)


def load_exported(path: str | os.PathLike[str], fmt: str, threads: int | None = None) -> Callable[[np.ndarray], tuple]:
    """A callable ``images (N, 3, H, W) float32 array -> (scores, labels, closed_set)`` arrays running the exported
    file (files of earlier versions give ``(scores, labels)``).

    Args:
        path: the exported file.
        fmt: ``"onnx"`` (ONNX Runtime, CPU) or ``"torchscript"``.
        threads: intra-op threads of ONNX Runtime (default: its own choice).
    """
    if fmt == "onnx":
        require_onnx()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: tuple(session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)}))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream but still supported
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
            with torch.no_grad():
                outputs = module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
            return tuple(output.numpy() for output in outputs)

        return run
    raise ValueError(f"Expected `fmt` to be one of {', '.join(EXPORT_FORMATS)}, but got {fmt!r}.")


def exported_format(path: str | os.PathLike[str]) -> str | None:
    """``"onnx"`` for a ``.onnx`` file, ``"torchscript"`` for a TorchScript archive, None for anything else (e.g. a
    checkpoint)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    # torch.save archives hold data.pkl only; TorchScript archives hold the compiled code as well
    return "torchscript" if any("/code/" in name or name.startswith("code/") for name in names) else None


def read_exported_metadata(path: str | os.PathLike[str], fmt: str) -> dict[str, Any]:
    """The metadata ``export_model`` stored in the file (ONNX ``metadata_props``, TorchScript ``densehybrid.json``),
    decoded; empty for a file without any.

    Raises:
        CheckpointError: the file cannot be read or its metadata is not JSON.
    """
    try:
        if fmt == "onnx":
            require_onnx()
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            raw = {p.key.removeprefix("densehybrid."): p.value for p in proto.metadata_props}
        else:
            files = {"densehybrid.json": ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.load(str(path), map_location="cpu", _extra_files=files)
            raw = json.loads(files["densehybrid.json"] or "{}")
        return {key: json.loads(value) for key, value in raw.items()}
    except DenseHybridError:
        raise
    except Exception as exc:
        raise CheckpointError(f"Cannot read the exported {fmt} file {str(path)!r}: {exc}") from exc


class ExportedModel:
    """An exported graph run like :class:`~densehybrid.openset.OpenSetModel`: images -> :class:`OpenSetOutput`.

    ONNX files run in ONNX Runtime (CPU), TorchScript files in TorchScript; the score, threshold, K, class names,
    palette and display range come from the file's metadata.

    Args:
        path: a file written by :func:`export_model`.
        fmt: ``"onnx"`` or ``"torchscript"``; default from the file (:func:`exported_format`).
        threads: intra-op threads of ONNX Runtime (default: its own choice).

    Raises:
        CheckpointError: not an exported file, or unreadable metadata.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: str | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        fmt = fmt or exported_format(self.path)
        if fmt not in EXPORT_FORMATS:
            raise CheckpointError(
                f"Expected an exported .onnx or TorchScript file at {str(path)!r}, but it is neither. Export one with "
                "`densehybrid export`."
            )
        self.fmt = fmt
        self.metadata = read_exported_metadata(self.path, fmt)
        k = self.metadata.get("num_classes")
        if self.metadata.get("producer") != "densehybrid" or not isinstance(k, int):
            raise CheckpointError(
                f"Expected the metadata of `densehybrid export` (producer, num_classes, score, threshold) in "
                f"{str(path)!r}, but found {sorted(self.metadata) or 'none'}. Export it with `densehybrid export`."
            )
        self.num_classes = k
        self.score = str(self.metadata.get("score", "densehybrid"))
        self.threshold = self.metadata.get("threshold")
        self.score_options: dict[str, Any] = {}
        self.window = None
        self.device = torch.device("cpu")
        self._threads = threads
        self._run: Callable[[np.ndarray], tuple] | None = None
        self._module: Any = None

    def describe(self) -> str:
        runtime = "ONNX Runtime" if self.fmt == "onnx" else "TorchScript"
        return f"{runtime} ({self.path.name})"

    def check_settings(
        self, score: str, threshold: float | None, score_options: Mapping[str, Any] | None, window: Any
    ) -> None:
        """Refuse settings that differ from the ones baked into the graph (they cannot change without a re-export)."""
        if score != self.score:
            raise ValueError(
                f"Expected the score {self.score!r} of the exported file {str(self.path)!r}, but got {score!r}: the "
                "score is part of the graph. Export again with --score."
            )
        if threshold != self.threshold:
            raise ValueError(
                f"Expected the threshold {self.threshold} of the exported file {str(self.path)!r}, but got "
                f"{threshold}: the threshold is part of the graph. Export again with --threshold."
            )
        if score_options:
            raise ValueError("Expected no score options for an exported graph: its score is part of the graph.")
        if window not in (None, "auto"):
            raise ValueError("Expected no sliding window for an exported graph: it runs the whole image (or tile).")

    def place(self, device: str | torch.device) -> torch.device:
        """Where the graph runs: ONNX Runtime on the CPU (``"auto"`` picks it), TorchScript on ``device``."""
        from densehybrid.engine.runtime import select_device

        if self.fmt == "onnx":
            if str(device) not in ("auto", "cpu"):
                raise ValueError(f"Expected device auto or cpu for an ONNX file (ONNX Runtime, CPU), but got {device}.")
            self.device = torch.device("cpu")
        else:
            self.device = select_device(device)
        return self.device

    def __call__(self, images: torch.Tensor) -> OpenSetOutput:
        """(N, 3, H, W) float images in [0, 1] -> :class:`OpenSetOutput` (scores, labels, closed set) on the device."""
        if self.fmt == "torchscript":
            if self._module is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    self._module = torch.jit.load(str(self.path), map_location=self.device).eval()
            with torch.no_grad():
                outputs = tuple(self._module(images.float().to(self.device)))
        else:
            if self._run is None:
                self._run = load_exported(self.path, "onnx", self._threads)
            outputs = tuple(torch.from_numpy(o) for o in self._run(images.float().cpu().numpy()))
        scores, labels = outputs[0].float(), outputs[1].long()
        # files of earlier versions have no closed_set output: their labels are the closest there is
        closed = outputs[2].long() if len(outputs) > 2 else labels
        return OpenSetOutput(scores, labels, closed)


# --------------------------------------------------------------------------------------------------------------------
# Parity


@dataclass
class ParityReport:
    """The comparison of an exported file with eager PyTorch.

    Attributes:
        fmt: the format checked.
        sizes: the (N, H, W) of the random inputs.
        relative_error: per size, max |exported - eager| / max |eager| of the scores.
        label_mismatches: per size, pixels whose labels differ outside the tolerated pixels.
        tolerated: per size, pixels exempt from the label comparison: within ``tolerance * max|eager|`` of the
            threshold, or whose two largest logits are that close (a tie the argmax may break either way).
        tolerance: the bound on the relative error.
    """

    fmt: str
    sizes: list[tuple[int, int, int]] = field(default_factory=list)
    relative_error: list[float] = field(default_factory=list)
    label_mismatches: list[int] = field(default_factory=list)
    tolerated: list[int] = field(default_factory=list)
    tolerance: float = PARITY_TOLERANCE

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerance for e in self.relative_error) and not any(self.label_mismatches)

    def lines(self) -> list[str]:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"parity {self.fmt} vs PyTorch eager: {verdict} (relative error <= {self.tolerance:g})"]
        for size, error, bad, tolerated in zip(self.sizes, self.relative_error, self.label_mismatches, self.tolerated):
            lines.append(
                f"  N={size[0]} H={size[1]} W={size[2]}: score relative error {error:.2e}, label mismatches {bad} "
                f"({tolerated} pixels at the threshold or at a logit tie exempt)"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "passed": self.passed,
            "tolerance": self.tolerance,
            "sizes": [list(s) for s in self.sizes],
            "relative_error": self.relative_error,
            "label_mismatches": self.label_mismatches,
            "tolerated_pixels": self.tolerated,
        }


@torch.no_grad()
def eager_reference(
    model: nn.Module,
    images: torch.Tensor,
    score: str = "densehybrid",
    threshold: float | None = None,
    score_options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the exported graph should give, from :class:`~densehybrid.openset.OpenSetModel` in eager mode:
    (scores, labels, top-2 logit gap)."""
    result = OpenSetModel(model.eval(), score, threshold, score_options)(images, return_outputs=True)
    logits = result.outputs.logits
    top2 = logits.topk(2, dim=1).values if logits.shape[1] > 1 else None
    gap = (top2[:, 0] - top2[:, 1]) if top2 is not None else torch.full_like(result.scores, math.inf)
    return result.scores, result.labels, gap


def check_parity(
    model: nn.Module,
    path: str | os.PathLike[str],
    fmt: str,
    *,
    score: str = "densehybrid",
    threshold: float | None = None,
    score_options: Mapping[str, Any] | None = None,
    sizes: Sequence[tuple[int, int, int]] = PARITY_SIZES,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> ParityReport:
    """Run the exported file and the eager model on random images of each size and compare.

    Returns:
        :class:`ParityReport` (``passed`` when every relative error is within ``tolerance`` and the labels agree
        outside the tolerated pixels).
    """
    run = load_exported(path, fmt)
    generator = torch.Generator().manual_seed(seed)
    report = ParityReport(fmt=fmt, tolerance=tolerance)
    for n, h, w in sizes:
        images = torch.rand(n, 3, h, w, generator=generator)
        scores, labels, gap = eager_reference(model, images, score, threshold, score_options)
        exported_scores, exported_labels = run(images.numpy())[:2]
        reference = scores.numpy()
        scale = max(float(np.abs(reference).max()), 1e-12)
        if exported_scores.shape != reference.shape or exported_labels.shape != reference.shape:
            report.sizes.append((n, h, w))
            report.relative_error.append(math.inf)
            report.label_mismatches.append(int(reference.size))
            report.tolerated.append(0)
            continue
        error = float(np.abs(exported_scores.astype(np.float64) - reference).max()) / scale
        band = tolerance * scale
        exempt = (gap.numpy() <= band) if threshold is None else (np.abs(reference - threshold) <= band)
        if threshold is not None:
            exempt |= (gap.numpy() <= band) & (reference <= threshold)
        differ = exported_labels != labels.numpy()
        report.sizes.append((n, h, w))
        report.relative_error.append(error)
        report.label_mismatches.append(int((differ & ~exempt).sum()))
        report.tolerated.append(int(exempt.sum()))
    return report

"""Evaluate a model on a registered benchmark under the benchmark's own protocol (``densehybrid evaluate``).

:func:`evaluate_benchmark` reads the benchmark's official tree, runs the model at full resolution (by default) and
returns the metrics as a JSON-ready dict:

* anomaly detection per score, with the protocol of the benchmark's official evaluation
  (:attr:`~densehybrid.data.datasets.BenchmarkSpec.protocol`): pixels pooled over the split for Fishyscapes and
  RoadAnomaly (as the released DenseHybrid code), per-image means for StreetHazards (released code), the SMIYC
  toolkit's binned pooled curve for the SegmentMeIfYouCan sets;
* SMIYC component metrics (sIoU, PPV, mean F1) when the protocol is ``smiyc`` or when asked for: the score is
  binarised at the best-F1 threshold of the pixel curve, as the toolkit's ``default_instancer`` does, which needs a
  second pass over the frames;
* closed-set mIoU for semantic targets (StreetHazards, COCO20/80, Cityscapes).

Under ``torchrun`` every rank evaluates its block of the frames and gets the merged result, equal to one process's
(see :mod:`densehybrid.engine.evaluate`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from densehybrid.data.datasets import BenchmarkDataset, BenchmarkSpec, get_benchmark
from densehybrid.engine.evaluate import evaluate, model_outputs
from densehybrid.errors import DatasetError
from densehybrid.labels import anomaly_target
from densehybrid.metrics import COMPONENT_TRACKS, PROTOCOLS, ComponentMetrics
from densehybrid.models.output import output_fields
from densehybrid.models.window import SlidingWindow, describe_window, resolve_window
from densehybrid.scores import check_score_inputs, compute_score, score_info

#: Benchmarks without anomalies: only the closed-set mIoU is evaluated there.
CLOSED_SET_BENCHMARKS = frozenset({"cityscapes"})

#: SMIYC component-metric track (minimum component sizes) of each benchmark; others default to ``"anomaly"``.
BENCHMARK_TRACKS: dict[str, str] = {
    "smiyc-anomaly": "anomaly",
    "smiyc-obstacle": "obstacle",
    "laf-test": "obstacle",
    "laf-noknown": "obstacle",
}

#: FPR95 rule of the pooled protocol per benchmark, as its released evaluation computes it: the DenseHybrid
#: Fishyscapes code takes the first ``roc_curve`` point with TPR > 0.95 (``evaluations/base.py``), the COCO20 code
#: the first with TPR >= 0.95 (``evaluate_osr_coco.py``). Others (RoadAnomaly, SMIYC sets run pooled) use the
#: metric's default, the exact first TPR >= 0.95.
POOLED_FPR95_RULES: dict[str, str] = {"fs-laf": "above", "fs-static": "above", "coco20": "at_least"}

_WORKER_ERROR = re.compile(r"^densehybrid\.[\w.]*(?:DatasetFileError|DatasetError|CheckpointError): (.*)$")


class ScaleImage:
    """Dataset transform resizing only the image by ``scale`` (bilinear); the target keeps its full resolution.

    The model then runs on the smaller image and its outputs are upsampled to the label's resolution, so metrics are
    always computed on the full-resolution labels.

    Args:
        scale: resize factor, > 0 (1.0 leaves the sample unchanged).
    """

    def __init__(self, scale: float) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"Expected `input_scale` to be a positive number, but got {scale!r}.")
        self.scale = float(scale)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.scale == 1.0:
            return sample
        image = sample["image"][None]
        height, width = image.shape[-2:]
        if min(math.floor(height * self.scale), math.floor(width * self.scale)) < 1:
            raise DatasetError(
                f"Expected `--input-scale` {self.scale:g} to leave at least 1 px per side, but frame "
                f"{sample.get('name', '?')!r} of {height}x{width} px would become "
                f"{math.floor(height * self.scale)}x{math.floor(width * self.scale)}: use a larger scale."
            )
        resized = F.interpolate(
            image, scale_factor=self.scale, mode="bilinear", align_corners=False, antialias=self.scale < 1
        )
        return {**sample, "image": resized[0].clamp_(0.0, 1.0)}


@contextlib.contextmanager
def dataset_worker_errors() -> Iterator[None]:
    """Turn a dataset error raised inside a ``DataLoader`` worker back into a one-line :class:`DatasetError`.

    PyTorch re-raises exceptions of worker processes as ``RuntimeError`` holding the worker's whole traceback when
    the exception type cannot be rebuilt from a message (our file errors carry the path and the fix separately).
    """
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not text.startswith("Caught "):
            raise
        for line in reversed(text.strip().splitlines()):
            match = _WORKER_ERROR.match(line.strip())
            if match:
                raise DatasetError(match.group(1)) from exc
        raise


@contextlib.contextmanager
def same_size_batches(batch_size: int, benchmark: str) -> Iterator[None]:
    """Turn the collate error of frames of different sizes in one batch into a ``ValueError`` naming the benchmark."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        text = str(exc)
        if batch_size > 1 and ("stack expects each tensor to be equal size" in text or "share one size" in text):
            raise ValueError(
                f"Expected the frames of a batch to share one size for `batch_size` {batch_size}, but benchmark "
                f"{benchmark!r} has frames of different sizes. Use a batch size of 1."
            ) from exc
        raise


def open_benchmark(
    spec: BenchmarkSpec | str,
    root: str | Path,
    split: str | None = None,
    options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    require_labels: bool = True,
) -> tuple[BenchmarkDataset, Dataset]:
    """Build a benchmark's loader and the (possibly shortened, rescaled) dataset to evaluate.

    Args:
        spec: a :class:`BenchmarkSpec` or a benchmark name.
        root: the dataset root.
        split: default the benchmark's evaluation split.
        options: loader options (``--option KEY=VALUE``).
        limit: keep only the first ``limit`` frames (a quick look; not comparable to published numbers).
        input_scale: resize factor of the model input (see :class:`ScaleImage`).
        require_labels: refuse frames without public labels (e.g. the SMIYC test frames).

    Returns:
        ``(loader, dataset)``: the full loader and what to iterate (a :class:`~torch.utils.data.Subset` with
        ``limit``).

    Raises:
        ValueError: bad ``limit``, unknown option or split, or unlabelled frames with ``require_labels``.
        DatasetError: the tree is missing or broken.
    """
    spec = get_benchmark(spec) if isinstance(spec, str) else spec
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"Expected `limit` to be a positive integer, but got {limit!r}.")
    transform = ScaleImage(input_scale) if input_scale != 1.0 else None
    loader = spec.create(root, split, transform=transform, **dict(options or {}))
    count = len(loader) if limit is None else min(limit, len(loader))
    if require_labels:
        unlabelled = [frame.name for frame in loader.frames[:count] if frame.label is None]
        if unlabelled:
            raise ValueError(
                f"Expected labelled frames, but {len(unlabelled)} of {count} frames of split {loader.split!r} of "
                f"{spec.name!r} have no public labels (e.g. {unlabelled[0]!r}). Evaluate a labelled split (e.g. "
                f"--split {spec.split}), or write a submission with `densehybrid export-smiyc`."
            )
    dataset: Dataset = loader if count == len(loader) else Subset(loader, range(count))
    return loader, dataset


def check_scores(scores: Sequence[str], score_options: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """Validate score names and that scores needing fitted statistics get them.

    Returns:
        the canonical score names.

    Raises:
        ValueError: an unknown score, a repeated one, or ``sml`` without ``statistics``.
    """
    names = [score_info(name).name for name in scores]
    if len(set(names)) != len(names):
        raise ValueError(f"Expected each score once, but got {list(scores)}.")
    for name in names:
        if score_info(name).requires_fit and "statistics" not in (score_options or {}).get(name, {}):
            raise ValueError(
                f"Expected fitted statistics for score {name!r} (on the command line: --sml-statistics FILE, saved "
                "with torch.save(fit_sml_statistics(...).to_dict(), FILE)), but got none."
            )
    return names


def model_num_classes(model: nn.Module, dataset: BenchmarkDataset, num_classes: int | None, benchmark: str) -> int:
    """K of the model, checked against a semantic benchmark's classes.

    Raises:
        ValueError: a semantic benchmark whose K differs from the model's.
    """
    k = num_classes or getattr(model, "num_classes", None) or dataset.num_classes
    if dataset.target_kind == "semantic" and k != dataset.num_classes:
        raise ValueError(
            f"Expected a model with the {dataset.num_classes} classes of benchmark {benchmark!r} (its targets mark "
            f"anomalies with id {dataset.num_classes}), but the model has {k}. Use a checkpoint trained on it, or "
            "change the encoding with --option."
        )
    return int(k)


def resolve_request(
    spec: BenchmarkSpec | str,
    scores: Sequence[str] | None = None,
    protocol: str | None = None,
    components: bool | None = None,
    component_track: str | None = None,
) -> tuple[str, list[str], bool, str]:
    """Check an evaluation request before any data or weights are read (see :func:`evaluate_benchmark`).

    Returns:
        ``(protocol, scores, components, track)``: the protocol to run, the score names (default ``densehybrid``,
        none for Cityscapes), whether component metrics run, and their SMIYC track.

    Raises:
        ValueError: a benchmark without a protocol (ADE20K), an unknown protocol, score or track, scores for a
            benchmark without anomalies, or component metrics under the per-image protocol or without a score.
    """
    spec = get_benchmark(spec) if isinstance(spec, str) else spec
    if spec.protocol is None:
        raise ValueError(
            f"Expected a benchmark with an evaluation protocol, but {spec.name!r} only provides training negatives."
        )
    protocol = spec.protocol if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"Expected `protocol` to be one of {', '.join(PROTOCOLS)}, but got {protocol!r}.")
    if scores is None:
        scores = () if spec.name in CLOSED_SET_BENCHMARKS else ("densehybrid",)
    elif scores and spec.name in CLOSED_SET_BENCHMARKS:
        raise ValueError(
            f"Expected no anomaly scores for {spec.name!r}, which has no anomalies (only its closed-set mIoU is "
            f"evaluated), but got {list(scores)}."
        )
    names = [score_info(name).name for name in scores]
    if len(set(names)) != len(names):
        raise ValueError(f"Expected each score once, but got {list(scores)}.")
    components = protocol == "smiyc" if components is None else bool(components)
    track = component_track or BENCHMARK_TRACKS.get(spec.name, "anomaly")
    if track not in COMPONENT_TRACKS:
        raise ValueError(f"Expected `component_track` to be one of {', '.join(COMPONENT_TRACKS)}, but got {track!r}.")
    if components and protocol == "per_image":
        raise ValueError(
            "Expected protocol 'pooled' or 'smiyc' for component metrics (they threshold at the best F1 of the pooled "
            "pixel curve), but got 'per_image'."
        )
    if components and not names:
        raise ValueError("Expected an anomaly score for component metrics, but got none.")
    return protocol, names, components, track


def evaluate_benchmark(
    spec: BenchmarkSpec | str,
    root: str | Path,
    model: nn.Module,
    scores: Sequence[str] | None = None,
    *,
    split: str | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    protocol: str | None = None,
    protocol_options: Mapping[str, Any] | None = None,
    score_options: Mapping[str, Mapping[str, Any]] | None = None,
    components: bool | None = None,
    component_track: str | None = None,
    num_classes: int | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    amp: bool = False,
    device: str | torch.device = "auto",
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = True,
    window: SlidingWindow | str | None = "auto",
) -> dict[str, Any]:
    """Evaluate ``model`` on a benchmark under its official protocol.

    Args:
        spec: a :class:`BenchmarkSpec` or a benchmark name (see ``densehybrid.data.datasets.BENCHMARKS``).
        root: the dataset root, in the benchmark's official layout.
        model: a DenseHybrid model (``forward(images, output_size) -> HybridOutput``) or a DiCNet model
            (``-> DistillationOutput``; score ``dicnet``).
        scores: anomaly scores to evaluate; default ``("densehybrid",)``, none for Cityscapes (closed set only).
        split: default the benchmark's evaluation split.
        dataset_options: loader options.
        protocol: ``pooled``, ``per_image`` or ``smiyc``; default the benchmark's.
        protocol_options: keyword options of the protocol's metric (e.g. ``{"variant": "streethazards"}``); the
            pooled protocol's ``fpr95_rule`` defaults to the benchmark's released rule (:data:`POOLED_FPR95_RULES`).
        score_options: per-score keyword options, e.g. ``{"sml": {"statistics": stats}}``.
        components: SMIYC component metrics; default on exactly when the protocol is ``smiyc``. They need the
            pixel curve's best-F1 threshold, so the frames are run through the model a second time.
        component_track: ``"anomaly"`` (components >= 500 px, ground truth >= 100 px) or ``"obstacle"`` (50/10);
            default the benchmark's SMIYC track.
        num_classes: K of the model; default ``model.num_classes``.
        limit: evaluate only the first ``limit`` frames.
        input_scale: resize factor of the model input; metrics stay at the labels' full resolution.
        window: sliding-window inference: ``"auto"`` (the model's released window, e.g. the Segmenter's 512/320
            probability merge of the COCO20 evaluation), a :class:`~densehybrid.models.window.SlidingWindow` or None.
        amp: bfloat16 autocast on CUDA (faster, slightly different scores); the released code runs float32.
        device, batch_size, num_workers, progress: loop settings (progress bars go to stderr).

    Returns:
        A JSON-ready dict: ``benchmark``, ``split``, ``protocol``, ``protocol_options``, ``target_kind``,
        ``num_classes``, ``num_images``, ``expected_images`` (frames of a complete split), ``complete``,
        ``input_scale``, ``anomaly`` (score -> the protocol metric's ``compute()``: ``ap``, ``auroc``, ``fpr95``, ...),
        ``components`` (score -> :class:`~densehybrid.metrics.ComponentMetrics` results, or None) and
        ``closed_set`` (``miou``, ``iou``, ``class_names``, ... for semantic targets, else None).

    Raises:
        ValueError: bad arguments, a benchmark that is not evaluated (ADE20K), unlabelled frames, or a model whose
            classes do not fit a semantic benchmark.
        DatasetError: a missing or broken tree (also when raised inside a ``DataLoader`` worker).

    Example:
        >>> from densehybrid.models import create_model
        >>> model = create_model("ldn121", num_classes=12)
        >>> result = evaluate_benchmark("streethazards", "/data/streethazards", model)  # doctest: +SKIP
        >>> result["anomaly"]["densehybrid"]["ap"]  # doctest: +SKIP
    """
    spec = get_benchmark(spec) if isinstance(spec, str) else spec
    protocol, names, components, track = resolve_request(spec, scores, protocol, components, component_track)
    names = check_scores(names, score_options)
    check_score_inputs(names, output_fields(model), f"model {getattr(model, 'model_name', type(model).__name__)!r}")
    _check_protocol_options(protocol, protocol_options)
    _check_dicnet_variant(spec.name, protocol_options, dataset_options)
    if protocol == "pooled" and spec.name in POOLED_FPR95_RULES:
        protocol_options = {"fpr95_rule": POOLED_FPR95_RULES[spec.name], **dict(protocol_options or {})}
    loader, dataset = open_benchmark(spec, root, split, dataset_options, limit, input_scale)
    k = model_num_classes(model, loader, num_classes, spec.name)
    semantic = loader.target_kind == "semantic"
    # Cityscapes with its instance files: the official iIoU and category metrics join the closed-set ones.
    official_cityscapes = (
        hasattr(loader, "instance_path") and len(loader.frames) > 0 and loader.instance_path(loader.frames[0]).is_file()
    )
    if official_cityscapes:
        loader.instances = True
    with dataset_worker_errors(), same_size_batches(batch_size, spec.name):
        result = evaluate(
            model,
            dataset,
            names,
            target_kind=loader.target_kind,
            num_classes=k if semantic else None,
            protocol=protocol,
            protocol_options=protocol_options,
            score_options=score_options,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            amp=amp,
            window=window,
            cityscapes_metrics=official_cityscapes,
        )
        anomaly = {name: result.anomaly[name]["all"] for name in names}
        component_results = None
        if components:
            component_results = _component_metrics(
                model,
                dataset,
                anomaly,
                k if semantic else None,
                track,
                protocol,
                score_options,
                (device, batch_size, num_workers, amp, progress, window),
            )
    closed = None
    if result.closed_set is not None:
        closed = {**result.closed_set, "class_names": list(loader.class_names)}
        for key in ("open_miou", "open_iou", "anomaly_iou"):  # no threshold here: these equal the closed-set IoUs
            closed.pop(key, None)
    expected = spec.expected_counts.get(loader.split)
    return {
        "benchmark": spec.name,
        "split": loader.split,
        "protocol": protocol,
        "protocol_options": dict(protocol_options or {}),
        "target_kind": loader.target_kind,
        "num_classes": k,
        "num_images": result.num_images,
        "expected_images": expected,
        "complete": expected is not None and result.num_images == expected,
        "input_scale": float(input_scale),
        "window": describe_window(resolve_window(model, window)),
        "anomaly": anomaly,
        "components": component_results,
        "component_track": track if components else None,
        "closed_set": closed,
    }


def _check_protocol_options(protocol: str, options: Mapping[str, Any] | None) -> None:
    parameters = inspect.signature(PROTOCOLS[protocol].__init__).parameters
    allowed = sorted(name for name in parameters if name not in ("self", "device"))
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ValueError(
            f"Expected options of the {protocol!r} metric among ({', '.join(allowed)}), but got {', '.join(unknown)}."
        )


def _check_dicnet_variant(
    benchmark: str, protocol_options: Mapping[str, Any] | None, dataset_options: Mapping[str, Any] | None
) -> None:
    """The released DiCNet protocol has no ignore label: on StreetHazards it needs the ``hendrycks`` encoding."""
    encoding = dict(dataset_options or {}).get("encoding", "densehybrid")
    if (
        benchmark == "streethazards"
        and dict(protocol_options or {}).get("variant") == "dicnet"
        and encoding != "hendrycks"
    ):
        raise ValueError(
            "Expected the loader option encoding=hendrycks with the per-image variant 'dicnet' (DiCNet counts "
            f"'unlabeled' and 'other' as inliers, with no ignore label), but got encoding {encoding!r}. Add "
            "--option encoding=hendrycks."
        )


def _component_metrics(
    model: nn.Module,
    dataset: Dataset,
    anomaly: Mapping[str, Mapping[str, Any]],
    semantic_classes: int | None,
    track: str,
    protocol: str,
    score_options: Mapping[str, Mapping[str, Any]] | None,
    loop: tuple[str | torch.device, int, int, bool, bool, SlidingWindow | str | None],
) -> dict[str, dict[str, Any] | None]:
    """Second pass: SMIYC component metrics of each score at its pixel curve's best-F1 threshold.

    ``semantic_classes`` is K for semantic targets (anomaly id K), None for binary ones; ``loop`` holds
    ``(device, batch_size, num_workers, amp, progress, window)``.
    """
    device, batch_size, num_workers, amp, progress, window = loop
    metrics: dict[str, ComponentMetrics] = {}
    results: dict[str, dict[str, Any] | None] = {}
    for name, values in anomaly.items():
        threshold = values.get("best_f1_threshold")
        if threshold is None or threshold != threshold:
            warnings.warn(
                f"Score {name!r} has no best-F1 threshold (no anomaly pixels?): its component metrics are skipped.",
                UserWarning,
                stacklevel=3,
            )
            results[name] = None
            continue
        metrics[name] = ComponentMetrics(float(threshold), track=track, float16=protocol == "smiyc")
    if metrics:
        options = {k: dict(v) for k, v in (score_options or {}).items()}
        for batch, out in model_outputs(
            model,
            dataset,
            device,
            batch_size,
            num_workers,
            amp=amp,
            progress=progress,
            desc="components",
            window=window,
        ):
            target = batch["target"].to(out.logits.device).long()
            binary = target if semantic_classes is None else anomaly_target(target, semantic_classes)
            for name, metric in metrics.items():
                metric.update(compute_score(name, out, **options.get(name, {})), binary)
        results.update({name: metric.sync().compute() for name, metric in metrics.items()})
    return results

"""Open-set segmentation protocols: a threshold calibrated on one part of the data, open-mIoU on the other.

StreetHazards (:func:`streethazards_open_set`) follows the released DenseHybrid ``evaluate_osr.py``
(https://github.com/matejgrcic/DenseHybrid; Grcić et al., ECCV 2022):

1. the anomaly score of every pixel of one test town is computed at full resolution, then the score map is
   downsampled bilinearly by ``calibration_scale`` (0.5) and the label map by nearest neighbour; ignored pixels
   are dropped and all remaining pixels of the town are pooled;
2. the threshold is the first ROC threshold whose TPR exceeds the target (0.95), strictly
   (:func:`~densehybrid.openset.calibrate_threshold` with ``strict=True``);
3. on the *other* town, at full resolution, pixels with ``score > threshold`` become the unknown class K
   (:func:`~densehybrid.openset.predict_open_set`) and open-IoU is accumulated in one confusion matrix
   (:class:`~densehybrid.metrics.ConfusionMatrix`);
4. both folds are run (calibrate on t5, evaluate t6; calibrate on t6, evaluate t5) and the final open-mIoU is
   their average weighted by the number of evaluated images; the closed-set mIoU is pooled over both towns.

The TPAMI-era ``evaluate_osr_sh.py`` is the same protocol except that NaN IoUs (a known class absent from the
targets and predictions of a town) are set to 0 before averaging; that is the default here (``nan_iou="zero"``),
``nan_iou="skip"`` gives the ECCV ``nanmean``.

COCO20/80 (:func:`coco_open_set`), ``coco_protocol="released"`` (default): the TPAMI-era ``evaluate_osr_coco.py``
calibrates on the same split it evaluates. The anomaly score of every pixel of COCO val2017 (the released lists
hold 4,952 images) is pooled over the split, stuff and unlabelled pixels ignored, and the threshold is the first
threshold of scikit-learn's ``roc_curve`` with TPR >= 0.95 (``calibration_rule="at_least"``); open-mIoU over the 20
known classes comes from one pooled confusion matrix of the same split, NaN IoUs set to 0. This is the protocol of
the TPAMI COCO20/80 table. ``coco_protocol="halves"`` is our stricter alternative, which never applies a threshold
to the images it was fitted on: val2017, sorted by image id, is cut into two halves; the threshold calibrated on one
half is applied to the other, both ways, and the open-mIoU is the image-weighted average. Numbers from the halves
protocol are ours, not the paper's.

Under ``torchrun`` every rank runs the model over its block of each part; thresholds are calibrated on the pixels of
all ranks (exactly, :func:`~densehybrid.openset.calibrate_threshold` with ``distributed=True``) and the confusion
matrices summed, so every rank gets the single-process result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from densehybrid.data.datasets import BenchmarkDataset, get_benchmark
from densehybrid.engine import distributed
from densehybrid.engine.evaluate import model_outputs
from densehybrid.evaluation.benchmark import (
    check_scores,
    dataset_worker_errors,
    model_num_classes,
    open_benchmark,
    same_size_batches,
)
from densehybrid.labels import ANOMALY, anomaly_target
from densehybrid.metrics import ConfusionMatrix
from densehybrid.metrics.segmentation import NAN_IOU_RULES
from densehybrid.models.window import SlidingWindow, describe_window, resolve_window
from densehybrid.openset import CALIBRATION_METHODS, OpenSetModel, calibrate_threshold

#: Benchmarks with an open-set protocol and their default calibration scale.
OPEN_SET_BENCHMARKS: dict[str, float] = {"streethazards": 0.5, "coco20": 1.0, "folder": 1.0, "roadscene": 1.0}
#: The StreetHazards test towns, in fold order.
STREETHAZARDS_TOWNS = ("t5", "t6")
#: Calibration rules at the target TPR: "above" = first ``roc_curve`` threshold with TPR > target (released
#: StreetHazards code), "at_least" = first with TPR >= target (released COCO20 code).
CALIBRATION_RULES = ("above", "at_least")
#: COCO20/80 protocols: "released" (calibrate and evaluate on the same val split) and "halves" (two folds).
COCO_PROTOCOLS = ("released", "halves")


def _loop_kwargs(device, batch_size, num_workers, amp, progress) -> dict[str, Any]:
    return {"device": device, "batch_size": batch_size, "num_workers": num_workers, "amp": amp, "progress": progress}


def calibration_pairs(
    model: nn.Module,
    dataset: Dataset,
    score: str,
    num_classes: int,
    scale: float = 1.0,
    score_options: Mapping[str, Any] | None = None,
    desc: str = "calibrate",
    window: SlidingWindow | str | None = "auto",
    **loop: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(scores, binary target)`` per batch for :func:`~densehybrid.openset.calibrate_threshold`.

    Scores are computed at the label resolution, then both maps are resized by ``scale``: bilinearly
    (``align_corners=False``) for scores, nearest-neighbour for labels, as the released StreetHazards code does.

    Args:
        model: the model.
        dataset: semantic targets (ids ``0..K-1``, anomaly K, ignore 255).
        score: registered score name.
        num_classes: K.
        scale: resize factor of the calibration maps (1.0: none).
        score_options: keyword options of the score.
        desc: progress-bar label.
        window: sliding-window inference of :class:`~densehybrid.openset.OpenSetModel` (``"auto"``: the model's).
        **loop: ``device``, ``batch_size``, ``num_workers``, ``amp``, ``progress`` of
            :func:`~densehybrid.engine.evaluate.model_outputs`.
    """
    open_set = OpenSetModel(model, score, None, score_options, window)
    for batch, out in model_outputs(open_set, dataset, desc=desc, window=None, **loop):
        scores = out.scores
        binary = anomaly_target(batch["target"].to(scores.device).long(), num_classes)
        if scale != 1.0:
            scores = F.interpolate(scores[:, None], scale_factor=scale, mode="bilinear", align_corners=False)[:, 0]
            binary = F.interpolate(binary[:, None].float(), scale_factor=scale, mode="nearest")[:, 0].long()
        yield scores, binary


def open_set_confusion(
    model: nn.Module,
    dataset: Dataset,
    score: str,
    threshold: float,
    num_classes: int,
    score_options: Mapping[str, Any] | None = None,
    desc: str = "open-set",
    window: SlidingWindow | str | None = "auto",
    **loop: Any,
) -> tuple[ConfusionMatrix, ConfusionMatrix, int]:
    """Closed-set and open-set confusion matrices of ``dataset`` at full (label) resolution, from
    :class:`~densehybrid.openset.OpenSetModel` (in a process group: over every rank's block).

    Returns:
        ``(closed, open, num_images)``: the closed-set matrix holds the argmax over the K classes, the open-set one
        the same argmax with ``score > threshold`` pixels set to K.
    """
    open_set = OpenSetModel(model, score, threshold, score_options, window)
    closed, opened = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    num_images = 0
    for batch, out in model_outputs(open_set, dataset, desc=desc, window=None, **loop):
        target = batch["target"].to(out.labels.device).long()
        closed.update(out.closed_set, target)
        opened.update(out.labels, target)
        num_images += target.shape[0]
    if distributed.is_distributed():
        closed.sync(), opened.sync()
        num_images = int(distributed.sum_over_ranks(torch.tensor(num_images)))
    return closed, opened, num_images


class _CountAnomalies:
    """Pass ``(scores, binary target)`` pairs through, counting anomaly pixels (to explain a failed calibration)."""

    def __init__(self, pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = pairs
        self.anomalies = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for scores, binary in self.pairs:
            self.anomalies += int((binary == ANOMALY).sum())
            yield scores, binary


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    total = sum(weights)
    if total == 0 or any(math.isnan(v) for v in values):
        return math.nan
    return sum(v * w for v, w in zip(values, weights)) / total


def two_fold_open_set(
    model: nn.Module,
    parts: Mapping[str, Dataset],
    score: str = "densehybrid",
    **kwargs: Any,
) -> dict[str, Any]:
    """Calibrate on each of two parts, evaluate open-mIoU on the other, and average weighted by image count.

    Args:
        model: the model.
        parts: exactly two named datasets with semantic targets (ids ``0..K-1``, anomaly K, ignore 255).
        score: the anomaly score that decides "unknown".
        **kwargs: :func:`open_set_folds` options (``num_classes`` is required).

    Returns:
        :func:`open_set_folds`' dict for the folds (first part -> second part) and (second -> first).

    Raises:
        ValueError: not two parts, or what :func:`open_set_folds` raises.
    """
    if len(parts) != 2:
        raise ValueError(f"Expected exactly two parts for the two-fold protocol, but got {list(parts)}.")
    first, second = list(parts)
    return open_set_folds(model, parts, [(first, second), (second, first)], score, **kwargs)


def open_set_folds(
    model: nn.Module,
    parts: Mapping[str, Dataset],
    folds: Sequence[tuple[str, str]],
    score: str = "densehybrid",
    *,
    num_classes: int,
    target_tpr: float = 0.95,
    method: str = "tpr",
    calibration_rule: str = "above",
    calibration_scale: float = 0.5,
    nan_iou: str = "zero",
    score_options: Mapping[str, Mapping[str, Any]] | None = None,
    class_names: Sequence[str] = (),
    device: str | torch.device = "auto",
    batch_size: int = 1,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
    benchmark: str = "",
    window: SlidingWindow | str | None = "auto",
) -> dict[str, Any]:
    """Calibrate a threshold on one part, evaluate open-mIoU on another (or the same), per fold; average the folds.

    Args:
        model: the model.
        parts: named datasets with semantic targets (ids ``0..K-1``, anomaly K, ignore 255).
        folds: ``(calibration part, evaluation part)`` names; each part is calibrated once.
        score: the anomaly score that decides "unknown".
        num_classes: K.
        target_tpr: TPR the threshold reaches on the calibration part (``method="tpr"``).
        method: ``"tpr"`` (released code) or ``"f1"`` (best pixel F1 on the calibration part).
        calibration_rule: ``"above"``: the first threshold of scikit-learn's ``roc_curve`` with TPR > ``target_tpr``
            (released StreetHazards code); ``"at_least"``: the first with TPR >= it (released COCO20 code).
        calibration_scale: resize factor of the calibration score and label maps.
        nan_iou: ``"zero"``: NaN IoUs (known classes absent from a fold's targets and predictions) count as 0 in the
            open-mIoU (TPAMI-era released scripts); ``"skip"``: NaN-ignoring mean (ECCV ``evaluate_osr.py``).
        score_options: per-score keyword options.
        class_names: the K class names, stored beside the per-class IoUs.
        device, batch_size, num_workers, amp, progress: loop settings.
        benchmark: name used in error messages.
        window: sliding-window inference: ``"auto"`` (the model's released window: the Segmenter's 512x512
            windows, stride 320, merged as probabilities, as the released COCO20 evaluation), a
            :class:`~densehybrid.models.window.SlidingWindow` or None (whole image).

    Returns:
        A JSON-ready dict: ``folds`` (per fold: ``calibration``, ``evaluation``, ``threshold``,
        ``calibration_images``, ``num_images``, ``open_miou``, ``open_iou``, ``anomaly_iou``, ``closed_miou``),
        ``open_miou`` and ``anomaly_iou`` (image-weighted means over the folds), ``closed_miou`` and ``closed_iou``
        (pooled over the evaluated parts, each once), ``miou_gap`` (closed minus open), ``num_images``,
        ``class_names`` and the settings.

    Raises:
        ValueError: a bad method/rule/TPR/scale/fold, or a calibration part without anomaly pixels.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"Expected `method` to be one of {', '.join(CALIBRATION_METHODS)}, but got {method!r}.")
    if calibration_rule not in CALIBRATION_RULES:
        raise ValueError(
            f"Expected `calibration_rule` to be one of {', '.join(CALIBRATION_RULES)}, but got {calibration_rule!r}."
        )
    if nan_iou not in NAN_IOU_RULES:
        raise ValueError(f"Expected `nan_iou` to be one of {', '.join(NAN_IOU_RULES)}, but got {nan_iou!r}.")
    if isinstance(target_tpr, bool) or not isinstance(target_tpr, (int, float)) or not 0.0 < target_tpr < 1.0:
        raise ValueError(f"Expected `target_tpr` in (0, 1), but got {target_tpr!r}.")
    if isinstance(calibration_scale, bool) or not isinstance(calibration_scale, (int, float)):
        raise ValueError(f"Expected `calibration_scale` to be a number in (0, 1], but got {calibration_scale!r}.")
    if not 0.0 < calibration_scale <= 1.0:
        raise ValueError(f"Expected `calibration_scale` in (0, 1], but got {calibration_scale!r}.")
    unknown = sorted({name for fold in folds for name in fold} - set(parts))
    if not folds or unknown:
        raise ValueError(f"Expected folds over the parts {list(parts)}, but got {list(folds)}.")
    (score,) = check_scores([score], score_options)
    options = dict((score_options or {}).get(score, {}))
    window = resolve_window(model, window)
    loop = {**_loop_kwargs(device, batch_size, num_workers, amp, progress), "window": window}
    thresholds: dict[str, float] = {}
    with dataset_worker_errors(), same_size_batches(batch_size, benchmark):
        for name in dict.fromkeys(calibration for calibration, _ in folds):
            pairs = calibration_pairs(
                model, parts[name], score, num_classes, calibration_scale, options, desc=f"calibrate {name}", **loop
            )
            counted = _CountAnomalies(pairs)
            try:
                thresholds[name] = calibrate_threshold(
                    counted,
                    method=method,
                    target_tpr=target_tpr,
                    strict=calibration_rule == "above",
                    drop_intermediate=True,  # both released scripts walk scikit-learn's roc_curve
                    distributed=distributed.is_distributed(),
                )
            except ValueError as exc:
                if counted.anomalies or "anomaly pixels" not in str(exc):
                    raise
                raise ValueError(
                    f"Expected anomaly pixels in the calibration part {name!r} of {benchmark or 'the data'}, but "
                    "found none: the threshold cannot be calibrated there."
                ) from exc
        results, pooled_closed, closed_seen = [], ConfusionMatrix(num_classes), set()
        for calibration, evaluation in folds:
            closed, opened, count = open_set_confusion(
                model,
                parts[evaluation],
                score,
                thresholds[calibration],
                num_classes,
                options,
                desc=f"open-set {evaluation}",
                **loop,
            )
            if evaluation not in closed_seen:
                closed_seen.add(evaluation)
                pooled_closed.merge(closed)
            open_result, closed_result = opened.compute(nan_iou=nan_iou), closed.compute()
            results.append(
                {
                    "calibration": calibration,
                    "evaluation": evaluation,
                    "threshold": thresholds[calibration],
                    "calibration_images": len(parts[calibration]),
                    "num_images": count,
                    "open_miou": open_result["open_miou"],
                    "open_iou": open_result["open_iou"],
                    "anomaly_iou": open_result["anomaly_iou"],
                    "closed_miou": closed_result["miou"],
                    "num_pixels": open_result["num_pixels"],
                }
            )
    counts = [fold["num_images"] for fold in results]
    closed_all = pooled_closed.compute()
    open_miou = _weighted([fold["open_miou"] for fold in results], counts)
    tpr = method == "tpr"
    return {
        "score": score,
        "calibration_method": method,
        "target_tpr": float(target_tpr) if tpr else None,
        "calibration_rule": calibration_rule if tpr else None,
        "strict_tpr": calibration_rule == "above" if tpr else None,
        "calibration_scale": float(calibration_scale),
        "window": describe_window(window),
        "nan_iou": nan_iou,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "num_images": sum(counts),
        "folds": results,
        "open_miou": open_miou,
        "anomaly_iou": _weighted([fold["anomaly_iou"] for fold in results], counts),
        "closed_miou": closed_all["miou"],
        "closed_iou": closed_all["iou"],
        "miou_gap": closed_all["miou"] - open_miou,
    }


def _check_options(options: Mapping[str, Any] | None, reserved: str, benchmark: str) -> dict[str, Any]:
    options = dict(options or {})
    if reserved in options:
        raise ValueError(
            f"Expected no `{reserved}` option for the open-set protocol of {benchmark!r}: the protocol chooses the "
            f"parts itself, but got {reserved}={options[reserved]!r}."
        )
    return options


def _describe(loader: BenchmarkDataset, indices: range) -> dict[str, Any]:
    return {
        "num_images": len(indices),
        "first_frame": loader.frames[indices[0]].name if len(indices) else None,
        "last_frame": loader.frames[indices[-1]].name if len(indices) else None,
    }


def streethazards_open_set(
    root: str | Path,
    model: nn.Module,
    score: str = "densehybrid",
    *,
    dataset_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    num_classes: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The StreetHazards two-fold open-set protocol of the released code (see the module docstring).

    Args:
        root: the StreetHazards root (``test/images/test/{t5,t6}``, ...).
        model: a model with the benchmark's K (12 with the default encoding).
        score: the anomaly score.
        dataset_options: loader options (e.g. ``encoding``); ``towns`` is set by the protocol.
        limit: only the first ``limit`` frames of each town (a quick look).
        input_scale: resize factor of the model input; metrics stay at full resolution.
        num_classes: K; default the model's.
        **kwargs: :func:`open_set_folds` options (``target_tpr``, ``method``, ``calibration_rule`` (default
            ``"above"``), ``calibration_scale`` (default 0.5), ``nan_iou`` (default ``"zero"``), ``score_options``,
            ``device``, ``batch_size``, ``num_workers``, ``amp``, ``progress``).

    Returns:
        :func:`two_fold_open_set`'s dict plus ``benchmark``, ``split``, ``input_scale`` and ``parts`` (frames per
        town).
    """
    options = _check_options(dataset_options, "towns", "streethazards")
    parts: dict[str, Dataset] = {}
    described = {}
    loader = None
    for town in STREETHAZARDS_TOWNS:
        loader, dataset = open_benchmark("streethazards", root, "test", {**options, "towns": town}, limit, input_scale)
        parts[town] = dataset
        described[town] = _describe(loader, range(len(dataset)))
    k = model_num_classes(model, loader, num_classes, "streethazards")
    kwargs.setdefault("calibration_scale", OPEN_SET_BENCHMARKS["streethazards"])
    result = two_fold_open_set(
        model, parts, score, num_classes=k, class_names=loader.class_names, benchmark="streethazards", **kwargs
    )
    return _with_header(result, "streethazards", "test", input_scale, described)


def coco_open_set(
    root: str | Path,
    model: nn.Module,
    score: str = "densehybrid",
    *,
    split: str | None = None,
    coco_protocol: str = "released",
    dataset_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    num_classes: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """COCO20/80 open-set evaluation (see the module docstring).

    Args:
        root: the COCO-Stuff ``dataset`` folder.
        model: a model with K = 20 (21 with ``background=class``).
        score: the anomaly score.
        split: default ``val2017``.
        coco_protocol: ``"released"`` (default): calibrate on the whole split and evaluate it, first TPR >= 0.95,
            as the TPAMI-era ``evaluate_osr_coco.py``; ``"halves"``: two folds over the two halves of the split.
        dataset_options: loader options (``known_classes``, ``background``).
        limit: only the first ``limit`` frames (of each half with ``"halves"``; a quick look).
        input_scale: resize factor of the model input.
        num_classes: K; default the model's.
        **kwargs: :func:`open_set_folds` options (``calibration_scale`` defaults to 1.0, ``calibration_rule`` to
            ``"at_least"`` and ``nan_iou`` to ``"zero"``, as released).

    Returns:
        :func:`open_set_folds`' dict plus ``benchmark``, ``split``, ``coco_protocol``, ``input_scale`` and ``parts``
        (frames and first/last image of each part).
    """
    if coco_protocol not in COCO_PROTOCOLS:
        raise ValueError(
            f"Expected `coco_protocol` to be one of {', '.join(COCO_PROTOCOLS)}, but got {coco_protocol!r}."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"Expected `limit` to be a positive integer, but got {limit!r}.")
    spec = get_benchmark("coco20")
    loader, _ = open_benchmark(spec, root, split, dataset_options, None, input_scale)
    parts, described = _split_parts(loader, coco_protocol == "halves", limit, root)
    k = model_num_classes(model, loader, num_classes, spec.name)
    kwargs.setdefault("calibration_scale", OPEN_SET_BENCHMARKS["coco20"])
    kwargs.setdefault("calibration_rule", "at_least")
    common = {"num_classes": k, "class_names": loader.class_names, "benchmark": spec.name}
    if coco_protocol == "released":
        (name,) = parts
        result = open_set_folds(model, parts, [(name, name)], score, **common, **kwargs)
    else:
        result = two_fold_open_set(model, parts, score, **common, **kwargs)
    return {"coco_protocol": coco_protocol, **_with_header(result, spec.name, loader.split, input_scale, described)}


def folder_open_set(
    root: str | Path,
    model: nn.Module,
    score: str = "densehybrid",
    *,
    split: str | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    num_classes: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Open-set evaluation of a user's folder tree (ours): two folds over the halves of its ``val`` split.

    The frames of the split, in file-name order, are cut into two halves; the threshold calibrated on one half
    (first threshold with TPR > 0.95 by default, maps at full size) is applied to the other, both ways, and the
    open-mIoU is the image-weighted average. A threshold is thus never applied to the images it was fitted on.

    Args:
        root: the folder tree (``DIR/classes.txt``, ``DIR/val/images``, ``DIR/val/labels``).
        model: a model with the K classes of ``classes.txt``.
        score: the anomaly score.
        split: default ``val``.
        dataset_options: loader options (``anomaly_id``).
        limit: only the first ``limit`` frames of each half (a quick look).
        input_scale: resize factor of the model input.
        num_classes: K; default the model's.
        **kwargs: :func:`open_set_folds` options (``calibration_scale`` defaults to 1.0, ``calibration_rule`` to
            ``"above"``).

    Returns:
        :func:`open_set_folds`' dict plus ``benchmark``, ``split``, ``input_scale`` and ``parts``.

    Raises:
        ValueError: fewer than 2 frames, a model whose K differs from ``classes.txt``, or a half without anomaly
            pixels.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"Expected `limit` to be a positive integer, but got {limit!r}.")
    loader, _ = open_benchmark("folder", root, split, dataset_options, None, input_scale)
    parts, described = _split_parts(loader, True, limit, root)
    k = model_num_classes(model, loader, num_classes, "folder")
    kwargs.setdefault("calibration_scale", OPEN_SET_BENCHMARKS["folder"])
    result = two_fold_open_set(
        model, parts, score, num_classes=k, class_names=loader.class_names, benchmark="folder", **kwargs
    )
    return _with_header(result, "folder", loader.split, input_scale, described)


def _split_parts(
    loader: BenchmarkDataset, halves: bool, limit: int | None, root: str | Path
) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """The whole split as one part, or its two halves (frame order), each cut to ``limit`` frames."""
    n = len(loader)
    if halves and n < 2:
        raise ValueError(
            f"Expected at least 2 frames of split {loader.split!r} to cut into halves, but {str(root)!r} has {n}."
        )
    bounds = [(0, (n + 1) // 2), ((n + 1) // 2, n)] if halves else [(0, n)]
    parts: dict[str, Dataset] = {}
    described = {}
    for start, stop in bounds:
        indices = range(start, stop if limit is None else min(stop, start + limit))
        name = f"{loader.split}[{start}:{stop}]" if halves else loader.split
        parts[name] = loader if len(indices) == n else Subset(loader, indices)
        described[name] = _describe(loader, indices)
    return parts, described


def roadscene_open_set(
    root: str | Path,
    model: nn.Module,
    score: str = "densehybrid",
    *,
    dataset_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    num_classes: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """RoadScene open-set evaluation, the demo's protocol: the threshold is calibrated on val (first TPR > the
    target, full-size maps) and applied to test.

    Args:
        root: the benchmark folder (``OUT/data`` of ``densehybrid demo --out OUT``).
        model: a model with K = 10.
        score, dataset_options, limit, input_scale, num_classes: as :func:`coco_open_set`.
        **kwargs: :func:`open_set_folds` options (``calibration_scale`` defaults to 1.0).

    Returns:
        :func:`open_set_folds`' dict plus ``benchmark``, ``split``, ``input_scale`` and ``parts``.
    """
    parts: dict[str, Dataset] = {}
    described = {}
    loader = None
    for split in ("val", "test"):
        loader, dataset = open_benchmark("roadscene", root, split, dataset_options, limit, input_scale)
        parts[split] = dataset
        described[split] = _describe(loader, range(len(dataset)))
    k = model_num_classes(model, loader, num_classes, "roadscene")
    kwargs.setdefault("calibration_scale", OPEN_SET_BENCHMARKS["roadscene"])
    common = {"num_classes": k, "class_names": loader.class_names, "benchmark": "roadscene"}
    result = open_set_folds(model, parts, [("val", "test")], score, **common, **kwargs)
    return _with_header(result, "roadscene", "test", input_scale, described)


def _with_header(
    result: dict[str, Any], benchmark: str, split: str, input_scale: float, parts: Mapping[str, Any]
) -> dict[str, Any]:
    return {"benchmark": benchmark, "split": split, "input_scale": float(input_scale), "parts": dict(parts), **result}

"""Evaluation loop: run a model over a dataset once and feed every requested score into streaming metrics.

One forward pass per batch serves all scores, all anomaly groups (e.g. per anomaly family) and, for semantic
targets, the closed-set and open-set confusion matrices. Metric state has fixed size, so the loop runs over
benchmarks of 10^9 pixels in bounded memory; optional pixel subsamples feed plots.

Under ``torchrun`` (an initialised process group) every rank runs the model over its contiguous block of the
dataset's batches (:func:`batch_aligned_block`) and the metrics are merged over the ranks: integer
states are summed, float sums are exact (:mod:`densehybrid.metrics._base`) and the SMIYC frame lists are gathered in
rank order, so every rank gets exactly the numbers of one process. Every rank must call these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from densehybrid.engine import distributed
from densehybrid.engine.batches import collate
from densehybrid.engine.runtime import select_device
from densehybrid.labels import ANOMALY, INLIER, anomaly_target
from densehybrid.metrics import ConfusionMatrix, anomaly_metrics
from densehybrid.metrics.cityscapes import CityscapesInstanceMetrics
from densehybrid.models.output import check_finite_outputs, output_as_float32, output_fields
from densehybrid.models.window import SlidingWindow, resolve_window, sliding_window_outputs
from densehybrid.openset import predict_open_set
from densehybrid.scores import check_score_inputs, compute_score, score_info

GroupFn = Callable[[dict[str, Any], torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        anomaly: score name -> group name -> the metric's ``compute()`` dict (``ap``, ``auroc``, ``fpr95``, ...).
        closed_set: closed-set ``ConfusionMatrix.compute()`` (semantic targets only).
        open_set: open-set ``ConfusionMatrix.compute()`` with the given threshold (semantic targets only).
        samples: score name -> (scores, labels, group ids) pixel subsample as NumPy arrays, for plots.
        num_images: images evaluated.
    """

    anomaly: dict[str, dict[str, dict[str, Any]]]
    closed_set: dict[str, Any] | None = None
    open_set: dict[str, Any] | None = None
    samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    num_images: int = 0


def model_outputs(
    model: nn.Module,
    dataset: Dataset,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
    desc: str = "evaluate",
    window: SlidingWindow | str | None = "auto",
    shard: bool = True,
):
    """Yield ``(batch, output)`` for every batch of ``dataset``: the model's output tuple (e.g. ``HybridOutput``) in
    float32, dense outputs at the target's resolution. ``batch["index"]`` holds the samples' positions in ``dataset``.

    ``window``: a :class:`~densehybrid.models.window.SlidingWindow`, ``"auto"`` (default: the model's released one,
    ``model.inference_window``; none for most models) or None (one whole-image pass). ``shard``: in a process group,
    only this rank's contiguous block of the batches a single process would run (the caller merges the ranks'
    results); progress bars are shown by rank 0 only.
    """
    window = resolve_window(model, window)
    device = select_device(device)
    model.to(device).eval()
    use_amp = amp and device.type == "cuda"
    block = batch_aligned_block(len(dataset), batch_size) if shard else range(len(dataset))
    if len(block) != len(dataset):
        dataset = Subset(dataset, block)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    position = block.start
    for batch in tqdm(loader, desc=desc, disable=not progress or not distributed.is_main(), leave=False):
        count = batch["image"].shape[0]
        batch["index"] = torch.arange(position, position + count)
        position += count
        images = batch["image"].to(device, non_blocking=True)
        size = tuple(batch["target"].shape[-2:]) if "target" in batch else tuple(images.shape[-2:])
        # no_grad, not inference_mode: the mode must not leak into the caller's code while this generator is
        # suspended at `yield` (metric states created there would become inference tensors).
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            if window is None:
                out = model(images, output_size=size)
            else:
                out = sliding_window_outputs(model, images, window, size)
        check_finite_outputs(out, batch)
        yield batch, output_as_float32(out)


def batch_aligned_block(count: int, batch_size: int, rank: int | None = None, world: int | None = None) -> range:
    """This rank's samples: its :func:`~densehybrid.engine.distributed.shard_range` block of the ``batch_size``
    batches of one process, so every batch holds the same samples as in one process (kernels may round an image's
    outputs differently in batches of another size) and the ranks' results equal a single process's bit for bit."""
    batches = distributed.shard_range(-(-count // batch_size), rank, world)
    return range(min(batches.start * batch_size, count), min(batches.stop * batch_size, count))


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    scores: Sequence[str] = ("densehybrid",),
    *,
    target_kind: str = "semantic",
    num_classes: int | None = None,
    protocol: str = "pooled",
    protocol_options: Mapping[str, Any] | None = None,
    score_options: Mapping[str, Mapping[str, Any]] | None = None,
    groups: GroupFn | None = None,
    threshold: float | None = None,
    open_set_score: str = "densehybrid",
    sample_pixels: int = 0,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
    amp: bool = False,
    window: SlidingWindow | str | None = "auto",
    cityscapes_metrics: bool = False,
) -> EvaluationResult:
    """Anomaly metrics for every score (and segmentation metrics for semantic targets) in one pass.

    Args:
        model: a DenseHybrid model, or any model returning an output tuple (e.g. a DiCNet model).
        dataset: samples with ``image`` (3, H, W) and ``target`` (H, W).
        scores: registered score names to evaluate; each must read only outputs the model gives
            (:func:`densehybrid.scores.check_score_inputs`).
        target_kind: ``"semantic"`` (ids 0..K-1, anomaly K, ignore 255) or ``"anomaly"`` (0/1/255).
        num_classes: K; required for semantic targets.
        protocol: metric protocol (``pooled``, ``per_image``, ``smiyc``; see :mod:`densehybrid.metrics`).
        protocol_options: keyword options of the protocol's metric.
        score_options: per-score keyword options, e.g. ``{"sml": {"statistics": stats}}``.
        groups: ``(batch, binary_target) -> {group: binary_target}`` to evaluate subsets (e.g. per anomaly
            family); default ``{"all": binary_target}``.
        threshold: open-set threshold on ``open_set_score``; with semantic targets it yields open-mIoU.
        open_set_score: the score the threshold applies to.
        sample_pixels: keep about this many random evaluated pixels per score for plots (0: none).
        seed: seeds the pixel subsample.
        device, batch_size, num_workers, progress: loop settings.
        amp: run the model under bfloat16 autocast on CUDA (see :func:`model_outputs`); False keeps float32, as
            the released evaluation code does.
        window: sliding-window inference (see :func:`model_outputs`).
        cityscapes_metrics: add the official Cityscapes iIoU and category IoU / iIoU to ``closed_set``
            (:mod:`densehybrid.metrics.cityscapes`); the samples must carry ``instances``.

    Returns:
        :class:`EvaluationResult`.
    """
    if target_kind not in ("semantic", "anomaly"):
        raise ValueError(f"Expected `target_kind` to be 'semantic' or 'anomaly', but got {target_kind!r}.")
    if target_kind == "semantic" and num_classes is None:
        raise ValueError("Expected `num_classes` for semantic targets (the anomaly id is K), but got None.")
    score_names = [score_info(name).name for name in scores]
    if threshold is not None and open_set_score not in score_names:
        score_names.append(score_info(open_set_score).name)
    model_name = getattr(model, "model_name", None) or type(model).__name__
    check_score_inputs(score_names, output_fields(model), f"model {model_name!r}")
    score_options = {k: dict(v) for k, v in (score_options or {}).items()}
    metrics: dict[str, dict[str, Any]] = {name: {} for name in scores}
    closed = ConfusionMatrix(num_classes) if target_kind == "semantic" else None
    opened = ConfusionMatrix(num_classes) if target_kind == "semantic" and threshold is not None else None
    instance_metrics = CityscapesInstanceMetrics() if closed is not None and cityscapes_metrics else None
    sampler = _PixelSampler(sample_pixels, len(dataset), seed) if sample_pixels else None
    group_order: dict[str, None] = {}
    num_images = 0
    for batch, out in model_outputs(
        model, dataset, device, batch_size, num_workers, amp=amp, progress=progress, window=window
    ):
        target = batch["target"].to(out.logits.device).long()
        binary = anomaly_target(target, num_classes) if target_kind == "semantic" else target
        group_targets = dict(groups(batch, binary)) if groups is not None else {"all": binary}
        group_order.update(dict.fromkeys(group_targets))
        computed = {name: compute_score(name, out, **score_options.get(name, {})) for name in score_names}
        for name in scores:
            for group, group_target in group_targets.items():
                if group not in metrics[name]:
                    metrics[name][group] = anomaly_metrics(protocol, **dict(protocol_options or {}))
                metrics[name][group].update(computed[name], group_target)
        if closed is not None:
            closed.update(out.logits.argmax(1), target)
        if instance_metrics is not None:
            instance_metrics.update(out.logits.argmax(1), batch["instances"])
        if opened is not None:
            opened.update(predict_open_set(out.logits, computed[open_set_score], threshold), target)
        if sampler is not None:
            group_ids = _group_ids(group_targets, binary)
            sampler.add({name: computed[name] for name in scores}, binary, group_ids, batch["index"])
        num_images += target.shape[0]
    if distributed.is_distributed():
        num_images = _merge_over_ranks(metrics, group_order, protocol, protocol_options, num_images)
        for metric in (closed, opened, instance_metrics):
            if metric is not None:
                metric.sync()
    return EvaluationResult(
        anomaly={name: {g: m.compute() for g, m in by_group.items()} for name, by_group in metrics.items()},
        closed_set=_closed_set(closed, instance_metrics),
        open_set=opened.compute() if opened is not None else None,
        samples=sampler.result() if sampler is not None else {},
        num_images=num_images,
    )


def _merge_over_ranks(
    metrics: dict[str, dict[str, Any]],
    group_order: dict[str, None],
    protocol: str,
    protocol_options: Mapping[str, Any] | None,
    num_images: int,
) -> int:
    """Sync every anomaly metric over the ranks, its groups in the order one process would have met them (a rank may
    have seen none of a group's images); return the images of all ranks."""
    order = dict.fromkeys(group for part in distributed.gather_to_all(list(group_order)) for group in part)
    for name, by_group in metrics.items():
        merged = {}
        for group in order:
            metric = by_group[group] if group in by_group else anomaly_metrics(protocol, **dict(protocol_options or {}))
            merged[group] = metric.sync()
        metrics[name] = merged
    return int(distributed.sum_over_ranks(torch.tensor(num_images)))


def _group_ids(group_targets: Mapping[str, torch.Tensor], binary: torch.Tensor) -> torch.Tensor:
    """Per pixel, the index (1-based, in group order) of the first group that counts it as an anomaly; 0 otherwise."""
    ids = torch.zeros_like(binary)
    for i, group_target in enumerate(group_targets.values(), start=1):
        ids[(group_target == ANOMALY) & (ids == 0)] = i
    return ids


def sample_pixels_of_image(valid: torch.Tensor, count: int, seed: int, index: int) -> torch.Tensor:
    """Up to ``count`` random positions among the True entries of ``valid`` (a flat bool mask of one image), drawn
    from a generator seeded by ``seed`` and the image's ``index`` in its dataset: the same pixels whatever the batch
    size or the number of processes.
    """
    positions = valid.nonzero().squeeze(1).cpu()
    generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (1 << 63))
    return positions[torch.randperm(positions.numel(), generator=generator)[:count]]


class _PixelSampler:
    """Keeps a seeded random subset of evaluated pixels (same pixels for every score) for curves and histograms;
    in a process group, :meth:`result` gathers the ranks' samples in image order."""

    def __init__(self, total: int, num_images: int, seed: int) -> None:
        self.per_image = max(1, total // max(num_images, 1))
        self.seed = seed
        self.scores: dict[str, list[np.ndarray]] = {}
        self.labels: list[np.ndarray] = []
        self.groups: list[np.ndarray] = []

    def add(
        self,
        scores: Mapping[str, torch.Tensor],
        binary: torch.Tensor,
        group_ids: torch.Tensor,
        indices: torch.Tensor,
    ) -> None:
        for i in range(binary.shape[0]):
            valid = ((binary[i] == INLIER) | (binary[i] == ANOMALY)).flatten()
            pick = sample_pixels_of_image(valid, self.per_image, self.seed, int(indices[i]))
            if pick.numel() == 0:
                continue
            self.labels.append(binary[i].flatten().cpu()[pick].numpy())
            self.groups.append(group_ids[i].flatten().cpu()[pick].numpy())
            for name, value in scores.items():
                self.scores.setdefault(name, []).append(value[i].flatten().cpu()[pick].numpy())

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        ranks = distributed.gather_to_all((self.scores, self.labels, self.groups))
        scores: dict[str, list[np.ndarray]] = {}
        labels: list[np.ndarray] = []
        groups: list[np.ndarray] = []
        for rank_scores, rank_labels, rank_groups in ranks:
            for name, parts in rank_scores.items():
                scores.setdefault(name, []).extend(parts)
            labels += rank_labels
            groups += rank_groups
        if not labels:
            return {}
        return {
            name: (np.concatenate(parts), np.concatenate(labels), np.concatenate(groups))
            for name, parts in scores.items()
        }


def _closed_set(closed: ConfusionMatrix | None, official: CityscapesInstanceMetrics | None) -> dict[str, Any] | None:
    """``closed.compute()``, with the official Cityscapes metrics when they were accumulated."""
    if closed is None:
        return None
    result = closed.compute()
    if official is not None:
        result.update(official.compute(closed.confusion()))
    return result

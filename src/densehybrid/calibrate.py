"""Open-set calibration stored in a checkpoint: the library side of ``densehybrid calibrate``.

:func:`calibrate_checkpoint` runs a checkpoint over a labelled split, picks the open-set threshold with
:func:`densehybrid.openset.calibrate_threshold` (the first threshold whose TPR exceeds the target, as the released
StreetHazards code, or the best pixel F1), measures the score's display range (the 1st and 99th percentiles of a
seeded subsample of the evaluated pixels, widened to include the threshold), and writes a *new* checkpoint that
carries both under :data:`densehybrid.predict.CALIBRATION_KEY`. The original file is never written; the output
follows the output-path policy of :mod:`densehybrid.engine.outputs` (an existing file only with ``overwrite``).

Benchmarks are read with the registered loaders (``densehybrid doctor`` lists them), the demo's generated
``roadscene`` (``--root demo_out/data``) among them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from densehybrid.engine import distributed
from densehybrid.engine.evaluate import model_outputs, sample_pixels_of_image
from densehybrid.engine.outputs import check_output_file
from densehybrid.labels import ANOMALY, IGNORE_INDEX, anomaly_target
from densehybrid.models.checkpoint import (
    Checkpoint,
    checkpoint_dict,
    model_from_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from densehybrid.models.window import SlidingWindow, describe_window
from densehybrid.openset import CALIBRATION_METHODS, OpenSetModel, calibrate_threshold
from densehybrid.predict import Calibration
from densehybrid.scores import get_score

__all__ = ["DISPLAY_PERCENTILES", "calibrate_checkpoint", "calibrated_checkpoint", "calibrated_path"]

#: Percentiles of the evaluated pixels' scores that bound the heatmap's colour scale.
DISPLAY_PERCENTILES = (1.0, 99.0)


def calibrated_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The default output: ``NAME-calibrated.pt`` beside the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-calibrated.pt")


def _default_split(spec: Any) -> str:
    for name in ("val", "validation"):
        if name in spec.expected_counts:
            return name
    return spec.split


def _open_data(
    benchmark: str,
    root: str | os.PathLike[str],
    split: str | None,
    options: Mapping[str, Any] | None,
    limit: int | None,
    input_scale: float,
) -> tuple[Dataset, str, str, int | None, list[str], list[list[int]]]:
    """(dataset, split, target kind, K of the benchmark, class names, palette)."""
    from densehybrid.data.datasets import get_benchmark
    from densehybrid.evaluation import open_benchmark

    spec = get_benchmark(benchmark)
    loader, dataset = open_benchmark(spec, root, split or _default_split(spec), options, limit, input_scale)
    names = list(loader.class_names) if loader.target_kind == "semantic" else []
    k = spec.num_known_classes if spec.num_known_classes is not None else loader.num_classes  # folder: classes.txt
    palette = list(getattr(loader, "palette", []))
    return dataset, loader.split, loader.target_kind, k, names, palette


class _Pairs:
    """``(scores, binary target)`` per batch for ``calibrate_threshold``, keeping a pixel sample and counts.

    The sample takes ``sample_per_image`` pixels of each image, seeded by the image's position in the dataset, so
    it does not depend on the batch size or the number of processes; :meth:`merge` combines the ranks' samples.
    """

    def __init__(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], sample_per_image: int, seed: int
    ):
        self.batches = batches
        self.sample_per_image = sample_per_image
        self.seed = seed
        self.sample: list[np.ndarray] = []
        self.anomalies = 0
        self.images = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for scores, binary, indices in self.batches:
            self.images += scores.shape[0]
            self.anomalies += int((binary == ANOMALY).sum())
            for image_scores, image_binary, index in zip(scores, binary, indices.tolist()):
                pick = sample_pixels_of_image(
                    (image_binary != IGNORE_INDEX).flatten(), self.sample_per_image, self.seed, index
                )
                if pick.numel():
                    self.sample.append(image_scores.flatten().cpu()[pick].double().numpy())
            yield scores, binary

    def merge(self) -> None:
        """In a process group: the counts and samples of every rank (samples in image order), on every rank."""
        if not distributed.is_distributed():
            return
        ranks = distributed.gather_to_all((self.images, self.anomalies, self.sample))
        self.images = sum(images for images, _, _ in ranks)
        self.anomalies = sum(anomalies for _, anomalies, _ in ranks)
        self.sample = [part for _, _, sample in ranks for part in sample]


def calibrate_checkpoint(
    checkpoint: str | os.PathLike[str],
    benchmark: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    split: str | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    score: str = "densehybrid",
    score_options: Mapping[str, Any] | None = None,
    method: str = "tpr",
    target_tpr: float = 0.95,
    calibration_scale: float = 1.0,
    dataset_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    input_scale: float = 1.0,
    sample_pixels: int = 1_000_000,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 1,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
    window: SlidingWindow | str | None = "auto",
    overwrite: bool = False,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Calibrate the open-set threshold and display range of a checkpoint and write a calibrated copy.

    Args:
        checkpoint: the checkpoint to calibrate (read only).
        benchmark: a registered benchmark name (e.g. ``"roadscene"``, the demo's).
        root: the benchmark's root.
        out: the calibrated checkpoint (default :func:`calibrated_path`); checked before the work with the
            output-path policy (:func:`densehybrid.engine.outputs.check_output_file`): never ``checkpoint`` or a
            file under ``root``, and an existing file only with ``overwrite``.
        split: the labelled split (default ``val``/``validation`` where the benchmark has one).
        model, num_classes: for checkpoints that do not record them.
        score: the registered score the threshold applies to.
        score_options: keyword options of the score.
        method: ``"tpr"`` (first threshold with TPR > ``target_tpr``, released code) or ``"f1"`` (best pixel F1).
        target_tpr: the TPR of ``method="tpr"``.
        calibration_scale: resize factor of the score and label maps before calibration (released StreetHazards
            code: 0.5; bilinear scores, nearest labels).
        dataset_options, limit, input_scale: as for ``densehybrid evaluate``.
        sample_pixels: pixels sampled for the display range (the same number from each image).
        seed: seeds that sample.
        device, batch_size, num_workers, amp, progress: loop settings.
        window: sliding-window inference of :class:`~densehybrid.openset.OpenSetModel` (``"auto"``: the model's).
        overwrite: replace an existing ``out``.
        report: called with the result before the checkpoint is written (a failed write then loses nothing).

    Under ``torchrun`` every rank calls this and runs the model over its block of the split; the threshold comes
    from the pixels of all ranks (exactly the single-process one), and rank 0 alone reports and writes.

    Returns:
        a JSON-ready dict: ``out``, the :class:`~densehybrid.predict.Calibration` fields, ``anomaly_pixels``.

    Raises:
        ValueError: bad arguments, or a split without anomaly pixels.
        OutputError: ``out`` is an input, exists without ``overwrite``, or cannot be written.
        DenseHybridError: unreadable checkpoint or data.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"Expected `method` to be one of {', '.join(CALIBRATION_METHODS)}, but got {method!r}.")
    if isinstance(target_tpr, bool) or not isinstance(target_tpr, (int, float)) or not 0.0 < target_tpr < 1.0:
        raise ValueError(f"Expected `target_tpr` in (0, 1), but got {target_tpr!r}.")
    if not 0.0 < calibration_scale <= 1.0:
        raise ValueError(f"Expected `calibration_scale` in (0, 1], but got {calibration_scale!r}.")
    get_score(score)
    out_path = check_output_file(
        out if out is not None else calibrated_path(checkpoint), inputs=[checkpoint, root], overwrite=overwrite
    )
    dataset, split, target_kind, benchmark_k, class_names, palette = _open_data(
        benchmark, root, split, dataset_options, limit, input_scale
    )
    info = read_checkpoint(checkpoint)
    net, metadata = model_from_checkpoint(info, checkpoint, model, num_classes, benchmark_k)
    k = int(metadata["num_classes"])
    if target_kind == "semantic" and benchmark_k is not None and k != benchmark_k:
        raise ValueError(
            f"Expected a model with the {benchmark_k} classes of benchmark {benchmark!r} (its targets mark anomalies "
            f"with id {benchmark_k}), but checkpoint {str(checkpoint)!r} has {k}."
        )
    options = dict(score_options or {})

    open_set = OpenSetModel(net, score, None, options, window)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loop = model_outputs(
            open_set,
            dataset,
            device,
            batch_size,
            num_workers,
            amp=amp,
            progress=progress,
            desc="calibrate",
            window=None,
        )
        for batch, output in loop:
            scores = output.scores
            target = batch["target"].to(scores.device).long()
            binary = anomaly_target(target, k) if target_kind == "semantic" else target
            if calibration_scale != 1.0:
                height, width = scores.shape[-2:]
                if int(height * calibration_scale) < 1 or int(width * calibration_scale) < 1:
                    raise ValueError(
                        f"Expected `calibration_scale` to leave at least 1 px per side of the {height}x{width} score "
                        f"maps, but {calibration_scale:g} leaves none. Use at least {1.0 / min(height, width):.3g}."
                    )
                scores = F.interpolate(
                    scores[:, None], scale_factor=calibration_scale, mode="bilinear", align_corners=False
                )[:, 0]
                binary = F.interpolate(binary[:, None].float(), scale_factor=calibration_scale, mode="nearest")[
                    :, 0
                ].long()
            yield scores, binary, batch["index"]

    pairs = _Pairs(batches(), max(1, sample_pixels // max(1, len(dataset))), seed)
    try:
        threshold = calibrate_threshold(
            pairs, method=method, target_tpr=target_tpr, strict=True, distributed=distributed.is_distributed()
        )
    except ValueError as exc:
        if "anomaly pixels" in str(exc):  # raised on every rank alike: the counts of all ranks explain it
            pairs.merge()
        if pairs.anomalies or not pairs.images:  # no image reached the count: the error is not about anomalies
            raise
        remedy = "Use a split with anomalies."
        if benchmark == "folder":
            remedy = (
                f"Mark anomaly pixels in {str(Path(root) / 'val' / 'labels')!r} with label value K (or the "
                "anomaly_id of dataset.toml / --option anomaly_id=N); `densehybrid doctor folder DIR` counts them."
            )
        raise ValueError(
            f"Expected anomaly pixels in split {split!r} of {benchmark!r}, but its {pairs.images} labelled images "
            f"have none: a threshold cannot be calibrated there. {remedy}"
        ) from exc
    pairs.merge()
    sample = np.concatenate(pairs.sample)
    low, high = (float(v) for v in np.percentile(sample[np.isfinite(sample)], DISPLAY_PERCENTILES))
    low, high = min(low, threshold), max(high, threshold)
    if not high > low:
        high = low + 1.0
    calibration = Calibration(
        score=score,
        threshold=threshold,
        display_range=(low, high),
        method=method,
        target_tpr=float(target_tpr) if method == "tpr" else None,
        benchmark=benchmark,
        split=split,
        num_images=pairs.images,
        class_names=class_names if len(class_names) == k else [],
        palette=palette if len(palette) == k else [],
    )
    result = {
        "out": str(out_path),
        "checkpoint": str(checkpoint),
        "model": metadata["model_name"],
        "num_classes": k,
        **calibration.to_dict(),
        "calibration_scale": float(calibration_scale),
        "window": describe_window(open_set.window),
        "anomaly_pixels": pairs.anomalies,
    }
    if distributed.is_main():  # one writer; every rank computed the same calibration
        if report is not None:
            report(result)
        write_checkpoint(calibrated_checkpoint(info, metadata, calibration), out_path)
    return result


def calibrated_checkpoint(info: Checkpoint, metadata: Mapping[str, Any], calibration: Calibration) -> dict[str, Any]:
    """The checkpoint with the calibration added, in the one format: the architecture and K are recorded (so no
    flags are needed later) and the classes are the checkpoint's, else those of the calibration data."""
    k = int(metadata["num_classes"])
    kwargs = info.model_kwargs if info.model_name == metadata["model_name"] and info.model_kwargs else {}
    return checkpoint_dict(
        info.state_dict,
        model_name=metadata["model_name"],
        model_kwargs={**kwargs, "num_classes": k},
        num_classes=k,
        architecture=info.architecture,
        class_names=info.class_names or calibration.class_names,
        palette=info.palette or calibration.palette,
        ignore_index=info.ignore_index,
        normalization=info.normalization,
        method=info.method,
        recipe=info.recipe,
        calibration=calibration.to_dict(),
        training=info.training or None,
        metadata=info.metadata,
    )

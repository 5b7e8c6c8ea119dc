"""The values a run derives where its recipe says ``"auto"`` (the ``generic`` recipe's defaults).

A recipe key whose :attr:`~densehybrid.recipes.schema.Key.auto` is set accepts the value ``"auto"``; a run replaces it
before it trains (:func:`derive_from_data`, then :func:`derive_from_run`), by these rules:

- ``augment.crop`` (derived from data): the shorter side of the smallest training image (read from the image
  headers), rounded down to a multiple of 32, at least 32 and at most 512 (:data:`CROP_STEP`, :data:`CROP_RANGE`).
- ``run.num_workers`` (derived from the machine): the usable CPU cores per local process minus one (the training
  itself), at most 8 (:data:`MAX_WORKERS`); on 2 cores: 1 worker.
- ``optim.lr`` and ``optim.backbone_lr_ratio`` (because ``--init`` was given): a run that trains an anomaly score with
  negatives (DenseHybrid) and starts from ``--init`` (or ``model.init``) takes the released fine-tuning rates of
  :data:`FINETUNE_PRESET` (Adam 1e-5, backbone at 1/4); any other run the released closed-set rates of
  :data:`TRAIN_PRESET` (4e-4, backbone at 1/4).
- ``run.best_metric`` (derived from data): ``val_ap`` when the run trains an anomaly score and the validation labels
  hold anomaly pixels (label value K), else ``val_miou``.

The run stores the derived values in the resolved recipe it writes into every checkpoint and ``train-summary.json``,
so a resumed run compares like with like: it derives them again and resumes when they come out the same. Where each
value came from is returned as ``{"section.key": "derived from ...: why"}`` for the start-up summary.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from densehybrid.recipes.schema import AUTO

#: ``augment.crop = "auto"``: a multiple of this, within this range.
CROP_STEP, CROP_RANGE = 32, (32, 512)
#: ``run.num_workers = "auto"``: at most this many DataLoader workers per process.
MAX_WORKERS = 8
#: The released recipes ``optim.lr = "auto"`` takes its rates from: training from ImageNet weights, and DenseHybrid
#: fine-tuning of a closed-set model (the LDN-121 StreetHazards scripts).
TRAIN_PRESET, FINETUNE_PRESET = "ldn121-streethazards", "ldn121-streethazards-finetune"

FROM_DATA, FROM_MACHINE, FROM_INIT, FROM_RECIPE = (
    "derived from data",
    "derived from the machine",
    "because --init was given",
    "recipe",
)


def auto_keys(recipe: Mapping[str, Any]) -> list[str]:
    """The ``section.key`` names whose value is ``"auto"`` in ``recipe``."""
    return [
        f"{section}.{key}"
        for section, table in recipe.items()
        if isinstance(table, Mapping)
        for key, value in table.items()
        if isinstance(value, str) and value == AUTO
    ]


def _set(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    section, key = dotted.split(".")
    recipe[section][key] = value


def smallest_image_side(dataset: Any) -> tuple[int, int]:
    """(H, W) of the training image with the shortest side: from the file headers of a dataset with ``frames`` (a
    :class:`~densehybrid.data.datasets.BenchmarkDataset`, e.g. a folder tree), else the first sample's image."""
    from densehybrid.data.datasets._io import IMAGE_SUFFIXES, image_size

    frames = getattr(dataset, "frames", None)
    if frames and all(str(getattr(frame, "image", "")).lower().endswith(IMAGE_SUFFIXES) for frame in frames):
        return min((image_size(frame.image) for frame in frames), key=min)
    from densehybrid.engine.batches import unpack_sample

    image, _ = unpack_sample(dataset[0])
    height, width = image.shape[-2:]
    return int(height), int(width)


def crop_from_sizes(height: int, width: int) -> int:
    """``augment.crop = "auto"`` for a smallest training image of ``height`` x ``width``."""
    low, high = CROP_RANGE
    return max(low, min(high, min(height, width) // CROP_STEP * CROP_STEP))


def workers_from_cores(cores: int, processes: int = 1) -> int:
    """``run.num_workers = "auto"`` on ``cores`` usable CPU cores shared by ``processes`` local processes."""
    return max(0, min(MAX_WORKERS, cores // max(1, processes) - 1))


def derive_from_data(recipe: Mapping[str, Any], train_set: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``recipe`` with ``augment.crop`` and ``run.num_workers`` derived where they are ``"auto"`` (before the run's
    bounds are checked), and where they came from."""
    from densehybrid.engine.resources import usable_cpu_count

    recipe, sources = copy.deepcopy(dict(recipe)), {}
    if recipe["augment"]["crop"] == AUTO:
        height, width = smallest_image_side(train_set)
        crop = crop_from_sizes(height, width)
        _set(recipe, "augment.crop", crop)
        sources["augment.crop"] = (
            f"{FROM_DATA}: the smallest training image is {height}x{width} px (shorter side rounded down to a "
            f"multiple of {CROP_STEP}, {CROP_RANGE[0]}..{CROP_RANGE[1]})"
        )
    if recipe["run"]["num_workers"] == AUTO:
        cores, processes = usable_cpu_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        _set(recipe, "run.num_workers", workers_from_cores(cores, processes))
        per = f" over {processes} processes" if processes > 1 else ""
        sources["run.num_workers"] = (
            f"{FROM_MACHINE}: {cores} usable CPU cores{per}, one left to the training (at most {MAX_WORKERS})"
        )
    return recipe, sources


def derive_from_run(
    recipe: Mapping[str, Any], trains_anomalies: bool, init: str, val_anomaly_pixels: int | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """``recipe`` with the learning rates and ``run.best_metric`` derived where they are ``"auto"``, and where they
    came from.

    Args:
        trains_anomalies: the run trains an anomaly score with negatives (DenseHybrid, not closed-set).
        init: the weights the run starts from (``--init`` or ``model.init``; empty: none).
        val_anomaly_pixels: anomaly pixels (label K) in the validation labels; None: no validation.
    """
    from densehybrid.recipes import load_recipe

    recipe, sources = copy.deepcopy(dict(recipe)), {}
    optim = recipe["optim"]
    if AUTO in (optim["lr"], optim["backbone_lr_ratio"]):
        finetune = trains_anomalies and bool(init)
        released = load_recipe(FINETUNE_PRESET if finetune else TRAIN_PRESET)["optim"]
        why = (
            f"{FROM_INIT} to a DenseHybrid run: the released fine-tuning rate of {FINETUNE_PRESET}"
            if finetune
            else f"{FROM_RECIPE}: the released rate of {TRAIN_PRESET} (no --init, or closed-set training)"
        )
        for key in ("lr", "backbone_lr_ratio"):
            if optim[key] == AUTO:
                optim[key] = released[key]
                sources[f"optim.{key}"] = why
    if recipe["run"]["best_metric"] == AUTO:
        if trains_anomalies and val_anomaly_pixels:
            metric, why = "val_ap", f"{val_anomaly_pixels} anomaly pixels in val"
        elif val_anomaly_pixels is None:
            metric, why = "val_miou", "no validation split"
        elif not trains_anomalies:
            metric, why = "val_miou", f"{FROM_RECIPE}: closed-set training keeps its objective's metric"
        else:
            metric, why = "val_miou", "val has no anomaly pixels (label value K)"
        _set(recipe, "run.best_metric", metric)
        sources["run.best_metric"] = why if why.startswith(FROM_RECIPE) else f"{FROM_DATA}: {why}"
    return recipe, sources

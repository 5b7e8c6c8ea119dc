"""densehybrid: dense open-set semantic segmentation with hybrid anomaly scores, on PyTorch.

DenseHybrid (Grcić et al., ECCV 2022) adds a dataset-posterior head to a semantic segmentation model and scores every
pixel by combining the classifier's unnormalised likelihood with that posterior; its TPAMI 2024 extension trains with
synthetic negatives sampled from a DenseFlow normalizing flow, and DiCNet distils a teacher's features. This package
holds the models, scores, losses and metrics, the benchmark loaders and protocols, training recipes, and the
``densehybrid`` command line (``densehybrid --help``; docs/usage.md).

Main entry points (imported on first use, so ``import densehybrid`` stays light):

* models: :func:`create_model`, :func:`list_models`;
* scores and open-set decisions: :func:`compute_score`, :func:`list_scores`, :func:`calibrate_threshold`,
  :func:`predict_open_set`, and :class:`OpenSetModel` (model + score + threshold + sliding window: the one inference
  object behind predict, export, calibrate, evaluate-open-set and export-smiyc);
* training: :class:`DenseHybridLoss`, :func:`load_recipe` (the recipes behind ``densehybrid train``);
* evaluation: :func:`evaluate_benchmark` (``densehybrid evaluate``), :func:`get_benchmark`, :class:`FolderDataset`
  (a user's own tree, the ``folder`` benchmark), :func:`diagnose` (``densehybrid doctor``);
* deployment: :func:`calibrate_checkpoint` (``densehybrid calibrate``), :class:`Predictor` (``densehybrid predict``),
  :func:`export_model` (``densehybrid export``).

Example:
    >>> import densehybrid
    >>> model = densehybrid.create_model("ladder_mobilenetv3", num_classes=4)  # doctest: +SKIP
    >>> predictor = densehybrid.Predictor.from_checkpoint("best-calibrated.pt")  # doctest: +SKIP
    >>> predictor.predict("photo.jpg").labels  # (H, W): 0..K-1, unknown = K  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_ENTRY_POINTS: dict[str, str] = {
    "create_model": "densehybrid.models",
    "list_models": "densehybrid.models",
    "compute_score": "densehybrid.scores",
    "list_scores": "densehybrid.scores",
    "OpenSetModel": "densehybrid.openset",
    "calibrate_threshold": "densehybrid.openset",
    "predict_open_set": "densehybrid.openset",
    "DenseHybridLoss": "densehybrid.losses",
    "load_recipe": "densehybrid.recipes",
    "evaluate_benchmark": "densehybrid.evaluation",
    "get_benchmark": "densehybrid.data.datasets",
    "FolderDataset": "densehybrid.data.datasets",
    "diagnose": "densehybrid.doctor",
    "calibrate_checkpoint": "densehybrid.calibrate",
    "Predictor": "densehybrid.predict",
    "export_model": "densehybrid.export",
}

__all__ = [
    "DenseHybridLoss",
    "FolderDataset",
    "OpenSetModel",
    "Predictor",
    "__version__",
    "calibrate_checkpoint",
    "calibrate_threshold",
    "compute_score",
    "create_model",
    "diagnose",
    "evaluate_benchmark",
    "export_model",
    "get_benchmark",
    "list_models",
    "list_scores",
    "load_recipe",
    "predict_open_set",
]

if TYPE_CHECKING:
    from densehybrid.calibrate import calibrate_checkpoint
    from densehybrid.data.datasets import FolderDataset, get_benchmark
    from densehybrid.doctor import diagnose
    from densehybrid.evaluation import evaluate_benchmark
    from densehybrid.export import export_model
    from densehybrid.losses import DenseHybridLoss
    from densehybrid.models import create_model, list_models
    from densehybrid.openset import OpenSetModel, calibrate_threshold, predict_open_set
    from densehybrid.predict import Predictor
    from densehybrid.recipes import load_recipe
    from densehybrid.scores import compute_score, list_scores


def __getattr__(name: str) -> Any:
    # imported on first use, so `import densehybrid` (and the command line's start) stays cheap
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'densehybrid' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ENTRY_POINTS})

"""Models: the DenseHybrid wrapper, adapters, official architectures and checkpoint loading."""

from densehybrid.models.checkpoint import load_checkpoint
from densehybrid.models.heads import BNReluConv, DatasetPosteriorHead
from densehybrid.models.hybrid import DenseHybrid, Normalize, Segmenter
from densehybrid.models.output import DistillationOutput, HybridOutput, output_fields
from densehybrid.models.registry import MODELS, create_model, list_models

__all__ = [
    "MODELS",
    "BNReluConv",
    "DatasetPosteriorHead",
    "DenseHybrid",
    "DistillationOutput",
    "HybridOutput",
    "Normalize",
    "Segmenter",
    "create_model",
    "list_models",
    "load_checkpoint",
    "output_fields",
]

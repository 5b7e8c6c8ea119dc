"""Training and evaluation loops that the CLI and users both call."""

from densehybrid.engine.runtime import atomic_torch_save, seed_everything, select_device
from densehybrid.engine.train import (
    ClosedSetObjective,
    DenseHybridObjective,
    NegativeStream,
    TrainConfig,
    TrainResult,
    build_optimizer,
    fit,
    load_training_state,
)

__all__ = [
    "ClosedSetObjective",
    "DenseHybridObjective",
    "NegativeStream",
    "TrainConfig",
    "TrainResult",
    "atomic_torch_save",
    "build_optimizer",
    "fit",
    "load_training_state",
    "seed_everything",
    "select_device",
]

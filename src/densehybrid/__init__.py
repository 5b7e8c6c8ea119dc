"""densehybrid: dense open-set semantic segmentation with hybrid anomaly scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]

if TYPE_CHECKING:
    from densehybrid.predict import Predictor


def __getattr__(name: str) -> Any:
    # imported on first use, so `import densehybrid` (and the command line's start) stays cheap
    if name == "Predictor":
        from densehybrid.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'densehybrid' has no attribute {name!r}")

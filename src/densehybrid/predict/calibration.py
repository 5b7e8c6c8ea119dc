"""The open-set calibration a checkpoint carries: threshold, score and heatmap range (``densehybrid calibrate``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from densehybrid.errors import CheckpointError
from densehybrid.models.checkpoint import CALIBRATION_KEY

__all__ = ["CALIBRATION_KEY", "Calibration", "read_calibration"]


@dataclass
class Calibration:
    """The open-set calibration a checkpoint carries (written by ``densehybrid calibrate``).

    Attributes:
        score: the registered score the threshold applies to.
        threshold: pixels with ``score > threshold`` are unknown.
        display_range: (low, high) score mapped to the ends of the heatmap's colour scale.
        method: ``"tpr"`` or ``"f1"``.
        target_tpr: the TPR of ``method="tpr"`` (None for ``"f1"``).
        benchmark, split, num_images: the labelled data it was computed on.
        class_names: the K class names of that data (may be empty).
        palette: (K, 3) colours of the known classes (may be empty).
    """

    score: str
    threshold: float
    display_range: tuple[float, float]
    method: str = "tpr"
    target_tpr: float | None = 0.95
    benchmark: str = ""
    split: str = ""
    num_images: int = 0
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, so the checkpoint still loads with ``torch.load(weights_only=True)``."""
        return {
            "score": self.score,
            "threshold": float(self.threshold),
            "display_range": [float(v) for v in self.display_range],
            "method": self.method,
            "target_tpr": None if self.target_tpr is None else float(self.target_tpr),
            "benchmark": self.benchmark,
            "split": self.split,
            "num_images": int(self.num_images),
            "class_names": [str(name) for name in self.class_names],
            "palette": [[int(c) for c in colour] for colour in self.palette],
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], source: str = "the checkpoint") -> Calibration:
        """Rebuild what :meth:`to_dict` gave; raises :class:`CheckpointError` for a malformed entry."""
        try:
            threshold = float(state["threshold"])
            low, high = (float(v) for v in state["display_range"])
            score = str(state["score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"Expected the {CALIBRATION_KEY!r} entry of {source} to hold score, threshold and display_range, but "
                f"it is malformed ({exc!r}). Re-run `densehybrid calibrate`."
            ) from exc
        if not (math.isfinite(threshold) and math.isfinite(low) and math.isfinite(high) and high > low):
            raise CheckpointError(
                f"Expected a finite threshold and display range low < high in {source}, but got threshold "
                f"{threshold} and range ({low}, {high}). Re-run `densehybrid calibrate`."
            )
        return cls(
            score=score,
            threshold=threshold,
            display_range=(low, high),
            method=str(state.get("method", "tpr")),
            target_tpr=state.get("target_tpr"),
            benchmark=str(state.get("benchmark", "")),
            split=str(state.get("split", "")),
            num_images=int(state.get("num_images", 0)),
            class_names=list(state.get("class_names") or []),
            palette=[list(c) for c in state.get("palette") or []],
        )


def read_calibration(metadata: Mapping[str, Any], source: str = "the checkpoint") -> Calibration | None:
    """The :class:`Calibration` stored in checkpoint metadata, or None when the checkpoint has none."""
    entry = metadata.get(CALIBRATION_KEY)
    return None if entry is None else Calibration.from_dict(entry, source)

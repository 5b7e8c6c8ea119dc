"""Colouring the maps of a prediction: the heatmap on a fixed scale, the open-set segmentation and the overlay."""

from __future__ import annotations

import numpy as np

from densehybrid.labels import default_palette

__all__ = [
    "HEATMAP_COLORMAP",
    "OVERLAY_ALPHA",
    "default_palette",
    "render_heatmap",
    "render_overlay",
    "render_segmentation",
]

HEATMAP_COLORMAP = "inferno"
OVERLAY_ALPHA = 0.5
_COLORMAP_TABLES: dict[str, np.ndarray] = {}


def _colormap_table(name: str) -> np.ndarray:
    if name not in _COLORMAP_TABLES:
        from matplotlib import colormaps

        _COLORMAP_TABLES[name] = (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    return _COLORMAP_TABLES[name]


def render_heatmap(
    scores: np.ndarray, display_range: tuple[float, float], colormap: str = HEATMAP_COLORMAP
) -> np.ndarray:
    """Colour a score map on a fixed scale: ``low`` and below -> the colormap's first colour, ``high`` and above ->
    its last. Using one range for every image of a run makes heatmaps comparable (a per-image stretch would not).

    Args:
        scores: (H, W) float scores.
        display_range: (low, high), low < high.
        colormap: a matplotlib colormap name.

    Returns:
        (H, W, 3) uint8.
    """
    low, high = display_range
    scaled = (np.asarray(scores, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    index = np.clip(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0).astype(np.uint8)
    return _colormap_table(colormap)[index]


def render_segmentation(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Colour an open-set label map: known classes from ``palette`` (K, 3), unknown (id K) in cyan.

    Returns:
        (H, W, 3) uint8.
    """
    from densehybrid.report.figures import UNKNOWN_COLOUR

    palette = np.asarray(palette, dtype=np.uint8)
    table = np.concatenate([palette, UNKNOWN_COLOUR[None]], axis=0)
    return table[np.asarray(labels)]


def render_overlay(rgb: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a colour segmentation over the photo: ``(1 - alpha) * photo + alpha * colours`` (uint8 arithmetic)."""
    weight = int(round(alpha * 256))
    blended = (rgb.astype(np.uint16) * (256 - weight) + colours.astype(np.uint16) * weight) >> 8
    return blended.astype(np.uint8)

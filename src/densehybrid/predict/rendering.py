"""Colouring the maps of a prediction: the heatmap on a fixed scale, the open-set segmentation and the overlay; the
legend of class names drawn under a segmentation and the colour bar (score scale and threshold) drawn under a
heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from densehybrid.labels import default_palette

__all__ = [
    "HEATMAP_COLORMAP",
    "OVERLAY_ALPHA",
    "class_labels",
    "colour_bar_panel",
    "default_palette",
    "legend_panel",
    "render_heatmap",
    "render_overlay",
    "render_segmentation",
    "with_panel",
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


_PANEL_BACKGROUND = (255, 255, 255)
_PANEL_TEXT = (0, 0, 0)


def class_labels(class_names: Sequence[str], num_classes: int) -> list[str]:
    """The K names a legend shows: ``class_names`` when it names every class, else ``"class 0"``, ``"class 1"``..."""
    names = [str(name) for name in class_names]
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


def _font_size(width: int) -> int:
    """Text height in pixels for a panel ``width`` wide: readable at 2048 without crowding a 128-pixel image."""
    return int(np.clip(round(width / 90), 10, 28))


@lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _new_panel(width: int, height: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), _PANEL_BACKGROUND)
    return image, ImageDraw.Draw(image)


def _frozen(image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8).copy()
    array.flags.writeable = False
    return array


@lru_cache(maxsize=8)
def _legend_panel(width: int, labels: tuple[str, ...], colours: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    size = _font_size(width)
    font = _font(size)
    pad, row = size // 2, int(size * 1.6)
    entries = [*zip(labels, colours), ("unknown", tuple(int(c) for c in _unknown_colour()))]
    placed, x, y = [], pad, pad
    for text, colour in entries:  # flow the entries left to right, wrapping into rows
        entry = size + pad // 2 + int(np.ceil(font.getlength(text))) + 2 * pad
        if x > pad and x + entry > width:
            x, y = pad, y + row
        placed.append((x, y, text, colour))
        x += entry
    image, draw = _new_panel(width, y + row + pad // 2)
    for x, y, text, colour in placed:
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=colour, outline=_PANEL_TEXT)
        draw.text((x + size + pad // 2, y + size // 2), text, fill=_PANEL_TEXT, font=font, anchor="lm")
    return _frozen(image)


def legend_panel(width: int, class_names: Sequence[str], palette: np.ndarray) -> np.ndarray:
    """A legend ``width`` pixels wide: a swatch and the name of each known class (names from
    :func:`class_labels`) and the unknown colour. Built once per width and set of names (cached).

    Returns:
        (h, width, 3) uint8, read-only.
    """
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    labels = tuple(class_labels(class_names, len(palette)))
    return _legend_panel(int(width), labels, tuple(tuple(int(c) for c in colour) for colour in palette))


def _unknown_colour() -> np.ndarray:
    from densehybrid.report.figures import UNKNOWN_COLOUR

    return UNKNOWN_COLOUR


def _format_value(value: float) -> str:
    return f"{value:.4g}"


@lru_cache(maxsize=8)
def _colour_bar_panel(
    width: int, low: float, high: float, threshold: float | None, score: str, colormap: str
) -> np.ndarray:
    size = _font_size(width)
    font = _font(size)
    pad = size // 2
    title_y, bar_y = pad, pad + int(size * 1.5)
    bar_height = size
    ticks_y = bar_y + bar_height + pad // 2
    image, draw = _new_panel(width, ticks_y + int(size * 1.4) + pad // 2)
    x0, x1 = pad + size, width - pad - size  # room for the end labels
    x1 = max(x1, x0 + 2)
    gradient = _colormap_table(colormap)[np.linspace(0, 255, x1 - x0).round().astype(np.intp)]
    bar = np.asarray(image).copy()
    bar[bar_y : bar_y + bar_height, x0:x1] = gradient[None]
    from PIL import Image, ImageDraw

    image = Image.fromarray(bar)
    draw = ImageDraw.Draw(image)
    draw.rectangle((x0 - 1, bar_y - 1, x1, bar_y + bar_height), outline=_PANEL_TEXT)
    title = f"score: {score}"
    if threshold is None:
        title += "; no threshold (nothing marked unknown)"
    else:
        side = " (below the scale)" if threshold < low else " (above the scale)" if threshold > high else ""
        title += f"; threshold {_format_value(threshold)}{side}: higher scores are marked unknown"
    draw.text((pad, title_y), title, fill=_PANEL_TEXT, font=font)
    for fraction, anchor in ((0.0, "lt"), (0.5, "mt"), (1.0, "rt")):
        x = x0 + fraction * (x1 - x0)
        draw.line((x, bar_y + bar_height, x, ticks_y), fill=_PANEL_TEXT)
        label = _format_value(low + fraction * (high - low))
        label = ("<= " if fraction == 0.0 else ">= " if fraction == 1.0 else "") + label
        draw.text((x, ticks_y), label, fill=_PANEL_TEXT, font=font, anchor=anchor)
    if threshold is not None:  # a marker in the unknown colour, at the end of the bar when off the scale
        x = x0 + float(np.clip((threshold - low) / (high - low), 0.0, 1.0)) * (x1 - x0)
        marker = tuple(int(c) for c in _unknown_colour())
        half = max(2, size // 8)
        draw.rectangle((x - half, bar_y - pad // 2, x + half, bar_y + bar_height + pad // 2), fill=marker)
        draw.rectangle((x - half, bar_y - pad // 2, x + half, bar_y + bar_height + pad // 2), outline=_PANEL_TEXT)
    return _frozen(image)


def colour_bar_panel(
    width: int,
    display_range: tuple[float, float],
    threshold: float | None,
    score: str,
    colormap: str = HEATMAP_COLORMAP,
) -> np.ndarray:
    """A colour bar ``width`` pixels wide for :func:`render_heatmap`'s scale: the score's name, the colours from
    ``low`` to ``high`` with their values, and the threshold marked in the unknown colour (clamped to an end of the
    bar when it lies outside the range). Built once per width and scale (cached).

    Returns:
        (h, width, 3) uint8, read-only.
    """
    low, high = (float(v) for v in display_range)
    return _colour_bar_panel(int(width), low, high, None if threshold is None else float(threshold), score, colormap)


def with_panel(image: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) with ``panel`` (h, W, 3) below it: (H + h, W, 3); the top H rows are ``image`` unchanged."""
    return np.concatenate([image, panel], axis=0)

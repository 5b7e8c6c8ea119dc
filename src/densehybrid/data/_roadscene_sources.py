"""The scikit-image photographs behind the road-scene benchmark: textures, anomaly cut-outs and negative images.

Every picture used at run time ships inside the installed ``scikit-image`` package (no ``pooch`` download), and each
picture has exactly one role:

* :data:`TEXTURE_SOURCES` become greyscale detail maps that modulate the colour of roads, pavements, facades and
  vegetation of the *known* classes;
* :data:`REAL_ANOMALY_SOURCES` become object-shaped cut-outs pasted as the ``real`` anomalies of the val and test
  splits (the masks come from thresholds, stereo disparity, the bundled silhouette or fixed ellipses and polygons
  traced on the photograph, never a plain rectangle);
* :data:`NEGATIVE_SOURCES` are the training negatives (the ADE20K role of the paper): scikit-image's camera man,
  cells, clock, LFW faces, Hubble deep field, immunohistochemistry slide, retinal microaneurysms, scanned page,
  retina and text, and matplotlib's sample photograph of Grace Hopper.

The three tuples are disjoint; :func:`load_source` refuses names outside them, so no code path can reach another
role's picture by accident. Everything here is cached per process and deterministic (no randomness at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import data as skdata
from skimage.draw import ellipse, polygon

TEXTURE_SOURCES: tuple[str, ...] = ("brick", "grass", "gravel", "moon")
REAL_ANOMALY_SOURCES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "coins",
    "horse",
    "rocket",
    "stereo_motorcycle",
)
NEGATIVE_SOURCES: tuple[str, ...] = (
    "camera",
    "cell",
    "clock",
    "faces",
    "grace_hopper",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "page",
    "retina",
    "text",
)
# Negative sources that are not scikit-image pictures of the same name: the file each one reads (all ship inside
# installed packages). ``faces`` tiles scikit-image's 200 LFW face thumbnails into one mosaic. Flat-colour graphics
# (``colorwheel``, ``logo``, matplotlib's logo and present icon) are left out: they are too close to the procedural
# anomaly family, which must stay unlike any training negative.
_OTHER_FILES = {
    "faces": "skimage:lfw_subset",
    "grace_hopper": "matplotlib:grace_hopper.jpg",
}

# Texture pyramids are built from a 2x2 mirrored tiling, so they are seamless with period 2 * side.
_PYRAMID_LEVELS = 7
# Cut-outs are stored at a few resolutions; a sprite samples the smallest one at least as large as itself, so
# nearest-neighbour sampling never aliases badly.
_CUTOUT_SIDES = (160, 80, 40, 20)


def load_source(name: str) -> np.ndarray:
    """One bundled scikit-image picture as float32 RGB in [0, 1].

    Args:
        name: a name from :data:`TEXTURE_SOURCES`, :data:`REAL_ANOMALY_SOURCES` or :data:`NEGATIVE_SOURCES`.

    Returns:
        (H, W, 3) float32 array; greyscale pictures are repeated over the three channels. For ``"horse"`` (a binary
        silhouette) the silhouette is white on black. For ``"stereo_motorcycle"`` the left view.

    Raises:
        ValueError: for a name outside the three role tuples.
    """
    known = TEXTURE_SOURCES + REAL_ANOMALY_SOURCES + NEGATIVE_SOURCES
    if name not in known:
        raise ValueError(f"Expected `name` to be one of {', '.join(sorted(known))}, but got {name!r}.")
    return _load_source_cached(name)


@cache
def _load_source_cached(name: str) -> np.ndarray:
    if name == "stereo_motorcycle":
        raw = skdata.stereo_motorcycle()[0]
    elif name == "faces":
        thumbs = skdata.lfw_subset()  # (200, 25, 25) float in [0, 1]
        raw = (thumbs.reshape(10, 20, 25, 25).transpose(0, 2, 1, 3).reshape(250, 500) * 255).round()
    elif name == "grace_hopper":
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data(_OTHER_FILES[name].split(":")[1], asfileobj=False)) as im:
            raw = np.asarray(im.convert("RGBA"))
        alpha = raw[:, :, 3:4].astype(np.float32) / 255.0  # transparent parts become white, as on a page
        raw = raw[:, :, :3] * alpha + 255.0 * (1.0 - alpha)

    elif name == "horse":
        raw = (~skdata.horse()).astype(np.uint8) * 255  # the bundled array is False on the horse
    else:
        raw = getattr(skdata, name)()
    out = np.asarray(raw, dtype=np.float32) / 255.0
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    out = np.ascontiguousarray(out[:, :, :3])
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Texture:
    """A seamless greyscale detail map with a mip-map pyramid, flattened for one-gather sampling.

    Attributes:
        flat: all pyramid levels, level ``l`` of side ``side >> l`` stored row-major from ``offsets[l]``; values
            are zero-mean detail scaled to unit standard deviation at level 0.
        offsets: (levels,) int64 start of each level in ``flat``.
        side: side of level 0 (the period of the tiling), a power of two.
    """

    flat: np.ndarray
    offsets: np.ndarray
    side: int

    def sample(self, u: np.ndarray, v: np.ndarray, footprint: np.ndarray | float) -> np.ndarray:
        """Detail values at texel coordinates ``(u, v)`` (level-0 texels, any real values, the map tiles).

        Args:
            u: texel column coordinates, any shape.
            v: texel row coordinates, same shape as ``u``.
            footprint: level-0 texels covered by one output pixel (scalar or same shape); picks the pyramid level
                so that far surfaces are averaged instead of aliased.

        Returns:
            float32 array of the shape of ``u``.
        """
        levels = len(self.offsets)
        level = np.clip(np.log2(np.maximum(footprint, 1.0)).astype(np.int64), 0, levels - 1)
        level = np.broadcast_to(level, np.shape(u))
        shift = self._log_side - level
        scale = np.float32(1.0) / (1 << level)
        # Sizes are powers of two, so ``& (size - 1)`` is the (always non-negative) modulo.
        mod = (1 << shift) - 1
        iu = np.floor(u * scale).astype(np.int64) & mod
        iv = np.floor(v * scale).astype(np.int64) & mod
        return self.flat[self.offsets[level] + (iv << shift) + iu]

    @property
    def _log_side(self) -> int:
        return self.side.bit_length() - 1


@cache
def texture(name: str) -> Texture:
    """The detail map of a texture source (``brick`` is turned so that its courses run horizontally)."""
    if name not in TEXTURE_SOURCES:
        raise ValueError(f"Expected `name` to be one of {', '.join(TEXTURE_SOURCES)}, but got {name!r}.")
    grey = load_source(name)[:, :, 0].astype(np.float64)
    if name == "brick":
        grey = grey.T
    side = 1 << (min(grey.shape).bit_length() - 1)  # a power of two, so sampling can wrap with a bit mask
    grey = grey[:side, :side]
    # Remove the photograph's slow illumination gradient: only the texture detail should carry over.
    grey = grey - ndi.gaussian_filter(grey, sigma=side / 8, mode="reflect")
    grey = (grey - grey.mean()) / max(grey.std(), 1e-6)
    tile = np.block([[grey, grey[:, ::-1]], [grey[::-1, :], grey[::-1, ::-1]]])
    levels = [tile]
    for _ in range(_PYRAMID_LEVELS - 1):
        prev = levels[-1]
        levels.append(0.25 * (prev[0::2, 0::2] + prev[1::2, 0::2] + prev[0::2, 1::2] + prev[1::2, 1::2]))
    offsets = np.cumsum([0] + [lv.size for lv in levels[:-1]]).astype(np.int64)
    flat = np.concatenate([lv.ravel() for lv in levels]).astype(np.float32)
    flat.setflags(write=False)
    return Texture(flat=flat, offsets=offsets, side=tile.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Real anomaly cut-outs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cutout:
    """An object cut out of a photograph, stored at several resolutions (largest first).

    Attributes:
        rgbs: per resolution, (h, w, 3) float32 colours.
        masks: per resolution, (h, w) bool object mask (never a full rectangle).
        aspect: width / height of the object's bounding box.
    """

    rgbs: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    aspect: float

    def pick(self, height_px: float) -> tuple[np.ndarray, np.ndarray]:
        """The smallest stored resolution whose height is at least ``height_px`` (or the largest one)."""
        for rgb, mask in zip(self.rgbs[::-1], self.masks[::-1]):
            if rgb.shape[0] >= height_px:
                return rgb, mask
        return self.rgbs[0], self.masks[0]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = ndi.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _shape_mask(shape: tuple[int, int], ellipses=(), polygons=()) -> np.ndarray:
    """Union of ellipses ``(row, col, r_row, c_col)`` and polygons ``[(col, row), ...]`` traced on a photograph."""
    mask = np.zeros(shape, dtype=bool)
    for r, c, rr_, cr_ in ellipses:
        rr, cc = ellipse(r, c, rr_, cr_, shape=shape)
        mask[rr, cc] = True
    for pts in polygons:
        pts = np.asarray(pts, dtype=float)
        rr, cc = polygon(pts[:, 1], pts[:, 0], shape=shape)
        mask[rr, cc] = True
    return mask


def _mask_chelsea(rgb: np.ndarray) -> np.ndarray:
    # The cat's head, traced on the 300 x 451 photograph (ears run out of the top edge).
    head = [(18, 70), (50, 4), (110, 22), (220, 2), (330, 22), (382, 4), (376, 90), (368, 175), (330, 250),
            (270, 292), (180, 298), (95, 272), (35, 205)]  # fmt: skip
    return _shape_mask(rgb.shape[:2], polygons=[head])


def _mask_coffee(rgb: np.ndarray) -> np.ndarray:
    # Saucer, cup and spoon handle of the 400 x 600 photograph, as ellipses and one polygon.
    spoon = [(398, 70), (420, 70), (412, 190), (400, 190)]
    return _shape_mask(rgb.shape[:2], ellipses=[(228, 278, 158, 200), (150, 290, 135, 118)], polygons=[spoon])


def _mask_astronaut(rgb: np.ndarray) -> np.ndarray:
    # Head and hair, suited torso and the helmet in front of it (512 x 512 photograph).
    torso = [(20, 511), (24, 330), (55, 262), (120, 205), (180, 178), (290, 178), (345, 232), (362, 330),
             (362, 511)]  # fmt: skip
    return _shape_mask(rgb.shape[:2], ellipses=[(98, 227, 88, 76), (432, 394, 92, 120)], polygons=[torso])


def _mask_rocket(rgb: np.ndarray) -> np.ndarray:
    # The rocket is white against a dark blue dusk sky: a brightness threshold inside its column, plus the pad.
    lum = rgb.mean(axis=2)
    mask = np.zeros(lum.shape, dtype=bool)
    mask[120:405, 296:348] = lum[120:405, 296:348] > 0.42
    mask = ndi.binary_closing(mask, iterations=3)
    mask = _largest_component(mask)
    mask[400:427, 268:378] = True
    return ndi.binary_fill_holes(mask)


def _mask_coins(rgb: np.ndarray) -> np.ndarray:
    # Six coins of the top-left of the tray. The cloth gets brighter towards the top, so threshold the white
    # top-hat (brightness above a grey opening wider than a coin) instead of the raw brightness.
    lum = ndi.gaussian_filter(rgb.mean(axis=2), 1.5)
    tophat = lum - ndi.grey_opening(lum, size=(71, 71))
    mask = np.zeros(lum.shape, dtype=bool)
    mask[10:165, 5:185] = tophat[10:165, 5:185] > 0.12
    mask = ndi.binary_opening(ndi.binary_fill_holes(mask), iterations=2)
    return ndi.binary_fill_holes(mask)


def _mask_stereo_motorcycle(rgb: np.ndarray) -> np.ndarray:
    # The stereo pair's disparity separates the motorcycle from the garage: the floor's disparity grows linearly
    # with the row, so pixels clearly nearer than the floor line (and nearer than the shelves) are the motorcycle.
    disparity = skdata.stereo_motorcycle()[2]
    disparity = np.where(np.isfinite(disparity), disparity, 0.0)
    rows, values = [], []
    for y in range(250, disparity.shape[0], 5):
        for cols in (slice(0, 60), slice(disparity.shape[1] - 40, disparity.shape[1])):
            seen = disparity[y, cols]
            seen = seen[seen > 0]
            if seen.size:
                rows.append(y)
                values.append(float(np.median(seen)))
    slope, intercept = np.polyfit(rows, values, 1)
    floor = slope * np.arange(disparity.shape[0]) + intercept
    mask = (disparity > floor[:, None] + 4.0) & (disparity > 30.0)
    mask = _largest_component(ndi.binary_opening(mask, iterations=2))
    return ndi.binary_fill_holes(ndi.binary_closing(mask, iterations=3))


def _mask_horse(rgb: np.ndarray) -> np.ndarray:
    return rgb[:, :, 0] > 0.5


_MASKERS = {
    "astronaut": _mask_astronaut,
    "chelsea": _mask_chelsea,
    "coffee": _mask_coffee,
    "coins": _mask_coins,
    "horse": _mask_horse,
    "rocket": _mask_rocket,
    "stereo_motorcycle": _mask_stereo_motorcycle,
}


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-style resize of an (h, w, C) float array in [0, 1] (PIL's box filter, deterministic)."""
    channels = [
        np.asarray(Image.fromarray(array[:, :, c].astype(np.float32), mode="F").resize((width, height), Image.BOX))
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)


@cache
def cutout(name: str) -> Cutout:
    """The object cut-out of a real anomaly source."""
    if name not in REAL_ANOMALY_SOURCES:
        raise ValueError(f"Expected `name` to be one of {', '.join(REAL_ANOMALY_SOURCES)}, but got {name!r}.")
    rgb = load_source(name)
    mask = _MASKERS[name](rgb)
    if name == "horse":
        # The bundled horse is a bare silhouette: give it a coat, a patch of the cat's tabby fur (another real
        # anomaly source, so no training picture leaks into the test objects) darkened to a bay colour.
        # The patch is mirror-tiled rather than stretched so the fur keeps its grain.
        fur = load_source("chelsea")[5:75, 150:330]
        fur = np.concatenate([fur, fur[::-1]], axis=0)
        fur = np.concatenate([fur, fur[:, ::-1]], axis=1)
        reps = (-(-rgb.shape[0] // fur.shape[0]), -(-rgb.shape[1] // fur.shape[1]), 1)
        rgb = np.tile(fur, reps)[: rgb.shape[0], : rgb.shape[1]] * np.array([0.75, 0.55, 0.4], dtype=np.float32)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rgb, mask = rgb[r0:r1, c0:c1], mask[r0:r1, c0:c1]
    h, w = mask.shape
    rgbs, masks = [], []
    for side in _CUTOUT_SIDES:
        scale = side / max(h, w)
        nh, nw = max(2, round(h * scale)), max(2, round(w * scale))
        small_rgb = np.clip(_resize(rgb, nh, nw), 0.0, 1.0).astype(np.float32)
        small_mask = _resize(mask[:, :, None].astype(np.float32), nh, nw)[:, :, 0] > 0.5
        small_rgb.setflags(write=False)
        small_mask.setflags(write=False)
        rgbs.append(small_rgb)
        masks.append(small_mask)
    return Cutout(rgbs=tuple(rgbs), masks=tuple(masks), aspect=w / h)

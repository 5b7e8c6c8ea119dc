"""Rendering of one road scene of the built-in benchmark from a ``numpy.random.Generator``.

The world is a straight street seen by a pinhole camera at height ``cam_h`` with focal length ``f`` (pixels): a flat
ground plane (road with lane markings, pavements, grass verges) between two vertical facade planes made of blocks of
buildings and vegetation, and sky above. A pixel is classified by intersecting its ray with the ground and facade
planes (vectorised over the image), textured with scikit-image photographs in perspective (mip-mapped, so far
surfaces average instead of aliasing), then objects (cars, persons, poles, trees and, in the val/test splits,
anomalies) are painted far to near at sizes that shrink with depth. Lighting, white balance, gamma, saturation, blur
and sensor noise are applied to the finished picture, anomalies included, so that brightness or sharpness alone do
not give anomalies away. Labels are written from the same masks that paint the pixels.

All randomness comes from the ``Generator`` handed in, in a fixed order, so one generator state gives one scene.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from densehybrid.data._roadscene_sources import REAL_ANOMALY_SOURCES, cutout, texture

ROAD, LANE_MARKING, SIDEWALK, TERRAIN, BUILDING, VEGETATION, SKY, POLE, PERSON, CAR = range(10)
NUM_CLASSES = 10
ANOMALY_ID = NUM_CLASSES
FAMILY_NONE, FAMILY_REAL, FAMILY_PROCEDURAL = 0, 1, 2

PROCEDURAL_SHAPES = ("blob", "star", "polygon", "ring", "cross")
PROCEDURAL_FILLS = ("flat", "stripes", "checker", "cells", "rings", "rainbow")
MIN_ANOMALY_PIXELS = 24
# The first anomaly gets many tries so that every val/test scene has one; later ones give up sooner.
_FIRST_PLACEMENT_TRIES = 400
_MAX_PLACEMENT_TRIES = 40

# (colour, detail amplitude) choices; each scene jitters them.
_BUILDING_TINTS = (
    (0.55, 0.27, 0.2),  # red brick
    (0.45, 0.32, 0.24),  # brown brick
    (0.74, 0.66, 0.52),  # sandstone
    (0.52, 0.52, 0.52),  # grey concrete
    (0.78, 0.77, 0.72),  # white plaster
    (0.78, 0.7, 0.45),  # yellow plaster
    (0.45, 0.5, 0.56),  # blue-grey
)
_SIDEWALK_TINTS = ((0.56, 0.56, 0.55), (0.66, 0.6, 0.52), (0.58, 0.45, 0.4), (0.47, 0.48, 0.5))
_SKIN_TONES = ((0.95, 0.8, 0.68), (0.85, 0.65, 0.5), (0.65, 0.45, 0.32), (0.45, 0.3, 0.2), (0.3, 0.2, 0.14))
_SKIES = {
    # name: (zenith, horizon, cloud colour)
    "clear": ((0.25, 0.45, 0.82), (0.7, 0.8, 0.93), (0.95, 0.95, 0.97)),
    "overcast": ((0.58, 0.6, 0.64), (0.8, 0.8, 0.8), (0.9, 0.9, 0.9)),
    "dusk": ((0.2, 0.24, 0.5), (0.95, 0.62, 0.38), (0.75, 0.5, 0.5)),
    "hazy": ((0.5, 0.6, 0.75), (0.86, 0.85, 0.8), (0.95, 0.94, 0.9)),
}


@dataclass(frozen=True)
class AnomalyRecord:
    """One anomaly of a val/test scene.

    Attributes:
        family: ``"real"`` (a photograph cut-out) or ``"procedural"`` (a synthetic shape and fill).
        source: the scikit-image picture (real) or ``"<shape>/<fill>"`` (procedural).
        location: ``"road"`` or ``"beside"`` (pavement or verge next to the road).
        depth: distance from the camera in metres.
        bbox: ``(top, left, bottom, right)`` pixel box (bottom/right exclusive).
        pixels: number of pixels labelled as this anomaly (always at least :data:`MIN_ANOMALY_PIXELS`).
    """

    family: str
    source: str
    location: str
    depth: float
    bbox: tuple[int, int, int, int]
    pixels: int


@dataclass
class Scene:
    """One rendered scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        target: (H, W) uint8 class ids ``0..K-1`` and the anomaly id K.
        family: (H, W) uint8, 0 no anomaly, 1 real anomaly, 2 procedural anomaly.
        anomalies: one record per anomaly, in painting order.
    """

    image: np.ndarray
    target: np.ndarray
    family: np.ndarray
    anomalies: list[AnomalyRecord] = field(default_factory=list)


@dataclass
class _Layout:
    height: int
    width: int
    f: float
    horizon: float
    vp_x: float
    cam_h: float
    road_left: float
    road_right: float
    lane_edges: np.ndarray
    bands: dict[str, list[tuple[int, float]]]  # side -> [(class, width)] from the kerb outward
    facade: dict[str, float]  # side -> signed X of the facade plane


# A sprite draws itself on its bounding box: given the pixel-centre coordinates u (1, w) in [0, 1] left to right and
# v (h, 1) in [0, 1] bottom to top, the box size in pixels and metres per pixel, it returns (mask, rgb).
_Draw = Callable[[np.ndarray, np.ndarray, float, float, float], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Sprite:
    z: float
    x: float
    w: float
    h: float
    label: int
    draw: _Draw
    family: int = FAMILY_NONE
    cast_shadow: bool = True
    record: dict | None = None


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    out = np.asarray(colour, dtype=np.float32) * rng.uniform(1 - amount, 1 + amount, 3).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def _knots(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Left knot index and smoothstep weight of the right knot for ``n`` pixel centres over ``cells`` cells."""
    f = (np.arange(n) + 0.5) / n * cells + 0.5
    i0 = f.astype(np.int64)
    t = (f - i0).astype(np.float32)
    return i0, t * t * (3 - 2 * t)  # smoothstep hides the grid


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smoothly interpolated Gaussian value noise of about unit scale, ``cells`` random values per axis."""
    grid = rng.standard_normal((cells[0] + 2, cells[1] + 2)).astype(np.float32)
    # Separable: along x on the few knot rows first, then along y. (No matrix product: a multi-threaded BLAS call
    # on such small matrices costs more than it saves on a busy machine.)
    x0, tx = _knots(shape[1], cells[1])
    rows = grid[:, x0] * (1 - tx) + grid[:, x0 + 1] * tx
    y0, ty = _knots(shape[0], cells[0])
    return rows[y0] * (1 - ty)[:, None] + rows[y0 + 1] * ty[:, None]


def _noise_1d(rng: np.random.Generator, length: float, step: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random smooth function on ``[0, length]`` (values every ``step``, linear in between, constant beyond)."""
    knots = np.arange(0.0, length + step, step)
    values = rng.standard_normal(knots.size)
    return lambda t: np.interp(t, knots, values).astype(np.float32)


def _modulate(colour: np.ndarray, detail: np.ndarray, amplitude: float) -> np.ndarray:
    """(n, 3) colours: a base colour scaled by ``1 + amplitude * detail`` (detail has unit scale)."""
    return colour[None, :] * np.clip(1.0 + amplitude * detail, 0.2, 2.0)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Layout and background
# ----------------------------------------------------------------------------------------------------------------


def _sample_layout(rng: np.random.Generator, height: int, width: int) -> _Layout:
    f = width * rng.uniform(0.55, 0.8)
    horizon = height * rng.uniform(0.36, 0.5)
    vp_x = width * rng.uniform(0.35, 0.65)
    cam_h = rng.uniform(1.3, 1.8)
    lanes = int(rng.integers(2, 5))
    lane_w = rng.uniform(2.8, 3.6)
    road_w = lanes * lane_w
    offset = rng.uniform(0.2, 0.8) * road_w
    road_left, road_right = -offset, road_w - offset
    bands: dict[str, list[tuple[int, float]]] = {}
    facade: dict[str, float] = {}
    for side, sign, edge in (("left", -1.0, road_left), ("right", 1.0, road_right)):
        sidewalk = (SIDEWALK, rng.uniform(1.5, 4.0))
        has_terrain = rng.random() < 0.5
        terrain = (TERRAIN, rng.uniform(1.0, 5.0))
        if has_terrain and rng.random() < 0.35:
            side_bands = [terrain, sidewalk]  # a grass verge between road and pavement
        elif has_terrain:
            side_bands = [sidewalk, terrain]
        else:
            side_bands = [sidewalk]
        bands[side] = side_bands
        facade[side] = edge + sign * sum(w for _, w in side_bands)
    lane_edges = road_left + lane_w * np.arange(1, lanes)
    return _Layout(height, width, f, horizon, vp_x, cam_h, road_left, road_right, lane_edges, bands, facade)


@dataclass
class _Blocks:
    starts: np.ndarray
    heights: np.ndarray
    is_building: np.ndarray
    tints: np.ndarray  # (n, 3)
    amplitudes: np.ndarray
    top_noise: Callable[[np.ndarray], np.ndarray]


def _sample_blocks(rng: np.random.Generator, cam_h: float) -> _Blocks:
    starts, heights, building, tints, amps = [], [], [], [], []
    z = 0.0
    while z < 400.0:
        starts.append(z)
        if rng.random() < 0.68:
            building.append(True)
            heights.append(rng.uniform(6.0, 26.0))
            tints.append(_jitter(rng, _BUILDING_TINTS[int(rng.integers(len(_BUILDING_TINTS)))], 0.12))
            amps.append(rng.uniform(0.08, 0.35))
        else:
            building.append(False)
            # Never lower than the camera: one must not see the horizon over a hedge.
            heights.append(max(cam_h + 1.0, rng.uniform(2.5, 12.0)))
            tints.append(_hsv(rng.uniform(0.2, 0.36), rng.uniform(0.4, 0.75), rng.uniform(0.2, 0.45)))
            amps.append(rng.uniform(0.25, 0.45))
        z += rng.uniform(8.0, 28.0)
    return _Blocks(
        starts=np.asarray(starts),
        heights=np.asarray(heights),
        is_building=np.asarray(building),
        tints=np.asarray(tints, dtype=np.float32),
        amplitudes=np.asarray(amps, dtype=np.float32),
        top_noise=_noise_1d(rng, 420.0, 1.5),
    )


def _render_background(rng: np.random.Generator, lay: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground, facades and sky: (H, W, 3) float32 colours, (H, W) uint8 labels and the (H, W) bool ground mask."""
    H, W, f = lay.height, lay.width, lay.f
    image = np.zeros((H, W, 3), dtype=np.float32)
    label = np.zeros((H, W), dtype=np.uint8)
    dy = (np.arange(H, dtype=np.float64) + 0.5)[:, None] - lay.horizon
    dx = (np.arange(W, dtype=np.float64) + 0.5)[None, :] - lay.vp_x
    below = dy > 0
    safe_dy = np.where(below, dy, 1.0)
    zg = np.where(below, f * lay.cam_h / safe_dy, np.inf)  # (H, 1)
    xg = dx * lay.cam_h / safe_dy  # (H, W), meaningful where below
    safe_dx = np.where(dx == 0, 1e-9, dx)
    zf = np.where(dx > 0, f * lay.facade["right"] / safe_dx, f * lay.facade["left"] / safe_dx)  # (1, W)
    zf = np.where(zf > 0, zf, np.inf)
    ground = below & (zg <= zf)
    yf = lay.cam_h - dy * zf / f  # height on the facade plane, (H, W)

    # --- facades: blocks of buildings and vegetation along each side ---
    facade = np.zeros((H, W), dtype=bool)
    blocks = {side: _sample_blocks(rng, lay.cam_h) for side in ("left", "right")}
    veg_clumps = _smooth_noise(rng, (H, W), (6, 14))
    for side, on_side in (("left", dx < 0), ("right", dx > 0)):
        b = blocks[side]
        cols = np.broadcast_to(on_side & np.isfinite(zf), (H, W))
        region = cols & ~ground
        if not region.any():
            continue
        zf_full = np.broadcast_to(zf, (H, W))
        z = zf_full[region]
        y = yf[region]
        bi = np.clip(np.searchsorted(b.starts, z, side="right") - 1, 0, len(b.starts) - 1)
        top = b.heights[bi] + np.where(b.is_building[bi], 0.0, 1.2 * b.top_noise(z))
        top = np.maximum(top, lay.cam_h + 0.3)
        hit = (y >= 0) & (y <= top)
        rows, cols_idx = np.nonzero(region)
        rows, cols_idx, z, y, bi = rows[hit], cols_idx[hit], z[hit], y[hit], bi[hit]
        facade[rows, cols_idx] = True
        metres_per_px = z / f
        is_b = b.is_building[bi]
        colour = np.empty((z.size, 3), dtype=np.float32)
        # buildings: brick detail plus a grid of windows
        brick_scale = rng.uniform(180.0, 320.0)
        floor_h = rng.uniform(2.8, 3.6)
        win_period = rng.uniform(2.4, 4.0)
        win_w, win_h = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)
        glass = _jitter(rng, (0.12, 0.15, 0.2), 0.3)
        zb, yb, bb = z[is_b], y[is_b], bi[is_b]
        detail = texture("brick").sample(zb * brick_scale, yb * brick_scale, metres_per_px[is_b] * brick_scale)
        bcolour = b.tints[bb] * np.clip(1.0 + b.amplitudes[bb] * detail, 0.2, 2.0)[:, None]
        storey = (yb / floor_h) % 1.0
        window = (yb > 1.0) & (yb < b.heights[bb] - 0.6) & (((zb / win_period) % 1.0) < win_w) & (storey > 1 - win_h)
        colour[is_b] = np.where(window[:, None], glass[None, :] * (0.6 + 0.8 * storey)[:, None], bcolour)
        # vegetation: grass detail at a coarse scale and clumps of light and shade
        grass_scale = rng.uniform(120.0, 260.0)
        is_v = ~is_b
        zv, yv, bv = z[is_v], y[is_v], bi[is_v]
        gdetail = texture("grass").sample(zv * grass_scale, yv * grass_scale, metres_per_px[is_v] * grass_scale)
        clumps = np.clip(1.0 + 0.25 * veg_clumps[rows[is_v], cols_idx[is_v]], 0.5, 1.5)
        colour[is_v] = b.tints[bv] * (np.clip(1.0 + b.amplitudes[bv] * gdetail, 0.2, 2.0) * clumps)[:, None]
        image[rows, cols_idx] = colour
        label[rows, cols_idx] = np.where(is_b, BUILDING, VEGETATION)

    # --- ground: road, lane markings, pavements and verges ---
    grows, gcols = np.nonzero(ground)
    x = xg[grows, gcols]
    z = np.broadcast_to(zg, (H, W))[grows, gcols]
    footprint_m = np.sqrt((z / f) * (z * z / (f * lay.cam_h)))  # geometric mean of the two pixel footprints
    glabel = np.full(x.shape, ROAD, dtype=np.uint8)
    for side, sign, edge in (("left", -1.0, lay.road_left), ("right", 1.0, lay.road_right)):
        out = sign * (x - edge)  # distance beyond the kerb on this side
        start = 0.0
        for cls, width in lay.bands[side]:
            glabel[(out > start) & (out <= start + width)] = cls
            start += width
        glabel[out > start] = lay.bands[side][-1][0]  # rounding at the facade foot
    gcolour = np.empty((x.size, 3), dtype=np.float32)
    wear = _smooth_noise(rng, (H, W), (5, 10))[grows, gcols]

    # road: gravel detail as asphalt grain, darker and lighter worn patches
    r = glabel == ROAD
    xr, zr, wr = x[r], z[r], wear[r]
    road_grey = rng.uniform(0.2, 0.42)
    road_tint = _jitter(rng, (road_grey, road_grey, road_grey * rng.uniform(0.95, 1.08)), 0.04)
    road_scale = rng.uniform(100.0, 260.0)
    detail = texture("gravel").sample(xr * road_scale, zr * road_scale, footprint_m[r] * road_scale)
    road_col = _modulate(road_tint, detail, rng.uniform(0.1, 0.25)) * (1.0 + 0.08 * wr)[:, None]

    # lane markings: dashed lane dividers, optional solid edge lines and an optional zebra crossing
    line_w = rng.uniform(0.1, 0.2)
    dash_period, dash_len, dash_phase = rng.uniform(6.0, 12.0), rng.uniform(2.0, 4.0), rng.uniform(0.0, 12.0)
    marking = np.zeros(xr.shape, dtype=bool)
    dashes = ((zr + dash_phase) % dash_period) < dash_len
    for edge in lay.lane_edges:
        marking |= (np.abs(xr - edge) < line_w / 2) & dashes
    if rng.random() < 0.7:
        for edge in (lay.road_left + 0.3, lay.road_right - 0.3):
            marking |= np.abs(xr - edge) < line_w / 2
    if rng.random() < 0.3:
        z0 = rng.uniform(8.0, 30.0)
        marking |= (zr > z0) & (zr < z0 + rng.uniform(2.5, 4.0)) & (((xr - lay.road_left) % 1.0) < 0.5)
    marking &= wr < 1.1  # worn paint disappears where the asphalt is most worn
    yellow = rng.random() < 0.25
    paint = _jitter(rng, (0.88, 0.72, 0.2) if yellow else (0.88, 0.88, 0.86), 0.06)
    gcolour[r] = np.where(marking[:, None], _modulate(paint, detail, 0.08), road_col)
    glabel[np.flatnonzero(r)[marking]] = LANE_MARKING

    # pavement: concrete (moon surface) detail, slab joints and a lighter kerb
    p = glabel == SIDEWALK
    xp, zp = x[p], z[p]
    side_tint = _jitter(rng, _SIDEWALK_TINTS[int(rng.integers(len(_SIDEWALK_TINTS)))], 0.08)
    side_scale = rng.uniform(90.0, 200.0)
    slab = rng.uniform(0.8, 2.0)
    sdetail = texture("moon").sample(xp * side_scale, zp * side_scale, footprint_m[p] * side_scale)
    joint = ((np.abs(xp) % slab) < 0.05) | ((zp % slab) < 0.05)
    kerb = np.minimum(np.abs(xp - lay.road_left), np.abs(xp - lay.road_right)) < 0.2
    shade = np.where(joint, 0.8, 1.0) * np.where(kerb, 1.15, 1.0)
    gcolour[p] = _modulate(side_tint, sdetail, rng.uniform(0.15, 0.3)) * shade[:, None]

    # verge: grass detail, yellower and flatter than the vegetation
    t = glabel == TERRAIN
    terrain_tint = _hsv(rng.uniform(0.1, 0.24), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.55))
    terrain_scale = rng.uniform(150.0, 320.0)
    tdetail = texture("grass").sample(x[t] * terrain_scale, z[t] * terrain_scale, footprint_m[t] * terrain_scale)
    gcolour[t] = _modulate(terrain_tint, tdetail, rng.uniform(0.2, 0.4)) * (1.0 + 0.15 * wear[t])[:, None]
    image[grows, gcols] = gcolour
    label[grows, gcols] = glabel

    # --- sky: a vertical gradient with soft clouds ---
    sky = ~ground & ~facade
    srows, scols = np.nonzero(sky)
    zenith, horizon_c, cloud_c = _SKIES[tuple(_SKIES)[int(rng.integers(len(_SKIES)))]]
    zenith, horizon_c, cloud_c = _jitter(rng, zenith, 0.1), _jitter(rng, horizon_c, 0.06), _jitter(rng, cloud_c, 0.05)
    height_t = (np.clip(-dy[:, 0] / max(lay.horizon, 1.0), 0.0, 1.0) ** 0.7).astype(np.float32)[srows, None]
    gradient = horizon_c[None, :] * (1 - height_t) + zenith[None, :] * height_t
    cover = rng.uniform(-0.5, 1.0)
    clouds = _smooth_noise(rng, (H, W), (4, 8)) + 0.5 * _smooth_noise(rng, (H, W), (10, 20))
    clouds = (np.clip(clouds[srows, scols] + cover, 0, 1) * rng.uniform(0.3, 0.9))[:, None]
    image[srows, scols] = gradient * (1 - clouds) + cloud_c[None, :] * clouds
    label[srows, scols] = SKY
    return image, label, ground


# ----------------------------------------------------------------------------------------------------------------
# Sprites: known objects
# ----------------------------------------------------------------------------------------------------------------


def _car(rng: np.random.Generator) -> tuple[float, float, _Draw]:
    van = rng.random() < 0.2
    width = rng.uniform(1.65, 2.0)
    height = rng.uniform(1.9, 2.5) if van else rng.uniform(1.35, 1.65)
    roll = rng.random()
    if roll < 0.3:  # greys, black and white
        paint = np.full(3, rng.uniform(0.08, 0.85), dtype=np.float32)
    else:
        paint = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9))
    rear = rng.random() < 0.65
    lamp = np.array((0.85, 0.08, 0.05) if rear else (0.95, 0.92, 0.75), dtype=np.float32)
    glass = _jitter(rng, (0.1, 0.12, 0.15), 0.3)
    belt = 0.5 if van else 0.58  # top of the body, where the cabin starts

    def draw(u, v, pw, ph, mpp):
        cabin_half = 0.5 * (0.94 - 0.22 * (v - belt) / (1.0 - belt))
        corner = np.minimum(u, 1 - u)
        body = (v >= 0.1) & (v <= belt) & ~((v > belt - 0.06) & (corner < 0.03))
        cabin = (v > belt) & (v <= 0.99) & (np.abs(u - 0.5) <= cabin_half)
        wheels = (v < 0.16) & (((u > 0.06) & (u < 0.26)) | ((u > 0.74) & (u < 0.94)))
        mask = body | cabin | wheels
        shade = (0.7 + 0.45 * v) * np.ones_like(u)
        rgb = paint[None, None, :] * shade[..., None]
        window = cabin & (v > belt + 0.05) & (v < 0.94) & (np.abs(u - 0.5) < cabin_half - 0.06)
        rgb = np.where(window[..., None], glass[None, None, :] * (0.7 + 0.6 * v)[..., None], rgb)
        lights = body & (v > belt - 0.16) & (v < belt - 0.07) & ((u < 0.15) | (u > 0.85))
        rgb = np.where(lights[..., None], lamp[None, None, :], rgb)
        plate = (v > 0.22) & (v < 0.32) & (np.abs(u - 0.5) < 0.11)
        rgb = np.where(plate[..., None], np.float32(0.85), rgb)
        bumper = body & (v < 0.19) & ~plate
        rgb = np.where(bumper[..., None], rgb * 0.45, rgb)
        rgb = np.where((wheels & ~body)[..., None], np.float32(0.05), rgb)
        return mask, rgb

    return width, height, draw


def _person(rng: np.random.Generator) -> tuple[float, float, _Draw]:
    height = rng.uniform(1.5, 1.95)
    width = 0.7
    skin = _jitter(rng, _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))], 0.06)
    shirt = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.15, 0.9))
    pants = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.08, 0.5))
    hair = _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.7))
    stride = rng.uniform(0.0, 0.22)
    sway = rng.uniform(-0.03, 0.03)

    def draw(u, v, pw, ph, mpp):
        x = (u - 0.5) * (pw / ph)  # in units of the person's height
        head = x * x + (v - 0.925) ** 2 < 0.066**2
        hair_m = head & ((v > 0.945) | ((v > 0.9) & (np.abs(x) > 0.045)))
        torso = (v >= 0.48) & (v < 0.86) & (np.abs(x - sway) < 0.11 + 0.03 * (v - 0.48) / 0.38)
        arms = (v >= 0.5) & (v < 0.85) & (np.abs(x - sway) >= 0.125) & (np.abs(x - sway) < 0.165)
        left = np.abs(x + 0.055 + stride * (0.5 - v)) < 0.045
        right = np.abs(x - 0.055 - stride * (0.5 - v)) < 0.045
        legs = (v < 0.5) & (left | right)
        mask = head | torso | arms | legs
        rgb = np.broadcast_to(shirt, mask.shape + (3,)).copy()
        rgb = np.where(legs[..., None], pants, rgb)
        rgb = np.where((legs & (v < 0.04))[..., None], np.float32(0.08), rgb)
        rgb = np.where((arms & (v < 0.6))[..., None], skin, rgb)
        rgb = np.where(head[..., None], skin, rgb)
        rgb = np.where(hair_m[..., None], hair, rgb)
        return mask, rgb * (0.8 + 0.3 * v)[..., None]

    return width, height, draw


def _pole(rng: np.random.Generator) -> tuple[float, float, _Draw]:
    height = rng.uniform(3.5, 8.0)
    radius = rng.uniform(0.05, 0.1)
    metal = np.full(3, rng.uniform(0.3, 0.65), dtype=np.float32) * _jitter(rng, np.ones(3), 0.05)
    sign = rng.random() < 0.4
    sign_shape = int(rng.integers(2))
    sign_col = np.array(((0.8, 0.1, 0.1), (0.1, 0.25, 0.7), (0.9, 0.9, 0.88), (0.9, 0.75, 0.1))[int(rng.integers(4))])
    sign_h = rng.uniform(2.2, 2.8)
    width = 0.8

    def draw(u, v, pw, ph, mpp):
        x = (u - 0.5) * width  # metres
        y = v * height
        shaft = np.abs(x) < max(radius, 0.5 * mpp)  # never thinner than about a pixel
        rgb = np.broadcast_to(metal, shaft.shape + (3,)) * (1.0 + 1.5 * x / width)[..., None]
        mask = shaft
        if sign:
            if sign_shape == 0:
                plate = x * x + (y - sign_h) ** 2 < 0.33**2
            else:
                plate = (np.abs(x) < 0.35) & (np.abs(y - sign_h) < 0.3)
            rgb = np.where(plate[..., None], sign_col.astype(np.float32), rgb)
            mask = mask | plate
        return mask, rgb

    return width, height, draw


def _tree(rng: np.random.Generator) -> tuple[float, float, _Draw]:
    height = rng.uniform(4.0, 9.0)
    width = rng.uniform(2.0, 5.0)
    crown_base = rng.uniform(0.3, 0.45)
    harmonics = rng.uniform(-0.1, 0.1, 6)
    phases = rng.uniform(0, 2 * np.pi, 6)
    leaf = _hsv(rng.uniform(0.2, 0.36), rng.uniform(0.4, 0.75), rng.uniform(0.2, 0.45))
    bark = _jitter(rng, (0.3, 0.22, 0.15), 0.15)
    scale = rng.uniform(120.0, 260.0)
    trunk_r = rng.uniform(0.1, 0.2)

    def draw(u, v, pw, ph, mpp):
        xm = (u - 0.5) * width
        ym = v * height
        cy = height * (crown_base + 1.0) / 2
        ry, rx = height * (1.0 - crown_base) / 2, width / 2
        ex, ey = xm / rx, (ym - cy) / ry
        theta = np.arctan2(ey, ex)
        k = np.arange(2, 8)[:, None, None]
        radius = 1.0 + np.sum(harmonics[:, None, None] * np.cos(k * theta[None] + phases[:, None, None]), axis=0)
        crown = ex * ex + ey * ey < (0.92 * radius) ** 2
        trunk = (np.abs(xm) < max(trunk_r, 0.5 * mpp)) & (ym < cy)
        mask = crown | trunk
        shape = np.broadcast(xm, ym).shape
        xx, yy = np.broadcast_to(xm, shape), np.broadcast_to(ym, shape)
        detail = texture("grass").sample(xx * scale, yy * scale, mpp * scale)
        rgb = leaf[None, None, :] * np.clip(1.0 + 0.35 * detail, 0.2, 2.0)[..., None] * (0.8 + 0.4 * ey)[..., None]
        rgb = np.where((trunk & ~crown)[..., None], bark, rgb)
        return mask, rgb

    return width, height, draw


# ----------------------------------------------------------------------------------------------------------------
# Sprites: anomalies
# ----------------------------------------------------------------------------------------------------------------


def _real_anomaly(rng: np.random.Generator) -> tuple[str, float, _Draw]:
    source = REAL_ANOMALY_SOURCES[int(rng.integers(len(REAL_ANOMALY_SOURCES)))]
    cut = cutout(source)
    flip = rng.random() < 0.5
    gain = _jitter(rng, np.ones(3), 0.08) * rng.uniform(0.8, 1.15)

    def draw(u, v, pw, ph, mpp):
        rgb_src, mask_src = cut.pick(ph)
        h, w = mask_src.shape
        iu = np.clip((u * w).astype(np.int64), 0, w - 1)
        if flip:
            iu = w - 1 - iu
        iv = np.clip(((1.0 - v) * h).astype(np.int64), 0, h - 1)
        return mask_src[iv, iu], rgb_src[iv, iu] * gain

    return source, cut.aspect, draw


def _saturated(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))


def _procedural_anomaly(rng: np.random.Generator) -> tuple[str, float, _Draw]:
    shape = PROCEDURAL_SHAPES[int(rng.integers(len(PROCEDURAL_SHAPES)))]
    fill = PROCEDURAL_FILLS[int(rng.integers(len(PROCEDURAL_FILLS)))]
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    rotation = rng.uniform(0, 2 * np.pi)
    n = int(rng.integers(5, 10)) if shape == "star" else int(rng.integers(3, 8))
    inner = rng.uniform(0.35, 0.6)
    harmonics = rng.uniform(-0.18, 0.18, 4)
    phases = rng.uniform(0, 2 * np.pi, 4)
    corner_angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    corner_radii = rng.uniform(0.7, 1.0, n)
    arm = rng.uniform(0.25, 0.45)
    colours = [_saturated(rng) for _ in range(2)]
    if np.abs(colours[0] - colours[1]).sum() < 0.6:
        colours[1] = 1.0 - colours[0]  # keep the two colours of a pattern apart
    freq = rng.uniform(2.0, 6.0)
    angle = rng.uniform(0, np.pi)
    cells = int(rng.integers(3, 9))
    cell_colours = np.stack([_saturated(rng) for _ in range(cells * cells)])
    hue0 = rng.random()

    def radius_at(theta):
        if shape == "blob":
            k = np.arange(2, 6)[:, None, None]
            return 0.8 * (1 + np.sum(harmonics[:, None, None] * np.cos(k * theta[None] + phases[:, None, None]), 0))
        if shape == "star":
            knots = np.arange(2 * n + 1) * np.pi / n
            radii = np.where(np.arange(2 * n + 1) % 2 == 0, 1.0, inner)
            return np.interp((theta - rotation) % (2 * np.pi), knots, radii)
        angles = np.concatenate([corner_angles - 2 * np.pi, corner_angles, corner_angles + 2 * np.pi])
        return np.interp(theta % (2 * np.pi), angles, np.tile(corner_radii, 3))

    def draw(u, v, pw, ph, mpp):
        x, y = 2 * u - 1, 2 * v - 1
        x, y = np.broadcast_arrays(x, y)
        rho, theta = np.hypot(x, y), np.arctan2(y, x)
        if shape == "ring":
            mask = (rho < 0.98) & (rho > inner * 0.9)
        elif shape == "cross":
            cr, sr = np.cos(rotation), np.sin(rotation)
            a, b = x * cr + y * sr, -x * sr + y * cr
            mask = (rho < 1.0) & ((np.abs(a) < arm) | (np.abs(b) < arm))
        else:
            mask = rho <= radius_at(theta)
        t = x * np.cos(angle) + y * np.sin(angle)
        if fill == "flat":
            pick = np.zeros(x.shape, dtype=bool)
        elif fill == "stripes":
            pick = ((t + 1) * freq) % 1.0 < 0.5
        elif fill == "checker":
            pick = ((np.floor((x + 1) * freq) + np.floor((y + 1) * freq)) % 2) == 1
        elif fill == "rings":
            pick = (rho * freq * 1.5) % 1.0 < 0.5
        else:
            pick = None
        if fill == "cells":
            ci = np.clip(((x + 1) / 2 * cells).astype(np.int64), 0, cells - 1)
            cj = np.clip(((y + 1) / 2 * cells).astype(np.int64), 0, cells - 1)
            rgb = cell_colours[cj * cells + ci]
        elif fill == "rainbow":
            hue = (hue0 + 0.5 * (t + 1)) % 1.0
            rgb = np.stack(np.vectorize(colorsys.hsv_to_rgb, otypes=[float] * 3)(hue, 1.0, 1.0), axis=-1)
        else:
            rgb = np.where(pick[..., None], colours[1], colours[0])
        return mask, rgb.astype(np.float32)

    return f"{shape}/{fill}", aspect, draw


# ----------------------------------------------------------------------------------------------------------------
# Painting
# ----------------------------------------------------------------------------------------------------------------


def _sprite_box(s: _Sprite, lay: _Layout) -> tuple[float, float, float, float]:
    """Float pixel box (x0, y0, width, height) of a sprite standing on the ground at (x, z)."""
    pw, ph = lay.f * s.w / s.z, lay.f * s.h / s.z
    cx = lay.vp_x + lay.f * s.x / s.z
    bottom = lay.horizon + lay.f * lay.cam_h / s.z
    return cx - pw / 2, bottom - ph, pw, ph


def _int_box(s: _Sprite, lay: _Layout) -> tuple[int, int, int, int] | None:
    x0, y0, pw, ph = _sprite_box(s, lay)
    top, left = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
    bottom, right = min(lay.height, int(np.ceil(y0 + ph))), min(lay.width, int(np.ceil(x0 + pw)))
    if bottom <= top or right <= left:
        return None
    return top, left, bottom, right


def _rasterise(s: _Sprite, lay: _Layout) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray] | None:
    box = _int_box(s, lay)
    if box is None:
        return None
    top, left, bottom, right = box
    x0, y0, pw, ph = _sprite_box(s, lay)
    u = ((np.arange(left, right) + 0.5 - x0) / pw)[None, :]
    v = ((y0 + ph - (np.arange(top, bottom) + 0.5)) / ph)[:, None]
    mask, rgb = s.draw(u, v, pw, ph, s.z / lay.f)
    mask = np.broadcast_to(mask, (bottom - top, right - left))
    rgb = np.broadcast_to(rgb, (bottom - top, right - left, 3))
    return box, mask, rgb


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _known_objects(rng: np.random.Generator, lay: _Layout) -> list[_Sprite]:
    sprites: list[_Sprite] = []
    lanes = np.concatenate([[lay.road_left], lay.lane_edges, [lay.road_right]])
    centres = (lanes[:-1] + lanes[1:]) / 2
    taken: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(0, 7))):
        if rng.random() < 0.3:  # parked at a kerb
            x = lay.road_left + 1.1 if rng.random() < 0.5 else lay.road_right - 1.1
        else:
            x = centres[int(rng.integers(len(centres)))] + rng.uniform(-0.3, 0.3)
        z = rng.uniform(4.5, 70.0)
        w, h, draw = _car(rng)
        if any(abs(x - tx) < 2.2 and abs(z - tz) < 6.0 for tx, tz in taken):
            continue
        taken.append((x, z))
        sprites.append(_Sprite(z, x, w, h, CAR, draw))
    for _ in range(int(rng.integers(0, 6))):
        side, sign, edge = (("left", -1.0, lay.road_left), ("right", 1.0, lay.road_right))[int(rng.integers(2))]
        start = 0.0
        for cls, width in lay.bands[side]:
            if cls == SIDEWALK:
                break
            start += width
        x = edge + sign * (start + rng.uniform(0.4, max(0.5, width - 0.4)))
        if rng.random() < 0.15:  # crossing the road
            x = rng.uniform(lay.road_left + 0.5, lay.road_right - 0.5)
        w, h, draw = _person(rng)
        sprites.append(_Sprite(rng.uniform(4.0, 45.0), x, w, h, PERSON, draw))
    for side, sign, edge in (("left", -1.0, lay.road_left), ("right", 1.0, lay.road_right)):
        if rng.random() < 0.8:
            spacing = rng.uniform(12.0, 30.0)
            z = rng.uniform(3.0, 15.0)
            x = edge + sign * rng.uniform(0.35, 0.7)
            while z < 90.0:
                w, h, draw = _pole(rng)
                sprites.append(_Sprite(z, x, w, h, POLE, draw, cast_shadow=False))
                z += spacing * rng.uniform(0.9, 1.1)
        outer_cls, outer_w = lay.bands[side][-1]
        if outer_cls == TERRAIN and rng.random() < 0.6:
            start = sum(w for _, w in lay.bands[side][:-1])
            spacing = rng.uniform(7.0, 20.0)
            z = rng.uniform(3.0, 15.0)
            while z < 90.0:
                x = edge + sign * (start + outer_w * rng.uniform(0.3, 0.7))
                w, h, draw = _tree(rng)
                sprites.append(_Sprite(z, x, w, h, VEGETATION, draw, cast_shadow=False))
                z += spacing * rng.uniform(0.8, 1.2)
    return sprites


def _place_anomalies(rng: np.random.Generator, lay: _Layout, count: int, sprites: list[_Sprite]) -> list[_Sprite]:
    """Anomaly sprites on or beside the road, at least :data:`MIN_ANOMALY_PIXELS` each, never occluded."""
    placed: list[_Sprite] = []
    boxes: list[tuple[int, int, int, int]] = []
    for k in range(count):
        for _try in range(_FIRST_PLACEMENT_TRIES if k == 0 else _MAX_PLACEMENT_TRIES):
            family = FAMILY_REAL if rng.random() < 0.5 else FAMILY_PROCEDURAL
            if family == FAMILY_REAL:
                source, aspect, draw = _real_anomaly(rng)
            else:
                source, aspect, draw = _procedural_anomaly(rng)
            if rng.random() < 0.65:
                location = "road"
                x = rng.uniform(lay.road_left + 0.3, lay.road_right - 0.3)
            else:
                location = "beside"
                side, sign, edge = (("left", -1.0, lay.road_left), ("right", 1.0, lay.road_right))[int(rng.integers(2))]
                x = edge + sign * rng.uniform(0.3, sum(w for _, w in lay.bands[side]) - 0.3)
            h = rng.uniform(0.35, 1.6)
            w = h * aspect
            # Depth range in which the object is 10 px tall up to 45 % of the image height.
            z_near = max(4.0, lay.f * h / (0.45 * lay.height))
            z_far = min(45.0, lay.f * h / 10.0)
            if z_far <= z_near:
                continue
            z = float(np.exp(rng.uniform(np.log(z_near), np.log(z_far))))
            sprite = _Sprite(z, x, w, h, ANOMALY_ID, draw, family=family)
            raster = _rasterise(sprite, lay)
            if raster is None:
                continue
            box, mask, _ = raster
            if int(mask.sum()) < MIN_ANOMALY_PIXELS or any(_overlaps(box, b, margin=2) for b in boxes):
                continue
            sprite.record = {"family": ("", "real", "procedural")[family], "source": source, "location": location}
            placed.append(sprite)
            boxes.append(box)
            break
    # Known objects in front of an anomaly and overlapping it are removed, so each anomaly is seen whole.
    kept = []
    for s in sprites:
        box = _int_box(s, lay)
        hides = box is not None and any(s.z < a.z and _overlaps(box, b) for a, b in zip(placed, boxes))
        if not hides:
            kept.append(s)
    sprites[:] = kept
    return placed


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera and lighting: exposure, white balance, saturation, gamma, light falloff, blur and noise."""
    H, W, _ = image.shape
    image = image * rng.uniform(0.65, 1.25) * rng.uniform(0.88, 1.12, 3).astype(np.float32)
    grey = image.mean(axis=2, keepdims=True)
    image = grey + rng.uniform(0.7, 1.25) * (image - grey)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.75, 1.35)
    xs = (np.arange(W, dtype=np.float32) + 0.5) / W - 0.5
    ys = (np.arange(H, dtype=np.float32) + 0.5) / H - 0.5
    light = (
        1.0 + rng.uniform(-0.15, 0.15) * xs[None, :] - rng.uniform(0.0, 0.35) * (xs[None, :] ** 2 + ys[:, None] ** 2)
    )
    image = image * light[..., None]
    if rng.random() < 0.35:
        sigma = rng.uniform(0.4, 1.0)
        image = ndi.gaussian_filter(image, sigma=(sigma, sigma, 0.0), mode="nearest")
    image = image + rng.uniform(0.004, 0.025) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, height: int, width: int, num_anomalies: int) -> Scene:
    """Render one scene.

    Args:
        rng: the only source of randomness.
        height: image height H in pixels.
        width: image width W in pixels.
        num_anomalies: anomalies to place (0 for training scenes); each one is placed if a visible spot is found
            within a fixed number of tries, which at the default size always happens for the first one.

    Returns:
        The :class:`Scene` (uint8 image, target and family maps, anomaly records).
    """
    lay = _sample_layout(rng, height, width)
    image, label, ground = _render_background(rng, lay)
    sprites = _known_objects(rng, lay)
    anomalies = _place_anomalies(rng, lay, num_anomalies, sprites) if num_anomalies else []
    family = np.zeros((height, width), dtype=np.uint8)
    everything = sorted(sprites + anomalies, key=lambda s: -s.z)
    # Soft contact shadows on the ground, before any object is painted over them.
    rows = (np.arange(height) + 0.5)[:, None]
    cols = (np.arange(width) + 0.5)[None, :]
    darkness = np.ones((height, width), dtype=np.float32)
    shadow_strength = rng.uniform(0.3, 0.55)
    for s in everything:
        if not s.cast_shadow:
            continue
        x0, y0, pw, ph = _sprite_box(s, lay)
        cx, cy = x0 + pw / 2, y0 + ph
        rx, ry = 0.6 * pw + 0.5, 0.06 * pw + 0.8
        r0, r1 = max(0, int(cy - ry)), min(height, int(cy + ry) + 1)
        c0, c1 = max(0, int(cx - rx)), min(width, int(cx + rx) + 1)
        if r1 <= r0 or c1 <= c0:
            continue
        d = ((cols[:, c0:c1] - cx) / rx) ** 2 + ((rows[r0:r1] - cy) / ry) ** 2
        darkness[r0:r1, c0:c1] *= 1.0 - shadow_strength * np.clip(1.0 - d, 0.0, 1.0)
    image = np.where(ground[..., None], image * darkness[..., None], image)
    records = []
    for s in everything:
        raster = _rasterise(s, lay)
        if raster is None:
            continue
        (top, left, bottom, right), mask, rgb = raster
        image[top:bottom, left:right][mask] = rgb[mask]
        label[top:bottom, left:right][mask] = s.label
        family[top:bottom, left:right][mask] = s.family
    for s in anomalies:
        top, left, bottom, right = _int_box(s, lay)
        pixels = int((family[top:bottom, left:right] != FAMILY_NONE).sum())
        records.append(AnomalyRecord(depth=round(s.z, 3), bbox=(top, left, bottom, right), pixels=pixels, **s.record))
    return Scene(image=_finish(rng, image), target=label, family=family, anomalies=records)

"""Built-in demo data set: synthetic industrial inspection photos in the MVTec-AD layout.

The tool must run offline, so instead of downloading a benchmark it renders one: two
textures (`fabric`, a denim twill; `wood`, a grained board) and one object (`nut`, a hex
nut on a rubber belt), with lighting, pose and sensor-noise variation and five defect
types each, every defect with a pixel-exact mask. Every image is a pure function of
(seed, category, split, defect type, index), so the same seed gives byte-identical files
(with the same numpy / scipy / Pillow builds) whatever order they are generated in.

    <root>/<category>/train/good/000.png
    <root>/<category>/test/{good,<defect>}/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (L-mode, 0 / 255)
    <root>/demo.json                                         (settings; written last)
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from ad_lightning.data.generated import (
    GeneratedSet,
    default_root,
    ensure_generated,
    generator_main,
    sample_key,
    set_settings,
)

DEMO_VERSION = 1  # bump whenever rendering changes, so cached sets are regenerated
SETTINGS_FILE = "demo.json"
SUBTLE_FRACTION = 1 / 3  # share of defects rendered small or with low contrast
ALPHA_MIN = 0.1  # defect coverage below this is dropped, so the mask is exactly where pixels change
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Rec. 601 luminance weights

# --------------------------------------------------------------------------- primitives


@dataclass(frozen=True)
class _Scene:
    """A rendered normal surface, before global lighting and camera noise."""

    base: np.ndarray  # [H, W, 3] radiance in ~[0, 1]
    support: np.ndarray  # [H, W] where defects may start (1 everywhere on textures, the part on objects)
    backdrop: np.ndarray  # [H, W, 3] what shows where material is missing


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each [H, W] float32."""
    axis = np.arange(size, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="ij")


def _noise(
    rng: np.random.Generator, size: int, scale: float, stretch: float = 1.0, angle: float = 0.0
) -> np.ndarray:
    """Unit-variance Gaussian random field [H, W] with correlation length `scale` px, `stretch`
    times longer along `angle` (radians from the x axis): white noise drawn directly in the
    Fourier domain, only where the Gaussian filter lets it through."""
    k_y = np.fft.fftfreq(size).astype(np.float32)[:, None]
    k_x = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    k_along = k_x * math.cos(angle) + k_y * math.sin(angle)
    k_across = -k_x * math.sin(angle) + k_y * math.cos(angle)
    transfer = np.exp(-2 * (math.pi * scale) ** 2 * ((stretch * k_along) ** 2 + k_across**2))
    passed = transfer > 1e-3
    n = int(passed.sum())
    spectrum = np.zeros(transfer.shape, np.complex64)
    white = rng.standard_normal(n, np.float32) + 1j * rng.standard_normal(n, np.float32)
    spectrum[passed] = transfer[passed] * white
    field = scipy.fft.irfft2(spectrum, s=(size, size))
    return field / (field.std() + 1e-12)


def _smoothstep(edge0: float, edge1: float, t: np.ndarray) -> np.ndarray:
    """Hermite ramp from 0 at `edge0` to 1 at `edge1`."""
    t = np.clip((t - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _pick_point(rng: np.random.Generator, support: np.ndarray, margin: float) -> np.ndarray:
    """A random pixel (y, x) with full support, at least `margin` px from the border."""
    size = support.shape[0]
    inner = np.zeros_like(support, dtype=bool)
    m = int(margin)
    inner[m : size - m, m : size - m] = True
    candidates = np.flatnonzero((support >= 0.99) & inner)
    return np.array(divmod(int(rng.choice(candidates)), size), dtype=np.float32)


def _curve(rng: np.random.Generator, heading: float, length: float, bend: float, jitter: float) -> np.ndarray:
    """Points [N, 2] (y, x) of a random curve from the origin, 0.5 px apart: constant
    curvature `bend` (rad/px) plus a random walk of the heading (`jitter` rad per step)."""
    n = max(int(length / 0.5), 2)
    headings = heading + bend * 0.5 * np.arange(n) + np.cumsum(rng.normal(0.0, jitter, n))
    steps = 0.5 * np.stack([np.sin(headings), np.cos(headings)], axis=1)  # [N, 2]
    return np.cumsum(steps, axis=0) - steps[0]


def _stroke(size: int, points: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage [H, W] of a polyline with per-point `width` [N] px, and each
    pixel's distance to the centre line in half-widths (via a distance transform)."""
    inside = np.all((points >= 0) & (points <= size - 1), axis=1)
    points, width = points[inside], width[inside]
    if len(points) == 0:
        return np.zeros((size, size), np.float32), np.ones((size, size), np.float32)
    iy, ix = np.round(points).astype(int).T
    far = np.ones((size, size), dtype=bool)
    far[iy, ix] = False
    centre_y, centre_x, half = (np.zeros((size, size), np.float32) for _ in range(3))
    centre_y[iy, ix], centre_x[iy, ix], half[iy, ix] = points[:, 0], points[:, 1], width / 2
    _, (ny, nx) = ndimage.distance_transform_edt(far, return_indices=True)
    y, x = _coords(size)
    dist = np.hypot(y - centre_y[ny, nx], x - centre_x[ny, nx])
    half = half[ny, nx]
    return np.clip(half + 0.5 - dist, 0.0, 1.0), np.clip(dist / half, 0.0, 1.0)


def _blob(
    rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, softness: float, ragged: float = 0.0
) -> np.ndarray:
    """Coverage [H, W] of an irregular blob: a circle whose radius is modulated by a few random
    angular harmonics (and, if `ragged` > 0, by fine noise in px), with an edge `softness` px wide."""
    y, x = _coords(size)
    dy, dx = y - centre[0], x - centre[1]
    phi = np.arctan2(dy, dx)[..., None]  # [H, W, 1]
    harmonics = np.arange(2, 6, dtype=np.float32)
    amplitude = (rng.normal(0.0, 0.18, harmonics.size) / harmonics).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, harmonics.size).astype(np.float32)
    edge = radius * (1 + (amplitude * np.cos(harmonics * phi + phase)).sum(-1))  # [H, W, 4] -> [H, W]
    if ragged > 0:
        edge = edge + ragged * _noise(rng, size, 1.5)
    return np.clip((edge - np.hypot(dy, dx)) / softness + 0.5, 0.0, 1.0)


def _taper(n: int) -> np.ndarray:
    """Width profile [N] along a stroke: full in the middle, thinning towards both ends."""
    return np.sin(np.linspace(0.15, math.pi - 0.15, n)) ** 0.5


def _mix(base: np.ndarray, appearance: np.ndarray, strength: float) -> np.ndarray:
    """Appearance pulled towards `base`; `strength` 1 keeps it, 0 makes the defect invisible."""
    return base + strength * (appearance - base)


def _strength(rng: np.random.Generator, subtle: bool) -> float:
    """Contrast of a defect: full, or reduced to about half for a subtle one."""
    return rng.uniform(0.45, 0.6) if subtle else 1.0


# --------------------------------------------------------------------------- normal surfaces


def _rgb(*values: float) -> np.ndarray:
    """A colour [3] as float32 (so it does not promote float32 images to float64)."""
    return np.array(values, dtype=np.float32)


def _jitter(
    rng: np.random.Generator, colour: Sequence[float], brightness: float, tint: float = 0.0
) -> np.ndarray:
    """`colour` [3] with a random brightness (relative, +- `brightness`) and per-channel tint (std `tint`)."""
    return _rgb(*colour) * rng.uniform(1 - brightness, 1 + brightness) * _rgb(*(1 + rng.normal(0, tint, 3)))


def _yarn(fraction: np.ndarray) -> np.ndarray:
    """Height profile across a round yarn, 0 at its edges and 1 on its crest (`fraction` in [0, 1))."""
    return (1 - (2 * fraction - 1) ** 2) ** 0.35


def _fabric_scene(rng: np.random.Generator, size: int) -> _Scene:
    """Denim: a 3/1 twill of slubby indigo warp over ecru weft yarns, with pitch, angle,
    phase, cloth waviness and dye shade jittered per image."""
    s = size / 256
    y, x = _coords(size)
    pitch = rng.uniform(5.5, 6.5) * s
    theta = rng.normal(0.0, math.radians(2.5))
    cos, sin = math.cos(theta), math.sin(theta)
    wave_u, wave_v = (1.5 * s * _noise(rng, size, 30 * s) for _ in range(2))
    u = (x * cos + y * sin + wave_u) / pitch + rng.uniform()  # across the warp yarns: index + fraction
    v = (-x * sin + y * cos + wave_v) / pitch + rng.uniform()  # across the weft yarns
    cell = (np.floor(u) - np.floor(v)) % 4  # [H, W] 2, 1, 0: a warp float over three picks; 3: weft on top
    frac_u, frac_v = u % 1, v % 1
    along_float = (2 - np.minimum(cell, 2) + frac_v) / 3
    warp_up = cell < 3
    height = np.where(
        warp_up,
        _yarn(frac_u) * (0.75 + 0.25 * np.sin(math.pi * along_float)),
        _yarn(frac_v) * (0.5 + 0.3 * np.sin(math.pi * frac_u)),  # the weft dips between warp floats
    )
    slub_warp = _noise(rng, size, 0.8 * s, stretch=12, angle=theta + math.pi / 2)
    slub_weft = _noise(rng, size, 0.8 * s, stretch=12, angle=theta)
    indigo = _jitter(rng, (0.19, 0.26, 0.43), 0.12, tint=0.03)
    ecru = _jitter(rng, (0.58, 0.57, 0.53), 0.07)
    colour = np.where(
        warp_up[..., None],
        indigo * (1 + 0.2 * slub_warp[..., None]),
        ecru * (1 + 0.1 * slub_weft[..., None]),
    )
    fade = 1 + 0.05 * _noise(rng, size, 40 * s) + 0.04 * _noise(rng, size, 0.7 * s)  # wash-out and fuzz
    base = colour * ((0.3 + 0.7 * height) * fade)[..., None]
    backing = _rgb(0.05, 0.055, 0.07) * (1 + 0.3 * _noise(rng, size, 2 * s))[..., None]
    return _Scene(base, np.ones((size, size), np.float32), backing)


def _wood_scene(rng: np.random.Generator, size: int) -> _Scene:
    """Flat-sawn board: growth rings around a far-away pith, bent by smooth noise, with fine
    pore streaks along the grain; ring spacing, pith, angle and tint jittered per image."""
    s = size / 256
    y, x = _coords(size)
    theta = rng.normal(0.0, math.radians(3))
    along = x * math.cos(theta) + y * math.sin(theta)
    across = -x * math.sin(theta) + y * math.cos(theta)
    pith_across = float(rng.choice([-1, 1])) * rng.uniform(0.8, 2.0) * size + size / 2
    flatten = rng.uniform(0.15, 0.35)  # rings are long arcs along the grain
    radius = np.hypot(across - pith_across, flatten * (along - rng.uniform(0, size)))
    rings = radius / (rng.uniform(13, 20) * s) + rng.uniform()
    rings = rings + 0.6 * _noise(rng, size, 25 * s, stretch=4, angle=theta)
    rings = rings + 0.08 * _noise(rng, size, 4 * s, stretch=6, angle=theta)
    phase = rings % 1
    latewood = _smoothstep(0.45, 0.85, phase) * (1 - _smoothstep(0.9, 1.0, phase))
    contrast = 0.7 + 0.3 * _noise(rng, size, 20 * s, stretch=3, angle=theta)  # uneven from ring to ring
    latewood = latewood * contrast
    pores = np.clip(_noise(rng, size, 0.7 * s, stretch=14, angle=theta), 0, None)
    tone = np.clip(0.65 * latewood + 0.12 * pores + 0.06 * _noise(rng, size, 50 * s), 0, 1)
    early = _jitter(rng, (0.79, 0.59, 0.39), 0.07, tint=0.03)
    late = _jitter(rng, (0.50, 0.30, 0.16), 0.09)
    base = early + (late - early) * tone[..., None]
    hollow = _rgb(0.12, 0.07, 0.04) * (1 + 0.3 * _noise(rng, size, 2 * s))[..., None]
    return _Scene(base, np.ones((size, size), np.float32), hollow)


def _hexagon_depth(dx: np.ndarray, dy: np.ndarray, apothem: float, sides: np.ndarray) -> np.ndarray:
    """Signed distance [H, W] inside a regular hexagon (positive inside) with side normals at `sides` [6]."""
    reach = dx[..., None] * np.cos(sides) + dy[..., None] * np.sin(sides)  # [H, W, 6]
    return apothem - reach.max(-1)  # [H, W, 6] -> [H, W]


def _nut_scene(rng: np.random.Generator, size: int) -> _Scene:
    """A steel hex nut seen from above on a grey rubber belt: random rotation and shift,
    chamfered corners, lathe marks, a threaded bore and a soft drop shadow."""
    s = size / 256
    y, x = _coords(size)
    centre = (size / 2 + rng.normal(0.0, 6 * s, 2)).astype(np.float32)
    dy, dx = y - centre[0], x - centre[1]
    r, phi = np.hypot(dy, dx), np.arctan2(dy, dx)
    circumradius = size * rng.uniform(0.30, 0.32)
    apothem = circumradius * math.cos(math.pi / 6)
    sides = (rng.uniform(0, math.pi / 3) + np.arange(6) * math.pi / 3).astype(np.float32)
    bore = apothem * rng.uniform(0.48, 0.52)
    part = np.clip(_hexagon_depth(dx, dy, apothem, sides) + 0.5, 0, 1) * np.clip(r - bore + 0.5, 0, 1)

    light = rng.normal(-0.75 * math.pi, 0.25)  # direction the light comes from (upper left)
    cast_y, cast_x = -6 * s * math.sin(light), -6 * s * math.cos(light)  # shadow offset
    shadow = _smoothstep(-8 * s, 8 * s, _hexagon_depth(dx - cast_x, dy - cast_y, apothem, sides))
    grain = 1 + 0.04 * _noise(rng, size, 12 * s) + 0.05 * _noise(rng, size, 0.8 * s)
    belt = _jitter(rng, (0.36, 0.37, 0.36), 0.1) * grain[..., None]
    backdrop = belt * (1 - 0.5 * shadow)[..., None]

    chamfer = _smoothstep(0.0, 1.5 * s, r - 0.94 * apothem)  # corners beyond the turned face slope away
    countersink = 1 - _smoothstep(0.0, 1.5 * s, r - 1.22 * bore)
    facing = np.cos(phi - light)  # [H, W] how much a sloped surface faces the light
    face = 0.62 - 0.04 * (dx * math.cos(light) + dy * math.sin(light)) / circumradius
    lathe = 0.025 * np.sin(2 * math.pi * r / (1.6 * s) + 2 * _noise(rng, size, 6 * s))
    shade = face + lathe + 0.02 * _noise(rng, size, 0.8 * s)
    shade = shade + chamfer * 0.25 * facing - countersink * (0.18 + 0.2 * facing)
    shade = shade + countersink * 0.04 * np.sin(2 * math.pi * r / (2.5 * s))  # thread crests
    steel = _jitter(rng, (0.74, 0.76, 0.80), 0.0, tint=0.01)
    base = backdrop * (1 - part)[..., None] + (steel * shade[..., None]) * part[..., None]
    return _Scene(base, part, backdrop)


# --------------------------------------------------------------------------- defects
# Each returns (alpha [H, W], appearance [H, W, 3]): the image becomes base + alpha * (appearance - base).


def _scratch(
    rng: np.random.Generator,
    scene: _Scene,
    subtle: bool,
    gain: tuple[float, float],
    width: tuple[float, float],
    length: tuple[float, float],
    bend: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Scratch: a thin, gently curved, tapered line that brightens or darkens the surface by
    a factor in `gain` (faint when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    line_length = rng.uniform(*length) * s
    points = _curve(rng, rng.uniform(0, 2 * math.pi), line_length, rng.normal(0, bend / line_length), 0.01)
    points = points - points[len(points) // 2] + _pick_point(rng, scene.support, 0.1 * size)
    coverage, _ = _stroke(size, points, max(0.8, rng.uniform(*width) * s) * _taper(len(points)))
    factor = rng.uniform(*gain)
    appearance = _mix(scene.base, scene.base * factor, _strength(rng, subtle))
    return coverage * scene.support, appearance


def _crack(rng: np.random.Generator, scene: _Scene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Crack: a jagged dark line with one to three thinner branches (shorter when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    length = rng.uniform(50, 110) * s * (0.5 if subtle else 1.0)
    width = max(0.9, rng.uniform(1.3, 2.6) * s)
    heading = rng.uniform(0, 2 * math.pi)
    trunk = _curve(rng, heading, length, 0.0, 0.12)
    trunk = trunk - trunk[len(trunk) // 2] + _pick_point(rng, scene.support, 0.1 * size)
    strokes = [(trunk, width * _taper(len(trunk)))]
    for _ in range(rng.integers(1, 4)):
        fork = trunk[rng.integers(len(trunk) // 5, 4 * len(trunk) // 5)]
        turn = float(rng.choice([-1, 1])) * rng.uniform(math.radians(25), math.radians(65))
        branch = fork + _curve(rng, heading + turn, length * rng.uniform(0.2, 0.45), 0.0, 0.12)
        strokes.append((branch, 0.7 * width * np.linspace(1.0, 0.4, len(branch))))
    coverage = np.max([_stroke(size, points, w)[0] for points, w in strokes], axis=0)
    darkness = rng.uniform(0.2, 0.45)
    appearance = scene.base * darkness
    return coverage * scene.support, appearance


def _stain(
    rng: np.random.Generator, scene: _Scene, subtle: bool, tint: Sequence[float] = (0.62, 0.52, 0.42)
) -> tuple[np.ndarray, np.ndarray]:
    """Stain: a soft-edged irregular spot that darkens and tints by `tint`, a little darker at
    its rim (faint when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    radius = rng.uniform(8, 24) * s
    centre = _pick_point(rng, scene.support, 0.08 * size)
    coverage = _blob(rng, size, centre, radius, rng.uniform(2, 5) * s)
    tint = _jitter(rng, tint, 0.0, tint=0.08)
    rim = 1 + 0.4 * (coverage * (1 - coverage)) * 4  # [H, W] strongest at the half-coverage edge
    stained = scene.base * tint ** rim[..., None]
    return coverage * scene.support, _mix(scene.base, stained, _strength(rng, subtle))


def _discolour(
    rng: np.random.Generator, scene: _Scene, subtle: bool, hue: Sequence[float], brightness: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Colour shift: a large, soft, mottled patch where the surface takes the colour `hue` (RGB)
    while keeping its own light and dark texture, times `brightness` (faint when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    radius = rng.uniform(14, 34) * s
    coverage = _blob(rng, size, _pick_point(rng, scene.support, 0.1 * size), radius, rng.uniform(4, 9) * s)
    coverage = coverage * _smoothstep(-1.5, 0.5, _noise(rng, size, 4 * s))  # patchy, not a clean disc
    chroma = _rgb(*hue) / (LUMA @ _rgb(*hue))  # unit-luminance colour
    mottle = 1 + 0.15 * _noise(rng, size, 3 * s)
    luminance = scene.base @ LUMA  # [H, W, 3] -> [H, W]
    recoloured = (brightness * luminance * mottle)[..., None] * chroma
    strength = rng.uniform(0.7, 0.9) * _strength(rng, subtle)
    return coverage * scene.support, _mix(scene.base, recoloured, strength)


def _hole(rng: np.random.Generator, scene: _Scene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Missing patch of surface: a ragged, sharp-edged hole showing the backdrop through it
    (small when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    radius = rng.uniform(4, 7) * s if subtle else rng.uniform(7, 18) * s
    centre = _pick_point(rng, scene.support, 0.08 * size)
    coverage = _blob(rng, size, centre, radius, 1.0, ragged=min(radius / 3, 1.5 * s))
    return coverage * scene.support, scene.backdrop


def _cut(rng: np.random.Generator, scene: _Scene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cut: a straight slit through the cloth, a dark gap showing the backdrop between frayed
    pale yarn ends (short when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    length = rng.uniform(15, 35) * s if subtle else rng.uniform(35, 90) * s
    points = _curve(rng, rng.uniform(0, 2 * math.pi), length, 0.0, 0.01)
    points = points - points[len(points) // 2] + _pick_point(rng, scene.support, 0.1 * size)
    coverage, across = _stroke(size, points, max(2.0, rng.uniform(2.5, 4.5) * s) * _taper(len(points)))
    frayed = _rgb(0.72, 0.72, 0.70) * (1 + 0.25 * _noise(rng, size, 0.8 * s))[..., None]
    return coverage, np.where((across < 0.45)[..., None], scene.backdrop, frayed)


def _thread(rng: np.random.Generator, scene: _Scene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Foreign thread: a loosely curving round yarn lying on the fabric, in a foreign colour
    (close to the fabric's own colours when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    length = rng.uniform(50, 160) * s
    points = _curve(rng, rng.uniform(0, 2 * math.pi), length, rng.normal(0, 2.5 / length), 0.03)
    points = points - points[len(points) // 2] + _pick_point(rng, scene.support, 0.1 * size)
    coverage, across = _stroke(size, points, np.full(len(points), max(1.2, rng.uniform(1.8, 3.2) * s)))
    if subtle:
        colour = scene.base.reshape(-1, 3).mean(0) * rng.uniform(1.4, 1.8)  # [H*W, 3] -> [3]
    else:
        colour = _rgb(*rng.choice([[0.8, 0.15, 0.1], [0.9, 0.8, 0.2], [0.92, 0.92, 0.9], [0.08, 0.08, 0.08]]))
    roundness = np.sqrt(1 - across**2)  # [H, W] a cylinder, brightest along its axis
    twist = 1 + 0.1 * _noise(rng, size, 1.0 * s)
    appearance = colour * (0.55 + 0.45 * roundness * twist)[..., None]
    return coverage, appearance


def _missing(rng: np.random.Generator, scene: _Scene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Chipped part: a bite out of the part's outer edge, revealing the belt (small when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    edge = np.argwhere((scene.support > 0.3) & (scene.support < 0.7))  # [M, 2] boundary pixels
    edge = edge[np.linalg.norm(edge - size / 2, axis=1) > 0.25 * size]  # the outer edge, not the bore
    centre = edge[rng.integers(len(edge))].astype(np.float32)
    radius = rng.uniform(5, 9) * s if subtle else rng.uniform(10, 22) * s
    coverage = _blob(rng, size, centre, radius, 1.0, ragged=1.0 * s)
    return coverage * scene.support, scene.backdrop


def _extra(rng: np.random.Generator, scene: _Scene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Extra material: a shaded metal bead (weld spatter, burr) stuck on the part (small when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    centre = _pick_point(rng, scene.support, 0.08 * size)
    radius = rng.uniform(3, 6) * s if subtle else rng.uniform(6, 14) * s
    coverage = _blob(rng, size, centre, radius, 1.2)
    y, x = _coords(size)
    dome = np.clip(1 - ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / radius**2, 0, 1) ** 0.5
    highlight = np.clip(((centre[0] - y) + (centre[1] - x)) / (1.4 * radius), -1, 1)  # lit from the upper left
    metal = _jitter(rng, (0.56, 0.54, 0.52), 0.2)
    appearance = metal * (0.35 + 0.45 * dome + 0.3 * highlight * dome)[..., None]
    return coverage, appearance


@dataclass(frozen=True)
class _Category:
    scene: Callable[[np.random.Generator, int], _Scene]
    defects: dict[str, Callable[[np.random.Generator, _Scene, bool], tuple[np.ndarray, np.ndarray]]]


_CATEGORIES = {
    "fabric": _Category(
        _fabric_scene,
        {
            "color": partial(_discolour, hue=(0.55, 0.35, 0.4)),  # dye fault
            "cut": _cut,
            "hole": _hole,
            "stain": partial(_stain, tint=(0.5, 0.4, 0.28)),  # oil
            "thread": _thread,
        },
    ),
    "wood": _Category(
        _wood_scene,
        {
            "color": partial(_discolour, hue=(0.6, 0.53, 0.47), brightness=0.9),  # weathered, greyish
            "crack": _crack,
            "hole": _hole,
            "scratch": partial(_scratch, gain=(1.25, 1.5), width=(1.0, 2.2), length=(50, 150), bend=1.0),
            "stain": _stain,
        },
    ),
    "nut": _Category(
        _nut_scene,
        {
            "color": partial(_discolour, hue=(0.55, 0.28, 0.12), brightness=0.8),  # rust
            "crack": _crack,
            "extra": _extra,
            "missing": _missing,
            "scratch": partial(_scratch, gain=(0.35, 0.55), width=(1.2, 2.4), length=(40, 110), bend=1.0),
        },
    ),
}

DEMO_CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)
DEMO_DEFECTS: dict[str, tuple[str, ...]] = {name: tuple(c.defects) for name, c in _CATEGORIES.items()}

# --------------------------------------------------------------------------- camera


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Global lighting gain [H, W, 3]: exposure, a soft gradient, vignetting and white balance."""
    y, x = _coords(size)
    y, x = 2 * y / size - 1, 2 * x / size - 1
    direction = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0.0, 0.12) * (x * math.cos(direction) + y * math.sin(direction))
    vignette = rng.uniform(0.03, 0.12) * (x**2 + y**2)
    gain = rng.normal(1.0, 0.06) * (1 + gradient - vignette)
    return gain[..., None] * _jitter(rng, (1.0, 1.0, 1.0), 0.0, tint=0.012)


def _expose(rng: np.random.Generator, radiance: np.ndarray) -> np.ndarray:
    """Sensor: read noise plus signal-dependent shot noise, then 8-bit quantisation."""
    read = rng.uniform(1.0, 2.5) / 255
    sigma = np.sqrt(read**2 + 0.00004 * np.clip(radiance, 0, None))
    noisy = radiance + sigma * rng.standard_normal(radiance.shape, np.float32)
    return np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- rendering


def _check_name(category: str, kind: str) -> None:
    """Fail early, listing the valid names, on an unknown category or defect type."""
    if category not in _CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}; choose from {DEMO_CATEGORIES}")
    if kind != "good" and kind not in _CATEGORIES[category].defects:
        choices = DEMO_DEFECTS[category]
        raise ValueError(f"unknown defect {kind!r} for demo category {category!r}; choose from {choices}")


def render_sample(
    category: str,
    kind: str = "good",
    index: int = 0,
    seed: int = 0,
    split: str = "test",
    image_size: int = 256,
    with_defect: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One demo image [H, W, 3] uint8 and its defect mask [H, W] bool (None for "good").

    Keyed by (seed, category, split, kind, index) alone, so order of generation does not matter.
    `with_defect=False` renders the very same scene, lighting and noise without the defect,
    so `image != clean` only inside the mask."""
    _check_name(category, kind)
    key = sample_key(seed, category, split, kind, index)
    spec = _CATEGORIES[category]
    scene = spec.scene(np.random.default_rng([*key, 0]), image_size)
    base, mask = scene.base, None
    if kind != "good":
        rng = np.random.default_rng([*key, 1])
        subtle = bool(rng.random() < SUBTLE_FRACTION)
        alpha, appearance = spec.defects[kind](rng, scene, subtle)
        alpha = np.clip((alpha - ALPHA_MIN) / (1 - ALPHA_MIN), 0, 1)
        mask = alpha > 0
        if with_defect:
            base = base + alpha[..., None] * (appearance - base)
    light = _illumination(np.random.default_rng([*key, 2]), image_size)
    return _expose(np.random.default_rng([*key, 3]), base * light), mask


def _plan(
    categories: Sequence[str], n_train: int, n_test_good: int, n_per_defect: int
) -> Iterator[tuple[str, str, str, int]]:
    """Every (category, split, kind, index) of a set."""
    for category in categories:
        yield from ((category, "train", "good", i) for i in range(n_train))
        yield from ((category, "test", "good", i) for i in range(n_test_good))
        for defect in DEMO_DEFECTS[category]:
            yield from ((category, "test", defect, i) for i in range(n_per_defect))


def default_demo_root() -> Path:
    """Where the demo set lives: `$AD_LIGHTNING_DATA/demo`, else `~/.cache/ad_lightning/demo`."""
    return default_root("demo")


def generate_demo(
    root: Path,
    seed: int = 0,
    categories: Sequence[str] = DEMO_CATEGORIES,
    n_train: int = 160,
    n_test_good: int = 40,
    n_per_defect: int = 10,
    image_size: int = 256,
) -> Path:
    """Render a demo set into the new or empty directory `root`. The settings file is written
    last, so a set without it is incomplete. Prefer `ensure_demo`, which is atomic and cached."""
    root = Path(root)
    settings = _settings(seed, categories=categories, n_train=n_train, n_test_good=n_test_good,
                         n_per_defect=n_per_defect, image_size=image_size)  # fmt: skip
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; pass a new directory, or use ensure_demo to replace a set")
    plan = list(_plan(settings["categories"], n_train, n_test_good, n_per_defect))
    for category, split, kind, index in tqdm(plan, desc=f"generating demo set in {root}", leave=False):
        image, mask = render_sample(category, kind, index, seed, split, image_size)
        image_dir = root / category / split / kind
        image_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_dir / f"{index:03d}.png", compress_level=1)
        if mask is not None:
            mask_dir = root / category / "ground_truth" / kind
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{index:03d}_mask.png")
    (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return root


_GENERATE_SIGNATURE = inspect.signature(generate_demo)  # at import: the record does not change if it is patched


def _settings(seed: int, **kwargs) -> dict:
    """The JSON record of a set: `generate_demo`'s arguments with defaults filled in, validated."""
    return set_settings(_GENERATE_SIGNATURE, seed, DEMO_VERSION, lambda name: _check_name(name, "good"), "demo", **kwargs)


def ensure_demo(root: Path | None = None, seed: int = 0, **kwargs) -> Path:
    """The demo set at `root` (default: `default_demo_root()`), generated only once, atomically
    (`ensure_generated`). `kwargs` are `generate_demo`'s (categories, counts, image_size)."""
    root = Path(root).expanduser() if root is not None else default_demo_root()
    generate = lambda directory: generate_demo(directory, seed, **kwargs)  # noqa: E731
    return ensure_generated(root, _settings(seed, **kwargs), SETTINGS_FILE, generate, "demo")


class Demo(GeneratedSet):
    """The built-in generated demo set (MVTec layout), written once into a cache directory.

    `root=None` uses `$AD_LIGHTNING_DATA/demo` or `~/.cache/ad_lightning/demo`; nothing is downloaded.
    """

    CATEGORIES = DEMO_CATEGORIES
    DATA_HINT = "the demo set is generated by ad_lightning.data.demo; delete the directory to regenerate it"

    def __init__(
        self, root: str | Path | None = None, category: str | list[str] = "all", demo_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(root if root is not None else default_demo_root(), category, **kwargs)
        self.demo_seed = demo_seed

    def ensure(self) -> Path:
        return ensure_demo(self.root, seed=self.demo_seed)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ad_lightning.data.demo --root DIR --seed 0`: generate the demo set by hand."""
    generator_main(argv, "demo", ensure_demo, DEMO_CATEGORIES, {"n_train": 160, "n_test_good": 40, "n_per_defect": 10})


if __name__ == "__main__":
    main()

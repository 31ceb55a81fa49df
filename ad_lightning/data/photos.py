"""Photos development set: real photographs with painted defects, in the MVTec-AD layout.

The demo set's procedural textures are easy for a nearest-neighbour search, so this second set
is cut from real photographs: scikit-image's bundled sample images (offline, no download).
Four textures and one aligned object, five defect types each, every defect with a pixel-exact
mask; every image is a pure function of (seed, category, split, defect type, index).

- `moon`: the lunar surface (grey): craters and maria at many scales, lit from one side.
- `hubble`: the Hubble deep field (RGB): sparse coloured galaxies on black, the only colour texture.
- `print`: a scanned page of printed text (grey): regular lines of glyphs on paper, so a missing
  word or a smear breaks a strong structure. (`text` is left out: its handwriting on skewed paper
  would make "normal" two unrelated kinds of document.)
- `coins`: ancient coins on a dark cloth (grey): a quasi-regular field of discrete objects;
  defects are placed on the coins.
- `astronaut`: the whole portrait, an aligned object: a few % shift, a few degrees of rotation.

`camera` is not used: its crops are sky, coat, tripod or lawn, several unrelated scenes rather
than one stationary texture. `brick`, `grass` and `gravel` are not used: they are reserved for a
held-out set.

A normal image is a view of the photo (a random square for textures, the whole photo for the
object) rotated by a few degrees, resampled to the image size, with brightness / contrast /
gamma / white-balance jitter and sensor noise. A defect is painted onto the view before the
jitter and the noise, which act pixel by pixel with the same random draws, so an image and its
defect-free twin differ only inside the mask.

    <root>/<category>/train/good/000.png
    <root>/<category>/test/{good,<defect>}/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (L-mode, 0 / 255)
    <root>/photos.json                                       (settings; written last)
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk
from skimage.transform import rescale
from tqdm.auto import tqdm

from ad_lightning.data.demo import (
    ALPHA_MIN,
    LUMA,
    SUBTLE_FRACTION,
    _blob,
    _coords,
    _crack,
    _curve,
    _discolour,
    _expose,
    _hole,
    _mix,
    _noise,
    _pick_point,
    _rgb,
    _Scene,
    _scratch,
    _stain,
    _strength,
    _stroke,
)
from ad_lightning.data.images import BadInputError
from ad_lightning.data.generated import (
    GeneratedSet,
    default_root,
    ensure_generated,
    generator_main,
    sample_key,
    set_settings,
)

PHOTOS_VERSION = 1  # bump whenever rendering changes, so cached sets are regenerated
SETTINGS_FILE = "photos.json"
CHANGE_MIN = 0.03  # a painted pixel counts as defective when it moves by more than this (of full scale)
MIN_AREA = 3e-4  # smallest accepted mask, as a fraction of the image; smaller draws are repainted
MIN_VISIBLE = 0.25  # share of the painted region that must change noticeably; less is repainted
ATTEMPTS = 20  # defect draws tried before giving up (each a fresh, seeded draw)

Painter = Callable[[np.random.Generator, "_PhotoScene", bool], tuple[np.ndarray, np.ndarray]]

# --------------------------------------------------------------------------- views of a photo


@dataclass(frozen=True)
class _View:
    """How a category looks at its photo."""

    photo: str  # name of the skimage.data function
    side: float  # side of the viewed square, as a fraction of the photo's shorter side
    shift: float | None  # object: largest centre offset (fraction of the shorter side); None: anywhere
    rotation: float = 3.0  # largest rotation, degrees
    on_bright: bool = False  # defects start on the bright things on a dark ground (else anywhere)


@dataclass(frozen=True)
class _PhotoScene(_Scene):
    """A view of a photo (`base`, `support` and `backdrop` as in the demo set), plus a way to
    take another view of the same photo for cut-paste defects."""

    elsewhere: Callable[[np.random.Generator, np.ndarray], np.ndarray]  # (rng, target (y, x)) -> [H, W, 3]


@cache
def _photo(name: str, image_size: int, side: float) -> tuple[Image.Image, ...]:
    """The photo as one mode-"F" image per channel (one for grey photos, three for colour), values
    in [0, 1], low-pass filtered and shrunk so that a view of `side` (fraction of its shorter
    side) spans about `image_size` px: no aliasing when resampled."""
    image = getattr(skimage.data, name)().astype(np.float32) / 255
    if image.ndim == 2:
        image = image[..., None]  # [H, W] -> [H, W, 1]
    factor = image_size / (side * min(image.shape[:2]))
    if factor < 1:
        image = rescale(image, factor, anti_aliasing=True, channel_axis=-1)
    return tuple(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)) for c in range(image.shape[-1]))


def _warp(
    photo: tuple[Image.Image, ...], point: np.ndarray, angle: float, scale: float, size: int, anchor: np.ndarray
) -> np.ndarray:
    """View [size, size, 3] in which output pixel `anchor` (y, x) shows photo point `point` (y, x),
    turned by `angle` degrees and magnified by 1 / `scale` (photo px per output px), resampled
    bicubically; grey photos are resampled once, then repeated."""
    cos, sin = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    (ay, ax), (py, px) = anchor, point
    affine = (cos, -sin, px - cos * ax + sin * ay, sin, cos, py - sin * ax - cos * ay)  # output (x, y) -> photo
    channels = [
        np.asarray(c.transform((size, size), Image.Transform.AFFINE, affine, Image.Resampling.BICUBIC)) for c in photo
    ]
    view = np.stack(channels, axis=-1)  # C x [H, W] -> [H, W, C]
    return np.clip(np.broadcast_to(view, (size, size, 3)), 0.0, 1.0)  # [H, W, C] -> [H, W, 3]


def _pose(rng: np.random.Generator, view: _View, shape: np.ndarray, side: float) -> tuple[np.ndarray, float]:
    """A random centre (y, x) and angle for a view of `side` px that stays inside a photo of `shape` (h, w)."""
    angle = rng.uniform(-view.rotation, view.rotation)
    reach = side / 2 * (math.cos(math.radians(view.rotation)) + math.sin(math.radians(view.rotation)))
    low, high = np.full(2, reach), shape - reach
    if view.shift is None:
        return rng.uniform(low, high), angle
    offset = rng.uniform(-view.shift, view.shift, 2) * shape.min()
    return np.clip(shape / 2 + offset, low, high), angle


def _bright(base: np.ndarray) -> np.ndarray:
    """The bright things on a dark ground [H, W]: the Otsu threshold of the smoothed luminance,
    holes filled (at least the brightest 2 % of pixels)."""
    luminance = ndimage.gaussian_filter(base @ LUMA, base.shape[0] / 256)  # [H, W, 3] -> [H, W]
    threshold = min(threshold_otsu(luminance), np.percentile(luminance, 98))
    return ndimage.binary_fill_holes(luminance >= threshold).astype(np.float32)


@cache
def _table(size: int) -> np.ndarray:
    """What shows through a hole [H, W, 3]: a dark, faintly ribbed table top (read-only)."""
    y, x = _coords(size)
    table = (0.04 + 0.01 * np.sin(0.7 * x + 0.3 * y))[..., None] * _rgb(1.0, 0.97, 0.94)
    table.flags.writeable = False
    return table


def _scene(rng: np.random.Generator, view: _View, size: int) -> _PhotoScene:
    """A random normal view of the category's photo."""
    photo = _photo(view.photo, size, view.side)
    shape = np.array(photo[0].size[::-1], dtype=float)  # (h, w)
    side = view.side * shape.min()
    centre, angle = _pose(rng, view, shape, side)
    middle = np.full(2, size / 2)
    base = _warp(photo, centre, angle, side / size, size, middle)

    def elsewhere(other: np.random.Generator, target: np.ndarray) -> np.ndarray:
        """Another view whose pixel `target` shows a random point of the photo (far enough from its
        border for a patch of up to 40 px around it), turned by a clearly different angle."""
        margin = 40 * side / 256
        point = other.uniform(margin, shape - margin)
        return _warp(photo, point, angle + other.uniform(30, 330), side / size, size, target)

    support = _bright(base) if view.on_bright else np.ones((size, size), np.float32)
    return _PhotoScene(base, support, _table(size), elsewhere)


def _camera(rng: np.random.Generator, radiance: np.ndarray, pivot: float, key: list[int]) -> np.ndarray:
    """8-bit image [H, W, 3] of `radiance`, pixel by pixel: contrast about `pivot`, brightness and
    white balance, then sensor noise and quantisation (streams from `key`), then a gamma tone curve
    (a lookup table on the 8-bit values, as a camera applies it after the sensor)."""
    contrast = rng.uniform(0.9, 1.1)
    gain = rng.normal(1.0, 0.05) * (1 + rng.normal(0.0, 0.01, 3)).astype(np.float32)
    gamma = math.exp(rng.normal(0.0, 0.08))
    exposed = _expose(np.random.default_rng([*key, 3]), (pivot + contrast * (radiance - pivot)) * gain)
    tone = np.round(255 * (np.arange(256) / 255) ** gamma).astype(np.uint8)
    return tone[exposed]


# --------------------------------------------------------------------------- defects
# Painters return (alpha [H, W], appearance [H, W, 3]); demo painters are used where they fit.


def _pick_weighted(rng: np.random.Generator, weight: np.ndarray, margin: float) -> np.ndarray:
    """A random pixel (y, x), drawn with probability proportional to `weight` [H, W], at least
    `margin` px from the border."""
    size = weight.shape[0]
    m = int(margin)
    inner = np.zeros_like(weight)
    inner[m : size - m, m : size - m] = weight[m : size - m, m : size - m] + 1e-6
    index = rng.choice(inner.size, p=(inner / inner.sum()).ravel())
    return np.array(divmod(int(index), size), dtype=np.float32)


def _ellipse(size: int, centre: np.ndarray, radii: tuple[float, float], angle: float, softness: float) -> np.ndarray:
    """Coverage [H, W] of an ellipse with semi-axes `radii` (across, along), its long axis at
    `angle` radians from the x axis, and an edge `softness` px wide."""
    y, x = _coords(size)
    dy, dx = y - centre[0], x - centre[1]
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    radius = np.hypot(along / radii[1], across / radii[0])  # 1 on the rim
    return np.clip((1 - radius) * min(radii) / softness + 0.5, 0.0, 1.0)


def _cut_paste(rng: np.random.Generator, scene: _PhotoScene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cut-paste: a patch of the same photo from elsewhere, turned by a random angle, pasted with a
    1 px soft edge (small when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    radius = rng.uniform(7, 12) * s if subtle else rng.uniform(13, 28) * s
    target = _pick_point(rng, scene.support, 0.1 * size)
    return _blob(rng, size, target, radius, 1.0), scene.elsewhere(rng, target)


def _smudge(rng: np.random.Generator, scene: _PhotoScene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Smudge: a soft patch where the photo is blurred (smeared ink, a greasy spot), placed where
    there is detail to smear (smaller and milder when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    detail = ndimage.gaussian_gradient_magnitude(scene.base @ LUMA, s)  # [H, W, 3] -> [H, W]
    centre = _pick_weighted(rng, ndimage.gaussian_filter(detail, 4 * s) * scene.support, 0.1 * size)
    radius = rng.uniform(7, 12) * s if subtle else rng.uniform(12, 26) * s
    coverage = _blob(rng, size, centre, radius, rng.uniform(2, 4) * s)
    sigma = (rng.uniform(1.2, 2.0) if subtle else rng.uniform(2.5, 5.0)) * s
    return coverage, ndimage.gaussian_filter(scene.base, (sigma, sigma, 0))


def _missing(
    rng: np.random.Generator,
    scene: _PhotoScene,
    subtle: bool,
    remove: Callable[..., np.ndarray],
    width: float,
    aspect: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Missing content: an elliptical region (`aspect` times longer than high) where the content
    narrower than `width` px is gone, leaving the local background that `remove` leaves (a grey
    closing for dark print, an opening for bright sources); placed on content (smaller when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    k = max(3, round(width * s))
    background = ndimage.gaussian_filter(remove(scene.base, size=(k, k, 1)), (s, s, 0))
    content = np.abs(scene.base - background).max(-1)  # [H, W, 3] -> [H, W]
    centre = _pick_weighted(rng, ndimage.gaussian_filter(content, 3 * s), 0.1 * size)
    height = (rng.uniform(4, 7) if subtle else rng.uniform(7, 13)) * s
    coverage = _ellipse(size, centre, (height, height * aspect), rng.normal(0.0, 0.05), 1.5 * s)
    return coverage, background


def _trail(rng: np.random.Generator, scene: _PhotoScene, subtle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Satellite trail: a long, straight, thin bright streak across the field (dimmer when subtle)."""
    size = scene.base.shape[0]
    s = size / 256
    points = _curve(rng, rng.uniform(0, 2 * math.pi), rng.uniform(110, 240) * s, 0.0, 0.002)
    points = points - points[len(points) // 2] + rng.uniform(0.2 * size, 0.8 * size, 2)
    coverage, across = _stroke(size, points, np.full(len(points), max(0.8, rng.uniform(1.2, 2.2) * s)))
    glow = rng.uniform(0.6, 0.95) * (1 - 0.5 * across**2) * (1 + 0.1 * _noise(rng, size, 6 * s))  # [H, W]
    streak = glow[..., None] * _rgb(0.95, 0.97, 1.0)
    return coverage, _mix(scene.base, np.maximum(scene.base, streak), _strength(rng, subtle))


@dataclass(frozen=True)
class _Category:
    view: _View
    defects: dict[str, Painter]


_CATEGORIES = {
    "moon": _Category(
        _View("moon", side=0.375, shift=None),
        {
            "crack": _crack,
            "cut_paste": _cut_paste,
            "hole": _hole,
            "scratch": partial(_scratch, gain=(1.3, 1.6), width=(1.0, 2.2), length=(50, 150), bend=1.0),
            "stain": partial(_stain, tint=(0.75, 0.55, 0.35)),  # rust-brown
        },
    ),
    "hubble": _Category(
        _View("hubble_deep_field", side=0.3, shift=None, on_bright=True),
        {
            "color": partial(_discolour, hue=(0.3, 0.9, 0.35)),  # green galaxies
            "cut_paste": _cut_paste,
            "missing": partial(_missing, remove=ndimage.grey_opening, width=15, aspect=1.0),  # a galaxy gone
            "smudge": _smudge,
            "trail": _trail,
        },
    ),
    "print": _Category(
        _View("page", side=0.65, shift=None),
        {
            "cut_paste": _cut_paste,
            "ink": partial(_scratch, gain=(0.15, 0.35), width=(1.2, 2.6), length=(40, 130), bend=2.0),  # pen stroke
            "missing": partial(_missing, remove=ndimage.grey_closing, width=9, aspect=3.0),  # a word not printed
            "smudge": _smudge,
            "stain": partial(_stain, tint=(0.72, 0.55, 0.35)),  # coffee
        },
    ),
    "coins": _Category(
        _View("coins", side=0.5, shift=None, on_bright=True),
        {
            "color": partial(_discolour, hue=(0.35, 0.6, 0.45), brightness=0.9),  # verdigris
            "crack": _crack,
            "cut_paste": _cut_paste,
            "hole": _hole,
            "scratch": partial(_scratch, gain=(1.35, 1.7), width=(1.0, 2.0), length=(30, 90), bend=1.0),
        },
    ),
    "astronaut": _Category(
        _View("astronaut", side=0.88, shift=0.03),
        {
            "color": partial(_discolour, hue=(0.3, 0.55, 0.9)),  # blue patch
            "cut_paste": _cut_paste,
            "hole": _hole,
            "scratch": partial(_scratch, gain=(0.35, 0.55), width=(1.2, 2.4), length=(40, 120), bend=1.0),
            "stain": _stain,
        },
    ),
}

PHOTO_CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)
PHOTO_DEFECTS: dict[str, tuple[str, ...]] = {name: tuple(c.defects) for name, c in _CATEGORIES.items()}

# --------------------------------------------------------------------------- rendering


def _check_name(category: str, kind: str) -> None:
    """Fail early, listing the valid names, on an unknown category or defect type."""
    if category not in _CATEGORIES:
        raise BadInputError(f"unknown photos category {category!r}; choose from {PHOTO_CATEGORIES}")
    if kind != "good" and kind not in _CATEGORIES[category].defects:
        choices = PHOTO_DEFECTS[category]
        raise BadInputError(f"unknown defect {kind!r} for photos category {category!r}; choose from {choices}")


def _around(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of the non-empty `mask` [H, W], grown by `pad` px (within the image)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1)


def _defect(
    painter: Painter, key: list[int], scene: _PhotoScene, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(alpha [H, W], appearance [H, W, 3]) of a visible defect. Alpha is kept only where the
    painter changes a pixel by more than CHANGE_MIN (closed and hole-filled into one region), so
    the mask `alpha > 0` is where the image changes. A draw that changes too little (a blur on a
    flat patch, a cut-paste of look-alike texture) is redrawn from the next seeded stream."""
    size = scene.base.shape[0]
    radius = max(1, round(2 * size / 256))  # of the closing that joins nearby changed pixels
    for attempt in range(ATTEMPTS):
        rng = np.random.default_rng([*key, 1, attempt])
        subtle = bool(rng.random() < SUBTLE_FRACTION)
        alpha, appearance = painter(rng, scene, subtle)
        alpha = np.clip((alpha - ALPHA_MIN) / (1 - ALPHA_MIN), 0, 1)
        painted = alpha > 0
        changed = alpha * np.abs(appearance - scene.base).max(-1) > CHANGE_MIN  # [H, W, 3] -> [H, W]
        if changed.sum() < max(4, MIN_AREA * size**2, MIN_VISIBLE * painted.sum()):
            continue
        window = _around(changed, 2 * radius + 1)  # the closing only acts near changed pixels
        closed = np.zeros_like(changed)
        closed[window] = ndimage.binary_fill_holes(ndimage.binary_closing(changed[window], disk(radius)))
        return alpha * ((changed | closed) & painted), appearance
    raise RuntimeError(f"{name}: no visible defect in {ATTEMPTS} draws; the painter needs a larger change")


def render_sample(
    category: str,
    kind: str = "good",
    index: int = 0,
    seed: int = 0,
    split: str = "test",
    image_size: int = 256,
    with_defect: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One photos image [H, W, 3] uint8 and its defect mask [H, W] bool (None for "good").

    Keyed by (seed, category, split, kind, index) alone, so order of generation does not matter.
    `with_defect=False` renders the very same view, jitter and noise without the defect,
    so `image != clean` only inside the mask."""
    _check_name(category, kind)
    key = sample_key(seed, category, split, kind, index)
    spec = _CATEGORIES[category]
    scene = _scene(np.random.default_rng([*key, 0]), spec.view, image_size)
    base, mask = scene.base, None
    if kind != "good":
        name = f"photos {category}/{split}/{kind}/{index:03d} (seed {seed})"
        alpha, appearance = _defect(spec.defects[kind], key, scene, name)
        mask = alpha > 0
        if with_defect:
            base = base + alpha[..., None] * (appearance - base)
    return _camera(np.random.default_rng([*key, 2]), base, float(scene.base.mean()), key), mask


def _plan(
    categories: Sequence[str], n_train: int, n_test_good: int, n_per_defect: int
) -> Iterator[tuple[str, str, str, int]]:
    """Every (category, split, kind, index) of a set."""
    for category in categories:
        yield from ((category, "train", "good", i) for i in range(n_train))
        yield from ((category, "test", "good", i) for i in range(n_test_good))
        for defect in PHOTO_DEFECTS[category]:
            yield from ((category, "test", defect, i) for i in range(n_per_defect))


def default_photos_root() -> Path:
    """Where the photos set lives: `$AD_LIGHTNING_DATA/photos`, else `~/.cache/ad_lightning/photos`."""
    return default_root("photos")


def _write_sample(root: Path, seed: int, image_size: int, item: tuple[str, str, str, int]) -> None:
    """Render one planned (category, split, kind, index) and save it, with its mask, in the MVTec layout."""
    category, split, kind, index = item
    image, mask = render_sample(category, kind, index, seed, split, image_size)
    image_dir = root / category / split / kind
    image_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_dir / f"{index:03d}.png", compress_level=1)
    if mask is not None:
        mask_dir = root / category / "ground_truth" / kind
        mask_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{index:03d}_mask.png")


def generate_photos(
    root: Path,
    seed: int = 0,
    categories: Sequence[str] = PHOTO_CATEGORIES,
    n_train: int = 100,
    n_test_good: int = 24,
    n_per_defect: int = 8,
    image_size: int = 256,
) -> Path:
    """Render a photos set into the new or empty directory `root`. The settings file is written
    last, so a set without it is incomplete. Prefer `ensure_photos`, which is atomic and cached."""
    root = Path(root)
    settings = _settings(seed, categories=categories, n_train=n_train, n_test_good=n_test_good,
                         n_per_defect=n_per_defect, image_size=image_size)  # fmt: skip
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; pass a new directory, or use ensure_photos to replace a set")
    plan = list(_plan(settings["categories"], n_train, n_test_good, n_per_defect))
    for item in tqdm(plan, desc=f"generating photos set in {root}", leave=False):
        _write_sample(root, seed, image_size, item)
    (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return root


_GENERATE_SIGNATURE = inspect.signature(generate_photos)  # at import: the record does not change if it is patched


def _settings(seed: int, **kwargs: Any) -> dict:
    """The JSON record of a set: `generate_photos`' arguments with defaults filled in, validated."""
    return set_settings(_GENERATE_SIGNATURE, seed, PHOTOS_VERSION, lambda name: _check_name(name, "good"), "photos", **kwargs)


def ensure_photos(root: Path | None = None, seed: int = 0, **kwargs: Any) -> Path:
    """The photos set at `root` (default: `default_photos_root()`), generated only once, atomically
    (`ensure_generated`). `kwargs` are `generate_photos`' (categories, counts, image_size)."""
    root = Path(root).expanduser() if root is not None else default_photos_root()
    generate = lambda directory: generate_photos(directory, seed, **kwargs)  # noqa: E731
    return ensure_generated(root, _settings(seed, **kwargs), SETTINGS_FILE, generate, "photos")


class Photos(GeneratedSet):
    """The generated real-photograph development set (MVTec layout), written once into a cache directory.

    `root=None` uses `$AD_LIGHTNING_DATA/photos` or `~/.cache/ad_lightning/photos`; nothing is downloaded.
    """

    CATEGORIES = PHOTO_CATEGORIES
    DATA_HINT = "the photos set is generated by ad_lightning.data.photos; delete the directory to regenerate it"

    def __init__(
        self, root: str | Path | None = None, category: str | list[str] = "all", photos_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(root if root is not None else default_photos_root(), category, **kwargs)
        self.photos_seed = photos_seed

    def ensure(self) -> Path:
        return ensure_photos(self.root, seed=self.photos_seed)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ad_lightning.data.photos --root DIR --seed 0`: generate the photos set by hand."""
    generator_main(argv, "photos", ensure_photos, PHOTO_CATEGORIES, {"n_train": 100, "n_test_good": 24, "n_per_defect": 8})


if __name__ == "__main__":
    main()

"""Reading images and ground-truth masks from disk into tensors.

Every reader resizes to a square `size` (or keeps the native size), returns float32, and turns
an unreadable file into a `BadInputError` naming it, so one bad file stops the run instead of
silently changing results.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from ad_lightning.errors import BadInputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_16BIT = 65535.0
MOSTLY_ANOMALOUS = 0.5  # a mask marking more of its pixels than this is probably inverted or noisy: warn
LEVEL_GAP = 32  # grey levels (8-bit scale) farther apart than about this are separate levels of a mask
LEVEL_SHARE = 0.02  # a grey level cluster holding at least this share of a mask's pixels is a real level
_WARNED_MASKS: set[str] = set()  # masks already warned about in this process (a dataset reads them every epoch)


class BadFileError(BadInputError):
    """One file that cannot be used; keeps its `path` and `reason` so a run can skip it and report why."""

    def __init__(self, message: str, path: Path | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason or message


UNREADABLE_FIX = (
    f"re-export it as a valid {'/'.join(sorted(IMAGE_EXTENSIONS))} file or remove it from the dataset "
    "(or set --data.on_bad_file skip)"
)


@contextmanager
def _naming_errors(path: Path) -> Iterator[None]:
    """Turn PIL's errors while reading `path` into a `BadFileError` that names it and the fix."""
    try:
        yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = f"cannot read image file ({err})"
        raise BadFileError(f"cannot read image file {path} ({err}); {UNREADABLE_FIX}", path, reason) from err


def _open(path: Path) -> Image.Image:
    """Open and fully decode `path`, so truncated files fail here rather than later."""
    with _naming_errors(path), Image.open(path) as img:
        img.load()
        return img


def probe_image(path: Path, decode: bool = True) -> tuple[int, int]:
    """(width, height) of the image at `path`, or a `BadFileError` naming it.

    `decode=False` reads only the header (cheap). `decode=True` also decodes every byte of pixel
    data, so a zero-byte or truncated file fails here, at setup, and not mid-run; JPEGs are
    decoded at 1/8 scale (`draft`), which still reads the whole file.
    """
    with _naming_errors(path), Image.open(path) as img:
        size = img.size
        if decode:
            img.draft(None, (size[0] // 8, size[1] // 8))
            img.load()
        return size


def _resize(img: Image.Image, size: int | None) -> Image.Image:
    return img if size is None else img.resize((size, size), Image.Resampling.BILINEAR)


def _rgb_array(img: Image.Image, size: int | None) -> np.ndarray:
    """`img` as float32 [H, W, 3] in [0, 1] (H = W = size unless None); 16-bit grayscale keeps its full range."""
    if img.mode.startswith("I"):  # 16/32-bit grayscale: PIL's RGB conversion would clip at 255
        gray = _resize(img.convert("F"), size)
        gray = np.clip(np.array(gray, dtype=np.float32) / MAX_16BIT, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=-1)  # [H, W] -> [H, W, 3]
    rgb = _resize(img.convert("RGB"), size)
    return np.array(rgb, dtype=np.float32) / 255.0


def read_image(path: Path, size: int | None) -> torch.Tensor:
    """Image at `path` as float32 [3, size, size] in [0, 1] (grayscale/RGBA/palette -> RGB).

    `size=None` keeps the native [3, H, W] (for cutting tiles). PIL's bilinear resize is
    antialiased when it shrinks. No normalisation here: the backbone applies its own mean/std.
    """
    return image_tensor(_open(path), size)


def image_tensor(img: Image.Image, size: int | None) -> torch.Tensor:
    """A decoded PIL image as `read_image` gives it: float32 [3, size, size] in [0, 1] (None: native size)."""
    rgb = _rgb_array(img, size)
    return torch.from_numpy(rearrange(rgb, "h w c -> c h w"))  # [H, W, 3] -> [3, H, W]


def _grey_levels(img: Image.Image) -> tuple[np.ndarray, int]:
    """One grey level per pixel, [H, W] float32, and the full scale of the format (255, or 65535 for
    16-bit). The grey level is the brightest colour band, so a pure red or green mask is as bright as
    white; alpha is ignored; palette masks give their indices, not their colours."""
    width, height = img.size
    raw = np.array(img).reshape(height, width, -1).astype(np.float32)  # [H, W] or [H, W, bands] -> [H, W, bands]
    colour_bands = [i for i, band in enumerate(img.getbands()) if band != "A"]
    full_scale = int(MAX_16BIT) if img.mode.startswith("I") else 255
    return raw[..., colour_bands].max(axis=-1), full_scale  # [H, W, bands] -> [H, W]


def _warn_once(path: Path, message: str) -> None:
    """`warnings.warn(message)` the first time `path` has something to say in this process."""
    if str(path) not in _WARNED_MASKS:
        _WARNED_MASKS.add(str(path))
        warnings.warn(message, stacklevel=3)


def _separate_levels(grey: np.ndarray, full_scale: int) -> int:
    """How many clusters of grey levels, more than about LEVEL_GAP apart on the 8-bit scale, each hold
    at least LEVEL_SHARE of the pixels; JPEG ringing at a mask's edges is spread too thin to count."""
    levels = np.rint(grey * (255 / full_scale)).astype(np.int64)  # [H, W] on the 8-bit scale
    window = np.ones(LEVEL_GAP + 1)  # each level with its neighbours up to LEVEL_GAP / 2 away on either side
    share = np.convolve(np.bincount(levels.ravel(), minlength=256), window, mode="same") / grey.size
    populated = share >= LEVEL_SHARE
    return int(populated[0]) + int((populated[1:] & ~populated[:-1]).sum())  # runs of populated levels


def read_mask(path: Path, size: int | None) -> torch.Tensor:
    """Ground-truth mask at `path` as float32 [1, size, size] in {0, 1} (`size=None`: native [1, H, W]).

    Rule: each pixel's grey level is its brightest colour band (alpha ignored; palette masks give
    their indices, not their colours). If any level is above half the format's full scale (127 for
    8-bit, 32767 for 16-bit), the mask is a 0/255 style one and anomalous = above that half, so the
    small values that JPEG compression scatters around 0 and 255 stay on their side. Otherwise it is
    a 0/1 or class-id mask (VisA: 1, 2, ...) and anomalous = non-zero; such a mask cannot tell
    noise from class ids, so its background must be exactly 0. Nearest resize keeps it binary.

    Warns once per file when more than half the pixels are anomalous (an inverted mask or a noisy
    background) or when a 0/255 style mask holds more than two well-separated grey levels (the
    mid-grey ones count as normal).
    """
    img = _open(path)
    if size is not None:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    grey, full_scale = _grey_levels(img)
    half = full_scale // 2
    if grey.max() > half:
        anomalous = grey > half
        levels = _separate_levels(grey, full_scale)
        if levels > 2:
            _warn_once(
                path,
                f"mask {path} holds {levels} separate grey levels; only values above {half} count as anomalous, "
                "the rest as normal. Check that this is meant, or re-save the mask with 0 (normal) and 255 (defect)",
            )
    else:
        anomalous = grey != 0
    share = anomalous.mean()
    if share > MOSTLY_ANOMALOUS:
        _warn_once(
            path,
            f"mask {path} marks {share:.0%} of its pixels anomalous; check that its background is 0 "
            f"and not inverted or noisy (in a mask without values above {half} every non-zero value is anomalous)",
        )
    return torch.from_numpy(anomalous.astype(np.float32))[None]  # [H, W] -> [1, H, W]


def list_images(directory: Path) -> list[Path]:
    """Image files directly in `directory`, sorted; hidden files and other extensions skipped."""
    return sorted(
        path
        for path in Path(directory).iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def find_mask(directory: Path, names: Sequence[str]) -> Path:
    """The first of the file `names` that exists in `directory`, else the first name.

    Returning a path that does not exist (rather than None) lets the missing-mask check in setup
    name the file the user should add.
    """
    candidates = [Path(directory) / name for name in names]
    return next((path for path in candidates if path.is_file()), candidates[0])

"""Reading images and ground-truth masks from disk into tensors.

Every reader resizes to a square `size` (or keeps the native size), returns float32, and turns
an unreadable file into a `BadInputError` naming it, so one bad file stops the run instead of
silently changing results.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_16BIT = 65535.0


class BadInputError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the fix."""


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
    rgb = _rgb_array(_open(path), size)
    return torch.from_numpy(rearrange(rgb, "h w c -> c h w"))  # [H, W, 3] -> [3, H, W]


def read_mask(path: Path, size: int | None) -> torch.Tensor:
    """Ground-truth mask at `path` as float32 [1, size, size] in {0, 1} (`size=None`: native [1, H, W]).

    Nearest resize keeps it binary. Any non-zero raw value is anomalous, so 0/255 masks and
    class-id masks (1, 2, ...; palette indices, not palette colours) both work; alpha is ignored.
    """
    img = _open(path)
    if size is not None:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    width, height = img.size
    raw = np.array(img).reshape(height, width, -1)  # [H, W] or [H, W, bands] -> [H, W, bands]
    colour_bands = [i for i, band in enumerate(img.getbands()) if band != "A"]
    anomalous = (raw[..., colour_bands] != 0).any(axis=-1)  # [H, W, bands] -> [H, W]
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

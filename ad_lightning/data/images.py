"""Reading images and ground-truth masks from disk into tensors.

Every reader resizes to a square `size`, returns float32, and turns an unreadable file into a
`BadInputError` naming it, so one bad file stops the run instead of silently changing results.
"""

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_16BIT = 65535.0


class BadInputError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the fix."""


def _open(path: Path) -> Image.Image:
    """Open and fully decode `path`, so truncated files fail here rather than later."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInputError(
            f"cannot read image file {path} ({err}); re-export it as a valid "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} file or remove it from the dataset"
        ) from err


def _rgb_array(img: Image.Image, size: int) -> np.ndarray:
    """`img` as float32 [size, size, 3] in [0, 1]; 16-bit grayscale keeps its full range."""
    if img.mode.startswith("I"):  # 16/32-bit grayscale: PIL's RGB conversion would clip at 255
        gray = img.convert("F").resize((size, size), Image.Resampling.BILINEAR)
        gray = np.clip(np.array(gray, dtype=np.float32) / MAX_16BIT, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=-1)  # [H, W] -> [H, W, 3]
    rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.float32) / 255.0


def read_image(path: Path, size: int) -> torch.Tensor:
    """Image at `path` as float32 [3, size, size] in [0, 1] (grayscale/RGBA/palette -> RGB).

    PIL's bilinear resize is antialiased when it shrinks. No normalisation here: the backbone
    applies its own mean/std.
    """
    rgb = _rgb_array(_open(path), size)
    return torch.from_numpy(rearrange(rgb, "h w c -> c h w"))  # [H, W, 3] -> [3, H, W]


def read_mask(path: Path, size: int) -> torch.Tensor:
    """Ground-truth mask at `path` as float32 [1, size, size] in {0, 1}.

    Nearest resize keeps it binary. Any non-zero raw value is anomalous, so 0/255 masks and
    class-id masks (1, 2, ...; palette indices, not palette colours) both work; alpha is ignored.
    """
    img = _open(path).resize((size, size), Image.Resampling.NEAREST)
    raw = np.array(img).reshape(size, size, -1)  # [H, W] or [H, W, bands] -> [H, W, bands]
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

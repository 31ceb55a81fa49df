"""Tiny on-disk datasets in the MVTec-AD layout, written with PIL into tmp_path."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TREE_IMAGE_SIZE = 32
DEFECT_VALUE = 255  # image pixels inside a defect are saturated; everything else stays below 101


def write_image(path: Path, seed: int, defect_rows: int = 0, mode: str = "RGB", size: int = TREE_IMAGE_SIZE) -> None:
    """Noise in [0, 100] with the top `defect_rows` rows saturated, so a test can see where its mask must be."""
    rgb = np.random.default_rng(seed).integers(0, 101, (size, size, 3), dtype=np.uint8)
    rgb[:defect_rows] = DEFECT_VALUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).convert(mode).save(path)


def write_mask(path: Path, defect_rows: int, value: int = 255, size: int = TREE_IMAGE_SIZE) -> None:
    """Single-channel mask with the top `defect_rows` rows set to `value`."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:defect_rows] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def build_mvtec_tree(
    root: Path,
    category: str = "widget",
    n_train: int = 10,
    n_test_good: int = 3,
    defects: dict[str, int] | None = None,
    mode: str = "RGB",
    mask_value: int = 255,
) -> Path:
    """Write one category in the MVTec-AD layout under `root` and return `root`.

    The i-th image of a defect folder has its top i + 1 rows saturated and its mask marks the same
    rows, so every anomalous image has a different mask and a mis-paired mask is visible.
    """
    defects = {"scratch": 2, "hole": 2} if defects is None else defects
    category_dir = Path(root) / category
    for i in range(n_train):
        write_image(category_dir / "train" / "good" / f"{i:03d}.png", seed=i, mode=mode)
    for i in range(n_test_good):
        write_image(category_dir / "test" / "good" / f"{i:03d}.png", seed=1000 + i, mode=mode)
    for d, (defect, count) in enumerate(defects.items()):
        for i in range(count):
            write_image(category_dir / "test" / defect / f"{i:03d}.png", 2000 + 100 * d + i, i + 1, mode)
            write_mask(category_dir / "ground_truth" / defect / f"{i:03d}_mask.png", i + 1, mask_value)
    return Path(root)


@pytest.fixture
def make_mvtec_tree() -> Callable[..., Path]:
    """Factory: `make_mvtec_tree(root, category="widget", n_train=10, n_test_good=3, defects=...)`."""
    return build_mvtec_tree


@pytest.fixture
def write_image_file() -> Callable[..., None]:
    """`write_image_file(path, seed, defect_rows=0, mode="RGB", size=32)`: one noise image, see `write_image`."""
    return write_image


@pytest.fixture
def write_mask_file() -> Callable[..., None]:
    """`write_mask_file(path, defect_rows, value=255, size=32)`: one mask, see `write_mask`."""
    return write_mask


@pytest.fixture
def raw_errors(monkeypatch) -> None:
    """`main` re-raises input errors (as with --debug) instead of printing them and exiting, so a test
    can check the error's type and message."""
    monkeypatch.setenv("AD_LIGHTNING_DEBUG", "1")

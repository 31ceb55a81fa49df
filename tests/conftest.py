"""Tiny on-disk datasets in the MVTec-AD layout, written with PIL into tmp_path."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
import warnings

import numpy as np
import pytest
from PIL import Image

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import main
from ad_lightning.lit import FeatureDDPM

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


# ----- an easy set for quality floors: smooth normal texture, saturated square defects -----------------
EASY_SIZE = 128  # 8 x 8 positions on the backbone's stride-16 grid
EASY_PERIOD = 32  # pixels per cycle of the normal texture, whatever the image size (tiles look like images)
EASY_COLOUR = (255, 40, 0)  # a saturated orange defect on a blue-grey texture
CORNER = "corner"  # the defect folder whose squares all sit inside the bottom-left quadrant


def easy_normal(rng: np.random.Generator, size: int = EASY_SIZE) -> np.ndarray:
    """Two crossed sinusoids of period EASY_PERIOD with random phases, blue-grey, mild noise: [size, size, 3] uint8."""
    y, x = np.mgrid[0:size, 0:size] / EASY_PERIOD
    phase = rng.uniform(0, 2 * np.pi, 2)
    level = 0.5 + 0.15 * np.sin(2 * np.pi * x + phase[0]) + 0.15 * np.sin(2 * np.pi * y + phase[1])
    rgb = level[..., None] * np.array([0.6, 0.7, 0.9]) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def easy_square(rgb: np.ndarray, top: int, left: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(the image with a saturated side x side square at (top, left), its exact 0/255 mask)."""
    out, mask = rgb.copy(), np.zeros(rgb.shape[:2], dtype=np.uint8)
    out[top : top + side, left : left + side] = EASY_COLOUR
    mask[top : top + side, left : left + side] = 255
    return out, mask


def corner_origin(size: int) -> tuple[int, int]:
    """(top, left) of a size/4 square well inside the bottom-left quadrant of a size x size image."""
    return 5 * size // 8, size // 8


def build_easy_tree(
    root: Path,
    category: str = "easy",
    size: int = EASY_SIZE,
    n_train: int = 32,
    n_test_good: int = 8,
    n_defect: int = 8,
    n_corner: int = 2,
    seed: int = 0,
    defect_seed: int = 0,
) -> Path:
    """One MVTec-layout category where defects are easy by construction: normal images are the smooth
    texture of `easy_normal`; `square/` holds n_defect images with a size/4 saturated square at a random
    position, `corner/` n_corner with one inside the bottom-left quadrant; masks are exact. Normal images
    are drawn from `seed`, the defective ones from `defect_seed` (change it to change only the anomalies)."""
    category_dir = Path(root) / category

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(easy_normal(np.random.default_rng([seed, 0, i]), size), category_dir / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(easy_normal(np.random.default_rng([seed, 1, i]), size), category_dir / "test" / "good" / f"{i:03d}.png")
    for defect, count in (("square", n_defect), (CORNER, n_corner)):
        for i in range(count):
            rng = np.random.default_rng([defect_seed, 2 + (defect == CORNER), i])
            side = size // 4
            top, left = rng.integers(0, size - side, 2) if defect == "square" else corner_origin(size)
            image, mask = easy_square(easy_normal(rng, size), int(top), int(left), side)
            save(image, category_dir / "test" / defect / f"{i:03d}.png")
            save(mask, category_dir / "ground_truth" / defect / f"{i:03d}_mask.png")
    return Path(root)


TINY_WIDGET = ("--data", "MVTecAD", "--data.category", "widget", "--data.image_size", "64", "--data.train_batch_size", "8",
               "--model.denoiser", "tiny")  # fmt: skip
"""CLI options of the quick runs on the `widget` tree (`build_mvtec_tree`): 64 px, the `tiny` denoiser."""


EASY_HEADS = "likelihood,irf,radar,reconstruction,iforest,lof,ocsvm,patchcore,irf_bank,ensemble"
EASY_STEPS = 20  # optimizer steps of the easy model: ~10 s on one CPU thread


@dataclass
class EasyModel:
    root: Path  # the data root (category "easy", `build_easy_tree`)
    ckpt: Path  # the checkpoint `fit` wrote, every head fitted
    base: Path  # a directory of this session for further runs


def easy_options(root: Path, logs: Path) -> list[str]:
    """Data, model and output options of the easy set's `fit` and `test`: 128 px, a quarter of the normal
    images held out for validation (8), no plots or batch-1 latency (speed), logs under `logs`."""
    return [
        "--data", "MVTecAD", "--data.root", str(root), "--data.category", "easy", "--data.image_size", str(EASY_SIZE),
        "--data.train_batch_size", "8", "--data.val_fraction", "0.25", "--model.denoiser", "tiny", "--model.heads", EASY_HEADS,
        "--model.latency_images", "0", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(logs), "--trainer.default_root_dir", str(logs),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def easy_model(tmp_path_factory) -> EasyModel:
    """A `tiny` denoiser trained on the easy set through the CLI (`fit`, 20 steps at lr 1e-3), every head fitted
    at the end of training; shared by the quality, orientation and leakage tests. Without the default
    callbacks (plots cost 17 s a `test`), Lightning's own checkpoint callback writes the one checkpoint."""
    base = tmp_path_factory.mktemp("easy")
    root = build_easy_tree(base / "data")
    logs = base / "fit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *easy_options(root, logs), "--trainer.max_steps", str(EASY_STEPS), "--model.lr", "1e-3",
              "--model.warmup_steps", "1"])  # fmt: skip
    assert not [w for w in caught if "has not learned" in str(w.message)]  # 20 steps are enough to learn something
    (ckpt,) = (logs / "version_0" / "checkpoints").glob("*.ckpt")
    assert load_checkpoint(ckpt)["heads_fitted_step"] == EASY_STEPS  # saved after the heads were fitted
    return EasyModel(root, ckpt, base)


def run_test(ckpt: Path, root: Path, logs: Path, *extra: str) -> tuple[FeatureDDPM, Path]:
    """`test` of `ckpt` on the easy set at `root` through the CLI, logs under `logs`; returns (the model it
    scored with, in its state after the run, with `test_scores` and `test_metrics`; its run directory)."""
    models, original = [], FeatureDDPM.on_test_epoch_end

    def keep(self) -> None:
        original(self)
        models.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureDDPM, "on_test_epoch_end", keep)
        main(["test", *easy_options(root, logs), "--ckpt_path", str(ckpt), *extra])
    (run,) = logs.glob("version_*")
    return models[0], run

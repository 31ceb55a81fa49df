"""Ground-truth masks: the binarisation rule survives compression noise, still reads 0/1, class-id,
palette and 16-bit masks, and warns (once, naming the file) about masks that look wrong."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from ad_lightning.data.images import read_mask
from ad_lightning.evaluation.metrics import pixel_auroc


def region(size: int = 96) -> np.ndarray:
    """A disc and a bar: an irregular defect with curved and straight edges, [size, size] bool."""
    yy, xx = np.mgrid[:size, :size]
    return ((yy - 35) ** 2 + (xx - 30) ** 2 < 15**2) | ((yy > 65) & (yy < 78) & (xx > 10) & (xx < 85))


def rgb_0_255(defect: np.ndarray) -> np.ndarray:
    return np.repeat((defect * 255).astype(np.uint8)[..., None], 3, axis=-1)  # [H, W] -> [H, W, 3]


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """What a mask saved as JPEG and converted back to PNG holds: the same picture plus block noise."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buffer.getvalue())))


def save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def read_silently(path: Path, size: int | None = None) -> torch.Tensor:
    """`read_mask`, failing the test if it warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_mask(path, size)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_jpeg_round_tripped_rgb_mask_gives_the_original_region(tmp_path, quality):
    defect = region()
    noisy = jpeg_round_trip(rgb_0_255(defect), quality)
    assert noisy[~defect].max() > 0  # the round trip really left noise in the background
    mask = read_silently(save(noisy, tmp_path / "m.png"))[0].numpy() > 0.5
    assert iou(mask, defect) > 0.95
    assert not mask[~binary_dilation(defect, iterations=2)].any()  # away from the smeared edge: all normal


def test_background_noise_of_one_to_three_is_normal(tmp_path):
    defect = region()
    rgb = rgb_0_255(defect)
    rgb[~defect] = np.random.default_rng(0).integers(1, 4, (int((~defect).sum()), 3))
    mask = read_silently(save(rgb, tmp_path / "m.png"))
    assert torch.equal(mask[0], torch.from_numpy(defect.astype(np.float32)))


def test_a_pure_colour_mask_counts_as_bright(tmp_path):
    """A red-on-black mask (255, 0, 0) is as anomalous as white: the brightest band decides."""
    defect = region()
    rgb = np.zeros((*defect.shape, 3), dtype=np.uint8)
    rgb[defect, 0] = 255
    rgb[~defect, 1] = 2  # a little green noise in the background
    assert torch.equal(read_silently(save(rgb, tmp_path / "m.png"))[0], torch.from_numpy(defect.astype(np.float32)))


@pytest.mark.parametrize("values", [(0, 1), (0, 1, 2, 3)])
def test_zero_one_and_class_id_masks_mark_every_non_zero_value(tmp_path, values):
    ids = np.zeros((16, 16), dtype=np.uint8)
    for i, value in enumerate(values[1:]):
        ids[4 * i : 4 * i + 3, 2:10] = value  # one small region per class id
    mask = read_silently(save(ids, tmp_path / "m.png"))
    assert mask[0].sum() == 3 * 8 * (len(values) - 1)
    assert torch.equal(mask[0], torch.from_numpy((ids != 0).astype(np.float32)))


def test_palette_masks_are_read_as_indices_not_colours(tmp_path):
    ids = np.zeros((16, 16), dtype=np.uint8)
    ids[:3, :5], ids[10:, 10:] = 1, 2
    palette = Image.fromarray(ids).convert("P")
    palette.putpalette([255, 255, 255, 0, 0, 0, 9, 9, 9] + [0, 0, 0] * 253)  # index 0 white, ids 1, 2 dark
    palette.save(tmp_path / "p.png")
    assert torch.equal(read_silently(tmp_path / "p.png")[0], torch.from_numpy((ids != 0).astype(np.float32)))


def test_16bit_masks_threshold_at_half_their_range_or_read_class_ids(tmp_path):
    defect = region()
    bright = np.where(defect, 65535, 0).astype(np.uint16)
    bright[~defect] = np.random.default_rng(0).integers(1, 700, int((~defect).sum()))  # 8-bit noise x 257
    ids = np.where(defect, 2, 0).astype(np.uint16)
    expected = torch.from_numpy(defect.astype(np.float32))
    assert torch.equal(read_silently(save(bright, tmp_path / "bright.png"))[0], expected)
    assert torch.equal(read_silently(save(ids, tmp_path / "ids.png"))[0], expected)
    assert Image.open(tmp_path / "bright.png").mode.startswith("I")  # really stored as 16-bit


def test_resized_noisy_mask_matches_the_resized_clean_mask(tmp_path):
    defect = region()
    clean = read_silently(save(rgb_0_255(defect), tmp_path / "clean.png"), 48)
    noisy = read_silently(save(jpeg_round_trip(rgb_0_255(defect), 75), tmp_path / "noisy.png"), 48)
    assert clean.shape == (1, 48, 48)
    assert (noisy != clean).float().mean() < 0.01


def test_mostly_anomalous_mask_warns_once_naming_the_file(tmp_path):
    inverted = save(rgb_0_255(~region()), tmp_path / "inverted.png")  # background white, defect black
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # so that only read_mask's own once-per-file rule can hold it back
        read_mask(inverted, None)
        read_mask(inverted, 32)  # the same file again: no second warning
    assert len(record) == 1 and issubclass(record[0].category, UserWarning)
    assert str(inverted) in str(record[0].message) and "background" in str(record[0].message)


def test_mask_with_a_third_grey_level_warns_naming_the_file(tmp_path):
    grey = np.zeros((30, 30), dtype=np.uint8)
    grey[:5], grey[10:15] = 255, 100  # 1/6 of the pixels at 255 and 1/6 at mid-grey
    with pytest.warns(UserWarning, match="levels.png") as record:
        mask = read_mask(save(grey, tmp_path / "levels.png"), None)
    assert len(record) == 1 and "grey levels" in str(record[0].message)
    assert mask[0].sum() == 5 * 30  # the mid-grey rows are normal: only values above 127 count


@pytest.mark.parametrize("level", [40, 200])
def test_levels_more_than_32_apart_count_as_separate(tmp_path, level):
    grey = np.zeros((30, 30), dtype=np.uint8)
    grey[:5], grey[10:15] = 255 if level < 128 else 140, level
    with pytest.warns(UserWarning, match="grey levels"):
        read_mask(save(grey, tmp_path / f"{level}.png"), None)


def test_clean_and_nearby_levels_do_not_warn(tmp_path):
    grey = np.zeros((30, 30), dtype=np.uint8)
    grey[:5], grey[10:15] = 255, 230  # two bright levels 25 apart: one cluster
    read_silently(save(grey, tmp_path / "near.png"))
    read_silently(save(rgb_0_255(region()), tmp_path / "clean.png"))


def test_pixel_auroc_against_a_noisy_mask_equals_the_clean_one(tmp_path):
    defect = region()
    smooth = torch.from_numpy(binary_dilation(defect, iterations=3).astype(np.float32))
    anomaly_map = smooth + 0.8 * torch.rand(defect.shape, generator=torch.Generator().manual_seed(0))
    clean = read_silently(save(rgb_0_255(defect), tmp_path / "clean.png"))
    noisy = read_silently(save(rgb_0_255(defect), tmp_path / "noisy.jpg"))  # the mask file itself a JPEG
    expected = pixel_auroc(anomaly_map[None], clean)
    assert 0.9 < expected < 1.0  # the map is good but not perfect, so a wrong mask would show
    assert pixel_auroc(anomaly_map[None], noisy) == expected

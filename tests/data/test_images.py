from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ad_lightning.data.images import BadInputError, list_images, read_image, read_mask


def save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)
    return path


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_read_image_keeps_rgb_values_at_native_size(tmp_path, rgb):
    image = read_image(save(rgb, tmp_path / "a.png"), 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_read_image_makes_three_channels(tmp_path, rgb, mode):
    path = save(rgb, tmp_path / "a.png", mode)
    expected = np.array(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    image = read_image(path, 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_read_image_ignores_alpha(tmp_path, rgb):
    rgba = np.concatenate([rgb, np.zeros((16, 16, 1), dtype=np.uint8)], axis=-1)  # fully transparent
    torch.testing.assert_close(read_image(save(rgba, tmp_path / "a.png"), 16), read_image(save(rgb, tmp_path / "b.png"), 16))


def test_read_image_keeps_16bit_range(tmp_path):
    gray16 = np.full((8, 8), 32768, dtype=np.uint16)
    image = read_image(save(gray16, tmp_path / "a.png"), 8)
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.full((3, 8, 8), 32768 / 65535))


def test_read_image_resize_is_antialiased(tmp_path):
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, ::4] = 255  # one bright column in four: an antialiased 4x shrink averages to 1/4
    image = read_image(save(stripes, tmp_path / "a.png"), 16)
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image[:, :, 2:-2], torch.full((3, 16, 12), 0.25), atol=0.02, rtol=0)


@pytest.mark.parametrize("values", [(0, 255), (0, 1, 2)])
def test_read_mask_binarises(tmp_path, values):
    raw = np.array(values, dtype=np.uint8)[np.arange(64) % len(values)].reshape(8, 8)
    mask = read_mask(save(raw, tmp_path / "m.png"), 8)
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.float32
    torch.testing.assert_close(mask[0], torch.from_numpy((raw != 0).astype(np.float32)))


def test_read_mask_nearest_resize_stays_binary(tmp_path):
    raw = np.zeros((64, 64), dtype=np.uint8)
    raw[:, 32:] = 255
    mask = read_mask(save(raw, tmp_path / "m.png"), 16)
    assert mask.shape == (1, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, :, :8].sum() == 0 and mask[0, :, 8:].sum() == 16 * 8


def test_read_mask_uses_palette_indices_and_ignores_alpha(tmp_path):
    ids = np.zeros((8, 8), dtype=np.uint8)
    ids[0] = 1
    palette = Image.fromarray(ids).convert("P")
    palette.putpalette([200, 200, 200] + [0, 0, 0] * 255)  # background index 0 drawn light grey
    palette.save(tmp_path / "p.png")
    opaque_black = np.zeros((8, 8, 4), dtype=np.uint8)
    opaque_black[..., 3] = 255
    assert read_mask(tmp_path / "p.png", 8)[0].sum(dim=1).tolist() == [8.0] + [0.0] * 7
    assert read_mask(save(opaque_black, tmp_path / "a.png"), 8).sum() == 0


@pytest.mark.parametrize("reader", [read_image, read_mask])
@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "not_an_image"])
def test_unreadable_file_names_the_path(tmp_path, rgb, reader, damage):
    path = save(np.repeat(rgb, 4, axis=0), tmp_path / "bad.png")
    content = {"zero_bytes": b"", "truncated": path.read_bytes()[:300], "not_an_image": b"hello"}[damage]
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="bad.png") as info:
        reader(path, 16)
    assert str(path) in str(info.value) and "remove it" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_list_images_filters_and_sorts(tmp_path, rgb):
    for name in ["b.png", "a.JPG", "c.tiff", "d.Bmp", ".hidden.png", "notes.txt", "e.png.bak"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.tiff", "d.Bmp"]

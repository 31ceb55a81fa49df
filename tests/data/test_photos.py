"""Tests for the real-photograph development set (tiny sets, 64 px, into tmp_path)."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ad_lightning.data import Photos, photos
from ad_lightning.data.photos import (
    PHOTO_CATEGORIES,
    PHOTO_DEFECTS,
    SETTINGS_FILE,
    default_photos_root,
    ensure_photos,
    generate_photos,
    render_sample,
)

TINY = {"n_train": 3, "n_test_good": 2, "n_per_defect": 1, "image_size": 64}
RESERVED = {"brick", "grass", "gravel"}  # kept for a held-out set


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, keyed by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_photos(tmp_path_factory.mktemp("photos") / "set", seed=0, **TINY)


def test_layout_and_counts(tiny_root):
    assert len(PHOTO_CATEGORIES) >= 4 and "astronaut" in PHOTO_CATEGORIES
    for category in PHOTO_CATEGORIES:
        defects = PHOTO_DEFECTS[category]
        assert 4 <= len(defects) <= 5
        base = tiny_root / category
        assert [p.name for p in sorted((base / "train" / "good").iterdir())] == ["000.png", "001.png", "002.png"]
        assert [p.name for p in sorted((base / "test" / "good").iterdir())] == ["000.png", "001.png"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(("good", *defects))
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(defects)
        for defect in defects:
            assert [p.name for p in (base / "test" / defect).iterdir()] == ["000.png"]
            assert [p.name for p in (base / "ground_truth" / defect).iterdir()] == ["000_mask.png"]
    settings = json.loads((tiny_root / SETTINGS_FILE).read_text())
    assert settings == {**TINY, "seed": 0, "categories": list(PHOTO_CATEGORIES), "version": photos.PHOTOS_VERSION}


def test_reserved_photos_are_not_used():
    used = {category.view.photo for category in photos._CATEGORIES.values()}
    assert used.isdisjoint(RESERVED) and not RESERVED & set(PHOTO_CATEGORIES)


def test_images_are_rgb_of_the_requested_size(tiny_root):
    images = [p for p in tiny_root.rglob("*.png") if "ground_truth" not in p.parts]
    assert len(images) == len(PHOTO_CATEGORIES) * 5 + sum(map(len, PHOTO_DEFECTS.values()))
    for path in images:
        image = Image.open(path)
        assert (image.mode, image.size) == ("RGB", (64, 64)), path


def test_every_defect_image_has_a_binary_non_empty_mask(tiny_root):
    for category in PHOTO_CATEGORIES:
        for defect in PHOTO_DEFECTS[category]:
            mask = Image.open(tiny_root / category / "ground_truth" / defect / "000_mask.png")
            assert (mask.mode, mask.size) == ("L", (64, 64))
            assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}, (category, defect)


def test_normal_images_have_no_masks(tiny_root):
    assert not list(tiny_root.glob("*/ground_truth/good"))
    assert len(list(tiny_root.glob("*/ground_truth/*/*"))) == sum(map(len, PHOTO_DEFECTS.values()))


def test_files_hold_the_rendered_samples(tiny_root):
    """What is on disk is `render_sample` of the same key, whatever the order it was written in."""
    defect = PHOTO_DEFECTS["print"][0]
    image, mask = render_sample("print", defect, 0, seed=0, split="test", image_size=64)
    assert np.array_equal(np.asarray(Image.open(tiny_root / "print" / "test" / defect / "000.png")), image)
    written_mask = np.asarray(Image.open(tiny_root / "print" / "ground_truth" / defect / "000_mask.png"))
    assert np.array_equal(written_mask > 0, mask)
    normal, no_mask = render_sample("moon", "good", 2, seed=0, split="train", image_size=64)
    assert no_mask is None
    assert np.array_equal(np.asarray(Image.open(tiny_root / "moon" / "train" / "good" / "002.png")), normal)


@pytest.mark.parametrize("category", PHOTO_CATEGORIES)
def test_masks_cover_where_the_defect_changed_the_image(category):
    """Against the same sample rendered without its defect: pixels change only inside the mask,
    and most of the mask did change (it is not a loose box around the defect)."""
    for defect in PHOTO_DEFECTS[category]:
        for index in range(2):
            image, mask = render_sample(category, defect, index, image_size=64)
            clean, same_mask = render_sample(category, defect, index, image_size=64, with_defect=False)
            changed = np.any(image != clean, axis=-1)
            assert mask.any() and np.array_equal(mask, same_mask)
            assert not np.any(changed & ~mask), (category, defect, index)
            assert changed.sum() >= 0.8 * mask.sum(), (category, defect, index, changed.sum(), mask.sum())


def test_textures_are_random_crops_and_the_object_is_aligned():
    """The mean of eight normal views keeps the object's structure (same framing, small shift) but
    averages random texture crops towards flat: its spatial contrast relative to one view's."""

    def kept_contrast(category: str) -> float:
        views = np.stack([render_sample(category, "good", i, split="train", image_size=64)[0] for i in range(8)])
        return float(views.mean(0).std() / views.astype(float).std(axis=(1, 2, 3)).mean())

    assert kept_contrast("astronaut") > 0.75
    for texture in ("moon", "hubble", "print", "coins"):
        assert kept_contrast(texture) < 0.65, texture


def test_normal_images_differ_between_splits_and_indices(tiny_root):
    files = [tiny_root / "coins" / "train" / "good" / "000.png", tiny_root / "coins" / "train" / "good" / "001.png",
             tiny_root / "coins" / "test" / "good" / "000.png"]  # fmt: skip
    images = [np.asarray(Image.open(p)).astype(int) for p in files]
    assert np.abs(images[0] - images[1]).mean() > 5 and np.abs(images[0] - images[2]).mean() > 5


def test_same_seed_is_byte_identical(tiny_root, tmp_path):
    assert _files(generate_photos(tmp_path / "again", seed=0, **TINY)) == _files(tiny_root)


def test_different_seed_gives_different_images(tiny_root, tmp_path):
    first, second = _files(tiny_root), _files(generate_photos(tmp_path / "other", seed=1, **TINY))
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first if k.endswith(".png") and "ground_truth" not in k)


def test_bad_names_and_settings_are_refused():
    with pytest.raises(ValueError, match="'brick'"):
        render_sample("brick")
    with pytest.raises(ValueError, match="'trail'"):
        render_sample("moon", "trail")
    with pytest.raises(ValueError, match="n_per_defect=0"):
        ensure_photos(Path("unused"), n_per_defect=0)


def test_generate_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate_photos(tmp_path, **TINY)


def test_ensure_reuses_a_complete_set(tmp_path, monkeypatch):
    root = ensure_photos(tmp_path / "photos", categories=("moon",), **TINY)
    before = _files(root)
    monkeypatch.setattr(photos, "generate_photos", lambda *args, **kwargs: pytest.fail("regenerated"))
    assert ensure_photos(root, categories=("moon",), **TINY) == root
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"], "no temporary siblings left behind"


def test_ensure_regenerates_a_set_made_with_other_settings(tmp_path):
    root = ensure_photos(tmp_path / "photos", seed=0, categories=("coins",), **TINY)
    old = (root / "coins" / "train" / "good" / "000.png").read_bytes()
    ensure_photos(root, seed=1, categories=("coins",), **{**TINY, "n_train": 4})
    assert json.loads((root / SETTINGS_FILE).read_text())["seed"] == 1
    assert len(list((root / "coins" / "train" / "good").glob("*.png"))) == 4
    assert (root / "coins" / "train" / "good" / "000.png").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_an_interrupted_generation_is_regenerated(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return render_sample(*args, **kwargs)

    monkeypatch.setattr(photos, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_photos(tmp_path / "photos", categories=("astronaut",), **TINY)
    assert list(tmp_path.iterdir()) == [], "no set that looks complete, and the partial directory is gone"
    monkeypatch.undo()
    root = ensure_photos(tmp_path / "photos", categories=("astronaut",), **TINY)
    assert len(list(root.glob("astronaut/test/*/*.png"))) == 2 + len(PHOTO_DEFECTS["astronaut"])
    assert (root / SETTINGS_FILE).exists()


def test_ensure_refuses_to_replace_foreign_data(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a photos set"):
        ensure_photos(tmp_path, **TINY)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AD_LIGHTNING_DATA", str(tmp_path))
    assert default_photos_root() == tmp_path / "photos"
    monkeypatch.delenv("AD_LIGHTNING_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_photos_root() == tmp_path / "home" / ".cache" / "ad_lightning" / "photos"


def test_cli_generates_a_set(tmp_path, capsys):
    photos.main(["--root", str(tmp_path / "cli"), "--seed", "3", "--categories", "hubble", "--n-train", "2",
                 "--n-test-good", "1", "--n-per-defect", "1", "--image-size", "64"])  # fmt: skip
    assert str(tmp_path / "cli") in capsys.readouterr().out
    settings = json.loads((tmp_path / "cli" / SETTINGS_FILE).read_text())
    assert (settings["seed"], settings["categories"], settings["n_train"]) == (3, ["hubble"], 2)


def test_datamodule_generates_on_first_use_and_finds_categories_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("AD_LIGHTNING_DATA", str(tmp_path))
    small = {**TINY, "n_train": 4}  # the tiny set (not the default one), with two normals each side of the split
    monkeypatch.setattr(photos, "ensure_photos", partial(ensure_photos, **small))
    data = Photos(image_size=32, val_fraction=0.5)
    assert data.root == tmp_path / "photos" and data.categories == list(PHOTO_CATEGORIES)
    data.setup("fit")
    n = len(PHOTO_CATEGORIES)
    assert (len(data.train_dataset), len(data.val_dataset)) == (2 * n, 2 * n)
    assert len(data.test_dataset) == 2 * n + sum(map(len, PHOTO_DEFECTS.values()))
    item = data.test_dataset[len(data.test_dataset) - 1]  # the last category's last defect
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1 and item["mask"].max() == 1

    one = Photos(root=tmp_path / "photos", category="moon", val_fraction=0.5)
    one.setup("test")
    assert {s["category"] for s in one.test_dataset} == {"moon"}


def test_datamodule_is_chosen_by_short_name(capsys, monkeypatch):
    from ad_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["ad_lightning"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit):
        main(["fit", "--data", "Photos", "--data.category", "moon", "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: ad_lightning.data.Photos" in out and "category: moon" in out

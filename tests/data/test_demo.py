"""Tests for the built-in demo data set generator (tiny sets, 64 px, into tmp_path)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ad_lightning.data import demo
from ad_lightning.data.demo import (
    DEMO_CATEGORIES,
    DEMO_DEFECTS,
    SETTINGS_FILE,
    default_demo_root,
    ensure_demo,
    generate_demo,
    render_sample,
)

TINY = {"n_train": 3, "n_test_good": 2, "n_per_defect": 2, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, keyed by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "set", seed=0, **TINY)


def test_layout_and_counts(tiny_root):
    assert len(DEMO_CATEGORIES) >= 3
    for category in DEMO_CATEGORIES:
        assert 4 <= len(DEMO_DEFECTS[category]) <= 5
        base = tiny_root / category
        assert len(list((base / "train" / "good").glob("*.png"))) == TINY["n_train"]
        assert len(list((base / "test" / "good").glob("*.png"))) == TINY["n_test_good"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(("good", *DEMO_DEFECTS[category]))
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(DEMO_DEFECTS[category])
        for defect in DEMO_DEFECTS[category]:
            images = sorted((base / "test" / defect).glob("*.png"))
            assert [p.name for p in images] == ["000.png", "001.png"]
    settings = json.loads((tiny_root / SETTINGS_FILE).read_text())
    assert settings == {**TINY, "seed": 0, "categories": list(DEMO_CATEGORIES), "version": demo.DEMO_VERSION}


def test_images_are_rgb_of_the_requested_size(tiny_root):
    for path in tiny_root.rglob("*.png"):
        if "ground_truth" not in path.parts:
            image = Image.open(path)
            assert (image.mode, image.size) == ("RGB", (64, 64)), path


def test_every_defect_image_has_a_binary_non_empty_mask(tiny_root):
    for category in DEMO_CATEGORIES:
        for defect in DEMO_DEFECTS[category]:
            for image_path in (tiny_root / category / "test" / defect).glob("*.png"):
                mask_path = tiny_root / category / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                mask = Image.open(mask_path)
                assert mask.mode == "L" and mask.size == Image.open(image_path).size
                values = np.unique(np.asarray(mask))
                assert set(values.tolist()) == {0, 255}, (mask_path, values)


def test_normal_images_have_no_masks(tiny_root):
    masks = [p.name for p in tiny_root.glob("*/ground_truth/*/*")]
    assert len(masks) == sum(len(d) for d in DEMO_DEFECTS.values()) * TINY["n_per_defect"]
    assert not list(tiny_root.glob("*/ground_truth/good"))


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_masks_cover_the_defect_exactly(category):
    """Pixels change only inside the mask, and they do change there."""
    for defect in DEMO_DEFECTS[category]:
        for index in range(3):
            image, mask = render_sample(category, defect, index, image_size=128)
            clean, same_mask = render_sample(category, defect, index, image_size=128, with_defect=False)
            changed = np.any(image != clean, axis=-1)
            assert np.array_equal(mask, same_mask)
            assert not np.any(changed & ~mask), (category, defect, index)
            assert changed.sum() >= 0.5 * mask.sum(), (category, defect, index, changed.sum(), mask.sum())


def test_normal_images_vary():
    """Lighting, pose / phase and noise differ, so a pixel template cannot describe normality."""
    for category in DEMO_CATEGORIES:
        first, second = (render_sample(category, "good", i, split="train", image_size=128)[0] for i in (0, 1))
        assert np.abs(first.astype(int) - second.astype(int)).mean() > 5, category


def test_same_seed_is_byte_identical(tiny_root, tmp_path):
    again = generate_demo(tmp_path / "again", seed=0, **TINY)
    assert _files(again) == _files(tiny_root)


def test_different_seed_gives_different_images(tiny_root, tmp_path):
    other = generate_demo(tmp_path / "other", seed=1, **TINY)
    first, second = _files(tiny_root), _files(other)
    assert first.keys() == second.keys()
    images = [k for k in first if k.endswith(".png")]
    assert all(first[k] != second[k] for k in images)


def test_generate_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate_demo(tmp_path, **TINY)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="'carpet'"):
        render_sample("carpet")
    with pytest.raises(ValueError, match="'dent'"):
        render_sample("nut", "dent")
    with pytest.raises(ValueError, match="n_train=0"):
        ensure_demo(Path("unused"), n_train=0)


def test_ensure_demo_reuses_a_complete_set(tmp_path, monkeypatch):
    root = ensure_demo(tmp_path / "demo", seed=0, categories=("nut",), **TINY)
    probe = root / "nut" / "train" / "good" / "000.png"
    before = probe.stat().st_mtime_ns
    monkeypatch.setattr(demo, "generate_demo", lambda *args, **kwargs: pytest.fail("regenerated"))
    assert ensure_demo(root, seed=0, categories=("nut",), **TINY) == root
    assert probe.stat().st_mtime_ns == before
    assert not list(tmp_path.glob(".*")), "no temporary siblings left behind"


def test_ensure_demo_regenerates_after_a_settings_mismatch(tmp_path):
    root = ensure_demo(tmp_path / "demo", seed=0, categories=("wood",), **TINY)
    old = (root / "wood" / "train" / "good" / "000.png").read_bytes()
    ensure_demo(root, seed=1, categories=("wood",), **{**TINY, "n_train": 4})
    assert json.loads((root / SETTINGS_FILE).read_text())["seed"] == 1
    assert len(list((root / "wood" / "train" / "good").glob("*.png"))) == 4
    assert (root / "wood" / "train" / "good" / "000.png").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_ensure_demo_refuses_to_replace_foreign_data(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a demo set"):
        ensure_demo(tmp_path, **TINY)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_interrupted_generation_leaves_no_complete_looking_set(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return render_sample(*args, **kwargs)

    monkeypatch.setattr(demo, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo(tmp_path / "demo", categories=("fabric",), **TINY)
    assert len(calls) == 5
    assert not (tmp_path / "demo").exists()
    assert list(tmp_path.iterdir()) == [], "the partial directory is cleaned up"
    monkeypatch.undo()
    root = ensure_demo(tmp_path / "demo", categories=("fabric",), **TINY)
    assert (root / SETTINGS_FILE).exists()


def test_interrupted_regeneration_keeps_the_previous_set(tmp_path, monkeypatch):
    root = ensure_demo(tmp_path / "demo", seed=0, categories=("wood",), **TINY)
    before = _files(root)
    def full_disk(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(demo, "render_sample", full_disk)
    with pytest.raises(OSError, match="disk full"):
        ensure_demo(root, seed=1, categories=("wood",), **TINY)
    assert _files(root) == before, "the old set is untouched and still labelled with its own settings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AD_LIGHTNING_DATA", str(tmp_path))
    assert default_demo_root() == tmp_path / "demo"
    monkeypatch.delenv("AD_LIGHTNING_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == tmp_path / "home" / ".cache" / "ad_lightning" / "demo"


def test_cli_generates_a_set(tmp_path, capsys):
    demo.main(["--root", str(tmp_path / "cli"), "--seed", "3", "--categories", "nut", "--n-train", "2",
               "--n-test-good", "1", "--n-per-defect", "1", "--image-size", "64"])  # fmt: skip
    assert str(tmp_path / "cli") in capsys.readouterr().out
    settings = json.loads((tmp_path / "cli" / SETTINGS_FILE).read_text())
    assert (settings["seed"], settings["categories"], settings["n_train"]) == (3, ["nut"], 2)

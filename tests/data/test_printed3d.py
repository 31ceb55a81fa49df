import logging

import pytest
import torch

from ad_lightning.data.base import AnomalyDataset
from ad_lightning.data.images import BadInputError, read_image
from ad_lightning.data.printed3d import Printed3D, TileDataset
from ad_lightning.data.tiling import tile_boxes

SIZE = 32


@pytest.fixture
def parts_root(tmp_path, write_image_file, write_mask_file):
    """Part `bracket` with masks (`<stem>_mask.png` and `<stem>.png`), part `gear` without ground_truth."""
    for part in ("bracket", "gear"):
        for i in range(5):
            write_image_file(tmp_path / part / "train/good" / f"{i}.png", seed=i, size=80)
        write_image_file(tmp_path / part / "test/good/0.png", seed=50)
        for i in range(2):
            write_image_file(tmp_path / part / "test/stringing" / f"{i}.png", seed=100 + i, defect_rows=i + 1)
    write_mask_file(tmp_path / "bracket/ground_truth/stringing/0_mask.png", defect_rows=1)
    write_mask_file(tmp_path / "bracket/ground_truth/stringing/1.png", defect_rows=2)
    return tmp_path


def make_module(root, category, **kwargs) -> Printed3D:
    module = Printed3D(root, category, image_size=SIZE, val_fraction=0.2, **kwargs)
    module.setup()
    return module


def test_part_with_masks_pairs_both_spellings(parts_root, caplog):
    with caplog.at_level(logging.WARNING):
        module = make_module(parts_root, "bracket")
    assert module.has_masks and not [r for r in caplog.records if "image-level" in r.getMessage()]
    masks = [s.mask_path for s in module.test_dataset.samples]
    ground_truth = parts_root / "bracket/ground_truth/stringing"
    assert masks == [None, ground_truth / "0_mask.png", ground_truth / "1.png"]
    for item in module.test_dataset:
        defect_rows = (item["image"].min(dim=0).values > 0.9).float()  # [3, H, W] -> [H, W]
        assert (item["mask"][0] == defect_rows).all()


def test_part_without_ground_truth_is_image_level_and_warned_once(parts_root, caplog):
    with caplog.at_level(logging.WARNING):
        module = make_module(parts_root, "all")
        module.setup()
    assert module.categories == ["bracket", "gear"] and not module.has_masks
    assert [r.getMessage() for r in caplog.records if "ground_truth" in r.getMessage()] == [
        f"part 'gear' has no ground_truth directory under {parts_root}: image-level metrics only"
    ]
    gear = [s for s in module.test_dataset.samples if s.category == "gear"]
    assert [(s.label, s.mask_path) for s in gear] == [(0, None), (1, None), (1, None)]


def test_missing_mask_in_a_ground_truth_part_fails_before_testing(parts_root):
    (parts_root / "bracket/ground_truth/stringing/1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1_mask.png"):
        make_module(parts_root, "bracket").test_dataloader()


def test_training_items_are_tiles_of_the_right_count_and_size(parts_root):
    module = make_module(parts_root, "gear", tile_size=48, tile_overlap=8)
    per_image = len(tile_boxes(80, 80, 48, 8))
    assert per_image == 4
    train = module.train_dataset
    assert isinstance(train, TileDataset) and len(train.samples) == 3 and len(train) == 3 * per_image
    assert isinstance(module.val_dataset, TileDataset) and len(module.val_dataset) == 2 * per_image  # 2 images
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (12, 3, SIZE, SIZE) and batch["mask"].sum() == 0 and (batch["label"] == 0).all()


def test_test_items_are_whole_images_at_native_size_one_per_batch(parts_root, write_image_file):
    write_image_file(parts_root / "gear/test/good/0.png", seed=7, size=80)
    module = make_module(parts_root, "gear", tile_size=48, tile_overlap=8)
    assert module.tiling == (48, 8) and isinstance(module.test_dataset, AnomalyDataset)
    batch = next(iter(module.test_dataloader()))
    assert batch["image"].shape == (1, 3, 80, 80) and batch["mask"].shape == (1, 1, 80, 80)  # native, not SIZE
    assert make_module(parts_root, "gear").tiling is None


def test_a_tile_at_image_size_is_the_crop(parts_root):
    module = make_module(parts_root, "gear", tile_size=SIZE, tile_overlap=0)
    sample, (y0, x0, y1, x1) = module.train_dataset.tiles[5]
    expected = read_image(sample.image_path, None)[:, y0:y1, x0:x1]
    torch.testing.assert_close(module.train_dataset[5]["image"], expected)


def test_tiles_larger_than_the_image_are_refused(parts_root):
    with pytest.raises(BadInputError, match="smaller than a 96x96 tile"):
        make_module(parts_root, "gear", tile_size=96)
    with pytest.raises(BadInputError, match="tile_overlap"):
        Printed3D(parts_root, tile_size=32, tile_overlap=32)

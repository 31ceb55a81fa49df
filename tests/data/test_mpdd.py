import pytest

from ad_lightning.data.images import BadInputError
from ad_lightning.data.mpdd import MPDD


def test_mvtec_layout_counts_and_masks(tmp_path, make_mvtec_tree):
    root = make_mvtec_tree(tmp_path, "metal_plate", defects={"scratch": 2, "major_rust": 1})
    module = MPDD(root, "metal_plate", image_size=32)
    module.setup()
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (8, 2, 6)
    anomalous = [s for s in module.test_dataset.samples if s.label]
    assert sorted(s.defect for s in anomalous) == ["major_rust", "scratch", "scratch"]
    for s in anomalous:
        assert s.mask_path == root / "metal_plate/ground_truth" / s.defect / f"{s.image_path.stem}_mask.png"


def test_categories_and_hint():
    assert len(MPDD.CATEGORIES) == 6 and "tubes" in MPDD.CATEGORIES
    assert "https://github.com/stepanje/MPDD" in MPDD.DATA_HINT and "no public" in MPDD.DATA_HINT


def test_missing_root_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="stepanje/MPDD"):
        MPDD(tmp_path / "nowhere", "tubes").setup()


def test_unknown_category_lists_the_six(tmp_path):
    with pytest.raises(BadInputError, match="bracket_black"):
        MPDD(tmp_path, "bottle").setup()

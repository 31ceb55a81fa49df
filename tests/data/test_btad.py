import pytest

from ad_lightning.data.btad import BTAD

SIZE = 32


@pytest.fixture
def btad_root(tmp_path, write_image_file, write_mask_file):
    """Product 03 in BMP (masks too), product 01 in PNG; the i-th defect marks its top i + 1 rows."""
    for product, ext in (("01", "png"), ("03", "bmp")):
        product_dir = tmp_path / product
        for i in range(5):
            write_image_file(product_dir / "train/ok" / f"{i:04d}.{ext}", seed=i)
        for i in range(2):
            write_image_file(product_dir / "test/ok" / f"{i:04d}.{ext}", seed=50 + i)
        for i in range(3):
            write_image_file(product_dir / "test/ko" / f"{i:04d}.{ext}", seed=100 + i, defect_rows=i + 1)
            write_mask_file(product_dir / "ground_truth/ko" / f"{i:04d}.{ext}", defect_rows=i + 1)
    return tmp_path


def make_module(root, category, **kwargs) -> BTAD:
    module = BTAD(root, category, image_size=SIZE, val_fraction=0.2, **kwargs)
    module.setup()
    return module


@pytest.mark.parametrize(("product", "ext"), [("01", ".png"), ("03", ".bmp")])
def test_counts_labels_and_masks_paired_by_stem(btad_root, product, ext):
    module = make_module(btad_root, product)
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (3, 2, 5)  # 5 normal: at least 2 held out
    assert module.has_masks
    test = module.test_dataset.samples
    assert [(s.label, s.defect) for s in test] == [(0, "good")] * 2 + [(1, "ko")] * 3
    for sample in test[2:]:
        assert sample.image_path.suffix == sample.mask_path.suffix == ext
        assert sample.mask_path == btad_root / product / "ground_truth/ko" / (sample.image_path.stem + ext)
    for item in module.test_dataset:
        defect_rows = (item["image"].min(dim=0).values > 0.9).float()  # [3, H, W] -> [H, W]
        assert (item["mask"][0] == defect_rows).all() and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_png_mask_of_a_bmp_image_is_found(btad_root, write_mask_file):
    (btad_root / "03/ground_truth/ko/0001.bmp").unlink()
    write_mask_file(btad_root / "03/ground_truth/ko/0001.png", defect_rows=2)
    sample = make_module(btad_root, "03").test_dataset.samples[3]
    assert sample.mask_path == btad_root / "03/ground_truth/ko/0001.png"


def test_missing_mask_names_the_png_to_add(btad_root):
    (btad_root / "01/ground_truth/ko/0002.png").unlink()
    with pytest.raises(FileNotFoundError, match="0002.png"):
        make_module(btad_root, "01").test_dataloader()


def test_missing_root_says_where_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="btad.zip"):
        make_module(tmp_path / "nowhere", "01")

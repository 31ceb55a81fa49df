import logging

import numpy as np
import pytest
from PIL import Image

from ad_lightning.data.images import BadFileError, BadInputError
from ad_lightning.data.mvtec import MVTecAD

SIZE = 32


@pytest.fixture
def damaged(tmp_path, make_mvtec_tree, write_image_file, write_mask_file):
    """An MVTec tree with a truncated PNG, a zero-byte and a truncated JPG, and a mask of the wrong shape."""
    root = make_mvtec_tree(tmp_path, "bottle", n_train=10)
    truncated_png = root / "bottle/train/good/003.png"
    truncated_png.write_bytes(truncated_png.read_bytes()[:200])
    zero_jpg = root / "bottle/test/good/zero.jpg"
    zero_jpg.write_bytes(b"")
    truncated_jpg = root / "bottle/train/good/big.jpg"
    write_image_file(truncated_jpg, seed=9, size=256)
    truncated_jpg.write_bytes(truncated_jpg.read_bytes()[:2000])
    wrong_mask = root / "bottle/ground_truth/hole/001_mask.png"
    Image.fromarray(np.zeros((SIZE - 8, SIZE), dtype=np.uint8)).save(wrong_mask)  # 32 x 24 for a 32 x 32 image
    return {"root": root, "png": truncated_png, "zero": zero_jpg, "jpg": truncated_jpg, "mask": wrong_mask}


def make_module(root, **kwargs) -> MVTecAD:
    module = MVTecAD(root, "bottle", image_size=SIZE, val_fraction=0.2, **kwargs)
    module.setup()
    return module


def all_paths(module) -> set[str]:
    datasets = (module.train_dataset, module.val_dataset, module.test_dataset)
    return {str(s.image_path) for d in datasets for s in d.samples}


def test_skip_leaves_bad_files_out_at_setup_and_counts_them(damaged, caplog):
    with caplog.at_level(logging.WARNING):
        module = make_module(damaged["root"], on_bad_file="skip")
    image_of_wrong_mask = damaged["root"] / "bottle/test/hole/001.png"
    assert module.n_skipped == 4
    assert sorted(path for path, _ in module.skipped) == sorted(str(damaged[k]) for k in ("png", "zero", "jpg", "mask"))
    reasons = dict(module.skipped)
    assert "cannot read" in reasons[str(damaged["zero"])] and "truncated" in reasons[str(damaged["jpg"])]
    assert f"mask is 32x24 but its image {image_of_wrong_mask} is 32x32" == reasons[str(damaged["mask"])]
    left_out = {str(damaged[k]) for k in ("png", "zero", "jpg")} | {str(image_of_wrong_mask)}
    assert not all_paths(module) & left_out
    # 11 training images - 2 bad = 7 + 2; 8 test images - zero.jpg - the image of the wrong mask = 6
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (7, 2, 6)
    assert sum(str(damaged["png"]) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
    for loader in (module.train_dataloader(), module.val_dataloader(), module.test_dataloader()):
        assert sum(len(batch["path"]) for batch in loader) > 0  # nothing fails mid-run


def test_error_stops_the_test_split_on_a_wrong_size_mask_naming_mask_and_image(damaged, write_image_file):
    for key in ("png", "jpg", "zero"):  # only the mask is bad
        write_image_file(damaged[key], seed=1)
    module = make_module(damaged["root"])  # training never reads test masks: setup and fit's loaders go on
    assert sum(len(batch["path"]) for batch in module.train_dataloader()) == len(module.train_dataset)
    with pytest.raises(BadFileError) as info:
        module.test_dataloader()  # before a single test image is scored
    message = str(info.value)
    assert str(damaged["mask"]) in message and str(damaged["root"] / "bottle/test/hole/001.png") in message
    assert info.value.path == damaged["mask"]


@pytest.mark.parametrize("key", ["png", "zero", "jpg"])
def test_error_names_an_unreadable_file_when_it_is_read(damaged, write_mask_file, key):
    write_mask_file(damaged["mask"], defect_rows=2)  # only the unreadable images are left
    module = make_module(damaged["root"])
    assert module.n_skipped == 0
    for dataset in (module.train_dataset, module.val_dataset, module.test_dataset):
        index = {s.image_path: i for i, s in enumerate(dataset.samples)}.get(damaged[key])
        if index is not None:
            with pytest.raises(BadInputError, match=str(damaged[key])):
                dataset[index]
    assert str(damaged[key]) in all_paths(module)


def test_mask_at_another_resolution_is_bad_even_with_the_same_shape(damaged, write_mask_file):
    write_mask_file(damaged["mask"], defect_rows=4, size=2 * SIZE)
    module = make_module(damaged["root"], on_bad_file="skip")
    assert dict(module.skipped)[str(damaged["mask"])].startswith("mask is 64x64") and module.n_skipped == 4


def test_missing_mask_is_skipped_under_skip_and_stops_only_the_test_split_under_error(damaged, write_image_file):
    damaged["mask"].unlink()
    module = make_module(damaged["root"], on_bad_file="skip")
    assert "No such file" in dict(module.skipped)[str(damaged["mask"])]
    assert str(damaged["root"] / "bottle/test/hole/001.png") not in all_paths(module)
    for key in ("png", "jpg", "zero"):
        write_image_file(damaged[key], seed=1)
    module = make_module(damaged["root"])
    assert len(module.train_dataset) > 0
    with pytest.raises(FileNotFoundError, match="001_mask.png"):
        module.test_dataloader()


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="on_bad_file"):
        MVTecAD(tmp_path, on_bad_file="ignore")

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ad_lightning.data.base import AnomalyDataset
from ad_lightning.data.images import BadInputError
from ad_lightning.data.mvtec import MVTecAD

SIZE = 32


class AnyCategoryMVTec(MVTecAD):
    """MVTec layout without a fixed category list: "all" means the directories under root."""

    CATEGORIES = ()


def make_module(root, category="bottle", **kwargs) -> MVTecAD:
    kwargs = {"image_size": SIZE, "train_batch_size": 4, "eval_batch_size": 3} | kwargs
    module = MVTecAD(root, category, **kwargs)
    module.setup("fit")
    return module


def paths(dataset: AnomalyDataset) -> set[str]:
    return {str(sample.image_path) for sample in dataset.samples}


@pytest.fixture
def bottle(tmp_path, make_mvtec_tree):
    return make_mvtec_tree(tmp_path, "bottle")


def test_split_sizes_labels_and_defects(bottle):
    module = make_module(bottle)
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (8, 2, 7)  # 10 normal: 2 held out (at least 2 whatever the fraction)
    test = module.test_dataset.samples
    assert sorted((s.defect, s.label) for s in test) == [("good", 0)] * 3 + [("hole", 1)] * 2 + [("scratch", 1)] * 2
    assert all(s.label == 0 and s.mask_path is None for s in module.train_dataset.samples + module.val_dataset.samples)
    assert {s.category for s in test} == {"bottle"}
    assert module.hparams["category"] == "bottle" and module.hparams["image_size"] == SIZE


@pytest.mark.parametrize("loader", ["train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"])
def test_batches_have_contract_shapes_and_dtypes(bottle, loader):
    batch = next(iter(getattr(make_module(bottle), loader)()))
    n = batch["image"].shape[0]
    assert n in (2, 3, 4)
    assert batch["image"].shape == (n, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (n, 1, SIZE, SIZE) and batch["mask"].dtype == torch.float32
    assert batch["label"].shape == (n,) and batch["label"].dtype == torch.int64
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert len(batch["path"]) == len(batch["category"]) == len(batch["defect"]) == n


def test_loaders_shuffle_only_train(bottle):
    module = make_module(bottle)
    sampler = module.train_dataloader().sampler  # a seeded permutation per epoch (resumable), not the global RNG
    assert isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.shuffle and sampler.num_replicas == 1
    first = list(sampler)
    assert sorted(first) == list(range(len(module.train_dataset))) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and list(make_module(bottle).train_dataloader().sampler) == first
    for loader in (module.val_dataloader(), module.test_dataloader(), module.predict_dataloader()):
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    assert module.train_dataloader().batch_size == 4 and module.test_dataloader().batch_size == 3
    assert not module.train_dataloader().persistent_workers
    assert make_module(bottle, num_workers=1).train_dataloader().persistent_workers


def test_dataloader_before_setup_says_so(bottle):
    with pytest.raises(RuntimeError, match="setup"):
        MVTecAD(bottle).train_dataloader()


def assert_masks_paired(dataset: AnomalyDataset) -> None:
    """The conftest saturates exactly the defect pixels of each image, so the right mask equals them."""
    for item in dataset:
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        defect_pixels = (item["image"].min(dim=0).values > 0.9).float()  # [3, H, W] -> [H, W]
        torch.testing.assert_close(item["mask"][0], defect_pixels, msg=item["path"])
        assert (item["label"] == 1) == (item["mask"].sum() > 0)


def test_masks_are_zero_for_normal_and_paired_by_stem(bottle, write_image_file, write_mask_file):
    # "000_1.png" sorts after "000.png", but "000_1_mask.png" sorts before "000_mask.png".
    write_image_file(bottle / "bottle/test/scratch/000_1.png", seed=7, defect_rows=5)
    write_mask_file(bottle / "bottle/ground_truth/scratch/000_1_mask.png", defect_rows=5)
    image_order = [p.stem for p in sorted((bottle / "bottle/test/scratch").iterdir())]
    mask_order = [p.stem.removesuffix("_mask") for p in sorted((bottle / "bottle/ground_truth/scratch").iterdir())]
    assert image_order != mask_order
    assert_masks_paired(make_module(bottle).test_dataset)


def test_mask_of_another_size_is_refused(bottle, write_mask_file):
    mask = bottle / "bottle/ground_truth/hole/001_mask.png"
    write_mask_file(mask, defect_rows=4, size=2 * SIZE)
    with pytest.raises(BadInputError, match="001_mask.png"):
        make_module(bottle).test_dataloader()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_images_become_rgb(tmp_path, make_mvtec_tree, mode):
    module = make_module(make_mvtec_tree(tmp_path, "bottle", mode=mode))
    batch = next(iter(module.test_dataloader()))
    assert batch["image"].shape[1] == 3
    assert_masks_paired(module.test_dataset)


def test_class_id_masks_binarise(tmp_path, make_mvtec_tree):
    module = make_module(make_mvtec_tree(tmp_path, "bottle", mask_value=2))
    assert_masks_paired(module.test_dataset)


def test_splits_are_disjoint_and_cover_train_good(bottle):
    module = make_module(bottle, val_fraction=0.3)
    train, val, test = paths(module.train_dataset), paths(module.val_dataset), paths(module.test_dataset)
    assert len(val) == 3
    assert not (train & val or train & test or val & test)
    assert train | val == {str(p) for p in (bottle / "bottle/train/good").iterdir()}


def test_same_seed_same_split_whatever_the_global_rng(bottle):
    torch.manual_seed(1)
    np.random.seed(1)
    first = paths(make_module(bottle, val_fraction=0.5).val_dataset)
    torch.manual_seed(2)
    np.random.seed(2)
    assert paths(make_module(bottle, val_fraction=0.5).val_dataset) == first
    assert paths(make_module(bottle, val_fraction=0.5, seed=1).val_dataset) != first


@pytest.mark.slow
def test_same_split_in_another_process(bottle):
    code = (
        "import sys; from ad_lightning.data.mvtec import MVTecAD\n"
        "m = MVTecAD(sys.argv[1], val_fraction=0.5); m.setup()\n"
        "print(sorted(str(s.image_path) for s in m.val_dataset.samples))"
    )
    env = os.environ | {"PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, str(bottle)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(paths(make_module(bottle, val_fraction=0.5).val_dataset)))


def test_split_of_a_category_does_not_depend_on_the_others(tmp_path, make_mvtec_tree):
    for category in ("bottle", "cable"):
        make_mvtec_tree(tmp_path, category)
    alone = paths(make_module(tmp_path, "cable", val_fraction=0.5).val_dataset)
    together = paths(make_module(tmp_path, ["bottle", "cable"], val_fraction=0.5).val_dataset)
    assert alone < together


def test_setup_is_idempotent(bottle):
    module = make_module(bottle)
    datasets = (module.train_dataset, module.val_dataset, module.test_dataset)
    module.setup("test")
    assert (module.train_dataset, module.val_dataset, module.test_dataset) == datasets


@pytest.mark.parametrize("category", [["bottle", "zipper"], "bottle,zipper"])
def test_two_categories(tmp_path, make_mvtec_tree, category):
    for name in ("bottle", "zipper", "screw"):
        make_mvtec_tree(tmp_path, name)
    module = make_module(tmp_path, category)
    assert module.categories == ["bottle", "zipper"]
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (16, 4, 14)
    assert {s.category for s in module.test_dataset.samples} == {"bottle", "zipper"}


def test_all_means_the_fifteen_categories(tmp_path, make_mvtec_tree):
    for name in MVTecAD.CATEGORIES:
        make_mvtec_tree(tmp_path, name, n_train=4, n_test_good=1, defects={"crack": 1})
    module = make_module(tmp_path, "all")
    assert len(module.categories) == 15
    assert {s.category for s in module.test_dataset.samples} == set(MVTecAD.CATEGORIES)
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (30, 30, 30)


def test_all_without_category_list_means_the_directories_under_root(tmp_path, make_mvtec_tree):
    for name in ("widget", "gadget"):
        make_mvtec_tree(tmp_path, name)
    (tmp_path / ".cache").mkdir()
    (tmp_path / "readme.txt").write_text("not a category")
    module = AnyCategoryMVTec(tmp_path, "all", image_size=SIZE)
    module.setup()
    assert module.categories == ["gadget", "widget"]
    assert len(module.test_dataset) == 14


# --- bad input -------------------------------------------------------------------------------


def test_missing_root_names_it_and_how_to_get_the_data(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        make_module(root)
    message = str(info.value)
    assert str(root) in message and "--data.root" in message and "https://www.mvtec.com" in message


def test_unknown_category_lists_the_folders_under_the_root(bottle, make_mvtec_tree):
    make_mvtec_tree(bottle, "widget")
    with pytest.raises(BadInputError, match="bottel") as info:
        make_module(bottle, "bottel")
    assert "bottle, widget" in str(info.value) and "zipper" not in str(info.value)


def test_missing_category_directory_is_named(bottle):
    with pytest.raises(BadInputError, match="cable") as info:
        make_module(bottle, "cable")
    assert "download MVTec-AD" in str(info.value)


def test_empty_train_good_is_named(bottle):
    train_good = bottle / "bottle/train/good"
    for path in train_good.iterdir():
        path.unlink()
    with pytest.raises(BadInputError) as info:
        make_module(bottle)
    assert str(train_good) in str(info.value)


def test_no_test_images_names_the_test_directory(tmp_path, make_mvtec_tree):
    root = make_mvtec_tree(tmp_path, "bottle", n_test_good=0, defects={})
    (root / "bottle/test/good").mkdir(parents=True)
    with pytest.raises(BadInputError) as info:
        make_module(root)
    assert str(root / "bottle/test") in str(info.value)


def test_too_few_normal_images_to_hold_out_validation(tmp_path, make_mvtec_tree):
    with pytest.raises(BadInputError, match="val_fraction"):
        make_module(make_mvtec_tree(tmp_path, "bottle", n_train=1))


@pytest.mark.parametrize("bad", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"image_size": 0}])
def test_bad_settings_are_refused(tmp_path, bad):
    with pytest.raises(BadInputError, match=next(iter(bad))):
        MVTecAD(tmp_path, **bad)


@pytest.mark.parametrize("relative", ["bottle/train/good/003.png", "bottle/test/scratch/001.png"])
def test_unreadable_image_is_named_when_read(bottle, relative):
    path = bottle / relative
    path.write_bytes(path.read_bytes()[:60] if "test" in relative else b"")
    module = make_module(bottle, val_fraction=0.5)
    dataset = next(d for d in (module.train_dataset, module.val_dataset, module.test_dataset) if str(path) in paths(d))
    index = [str(s.image_path) for s in dataset.samples].index(str(path))
    with pytest.raises(BadInputError) as info:
        dataset[index]
    assert str(path) in str(info.value)


def test_anomalous_image_without_mask_fails_before_testing(bottle):
    mask = bottle / "bottle/ground_truth/hole/001_mask.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError) as info:
        make_module(bottle).test_dataloader()
    assert str(bottle / "bottle/test/hole/001.png") in str(info.value) and str(mask) in str(info.value)


def test_missing_test_directory_is_named(bottle):
    test_dir = bottle / "bottle/test"
    shutil.rmtree(test_dir)
    with pytest.raises(FileNotFoundError) as info:
        make_module(bottle)
    assert str(test_dir) in str(info.value)

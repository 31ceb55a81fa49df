import numpy as np
import pytest
import torch
from PIL import Image

from ad_lightning.data.base import AnomalyDataset
from ad_lightning.data.folder import Folder
from ad_lightning.data.images import BadInputError

SIZE = 32


@pytest.fixture
def folder_root(tmp_path, write_image_file, write_mask_file):
    """10 normal, 3 anomalous (masks `<stem>.png` for 0, 1 and `<stem>_mask.png` for 2), 2 extra normal test images."""
    for i in range(10):
        write_image_file(tmp_path / "normal" / f"n{i:02d}.png", seed=i)
    for i in range(3):
        write_image_file(tmp_path / "crack" / f"a{i}.jpg", seed=100 + i, defect_rows=i + 1)
        write_mask_file(tmp_path / "masks" / (f"a{i}.png" if i < 2 else f"a{i}_mask.png"), defect_rows=i + 1)
    for i in range(2):
        write_image_file(tmp_path / "normal_test" / f"t{i}.png", seed=50 + i)
    return tmp_path


def make_module(root, **kwargs) -> Folder:
    module = Folder(root=root, **({"normal_dir": "normal", "abnormal_dir": "crack", "image_size": SIZE} | kwargs))
    module.setup()
    return module


def paths(dataset) -> set:
    return {s.image_path for s in dataset.samples}


def test_without_masks_or_normal_test_dir_a_seeded_normal_share_is_tested(folder_root):
    module = make_module(folder_root)
    assert not module.has_masks
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (6, 2, 5)
    train, val, test = paths(module.train_dataset), paths(module.val_dataset), paths(module.test_dataset)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set((folder_root / "normal").iterdir()) | set((folder_root / "crack").iterdir())
    anomalous = [(s.label, s.mask_path, s.defect) for s in module.test_dataset.samples if s.label]
    assert anomalous == [(1, None, "crack")] * 3
    assert {s.category for s in module.test_dataset.samples} == {"folder"} and module.categories == ["folder"]
    assert paths(make_module(folder_root).test_dataset) == test
    assert paths(make_module(folder_root, seed=3).test_dataset) != test


def test_masks_paired_by_stem_in_both_spellings(folder_root):
    module = make_module(folder_root, mask_dir="masks", name="parts")
    assert module.has_masks and module.categories == ["parts"]
    anomalous = [s for s in module.test_dataset.samples if s.label]
    assert [s.mask_path.name for s in anomalous] == ["a0.png", "a1.png", "a2_mask.png"]
    for item in module.test_dataset:  # JPEG blurs the saturated rows, so count the mask's rows instead
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        expected_rows = int(item["path"][-5]) + 1 if item["label"] else 0  # ".../a<i>.jpg" marks i + 1 rows
        full_rows = (item["mask"][0].sum(dim=1) == SIZE).tolist()  # [H, W] -> [H]
        assert full_rows == [True] * expected_rows + [False] * (SIZE - expected_rows)


def test_normal_test_dir_keeps_all_of_normal_dir_for_training(folder_root):
    module = make_module(folder_root, normal_test_dir="normal_test", mask_dir="masks")
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (8, 2, 5)
    assert paths(module.train_dataset) | paths(module.val_dataset) == set((folder_root / "normal").iterdir())


def test_absolute_directories_and_missing_mask(folder_root):
    (folder_root / "masks/a1.png").unlink()
    with pytest.raises(FileNotFoundError, match="a1.png"):
        make_module(folder_root, normal_dir=folder_root / "normal", mask_dir=folder_root / "masks").test_dataloader()


@pytest.mark.parametrize("bad", [{"normal_test_fraction": 0.0}, {"normal_test_fraction": 1.0}])
def test_bad_fraction_is_refused(folder_root, bad):
    with pytest.raises(BadInputError, match="normal_test_fraction"):
        make_module(folder_root, **bad)


def test_too_few_normal_images_names_the_setting(folder_root):
    with pytest.raises(BadInputError, match="normal_test_fraction"):
        make_module(folder_root, normal_dir="normal_test", normal_test_fraction=0.9)


def test_missing_directory_is_named(folder_root):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_module(folder_root, abnormal_dir="nowhere")


def test_every_format_and_mode_loads_as_rgb_and_hidden_files_are_ignored(tmp_path, write_image_file, write_mask_file):
    modes = {"rgb.png": "RGB", "gray.jpg": "L", "rgb.bmp": "RGB", "rgba.tif": "RGBA", "gray.tiff": "L"}
    for name, mode in modes.items():
        write_image_file(tmp_path / "normal" / name, seed=len(name), mode=mode)
    write_image_file(tmp_path / "normal" / ".hidden.png", seed=0)
    Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16)).save(tmp_path / "normal" / "deep16.tif")
    (tmp_path / "bad").mkdir()
    Image.fromarray(np.full((SIZE, SIZE), 65535, dtype=np.uint16)).save(tmp_path / "bad" / "deep16.png")
    write_mask_file(tmp_path / "masks" / "deep16_mask.png", defect_rows=4, value=2)  # class id 2
    module = make_module(tmp_path, abnormal_dir="bad", mask_dir="masks", normal_test_fraction=1 / 6)
    everything = module.train_dataset.samples + module.val_dataset.samples + module.test_dataset.samples
    names = ["rgb.png", "gray.jpg", "rgb.bmp", "rgba.tif", "gray.tiff", "deep16.tif", "deep16.png"]
    assert sorted(s.image_path.name for s in everything) == sorted(names)
    items = {s.image_path.name: AnomalyDataset([s], SIZE)[0] for s in everything}
    assert all(item["image"].shape == (3, SIZE, SIZE) for item in items.values())
    torch.testing.assert_close(items["deep16.tif"]["image"], torch.full((3, SIZE, SIZE), 32768 / 65535))
    assert torch.equal(items["deep16.png"]["image"], torch.ones(3, SIZE, SIZE))
    assert items["deep16.png"]["mask"][0].sum(dim=1).tolist() == [SIZE] * 4 + [0.0] * (SIZE - 4)  # class id -> 1

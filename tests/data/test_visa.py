import csv

import pytest
import torch

from ad_lightning.data.images import BadInputError
from ad_lightning.data.visa import VisA

SIZE = 32


@pytest.fixture
def visa_root(tmp_path, write_image_file, write_mask_file):
    """Raw VisA layout for candle (6 normal train, 2 normal test, 3 anomalies) and pcb1; masks hold class ids."""
    rows = []
    for category in ("candle", "pcb1"):
        images = tmp_path / category / "Data" / "Images"
        for i in range(8):
            path = images / "Normal" / f"{i:04d}.JPG"
            write_image_file(path, seed=i)
            rows.append([category, "train" if i < 6 else "test", "normal", str(path.relative_to(tmp_path)), ""])
        for i in range(3):
            image = images / "Anomaly" / f"{i:03d}.JPG"
            mask = tmp_path / category / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png"
            write_image_file(image, seed=100 + i, defect_rows=i + 1)
            write_mask_file(mask, defect_rows=i + 1, value=i + 1)  # class ids 1, 2, 3
            relative = [str(image.relative_to(tmp_path)), str(mask.relative_to(tmp_path))]
            rows.append([category, "test", "anomaly", *relative])
    write_split_csv(tmp_path, rows)
    return tmp_path


def write_split_csv(root, rows):
    (root / "split_csv").mkdir(exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["object", "split", "label", "image", "mask"], *rows])


def make_module(root, category="candle", **kwargs) -> VisA:
    module = VisA(root, category, image_size=SIZE, val_fraction=1 / 3, **kwargs)
    module.setup()
    return module


def test_csv_split_counts_labels_and_masks(visa_root):
    module = make_module(visa_root)
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (4, 2, 5)
    assert module.has_masks
    test = module.test_dataset.samples
    assert sorted(s.label for s in test) == [0, 0, 1, 1, 1]
    assert all(s.category == "candle" for s in test)
    for sample in test:
        if sample.label:
            assert sample.mask_path == visa_root / "candle/Data/Masks/Anomaly" / f"{sample.image_path.stem}.png"
        else:
            assert sample.mask_path is None
    train = {s.image_path for s in module.train_dataset.samples + module.val_dataset.samples}
    assert train == {visa_root / "candle/Data/Images/Normal" / f"{i:04d}.JPG" for i in range(6)}
    assert not train & {s.image_path for s in test}


def test_class_id_masks_binarise_and_match_the_defect_rows(visa_root):
    for item in make_module(visa_root).test_dataset:
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        rows = int(item["mask"][0].sum().item()) // SIZE
        assert rows == (int(item["path"][-7:-4]) + 1 if item["label"] else 0)


def test_two_categories_read_in_place(visa_root):
    module = make_module(visa_root, "candle,pcb1")
    assert len(module.test_dataset) == 10
    assert {s.category for s in module.test_dataset.samples} == {"candle", "pcb1"}
    assert sorted(p.name for p in visa_root.iterdir()) == ["candle", "pcb1", "split_csv"]  # nothing copied


@pytest.mark.parametrize("escape", ["../outside.JPG", "/etc/passwd", "candle/../../outside.JPG"])
@pytest.mark.parametrize("column", ["image", "mask"])
def test_paths_leaving_the_root_are_refused(visa_root, escape, column):
    mask = "candle/Data/Masks/Anomaly/000.png"
    paths = {"image": [escape, mask], "mask": ["candle/x.JPG", escape]}[column]
    write_split_csv(visa_root, [["candle", "test", "anomaly", *paths]])
    with pytest.raises(BadInputError) as info:
        make_module(visa_root)
    message = str(info.value)
    assert "row 2 of" in message and escape in message and "outside the data root" in message


def test_missing_csv_says_how_to_get_visa(tmp_path):
    (tmp_path / "candle").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        make_module(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "split_csv" / "1cls.csv") in message
    assert "spot-diff" in message and "VisA_20220922.tar" in message


def test_bad_rows_are_named(visa_root):
    write_split_csv(visa_root, [["candle", "test", "broken", "candle/x.JPG", ""]])
    with pytest.raises(BadInputError, match="row 2 of .*'broken'"):
        make_module(visa_root)
    write_split_csv(visa_root, [["candle", "test", "anomaly", "candle/x.JPG", ""]])
    with pytest.raises(BadInputError, match="row 2 of .*without a mask"):
        make_module(visa_root)


def test_missing_mask_of_an_anomaly_fails_before_testing(visa_root):
    mask = visa_root / "candle/Data/Masks/Anomaly/001.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=str(mask)):
        make_module(visa_root).test_dataloader()


def test_batches_are_images_and_masks(visa_root):
    batch = next(iter(make_module(visa_root).test_dataloader()))
    assert batch["image"].shape == (5, 3, SIZE, SIZE) and batch["mask"].shape == (5, 1, SIZE, SIZE)
    assert batch["label"].dtype == torch.int64

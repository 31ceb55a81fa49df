"""`predict` on new images: one tiny fit per module, then folders, globs and bad input (seconds, CPU)."""

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_mvtec_tree, write_image
from matplotlib import colormaps
from PIL import Image

from ad_lightning.cli import main
from ad_lightning.data.images import BadInputError
from ad_lightning.errors import UsageError
from ad_lightning.predict import COLUMNS, OverlayWriter, overlay_names
from ad_lightning.rendering import OVERLAY_ALPHA, side_by_side_overlay

pytestmark = pytest.mark.usefixtures("raw_errors")  # input errors raised, not printed

IMAGE_SIZE = 64  # the training size; predict must take it from the checkpoint
HEADS = "likelihood,irf,irf_bank,ensemble"  # irf's Gaussian per position cannot score other sizes; the ensemble needs it


def fit(root: Path, *data_args: str) -> Path:
    """Train for one epoch with logs under `root/runs`; returns that directory."""
    logs = ["--trainer.logger.init_args.save_dir", str(root / "runs"), "--trainer.default_root_dir", str(root / "runs")]
    main(["fit", *data_args, "--data.train_batch_size", "8", "--model.denoiser", "tiny", "--trainer.max_epochs", "1", *logs])
    return root / "runs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    build_mvtec_tree(root / "data", n_train=20, n_test_good=2)
    data = ["--data", "MVTecAD", "--data.root", str(root / "data"), "--data.category", "widget"]
    return fit(root, *data, "--data.image_size", str(IMAGE_SIZE), "--model.heads", HEADS)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Mixed PNG/JPG/BMP images, two pairs sharing a stem, one corrupt PNG; 40 x 40, not the training size."""
    images = tmp_path / "photos"
    for i, name in enumerate(["a.png", "a.jpg", "b.bmp", "sub/a.png", "sub/c.jpeg"]):
        write_image(images / name, seed=i, defect_rows=8 * (i % 2), size=40)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (images / "notes.txt").write_text("not an image: ignored")
    return images


def predict(*args: str, head: str = "likelihood") -> int:
    with pytest.raises(SystemExit) as info:
        main(["predict", "--head", head, *args])
    return info.value.code


def read_rows(out: Path) -> list[dict]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def test_folder_scores_every_readable_image_and_reports_the_corrupt_one(runs, folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = predict("--ckpt_path", str(runs), "--data.path", str(folder), "--out", str(out), "--batch_size", "2")
    assert code == 1  # one image failed; the others are still scored
    rows = read_rows(out)
    names = ["a.jpg", "a.png", "b.bmp", "broken.png", "sub/a.png", "sub/c.jpeg"]
    assert list(rows[0]) == list(COLUMNS) and [r["path"] for r in rows] == [str(folder / n) for n in names]
    good = [r for r in rows if r["path"] != str(folder / "broken.png")]
    for row in good:
        score = float(row["score"])
        assert math.isfinite(score) and row["error"] == ""
        assert row["decision"] in ("anomalous", "normal")
    broken = rows[3]
    assert broken["score"] == broken["decision"] == broken["overlay"] == "" and "cannot read image" in broken["error"]

    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 5 and sorted(Path(r["overlay"]) for r in good) == overlays
    for path in overlays:  # side by side at the checkpoint's image size
        assert Image.open(path).size == (2 * IMAGE_SIZE, IMAGE_SIZE)
    printed = capsys.readouterr().out
    assert str(out / "predictions.csv") in printed and str(out / "overlays") in printed and "1 of 6" in printed
    assert "the head's normal-validation range" in printed  # map_low / map_high from the checkpoint


def test_decisions_flag_exactly_the_images_scoring_at_or_above_the_threshold(runs, folder, tmp_path):
    """The checkpoint's threshold set to the third-highest of the five scores: the top three images, the one
    scoring exactly the threshold included, are anomalous, the other two normal."""
    assert predict("--ckpt_path", str(runs), "--data.path", str(folder), "--out", str(tmp_path / "first")) == 1
    scored = sorted((float(r["score"]), r["path"]) for r in read_rows(tmp_path / "first") if r["score"])
    assert len({score for score, _ in scored}) == 5
    checkpoint = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    checkpoint["state_dict"]["heads.likelihood.threshold"].fill_(scored[2][0])  # a float32 score, exactly
    torch.save(checkpoint, tmp_path / "third.ckpt")
    out = tmp_path / "second"
    assert predict("--ckpt_path", str(tmp_path / "third.ckpt"), "--data.path", str(folder), "--out", str(out)) == 1
    decisions = {row["path"]: row["decision"] for row in read_rows(out) if row["score"]}
    assert decisions == {path: "anomalous" if rank >= 2 else "normal" for rank, (_, path) in enumerate(scored)}


def test_glob_selects_images_and_image_size_overrides(runs, folder, tmp_path):
    """Only the asked head scores: irf, fitted per position at 64 x 64, would refuse 128 x 128."""
    out = tmp_path / "out"
    code = predict("--ckpt_path", str(runs), "--data.path", str(folder / "**" / "*.jp*g"), "--out", str(out),
                   "--image_size", "128")  # fmt: skip
    assert code == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(folder / "a.jpg"), str(folder / "sub" / "c.jpeg")]
    assert all(Image.open(r["overlay"]).size == (256, 128) for r in rows)


def test_ensemble_head_scores_with_its_members(runs, folder, tmp_path):
    out = tmp_path / "out"
    code = predict("--ckpt_path", str(runs), "--data.path", str(folder / "a.*"), "--out", str(out), head="ensemble")
    assert code == 0
    rows = read_rows(out)
    assert len(rows) == 2 and all(math.isfinite(float(r["score"])) and Path(r["overlay"]).is_file() for r in rows)


def test_unknown_head_lists_the_available_ones(runs, folder):
    with pytest.raises(UsageError, match=r"unknown head 'radar'.*one of: likelihood, irf, irf_bank, ensemble$"):
        main(["predict", "--ckpt_path", str(runs), "--data.path", str(folder), "--head", "radar"])


def test_unfitted_threshold_is_refused(runs, folder, tmp_path):
    checkpoint = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    checkpoint["state_dict"]["heads.likelihood.threshold"].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "unfitted.ckpt")
    with pytest.raises(BadInputError, match="head 'likelihood' .* has no fitted threshold"):
        predict("--ckpt_path", str(tmp_path / "unfitted.ckpt"), "--data.path", str(folder))


@pytest.mark.parametrize("spec", ["empty_dir", "empty_dir/*.png"])
def test_no_images_names_the_path(runs, tmp_path, spec):
    (tmp_path / "empty_dir").mkdir()
    path = str(tmp_path / spec)
    with pytest.raises(FileNotFoundError, match=f"no images .* at --data.path {re.escape(repr(path))}"):
        main(["predict", "--ckpt_path", str(runs), "--data.path", path, "--head", "likelihood"])


def test_a_path_that_does_not_exist_is_named_as_such(runs, tmp_path):
    path = str(tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match=f"--data.path {re.escape(repr(path))} does not exist"):
        main(["predict", "--ckpt_path", str(runs), "--data.path", path, "--head", "likelihood"])


def test_tiled_model_scores_native_images_tile_by_tile(tmp_path):
    part = tmp_path / "prints" / "bracket"
    for i in range(10):
        write_image(part / "train/good" / f"{i}.png", seed=i, size=96)
    write_image(part / "test/good/0.png", seed=50, size=96)
    data = ["--data", "Printed3D", "--data.root", str(tmp_path / "prints"), "--data.image_size", "64",
            "--data.tile_size", "64", "--data.tile_overlap", "32"]  # fmt: skip
    runs = fit(tmp_path, *data, "--model.heads", "likelihood")
    new = tmp_path / "new" / "part.png"
    write_image(new, seed=7, size=96)
    Image.open(new).crop((0, 0, 96, 80)).save(new)  # 96 x 80: neither square nor a multiple of the stride
    out = tmp_path / "out"
    assert predict("--ckpt_path", str(runs), "--data.path", str(tmp_path / "new"), "--out", str(out)) == 0
    (row,) = read_rows(out)
    assert math.isfinite(float(row["score"])) and Image.open(row["overlay"]).size == (2 * 96, 80)


def test_overlay_names_are_unique_and_keep_the_extension(tmp_path):
    paths = [tmp_path / p for p in ["a.png", "a.jpg", "d1/a.png", "d2/a.png", "d1__a.png"]]
    names = overlay_names(paths)
    assert names == ["a.png.png", "a.jpg.png", "d1__a.png.png", "d2__a.png.png", "d1__a.png-1.png"]


def test_overlay_blends_the_colour_map_on_a_fixed_range():
    image = torch.full((3, 2, 2), 0.2)
    amap = torch.tensor([[0.0, 1.5], [2.0, 9.0]])  # below, inside, at the top of and above the range [1, 2]
    pixels = np.asarray(side_by_side_overlay(image, amap, 1.0, 2.0, "jet"), dtype=np.float64)
    assert pixels.shape == (2, 4, 3) and np.all(pixels[:, :2] == round(0.2 * 255))  # left: the image
    jet = colormaps["jet"]([0.0, 0.5, 1.0, 1.0])[:, :3] * 255  # levels clipped to [0, 1]
    expected = (1 - OVERLAY_ALPHA) * 0.2 * 255 + OVERLAY_ALPHA * jet
    np.testing.assert_allclose(pixels[:, 2:].reshape(4, 3), expected, atol=0.5)


def test_overlay_writer_without_a_stored_range_uses_min_max_over_all_maps(tmp_path):
    writer = OverlayWriter(tmp_path / "overlays", None, "jet")
    image = torch.zeros(3, 2, 2)
    writer.add(tmp_path / "overlays" / "x.png", image, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    writer.add(tmp_path / "overlays" / "y.png", image, torch.tensor([[-1.0, 0.0], [0.0, 0.5]]))
    assert not any((tmp_path / "overlays").iterdir())  # held until the range is known
    assert writer.close() == (-1.0, 4.0)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["x.png", "y.png"]

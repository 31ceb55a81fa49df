"""The heads are fitted and score on features and denoiser outputs computed the same way: in float32,
whatever the Trainer's precision (bf16-mixed speeds up the training steps only)."""

import csv

import pytest
from conftest import TINY_WIDGET

from ad_lightning.cli import main

TINY = [*TINY_WIDGET, "--model.heads", "likelihood,irf,radar", "--model.latency_images", "0"]


def scores(run) -> dict[str, dict[str, float]]:
    with (run / "scores.csv").open() as f:
        return {row.pop("path"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def test_fitted_in_one_precision_scored_in_another_agree_to_float32(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)
    data = [*TINY, "--data.root", str(root)]
    main(["fit", *data, "--trainer.max_epochs", "2", "--trainer.precision", "bf16-mixed"])  # heads fitted in fp32
    ckpt = str(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
    main(["test", *data, "--ckpt_path", ckpt, "--trainer.precision", "32"])
    main(["test", *data, "--ckpt_path", ckpt, "--trainer.precision", "bf16-mixed"])
    full, mixed = scores(tmp_path / "runs" / "version_1"), scores(tmp_path / "runs" / "version_2")
    assert full.keys() == mixed.keys() and len(full) == 8
    for path, row in full.items():
        for column, value in row.items():  # bf16 networks would move these by ~1e-2 relative
            assert mixed[path][column] == pytest.approx(value, rel=1e-5, abs=1e-6), (path, column)

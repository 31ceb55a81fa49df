"""Smoke tests of the entry points on a tiny MVTec-layout tree (seconds, CPU)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_WIDGET

from ad_lightning.cli import main, resolve_checkpoint
from ad_lightning.lit import FeatureDDPM

TINY = [*TINY_WIDGET, "--model.heads", "likelihood"]  # the default runs every head; tests that need them say so


@pytest.fixture
def tree(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ is written relative to the working directory
    return make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)


def run(subcommand, root, *extra):
    main([subcommand, *TINY, "--data.root", str(root), *extra])


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_fit_fast_dev_run(tree, precision, monkeypatch):
    """One training step, then the heads fitted. The denoiser's output layer starts at zero, so that step's
    loss is E ||eps||^2 = 1 (8 images x 152 x 4 x 4 noise values: within 0.05), in either precision."""
    losses, fitted = [], []
    step, fit_heads = FeatureDDPM.training_step, FeatureDDPM.fit_heads

    def recorded_step(self, *args):
        losses.append(step(self, *args))
        return losses[-1]

    def recorded_fit(self, *args, **kwargs):
        fitted.append(self)
        return fit_heads(self, *args, **kwargs)

    monkeypatch.setattr(FeatureDDPM, "training_step", recorded_step)
    monkeypatch.setattr(FeatureDDPM, "fit_heads", recorded_fit)
    run("fit", tree, "--trainer.fast_dev_run", "true", "--trainer.precision", precision)
    assert len(losses) == 1 and float(losses[0]) == pytest.approx(1.0, abs=0.05)
    (model,) = fitted
    assert model.global_step == 1 and math.isfinite(float(model.heads["likelihood"].threshold))


def test_fit_runs_without_a_logger(tree, tmp_path):
    """`--trainer.logger false` trains and checkpoints (the learning rate is logged by the model, which
    a Trainer without a logger accepts; LearningRateMonitor refused it)."""
    run("fit", tree, "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.default_root_dir", "nolog")
    assert (tmp_path / "nolog" / "checkpoints" / "last.ckpt").is_file()


def test_fit_then_test_writes_report(tree, tmp_path):
    run("fit", tree, "--trainer.max_epochs", "2")
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    assert bool(state["heads.likelihood.norms.nll.fitted"]) and bool(state["feature_norm.fitted"])
    assert torch.isfinite(state["heads.likelihood.threshold"])  # fitted on the normal validation split
    assert any(k.startswith("ema.module.") for k in state)

    run("test", tree, "--ckpt_path", "runs")  # a directory resolves to its newest checkpoint
    out = tmp_path / "runs" / "version_1"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test_images"] == 8 and metrics["n_anomalous"] == 4
    head = metrics["heads"]["likelihood"]
    assert head["nfe"] == 3 and 0.0 <= head["image_auroc"] <= 1.0 and 0.0 <= head["pixel_auroc"] <= 1.0
    for metric in ("image_ap", "image_f1max", "pixel_ap", "pixel_f1max", "aupro", "accuracy", "precision", "f1"):
        assert 0.0 <= head[metric] <= 1.0, metric
    assert set(metrics["heads"]) == {"likelihood", "likelihood_nll", "likelihood_sp"}
    timing = metrics["timing"]  # batch 1 over the 8 test images after 3 warm-up ones, split by stage
    by_stage = timing["batch1_by_stage"]["likelihood"]
    assert {stage: s["n"] for stage, s in by_stage.items()} == {"backbone": 5, "likelihood": 5}
    median = {stage: s["median_ms"] for stage, s in by_stage.items()}
    assert head["ms_per_image"] == pytest.approx(median["backbone"] + median["likelihood"])
    assert timing["peak_memory_mb"] > 0
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and list(rows[0])[:3] == ["path", "label", "likelihood"]
    assert sum(int(r["label"]) for r in rows) == 4


def test_training_reads_cached_features_not_images(tree, monkeypatch):
    """After the one feature pass, training batches carry features: images are never read again."""
    from ad_lightning.data import base

    seen = []
    original = base.AnomalyDataset.__getitem__
    monkeypatch.setattr(base.AnomalyDataset, "__getitem__", lambda self, i: seen.append(i) or original(self, i))
    run("fit", tree, "--trainer.max_epochs", "3")
    n_train_and_val = 20
    assert len(seen) == n_train_and_val


def test_print_config_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    out = capsys.readouterr().out
    assert "ad_lightning.data.Demo" in out and "denoiser: small" in out


def test_checkpoint_directory_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="some/file.ckpt does not exist"):
        resolve_checkpoint("some/file.ckpt")


@pytest.mark.parametrize("config", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(config, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert "class_path" in capsys.readouterr().out


def test_download_is_dispatched_to_the_downloader(capsys):
    with pytest.raises(SystemExit) as info:
        main(["download", "--help"])
    assert info.value.code == 0 and "sha256" in capsys.readouterr().out


def test_tiled_printed3d_fit_and_test_scores_native_images(tmp_path, write_image_file, write_mask_file, monkeypatch):
    """Large images: trained on tiles, scored tile by tile, reported at the evaluation resolution."""
    monkeypatch.chdir(tmp_path)
    part = tmp_path / "prints" / "bracket"
    for i in range(10):
        write_image_file(part / "train/good" / f"{i}.png", seed=i, size=96)
    write_image_file(part / "test/good/0.png", seed=50, size=96)
    for i in range(2):
        write_image_file(part / "test/warp" / f"{i}.png", seed=60 + i, defect_rows=20 + i, size=96)
        write_mask_file(part / "ground_truth/warp" / f"{i}_mask.png", defect_rows=20 + i, size=96)
    data = ["--data", "Printed3D", "--data.root", str(tmp_path / "prints"), "--data.image_size", "64",
            "--data.tile_size", "64", "--data.tile_overlap", "32", "--data.train_batch_size", "8", "--model.denoiser", "tiny"]  # fmt: skip
    main(["fit", *data, "--trainer.max_epochs", "1"])
    main(["test", *data, "--ckpt_path", "runs"])
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    assert metrics["n_test_images"] == 3 and metrics["evaluation_resolution"] == [64, 64]
    assert metrics["pixel_metrics"] == "computed" and metrics["heads"]["likelihood"]["pixel_auroc"] is not None


def test_skip_policy_reports_bad_files_in_metrics(tree, tmp_path):
    bad = tree / "widget" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    run("fit", tree, "--trainer.max_epochs", "1", "--data.on_bad_file", "skip")
    run("test", tree, "--ckpt_path", "runs", "--data.on_bad_file", "skip")
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    assert metrics["n_skipped"] == 1 and metrics["skipped"][0]["path"] == str(bad)
    assert metrics["n_test_images"] == 7


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("MVTecAD", ["--data.category", "bottle"]),
        ("VisA", ["--data.category", "pcb1"]),
        ("MPDD", ["--data.category", "tubes"]),
        ("BTAD", ["--data.category", "03"]),
        ("Printed3D", ["--data.tile_size", "512"]),
        ("Folder", ["--data.normal_dir", "ok", "--data.abnormal_dir", "ng"]),
        ("Demo", []),
    ],
)
def test_datamodules_are_chosen_by_short_name(name, args, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data", name, "--data.root", "/data", *args, "--print_config"])
    assert f"class_path: ad_lightning.data.{name}" in capsys.readouterr().out


ALL_HEADS = "likelihood,irf,irf_bank,radar,reconstruction,iforest,lof,ocsvm,ensemble"
# the ensemble (irf + irf_bank) makes one call: both query the denoiser at the same t* and state
NFE = {"likelihood": 3, "irf": 1, "irf_bank": 1, "radar": 1, "reconstruction": 5, "iforest": 0, "lof": 0, "ocsvm": 0,
       "ensemble": 1}  # fmt: skip


def test_one_denoiser_serves_every_head_in_one_test_pass(tree, tmp_path):
    run("fit", tree, "--trainer.max_epochs", "2", "--model.heads", ALL_HEADS)
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    # the fitted states travel in the checkpoint: Gaussians, mean attention rows, detector points
    assert state["heads.irf.gaussian.precision"].shape == (16, 152, 152)
    assert any(k.startswith("heads.radar.mean_rows_") for k in state)
    assert state["heads.radar.forest.points"].shape[1] == 2 and state["heads.lof.detector.points"].shape[1] == 152
    assert not any(k.startswith("heads.ensemble.") and "denoiser" in k for k in state)

    run("test", tree, "--ckpt_path", str(ckpt), "--model.heads", ALL_HEADS)  # TINY's likelihood would win
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    heads = metrics["heads"]
    for name, nfe in NFE.items():
        assert heads[name]["nfe"] == nfe, name
        for metric in ("image_auroc", "accuracy", "precision", "recall", "f1"):
            assert 0.0 <= heads[name][metric] <= 1.0, (name, metric)
    for name in ("likelihood", "irf", "radar", "reconstruction", "ensemble"):
        assert 0.0 <= heads[name]["pixel_auroc"] <= 1.0, name
    for name in ("iforest", "lof", "ocsvm"):
        assert "pixel_auroc" not in heads[name]  # pooled features: no map
    for metric in ("pixel_accuracy", "pixel_precision", "pixel_recall", "pixel_f1"):
        assert 0.0 <= heads["radar"][metric] <= 1.0, metric
    assert {"irf_prior", "radar_l2", "radar_local_max", "ensemble_irf_bank"} <= set(heads)
    # batch 1: each head timed alone, its members with it
    latency = metrics["timing"]["batch1_by_stage"]
    assert set(latency) == set(NFE) and set(latency["irf"]) == {"backbone", "irf"}
    assert set(latency["ensemble"]) == {"backbone", "irf", "irf_bank", "ensemble"}
    by_stage = {stage: s["median_ms"] for stage, s in latency["ensemble"].items()}
    assert heads["ensemble"]["ms_per_image"] == pytest.approx(sum(by_stage.values()))

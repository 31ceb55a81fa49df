"""Kill a `fit` mid-epoch with SIGKILL, resume it from `last`: it finishes where an uninterrupted
run finishes, weight for weight (deterministic mode, CPU)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad_lightning.checkpoint import load_checkpoint

ARGS = ["--data", "MVTecAD", "--data.category", "widget", "--data.image_size", "64", "--data.train_batch_size", "8"]
ARGS += ["--model.denoiser", "tiny", "--model.heads", "likelihood,irf", "--trainer.deterministic", "true", "--trainer.max_epochs", "4"]
ARGS += ["--trainer.callbacks.every_n_steps", "1"]  # a checkpoint after every epoch, so the kill loses epoch 2 only
KILLER = ["--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.epoch", "2", "--trainer.callbacks.batch", "1"]


def fit(workdir: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "ad_lightning", "fit", *ARGS, "--data.root", str(root), *extra]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def final_state(workdir: Path, version: int) -> dict:
    return load_checkpoint(workdir / "runs" / f"version_{version}" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, make_mvtec_tree):
    root = make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)  # 18 training images: 3 batches
    (straight := tmp_path / "straight").mkdir()
    (crashed := tmp_path / "crashed").mkdir()
    assert fit(straight, root).returncode == 0

    killed = fit(crashed, root, *KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert final_state(crashed, 0)["global_step"] == 6  # the end of epoch 1, before the kill in epoch 2
    resumed = fit(crashed, root, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected, got = final_state(straight, 0), final_state(crashed, 1)
    assert got["global_step"] == expected["global_step"] == 12  # the step counter continued
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for key, value in expected["state_dict"].items():  # denoiser, EMA, feature statistics, fitted heads
        assert torch.equal(value, got["state_dict"][key]), key
    for a, b in zip(expected["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

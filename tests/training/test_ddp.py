"""DDP with two CPU processes (gloo): each rank encodes only its share of the images, the heads a DDP
`fit` stores equal the heads one process fits on the same weights, and a DDP `test` gives every image
the score a single-process `test` of the same checkpoint gives it.

Both tests score one image per batch with one thread per process. CPU kernels (oneDNN
convolutions, GEMM reductions) round differently at different batch sizes and thread counts, by
about 1e-6 relative in the backbone features, which DDIM inversion and the normalisers amplify to
about 2e-4 (batch 6 vs 32) and 3e-5 (1 vs 2 threads) relative in a likelihood score, in a single
process too; Lightning gives each DDP process cpu_count / devices threads. Equal batches and threads
isolate what DDP itself does: the sharding, the padded repeat, the gathering and the fitted state
every rank loads (measured: identical scores)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.data import MVTecAD
from ad_lightning.lit import FeatureDDPM

DATA = ["--data", "MVTecAD", "--data.category", "widget", "--data.image_size", "64", "--data.train_batch_size", "4"]
DATA += ["--data.eval_batch_size", "1"]
MODEL = ["--model.denoiser", "tiny", "--model.heads", "likelihood,irf,radar", "--model.latency_images", "0"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def cli(workdir: Path, *args: str) -> str:
    """Run the CLI in a subprocess (its DDP ranks write to the same pipes); returns what they printed."""
    command = [sys.executable, "-m", "ad_lightning", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def scores(run: Path) -> dict[str, dict[str, float]]:
    with (run / "scores.csv").open() as f:
        return {row.pop("path"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


@pytest.mark.slow
def test_ddp_fit_and_test_match_single_process_scores(tmp_path, make_mvtec_tree):
    root = make_mvtec_tree(tmp_path / "data", n_train=21, n_test_good=5, defects={"scratch": 3, "hole": 3})
    data = [*DATA, "--data.root", str(root)]
    printed = cli(tmp_path, "fit", *data, *MODEL, *DDP, "--trainer.max_epochs", "2")
    # 21 normal images: 19 train, 2 validation; each rank runs the backbone on every other image only
    for rank, (n_train, n_val) in enumerate([(10, 1), (9, 1)]):
        assert f"train features: rank {rank} of 2 encoded {n_train} of 19 images" in printed
        assert f"val features: rank {rank} of 2 encoded {n_val} of 2 images" in printed
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # the heads the two ranks fitted from their gathered features = one process fitting all images itself
    stored = load_checkpoint(ckpt)["state_dict"]
    single_fit = FeatureDDPM.from_checkpoint(str(ckpt))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_fit.fit_heads(MVTecAD(root, "widget", image_size=64, eval_batch_size=1))
    finally:
        torch.set_num_threads(threads)
    for key, value in single_fit.state_dict().items():
        if key.startswith("heads."):
            torch.testing.assert_close(stored[key], value, rtol=1e-5, atol=1e-6, msg=key)

    cli(tmp_path, "test", *data, *DDP, "--ckpt_path", str(ckpt))  # 11 images over 2 ranks: one padded repeat
    cli(tmp_path, "test", *data, "--trainer.devices", "1", "--ckpt_path", str(ckpt))
    ddp, single = scores(tmp_path / "runs" / "version_1"), scores(tmp_path / "runs" / "version_2")
    assert len(single) == 11 and ddp.keys() == single.keys()
    for path, row in single.items():
        assert row.keys() == ddp[path].keys()
        for column, value in row.items():
            assert ddp[path][column] == pytest.approx(value, abs=1e-6, rel=1e-6), (path, column)
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    assert metrics["n_test_images"] == 11 and metrics["repeated_images"]["count"] == 1

"""Two "nodes" of one device each, launched the way a cluster launches them (one process per node with
MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE; Lightning's own environment plugin), on this machine:
`fit` and `test` complete, with one report."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DATA = ["--data", "MVTecAD", "--data.category", "widget", "--data.image_size", "64", "--data.train_batch_size", "4"]
MODEL = ["--model.denoiser", "tiny", "--model.heads", "likelihood,irf", "--model.latency_images", "0", "--trainer.enable_progress_bar", "false"]
NODES = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_nodes(workdir: Path, *args: str) -> list[str]:
    """Run the CLI as node 0 and node 1 at once; returns what each printed (both must succeed)."""
    port = str(free_port())
    procs = []
    for node in (1, 0):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, "-m", "ad_lightning", *args]
        procs.append(subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    printed = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, printed):
        assert p.returncode == 0, out[-3000:]
    return printed


@pytest.mark.slow
def test_two_nodes_fit_and_test_with_one_report(tmp_path, make_mvtec_tree):
    root = make_mvtec_tree(tmp_path / "data", n_train=21, n_test_good=5, defects={"scratch": 3, "hole": 3})
    common = [*DATA, "--data.root", str(root), *MODEL, *NODES]
    node1, node0 = on_two_nodes(tmp_path, "fit", *common, "--trainer.max_epochs", "2")
    assert "train features: rank 0 of 2 encoded 10 of 19 images" in node0
    assert "train features: rank 1 of 2 encoded 9 of 19 images" in node1
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    on_two_nodes(tmp_path, "test", *common, "--ckpt_path", str(ckpt))
    reports = sorted((tmp_path / "runs").rglob("metrics.json"))
    assert [p.parent.name for p in reports] == ["version_1"]  # one report, written by global rank 0
    metrics = json.loads(reports[0].read_text())
    assert metrics["n_test_images"] == 11 and (reports[0].parent / "complete").is_file()
    assert 0.0 <= metrics["heads"]["irf"]["image_auroc"] <= 1.0

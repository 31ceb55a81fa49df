"""Safe checkpoints: weights-only loading refuses code, saves are atomic, a NaN loss stops cleanly."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad_lightning.checkpoint import SafeCheckpointIO, UnsafeCheckpointError, atomic_save, load_checkpoint
from ad_lightning.cli import main, resolve_checkpoint
from ad_lightning.lit import FeatureDDPM, NonFiniteLossError

pytestmark = pytest.mark.usefixtures("raw_errors")  # input errors raised, not printed

TINY = ["--data", "MVTecAD", "--data.category", "widget", "--data.image_size", "64", "--data.train_batch_size", "8",
        "--model.denoiser", "tiny"]  # fmt: skip
TINY += ["--model.heads", "likelihood"]


class RunsCode:
    """Unpickling this writes a file: the stand-in for a checkpoint that executes code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def tree(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)


def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {}, "payload": RunsCode(marker)}, path)
    return path, marker


def test_the_malicious_checkpoint_really_runs_code_without_weights_only(tmp_path):
    """Proves the payload of the refusal tests is live: an unsafe load executes it."""
    path, marker = malicious_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_checkpoint_with_code_is_refused_everywhere_and_the_code_does_not_run(tmp_path, tree):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {path}.*nothing from it was executed"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointIO().load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        resolve_checkpoint(str(tmp_path))  # a directory resolves to the newest *.ckpt, then it is checked
    with pytest.raises(UnsafeCheckpointError):
        main(["test", *TINY, "--data.root", str(tree), "--ckpt_path", str(path)])
    with pytest.raises(UnsafeCheckpointError):
        FeatureDDPM.from_checkpoint(path)  # what predict, ablate and export use
    assert not marker.exists()


def test_weights_only_false_is_refused(tmp_path):
    atomic_save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "a.ckpt", weights_only=False)


KILL_MID_SAVE = """
import os, signal, sys, torch
import ad_lightning.checkpoint as ckpt
real_save = torch.save
def half_then_die(obj, f):  # write part of the new checkpoint, then die as from SIGKILL
    f.write(b"PK" + b"x" * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
ckpt.torch.save = half_then_die
ckpt.atomic_save({"w": torch.full((4,), 2.0)}, sys.argv[1])
"""


def test_a_kill_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"w": torch.full((4,), 1.0)}, path)
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["w"], torch.full((4,), 1.0))
    assert len(list(tmp_path.glob(".last.ckpt.*.partial"))) == 1  # the killed writer's leftover
    atomic_save({"w": torch.full((4,), 3.0)}, path)  # the next save replaces the file and clears it
    assert torch.equal(load_checkpoint(path)["w"], torch.full((4,), 3.0))
    assert not list(tmp_path.glob(".*.partial"))


def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint_loads(tree, tmp_path, monkeypatch):
    main(["fit", *TINY, "--data.root", str(tree), "--trainer.max_epochs", "1"])  # 3 batches of 8: steps 0-2
    good = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    good_state = load_checkpoint(good)["state_dict"]
    real_loss = FeatureDDPM.diffusion_loss

    def nan_from_step_4(self, z0, generator=None):
        loss = real_loss(self, z0, generator)
        return loss * float("nan") if self.training and self.global_step >= 4 else loss

    monkeypatch.setattr(FeatureDDPM, "diffusion_loss", nan_from_step_4)
    with pytest.raises(NonFiniteLossError, match=r"global step 4 \(epoch 1, batch 1\).*Last good checkpoint: .*last.ckpt"):
        main(["fit", *TINY, "--data.root", str(tree), "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    monkeypatch.undo()
    assert load_checkpoint(good)["global_step"] == 3  # untouched by the failed run
    resumed = tmp_path / "runs" / "version_1" / "checkpoints" / "last.ckpt"
    assert not resumed.exists()  # nothing written after the NaN
    model = FeatureDDPM.load_from_checkpoint(good, weights_only=True)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good_state.items())


def test_fit_resumes_from_last_and_continues_the_step_counter(tree, tmp_path):
    main(["fit", *TINY, "--data.root", str(tree), "--trainer.max_epochs", "1"])
    assert resolve_checkpoint("last") == str(Path("runs") / "version_0" / "checkpoints" / "last.ckpt")
    main(["fit", *TINY, "--data.root", str(tree), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = load_checkpoint(tmp_path / "runs" / "version_1" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6  # 3 steps of the first run, then 3 more
    assert resumed["noise_seed"] == load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")["noise_seed"]


def test_last_without_any_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no last.ckpt under runs"):
        resolve_checkpoint("last")
    assert resolve_checkpoint("last", missing_last_ok=True) is None  # `fit --ckpt_path last` starts fresh


def test_unified_model_over_two_categories_is_evaluated_per_category(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_mvtec_tree(tmp_path / "data", "widget", n_train=12, n_test_good=3)
    make_mvtec_tree(root, "gadget", n_train=12, n_test_good=2, defects={"dent": 3})
    args = [*TINY, "--data.root", str(root), "--data.category", "widget,gadget"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    main(["test", *args, "--ckpt_path", "runs"])
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    assert {c: (m["n_test_images"], m["n_anomalous"]) for c, m in metrics["categories"].items()} == {
        "widget": (7, 4),
        "gadget": (5, 3),
    }
    per_category = [m["heads"]["likelihood"]["image_auroc"] for m in metrics["categories"].values()]
    assert metrics["heads"]["likelihood"]["image_auroc"] == pytest.approx(sum(per_category) / 2)

"""`RunCheckpoint`: a save at an epoch end once `every_n_steps` steps passed, and always when training ends."""

import pytest
import torch
from conftest import TINY_WIDGET

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import main

TINY = [*TINY_WIDGET, "--model.heads", "likelihood", "--model.latency_images", "0"]


@pytest.fixture
def saves(monkeypatch) -> list[int]:
    """The global step of every checkpoint save."""
    steps = []
    original = torch.save

    def recording(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj:
            steps.append(obj["global_step"])
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording)
    return steps


def test_saves_every_n_steps_at_epoch_ends_and_when_training_ends(tmp_path, make_mvtec_tree, monkeypatch, saves):
    monkeypatch.chdir(tmp_path)
    root = make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)  # 18 training images: 3 steps an epoch
    main(["fit", *TINY, "--data.root", str(root), "--trainer.max_steps", "20", "--trainer.callbacks.every_n_steps", "7"])
    assert saves == [9, 18, 20]  # epoch ends at 3, 6, ...: the first >= 7 after the last save, then the end
    ckpt = load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == ckpt["heads_fitted_step"] == 20

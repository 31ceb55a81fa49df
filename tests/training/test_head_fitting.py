"""Heads are fitted once, when training ends (or every k epochs when asked), on the EMA weights the
checkpoint stores; a checkpoint written mid-training is recognisable and `test` fits its heads first."""

import json

import pytest
import torch
from conftest import TINY_WIDGET, build_mvtec_tree

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import main
from ad_lightning.run_config import DEFAULT_MAX_STEPS
from ad_lightning.data import MVTecAD
from ad_lightning.lit import HEADS_NOT_CURRENT, FeatureDDPM

TINY = [*TINY_WIDGET, "--model.heads", "likelihood,irf", "--model.latency_images", "0"]
EVERY_3_STEPS = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.filename", "{step}",
                 "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.every_n_train_steps", "3"]  # fmt: skip


@pytest.fixture
def tree(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)


@pytest.fixture
def fits(monkeypatch) -> list[int]:
    """The global step of every `FeatureDDPM.fit_heads` call."""
    calls, original = [], FeatureDDPM.fit_heads

    def counted(self, *args, **kwargs):
        calls.append(self.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureDDPM, "fit_heads", counted)
    return calls


def run(subcommand, root, *extra):
    main([subcommand, *TINY, "--data.root", str(root), *extra])


def test_heads_are_fitted_once_at_the_end(tree, tmp_path, fits):
    run("fit", tree, "--trainer.max_epochs", "4")  # 18 training images, batch 8: 3 steps an epoch
    assert fits == [12]
    ckpt = load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == ckpt["heads_fitted_step"] == 12
    assert torch.isfinite(ckpt["state_dict"]["heads.irf.threshold"])


def test_heads_every_k_epochs_when_asked(tree, fits):
    run("fit", tree, "--trainer.max_epochs", "5", "--model.fit_heads_every_n_epochs", "2")
    assert fits == [6, 12, 15]  # epochs 2 and 4, then the end


def test_a_step_budget_ends_mid_epoch_with_fitted_heads(tree, tmp_path, fits):
    run("fit", tree, "--trainer.max_steps", "7")
    ckpt = load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
    assert fits == [7] and ckpt["global_step"] == ckpt["heads_fitted_step"] == 7


def test_the_default_budget_is_in_steps_and_epochs_alone_override_it(tree, tmp_path):
    run("fit", tree)  # neither max_steps nor max_epochs: the step budget
    config = (tmp_path / "runs" / "version_0" / "config.yaml").read_text()
    assert f"max_steps: {DEFAULT_MAX_STEPS}" in config
    assert load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == DEFAULT_MAX_STEPS
    run("fit", tree, "--trainer.max_epochs", "2")  # epochs alone: that many epochs, whatever the budget
    config = (tmp_path / "runs" / "version_1" / "config.yaml").read_text()
    assert "max_epochs: 2" in config and "max_steps: -1" in config
    assert load_checkpoint(tmp_path / "runs" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_a_mid_training_checkpoint_is_fitted_before_scoring(tree, tmp_path, fits, capsys):
    run("fit", tree, "--trainer.max_epochs", "3", *EVERY_3_STEPS)
    checkpoints = tmp_path / "runs" / "version_0" / "checkpoints"
    mid = load_checkpoint(checkpoints / "step=3.ckpt")
    assert mid["global_step"] == 3 and mid["heads_fitted_step"] is None
    assert torch.isnan(mid["state_dict"]["heads.likelihood.threshold"])  # never fitted: recognisably so

    fits.clear()
    capsys.readouterr()
    run("test", tree, "--ckpt_path", str(checkpoints / "step=3.ckpt"))
    assert fits == [0] and HEADS_NOT_CURRENT in capsys.readouterr().out
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    deployed = metrics["thresholds"]["deployed_image_threshold"]

    # the same heads, fitted another way: the checkpoint's model, fitted by hand on the same splits
    model = FeatureDDPM.from_checkpoint(str(checkpoints / "step=3.ckpt"))
    assert not model.heads_current
    model.fit_heads(MVTecAD(tree, "widget", image_size=64))
    assert model.heads_current
    for head in ("likelihood", "irf"):
        assert deployed[head] == pytest.approx(float(model.heads[head].threshold), rel=1e-5), head

    fits.clear()
    run("test", tree, "--ckpt_path", str(checkpoints / "last.ckpt"))  # fitted at its own step: used as it is
    assert fits == [] and HEADS_NOT_CURRENT not in capsys.readouterr().out


def test_checkpoints_from_before_the_marker_count_as_fitted(tree, tmp_path):
    run("fit", tree, "--trainer.max_epochs", "1")
    path = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(path)
    del ckpt["heads_fitted_step"]  # as written before heads were fitted once per run
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    assert FeatureDDPM.from_checkpoint(str(tmp_path / "legacy.ckpt")).heads_current


def test_heads_can_fit_on_normal_images_the_denoiser_never_trained_on(tmp_path, make_mvtec_tree, monkeypatch):
    """--data.head_fit_fraction holds a share of the training images out of training for the heads' fits."""
    monkeypatch.chdir(tmp_path)
    root = make_mvtec_tree(tmp_path / "data", n_train=24, n_test_good=4)
    data = MVTecAD(root, "widget", image_size=64, head_fit_fraction=0.25)
    data.setup()
    train, val, head = ({s.image_path for s in d.samples} for d in (data.train_dataset, data.val_dataset, data.head_dataset))
    assert (len(train), len(val), len(head)) == (16, 2, 6) and not (train & head or train & val or val & head)
    seen = []
    monkeypatch.setattr(FeatureDDPM, "fit_heads", lambda self, dm, cached=False: seen.append(len(self._head_features)))
    run("fit", root, "--trainer.max_epochs", "1", "--data.head_fit_fraction", "0.25")
    assert seen == [6]  # the Gaussians and forests see the 6 held-out images, the denoiser the 16 others


def test_a_checkpoint_loaded_with_other_head_args_has_its_heads_refitted(easy_model):
    """`from_checkpoint(..., head_args=...)` (what `load_model`, experiments and the API use): Lightning writes the
    overrides into the loaded hyper-parameters, yet the change must be seen, or the stored states of the heads
    as they were configured would be loaded into heads configured otherwise (or refused)."""
    path = str(easy_model.ckpt)
    stored = load_checkpoint(path)["hyper_parameters"]["head_args"]
    irf_only = {**stored, "ensemble": {"weights": {"irf": 1.0}}}
    model = FeatureDDPM.from_checkpoint(path, head_args=irf_only)
    assert model.scoring_changes == [f"head_args.ensemble: {irf_only['ensemble']} (checkpoint: {stored['ensemble']})"]
    assert not model.heads_current and model.heads["ensemble"].members == ["irf"]
    fewer = FeatureDDPM.from_checkpoint(path, heads="irf,irf_bank,ensemble", head_args=stored)  # nothing changes
    assert fewer.heads_current and fewer.scoring_changes == []
    assert float(fewer.heads["irf"].threshold) == float(FeatureDDPM.from_checkpoint(path).heads["irf"].threshold)
    assert "_stored_values" not in fewer.hparams  # the stored values never become a hyper-parameter


def test_a_head_default_changed_since_the_checkpoint_has_its_heads_refitted(easy_model, tmp_path):
    """No option changed, but this version of the code builds a head with another default than the one its stored
    state was fitted with: that state no longer fits the head, so it is refitted, and the reason names the default."""
    ckpt = load_checkpoint(easy_model.ckpt)
    assert ckpt["head_configs"]["irf"]["t_star"] == 200 and ckpt["head_configs"]["ensemble"]["weights"]
    unchanged = FeatureDDPM.from_checkpoint(str(easy_model.ckpt))
    assert unchanged.scoring_changes == [] and unchanged.heads_current
    ckpt["head_configs"]["irf"]["t_star"] = 100  # as if written when irf's default t* was 100
    older = tmp_path / "older.ckpt"
    torch.save(ckpt, older)
    model = FeatureDDPM.from_checkpoint(str(older))
    assert model.scoring_changes == ["head irf's default t_star: 200 (checkpoint: 100)"]
    assert not model.heads_current and torch.isnan(model.heads["irf"].threshold)  # fresh states, fitted before use
    assert "head irf's default t_star: 200 (checkpoint: 100)" in model.refit_reason()
    ckpt["head_configs"]["irf"]["t_star"] = 200
    ckpt["head_configs"]["irf_bank"]["chunk"] = 17  # memory only: no score changes, no refit
    torch.save(ckpt, older)
    assert FeatureDDPM.from_checkpoint(str(older)).scoring_changes == []
    del ckpt["head_configs"]  # written before the settings were kept: nothing to compare
    torch.save(ckpt, older)
    assert FeatureDDPM.from_checkpoint(str(older)).scoring_changes == []


def test_a_model_of_several_categories_tested_on_one_fits_its_heads_on_that_one(tree, tmp_path, fits, capsys):
    """Per-category heads from one denoiser: heads fitted on widget and gadget together are refitted on
    widget's normal splits alone when only widget is tested, exactly as fitting them by hand on widget."""
    build_mvtec_tree(tree, "gadget", n_train=20, n_test_good=4)
    run("fit", tree, "--trainer.max_epochs", "1", "--data.category", "widget,gadget")
    path = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(path)["heads_fitted_on"] == ["gadget", "widget"]

    fits.clear()
    capsys.readouterr()
    run("test", tree, "--ckpt_path", str(path), "--data.category", "gadget,widget")  # the same categories
    assert fits == [] and "fitted on the categories" not in capsys.readouterr().out
    run("test", tree, "--ckpt_path", str(path), "--data.category", "widget")
    said = capsys.readouterr().out
    assert len(fits) == 1 and "fitted on the categories gadget, widget, this data holds widget" in said
    deployed = json.loads((tmp_path / "runs" / "version_2" / "metrics.json").read_text())["thresholds"]
    by_hand = FeatureDDPM.from_checkpoint(str(path))
    by_hand.fit_heads(MVTecAD(tree, "widget", image_size=64))
    assert by_hand.heads_fitted_on == ["widget"]
    for head in ("likelihood", "irf"):
        pooled = float(FeatureDDPM.from_checkpoint(str(path)).heads[head].threshold)
        refitted = deployed["deployed_image_threshold"][head]
        assert refitted == pytest.approx(float(by_hand.heads[head].threshold), rel=1e-5) and refitted != pooled, head


def test_checkpoints_from_before_the_categories_were_kept_name_their_training_data(tree, tmp_path):
    """A checkpoint without `heads_fitted_on` had its heads fitted at the end of `fit` on its own data: its
    categories are read from the data it stores, so testing one category of it still refits the heads."""
    build_mvtec_tree(tree, "gadget", n_train=20, n_test_good=4)
    run("fit", tree, "--trainer.max_epochs", "1", "--data.category", "widget,gadget")
    ckpt = load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
    del ckpt["heads_fitted_on"]
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    model = FeatureDDPM.from_checkpoint(str(tmp_path / "legacy.ckpt"))
    assert model.heads_fitted_on == ["gadget", "widget"] and model.refit_reason(["gadget", "widget"]) is None
    assert "this data holds widget" in model.refit_reason(["widget"])
    ckpt["datamodule_hyper_parameters"]["_class_path"] = "gone_package.Data"  # a DataModule no longer installed
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    model = FeatureDDPM.from_checkpoint(str(tmp_path / "legacy.ckpt"))
    assert model.heads_fitted_on is None and model.refit_reason(["widget"]) is None  # unknown: not checked

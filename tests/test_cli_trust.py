"""The command line does what it is asked or says why not: options given win over a checkpoint's, output
goes where the user asked, input errors are one message with an exit status, never a traceback."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_WIDGET

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import COMMANDS, main
from ad_lightning.errors import UsageError
from ad_lightning.run_config import merge_model

TINY = [*TINY_WIDGET, "--model.latency_images", "0", "--trainer.enable_progress_bar", "false"]
HEADS = ["--model.heads", "likelihood,irf"]


@pytest.fixture
def tree(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)


@pytest.fixture
def ckpt(tree, tmp_path) -> Path:
    """A model trained with likelihood (S = 3) and irf, its checkpoint in runs/version_0."""
    main(["fit", *TINY, *HEADS, "--data.root", str(tree), "--trainer.max_epochs", "2"])
    return tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_fit_whose_denoiser_learned_nothing_says_so_and_how_to_fix_it(tree):
    """At lr 1e-9 the zero-initialised denoiser stays at eps = 0: the heads it fits would score at chance."""
    with pytest.warns(UserWarning, match=r"has not learned to predict noise.*--model\.lr 1e-09.*lower --model\.lr"):
        main(["fit", *TINY, *HEADS, "--data.root", str(tree), "--trainer.max_steps", "3", "--model.lr", "1e-9"])


def exit_status(capsys, *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of `main(argv)` for a run that must fail."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code, capsys.readouterr().err


def test_scoring_options_given_to_test_win_over_the_checkpoint(tree, tmp_path, ckpt, capsys):
    main(["test", "--ckpt_path", str(ckpt), "--data.root", str(tree),  # the rest of the data: the checkpoint's
          "--model.head_args", "{likelihood: {steps: 1}}", "--model.heads", "likelihood"])  # fmt: skip
    assert "scoring settings differ from the checkpoint's" in capsys.readouterr().out
    run = tmp_path / "runs" / "version_1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {k.split("_")[0] for k in metrics["heads"]} == {"likelihood"}  # only the head asked for
    assert metrics["heads"]["likelihood"]["nfe"] == 1 and metrics["n_test_images"] == 8
    config = (run / "config.yaml").read_text()
    assert "heads: likelihood\n" in config and "steps: 1\n" in config and "image_size: 64" in config
    # a subset of the trained heads needs no refit: the checkpoint's fitted state is used as it is
    main(["test", "--ckpt_path", str(ckpt), "--data.root", str(tree), "--model.heads", "irf"])
    assert "scoring settings differ" not in capsys.readouterr().out
    stored = load_checkpoint(ckpt)["state_dict"]["heads.irf.threshold"]
    deployed = json.loads((tmp_path / "runs" / "version_2" / "metrics.json").read_text())["thresholds"]
    assert deployed["deployed_image_threshold"]["irf"] == pytest.approx(float(stored))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--model.heads", "likelihood,irff"], "unknown head(s) ['irff']"),
        (["--model.head_args", "{likelihood: {steps: 0}}"], "--model.head_args.likelihood: steps must be >= 1"),
        (["--model.head_args", "{likelihood: {steps: 1001}}"], "--model.head_args.likelihood: 1001 steps"),
        (["--model.head_args", "{irf: {t_star: -5}}"], "--model.head_args.irf: irf t_star must be in [0, 999]"),
        (["--model.head_args", "{irf: {t_star: 5000}}"], "--model.head_args.irf: irf t_star must be in [0, 999]"),
        (["--model.head_args", "{reconstruction: {perturbation: 1.5}}"], "0 < perturbation <= 1"),
        (["--model.head_args", "{likelihod: {steps: 1}}"], "unknown head(s) ['likelihod']"),
        (["--model.denoiser", "small"], "--model.denoiser 'small' cannot change after training"),
        (["--model.out_indices", "[1, 3]"], "--model.out_indices (1, 3) cannot change after training"),
        (["--model.feature_aggregate", "3"], "--model.feature_aggregate 3 cannot change after training"),
        (["--data.image_size", "128"], "was trained at 64 x 64 px"),
        (["--model.lr", "0.1"], "--model.lr 0.1 cannot change in test"),
    ],
)
def test_test_refuses_bad_or_frozen_options_naming_them(tree, ckpt, capsys, option, message):
    heads = ["--model.heads", "likelihood,irf,reconstruction"] if "reconstruction" in option[1] else []
    status, err = exit_status(capsys, "test", "--ckpt_path", str(ckpt), "--data.root", str(tree), *heads, *option)
    assert status == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("option", [["--model.heads", "likelihood,irff"], ["--model.head_args", "{irf: {t_star: 1000}}"]])
def test_fit_refuses_bad_head_options_before_training(tree, tmp_path, capsys, option):
    status, err = exit_status(capsys, "fit", *TINY, *HEADS, "--data.root", str(tree), *option)
    assert status == 2 and "--model.head" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run left behind


def test_output_checkpoints_and_resume_follow_default_root_dir(tree, tmp_path):
    root = tmp_path / "elsewhere"
    main(["fit", *TINY, *HEADS, "--data.root", str(tree), "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root)])
    assert (root / "version_0" / "checkpoints" / "last.ckpt").is_file() and (root / "version_0" / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()
    main(["test", *TINY, "--data.root", str(tree), "--ckpt_path", "last", "--trainer.default_root_dir", str(root)])
    assert (root / "version_1" / "metrics.json").is_file() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_killed_fit_resumes_under_default_root_dir(tree, tmp_path):
    """SIGKILL mid-epoch 2, then `fit --ckpt_path last` under the same root continues from the saved step."""
    root = tmp_path / "elsewhere"
    args = [sys.executable, "-m", "ad_lightning", "fit", *TINY, *HEADS, "--data.root", str(tree), "--trainer.max_epochs",
            "4", "--trainer.default_root_dir", str(root), "--trainer.callbacks.every_n_steps", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "training"), "OMP_NUM_THREADS": "1"}
    killer = ["--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.epoch", "2", "--trainer.callbacks.batch", "1"]
    killed = subprocess.run([*args, *killer], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(root / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 6
    resumed = subprocess.run([*args, "--ckpt_path", "last"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "no last.ckpt" not in resumed.stdout  # found under the root, not started from scratch
    assert load_checkpoint(root / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert not (tmp_path / "runs").exists()


def test_few_normal_images_take_the_minimum_held_out_or_stop_before_training(tmp_path, make_mvtec_tree, capsys, caplog):
    root = make_mvtec_tree(tmp_path / "data", n_train=12, n_test_good=2)  # 10 % of 12 rounds to 1 image
    main(["fit", *TINY, *HEADS, "--data.root", str(root), "--trainer.max_epochs", "1", "--data.val_fraction", "0.1",
          "--trainer.default_root_dir", str(tmp_path / "runs")])  # fmt: skip
    assert "holding out 2" in caplog.text
    state = load_checkpoint(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.isfinite(state["heads.likelihood.threshold"])
    tiny = make_mvtec_tree(tmp_path / "tiny", n_train=3, n_test_good=2)
    status, err = exit_status(capsys, "fit", *TINY, *HEADS, "--data.root", str(tiny), "--trainer.max_epochs", "1")
    assert status == 1 and "--data.val_fraction" in err and "3 normal training image(s)" in err


def test_input_errors_are_one_message_without_a_traceback(tree, tmp_path):
    """Through the real command (a subprocess): exit 2 for an option, 1 for a file; --debug shows the traceback."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    base = [sys.executable, "-m", "ad_lightning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cases = [(["fit", "--trainer.max_epochs", "0"], 2, "trains nothing"),
             (["test", "--ckpt_path", str(tmp_path / "missing.ckpt")], 1, "missing.ckpt does not exist"),
             (["test", "--ckpt_path", str(empty)], 1, str(empty)),
             (["fit", "--data", "MVTecAD", "--data.root", str(tree), "--data.category", "bottel"], 1, "widget")]  # fmt: skip
    for argv, status, message in cases:
        proc = subprocess.run([*base, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == status and message in proc.stderr, (argv, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, argv
    proc = subprocess.run([*base, "--debug", *cases[0][0]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "python -m ad_lightning" in out and "__main__" not in out
    for command in ("fit", "validate", "test", "predict", "benchmark", "ablate", "export", "download"):
        assert f"\n  {command} " in out, command
    assert set(COMMANDS) == {"fit", "validate", "test", "predict", "benchmark", "ablate", "export", "download"}
    status, err = exit_status(capsys, "bechmark")
    assert status == 2 and "did you mean 'benchmark'" in err and "export" in err


def test_a_missing_test_mask_does_not_stop_fit_and_skip_leaves_it_out(tree, tmp_path, capsys):
    (tree / "widget" / "ground_truth" / "hole" / "000_mask.png").unlink()
    main(["fit", *TINY, *HEADS, "--data.root", str(tree), "--trainer.max_epochs", "1"])  # test masks are not read
    status, err = exit_status(capsys, "test", "--data.root", str(tree), "--ckpt_path", "runs")
    assert status == 1 and "000_mask.png" in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0"]  # the failed test left nothing
    main(["test", "--data.root", str(tree), "--ckpt_path", "runs/version_0", "--data.on_bad_file", "skip"])
    metrics = json.loads((tmp_path / "runs" / "version_1" / "metrics.json").read_text())
    assert metrics["n_skipped"] == 1 and metrics["n_test_images"] == 7


def test_a_failed_run_leaves_no_directory_with_only_its_config(tree, tmp_path, capsys):
    (tree / "widget" / "train" / "good" / "000.png").write_bytes(b"not a png")  # read during the feature pass
    status, _ = exit_status(capsys, "fit", *TINY, *HEADS, "--data.root", str(tree), "--trainer.max_epochs", "1")
    assert status == 1
    assert not [d for d in (tmp_path / "runs").glob("version_*") if {p.name for p in d.iterdir()} <= {"config.yaml"}]


def test_a_checkpoint_older_than_a_frozen_option_keeps_what_it_was_trained_with():
    """`feature_aggregate` came after some checkpoints were written: theirs is 1 (no aggregation), whatever the
    default configuration says now, and asking for another value is refused as for any frozen option."""
    assert merge_model({"grid": "coarsest"}, {}, "test", "old.ckpt") == {"feature_aggregate": 1}
    assert merge_model({"feature_aggregate": 3}, {}, "test", "new.ckpt") == {}
    with pytest.raises(UsageError, match="feature_aggregate 3 cannot change after training: old.ckpt was trained with 1"):
        merge_model({"grid": "coarsest"}, {"feature_aggregate": 3}, "test", "old.ckpt")

"""`ablate`: one checkpoint scored under many head settings without retraining (tiny tree, CPU)."""

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_WIDGET, build_mvtec_tree

from ad_lightning import ablate
from ad_lightning.ablate import COLUMNS, Setting, check_settings, grid_settings, number_list, settings_grid
from ad_lightning.cli import main
from ad_lightning.data import AnomalyDataModule, BadInputError, Demo, MVTecAD
from ad_lightning.data.stored import datamodule_of
from ad_lightning.errors import UsageError
from ad_lightning.evaluation.tables import markdown_table

pytestmark = pytest.mark.usefixtures("raw_errors")  # input errors raised, not printed

SCORES_8_SETTINGS = pytest.mark.slow  # tests of the `ablated` fixture: 8 settings, 12 s (idle) to 130 s (loaded)
DATA = list(TINY_WIDGET)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model (likelihood head, 1 epoch) and its data; returns the directory holding both."""
    root = tmp_path_factory.mktemp("ablate")
    build_mvtec_tree(root / "data", n_train=20, n_test_good=4)
    logs = ["--trainer.logger.init_args.save_dir", str(root / "runs"), "--trainer.default_root_dir", str(root / "runs")]
    data = [*DATA, "--data.root", str(root / "data")]
    main(["fit", *data, "--model.heads", "likelihood", "--trainer.max_epochs", "1", *logs])
    return root


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def ablated(trained, tmp_path_factory):
    """`ablate` over likelihood S {1, 2} x start {0, 100}, irf t* {0, 100}, reconstruction p {0.2} x S {1, 2},
    with --wandb (the logger call recorded) and the backbone's feature passes counted."""
    out = tmp_path_factory.mktemp("out") / "ablation"
    passes, logged = [], []
    with pytest.MonkeyPatch.context() as mp:
        original = AnomalyDataModule.cache_features
        mp.setattr(AnomalyDataModule, "cache_features", lambda self, *a: passes.append(1) or original(self, *a))
        mp.setattr("ad_lightning.ablate.log_ablation", lambda *a, **k: logged.append((a, k)))
        main(["ablate", "--ckpt_path", str(trained / "runs"), "--heads", "likelihood,irf,reconstruction",
              "--steps", "1,2", "--timesteps", "0,100",
              "--perturbation", "0.2", "--latency_images", "2", "--device", "cpu", "--wandb", "--out", str(out)])  # fmt: skip
    return out, passes, logged


@SCORES_8_SETTINGS
def test_one_csv_row_per_setting_in_grid_order(ablated):
    out, _, _ = ablated
    rows = read_rows(out / "ablation.csv")
    settings = [(r["head"], r["steps"], r["timestep"], r["perturbation"]) for r in rows]
    assert settings == [
        ("likelihood", "1", "0", ""), ("likelihood", "2", "0", ""),
        ("likelihood", "1", "100", ""), ("likelihood", "2", "100", ""),
        ("irf", "", "0", ""), ("irf", "", "100", ""),
        ("reconstruction", "1", "", "0.2"), ("reconstruction", "2", "", "0.2"),
    ]  # fmt: skip
    assert [int(r["nfe"]) for r in rows] == [1, 2, 1, 2, 1, 1, 1, 2]
    for row in rows:
        for metric in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "accuracy", "f1"):
            assert 0.0 <= float(row[metric]) <= 1.0, (row["head"], metric)
        for level in ("image", "pixel"):  # the bootstrap interval holds the point estimate
            low, high = float(row[f"{level}_auroc_low"]), float(row[f"{level}_auroc_high"])
            assert low <= float(row[f"{level}_auroc"]) <= high
        assert float(row["ms_per_image"]) > 0
    likelihood = [r for r in rows if r["head"] == "likelihood"]
    assert all(r["nll_image_auroc"] != "" and r["sp_image_auroc"] != "" for r in likelihood)
    assert all(r["nll_image_auroc"] == "" and r["prior_image_auroc"] != "" for r in rows if r["head"] == "irf")


@SCORES_8_SETTINGS
def test_rows_are_the_settings_own_test_reports(ablated):
    """Each row holds what that setting's `Trainer.test` wrote (metrics.json), latency at batch 1 included."""
    out, _, _ = ablated
    grid = settings_grid(["likelihood", "irf", "reconstruction"], [1, 2], [0, 100], [0.2])
    for setting, row in zip(grid, read_rows(out / "ablation.csv"), strict=True):
        metrics = json.loads((out / "runs" / setting.name / "metrics.json").read_text())
        head = metrics["heads"][row["head"]]
        assert float(row["image_auroc"]) == pytest.approx(head["image_auroc"])
        assert float(row["aupro"]) == pytest.approx(head["aupro"])
        assert float(row["ms_per_image"]) == pytest.approx(head["ms_per_image"])
        by_stage = metrics["timing"]["batch1_by_stage"][row["head"]]
        assert {s: v["n"] for s, v in by_stage.items()} == {"backbone": 2, row["head"]: 2}


@SCORES_8_SETTINGS
def test_backbone_runs_over_train_and_val_once_for_all_settings(ablated):
    _, passes, _ = ablated
    assert len(passes) == 1


@SCORES_8_SETTINGS
def test_plots_and_wandb_call(ablated):
    out, _, logged = ablated
    for metric in ablate.PLOT_METRICS:
        assert (out / f"{metric}_vs_steps.png").stat().st_size > 0
        assert (out / f"{metric}_vs_timestep.png").stat().st_size > 0
    (args, kwargs), = logged
    _, rows, plots = args
    assert len(rows) == 8 and set(plots) == {f"{m}_vs_{x}" for m in ablate.PLOT_METRICS for x in ("steps", "timestep")}
    assert ("steps", "image_auroc") in kwargs["lines"] and ("timestep", "aupro") in kwargs["lines"]


@pytest.mark.slow  # a fit-time test run and one ablation setting
def test_refitted_default_setting_reproduces_test(trained, tmp_path, monkeypatch):
    """fit_heads refits a head exactly as the last validation epoch did: `ablate` at the trained
    setting (S = 3, start 0) gives the per-image scores of `test` on the checkpoint."""
    monkeypatch.chdir(tmp_path)
    data = [*DATA, "--data.root", str(trained / "data")]
    main(["test", *data, "--model.heads", "likelihood", "--ckpt_path", str(trained / "runs")])
    out = tmp_path / "ablation"
    main(["ablate", "--ckpt_path", str(trained / "runs"), "--heads", "likelihood", "--steps", "3", "--timesteps", "0",
          "--latency_images", "0", "--device", "cpu", "--out", str(out)])  # fmt: skip

    def scores(path: Path) -> dict[str, list[float]]:
        with path.open() as f:
            rows = list(csv.DictReader(f))
        return {r["path"]: [float(r[c]) for c in ("likelihood", "likelihood_nll", "likelihood_sp")] for r in rows}

    tested = scores(next((tmp_path / "runs").rglob("scores.csv")))
    ablated = scores(out / "runs" / "likelihood_t0_S3" / "scores.csv")
    assert tested.keys() == ablated.keys() and len(tested) == 8
    for path, values in tested.items():
        assert ablated[path] == pytest.approx(values, rel=1e-4, abs=1e-5), path


def test_bad_settings_stop_before_anything_is_scored(trained, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UsageError, match=r"reconstruction_p1\.5_S1.*--perturbation"):
        main(["ablate", "--ckpt_path", str(trained / "runs"), "--perturbation", "1.5", "--steps", "1", "--out", str(out)])
    assert not (out / "ablation.csv").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (Setting.of("likelihood", timesteps=0, steps=0), "steps must be >= 1"),
        (Setting.of("likelihood", timesteps=999, steps=3), "do not fit"),
        (Setting.of("likelihood", timesteps=1000, steps=1), "start"),
        (Setting.of("irf", timesteps=1000), "t_star"),
        (Setting.of("irf", timesteps=-1), "t_star"),
        (Setting.of("reconstruction", perturbation=0.0, steps=2), "perturbation"),
        (Setting.of("reconstruction", perturbation=0.2, steps=0), "steps"),
        (Setting.of("reconstruction", perturbation=0.001, steps=5), "steps must be in"),
        (Setting.of("irf", covariance="round"), "covariance"),
        (Setting.of("irf", stepz=1), "stepz"),
    ],
)
def test_invalid_settings_are_named(setting, message):
    with pytest.raises(UsageError, match=message) as info:
        check_settings([setting], num_timesteps=1000)
    assert setting.name in str(info.value) and "--steps, --timesteps, --perturbation or --grid" in str(info.value)


def test_valid_edges_pass():
    edges = [Setting.of("likelihood", timesteps=999, steps=1), Setting.of("irf", timesteps=999),
             Setting.of("reconstruction", perturbation=1.0, steps=1)]  # fmt: skip
    check_settings(edges, num_timesteps=1000)


def test_grid_and_names():
    grid = settings_grid(["reconstruction", "irf", "likelihood"], [1, 3], [0, 200], [0.1])
    assert [s.name for s in grid] == [
        "reconstruction_p0.1_S1", "reconstruction_p0.1_S3", "irf_t0", "irf_t200",
        "likelihood_t0_S1", "likelihood_t0_S3", "likelihood_t200_S1", "likelihood_t200_S3",
    ]  # fmt: skip
    assert grid[0].head_args == {"perturbation": 0.1, "steps": 1}
    assert grid[2].head_args == {"t_star": 0}
    assert grid[-1].head_args == {"steps": 3, "start": 200}
    assert grid[-1].columns() == {"head": "likelihood", "steps": 3, "timestep": 200, "perturbation": None, "args": None}
    with pytest.raises(UsageError, match="radar"):
        settings_grid(["radar"], [1], [0], [0.1])


def test_a_grid_sweeps_any_arguments_of_any_head():
    grid = grid_settings({"irf": {"covariance": ["full", "diagonal"], "t_star": [100]}, "radar": {"t_r": 5}})
    assert [s.name for s in grid] == ["irf_covariance=full_t_star=100", "irf_covariance=diagonal_t_star=100",
                                      "radar_t_r=5"]  # fmt: skip
    assert grid[1].head_args == {"covariance": "diagonal", "t_star": 100}
    assert grid[1].columns()["args"] == '{"covariance": "diagonal", "t_star": 100}'
    check_settings(grid, num_timesteps=1000)
    with pytest.raises(UsageError, match="--grid"):
        grid_settings({"irf": [1, 2]})


def test_number_lists():
    assert number_list("1, 2,2,5", int) == [1, 2, 5]
    with pytest.raises(argparse.ArgumentTypeError, match="'1,a'"):
        number_list("1,a", int)


def test_datamodule_from_checkpoint_with_overrides(tmp_path):
    stored = {"_class_path": "ad_lightning.data.MVTecAD", "root": "x", "category": "widget", "image_size": 64}
    ckpt = {"datamodule_hyper_parameters": {**stored, "_instantiator": "lightning.pytorch.cli.instantiate_module"}}
    data = datamodule_of(ckpt, overrides={"root": str(tmp_path)})
    assert type(data) is MVTecAD and data.root == tmp_path and data.category == "widget" and data.image_size == 64
    other = datamodule_of(ckpt, "Demo", {"category": "nut"})  # another class keeps only the image size
    assert type(other) is Demo and other.category == "nut" and other.image_size == 64
    assert type(datamodule_of({})) is Demo
    for name in ("ad_lightning.ablate.Setting", "NoSuchData", "no_such_module.Data"):
        with pytest.raises(UsageError, match=f"--data {name} is not a DataModule"):
            datamodule_of(ckpt, name)
    with pytest.raises(UsageError, match="was trained at 64 x 64"):
        datamodule_of(ckpt, overrides={"image_size": 128})


def test_markdown_table():
    table = markdown_table([{"head": "irf", "image_auroc": 0.91234, "steps": None}], ["head", "steps", "image_auroc"])
    assert table.splitlines() == ["| head | steps | image_auroc |", "|---|---|---|", "| irf | - | 0.912 |"]


def test_checkpoint_missing_model_weights_is_refused(trained, tmp_path):
    path = next((trained / "runs").rglob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(BadInputError, match="lacks .* model weights"):
        ablate.load_setting(str(broken), ckpt, Setting.of("irf", timesteps=10), torch.device("cpu"), {})


def test_a_list_of_grids_varies_one_argument_at_a_time():
    grid = grid_settings([{"irf": {}}, {"irf": {"t_star": [100, [100, 400]]}}, {"ensemble": {"weights": [{"irf": 1.0, "patchcore": 0.5}]}}])
    assert [s.name for s in grid] == ["irf", "irf_t_star=100", "irf_t_star=[100,400]", "ensemble_weights=irf+patchcore0.5"]
    assert grid[0].head_args == {} and grid[2].head_args == {"t_star": [100, 400]}
    check_settings(grid, num_timesteps=1000)

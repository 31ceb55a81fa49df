"""W&B: offline without credentials, and what a `fit` + `test` run and `log_ablation` leave in the
offline run files (read back from the run's `.wandb` transaction log and `files/media`)."""

import json
import struct
from pathlib import Path

import pytest
import wandb
from conftest import build_mvtec_tree
from matplotlib.figure import Figure
from PIL import Image
from wandb.proto import wandb_internal_pb2

from ad_lightning.callbacks.wandb import Logger, log_ablation, metric_items
from ad_lightning.cli import main

WANDB_CONFIG = Path(__file__).parents[2] / "configs" / "wandb.yaml"
LOG_BLOCK, LOG_HEADER = 32768, 7  # the .wandb file: a LevelDB-style log of 32 KiB blocks, 7-byte record headers
LOG_FULL, LOG_LAST = 1, 4  # record types that end a record (FIRST and MIDDLE continue it)
FIT_AND_TEST = pytest.mark.slow  # tests of the `wandb_run` fixture: fit + test + W&B, 20-52 s on the shared 2-core CPU


def wandb_records(path: Path) -> list:
    """Every protobuf `Record` of an offline run's `run-<id>.wandb` file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", LOG_HEADER  # the file header fills the first 7 bytes
    while pos + LOG_HEADER <= len(data):
        if LOG_BLOCK - pos % LOG_BLOCK < LOG_HEADER:  # block trailer too short for a header: zero padding
            pos += LOG_BLOCK - pos % LOG_BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + LOG_HEADER])
        pending += data[pos + LOG_HEADER : pos + LOG_HEADER + length]
        pos += LOG_HEADER + length
        if kind in (LOG_FULL, LOG_LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged_values(run_dir: Path) -> dict[str, object]:
    """The last value of every key logged to the run's history or summary; a logged object (an image,
    a table) as a dict of its fields."""
    (log,) = run_dir.glob("run-*.wandb")
    values = {}
    for record in wandb_records(log):
        items = record.history.item if record.HasField("history") else record.summary.update
        for item in items:
            key, *field = [item.key] if item.key else list(item.nested_key)
            value = json.loads(item.value_json)
            if field:
                values.setdefault(key, {})["/".join(field)] = value
            else:
                values[key] = value
    return values


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """No W&B credentials anywhere (also not the developer's own), quiet, every W&B file in tmp."""
    tmp = tmp_path_factory.mktemp("wandb_env")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT"):
            mp.delenv(name, raising=False)
        mp.setenv("NETRC", str(tmp / "netrc"))  # absent file: no stored key
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(tmp / name.lower()))
        wandb.teardown()  # W&B's process-wide settings are read again from this environment
        yield tmp
        wandb.teardown()


@pytest.fixture(scope="module")
def wandb_run(offline_env, tmp_path_factory):
    """fit 1 epoch + test on a tiny tree with `--config configs/wandb.yaml` and no credentials."""
    tmp = tmp_path_factory.mktemp("wandb_run")
    root = build_mvtec_tree(tmp / "data", n_train=20, n_test_good=4)
    args = ["--config", str(WANDB_CONFIG), "--data", "MVTecAD", "--data.root", str(root), "--data.category", "widget",
            "--data.image_size", "64", "--data.train_batch_size", "8", "--model.denoiser", "tiny", "--model.heads", "likelihood",
            "--model.latency_images", "0", "--trainer.log_every_n_steps", "1"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the config's runs/ lands in tmp
        main(["fit", *args, "--trainer.max_epochs", "1"])
        main(["test", *args, "--ckpt_path", "runs"])
    flush_runs()
    return tmp / "runs"


def flush_runs() -> None:
    """Stop W&B's background service: a finished run's transaction log is written asynchronously,
    and is complete on disk once the service has stopped."""
    wandb.teardown()


def offline_runs(runs: Path) -> list[Path]:
    return sorted((runs / "wandb").glob("offline-run-*"))


@FIT_AND_TEST
def test_without_credentials_fit_and_test_run_offline(wandb_run):
    found = offline_runs(wandb_run)
    assert len(found) == 2  # fit and test: each entry point is its own run
    assert not list((wandb_run / "wandb").glob("run-*"))  # no online run


@FIT_AND_TEST
def test_fit_run_holds_loss_and_learning_rate(wandb_run):
    values = logged_values(offline_runs(wandb_run)[0])
    assert values["train/loss"] > 0 and values["train/lr"] > 0
    assert "val/loss" in values


@FIT_AND_TEST
def test_test_run_holds_the_metrics_per_category_and_head(wandb_run):
    metrics = json.loads((wandb_run / "version_1" / "metrics.json").read_text())
    values = logged_values(offline_runs(wandb_run)[1])
    expected = metrics["categories"]["widget"]["heads"]["likelihood"]
    for metric in ("image_auroc", "pixel_auroc", "aupro", "f1"):
        assert values[f"test/widget/likelihood/{metric}"] == pytest.approx(expected[metric])
    for metric in ("image_auroc", "nfe"):  # the mean over categories, with NFE and latency
        assert values[f"test/mean/likelihood/{metric}"] == pytest.approx(metrics["heads"]["likelihood"][metric])
    assert "test/widget/likelihood_nll/image_auroc" in values  # the score's terms too


@FIT_AND_TEST
def test_test_run_holds_the_heatmaps_and_metrics_table(wandb_run):
    files = offline_runs(wandb_run)[1] / "files" / "media"
    (heatmap,) = (files / "images" / "test" / "heatmaps" / "likelihood").glob("widget_*.png")
    local = wandb_run / "version_1" / "plots" / "heatmaps_likelihood_widget.png"
    with Image.open(heatmap) as logged, Image.open(local) as written:
        assert logged.format == "PNG" and logged.size == written.size
    for name in ("roc", "score_histograms"):
        assert list((files / "images" / "test").glob(f"{name}_*.png")), name
    (table,) = (files / "table" / "test").glob("metrics_*.table.json")
    content = json.loads(table.read_text())
    rows = [dict(zip(content["columns"], row)) for row in content["data"]]
    assert {(r["category"], r["head"]) for r in rows} >= {("widget", "likelihood"), ("mean", "likelihood")}


def test_log_ablation_writes_table_plots_and_line_plot(offline_env, tmp_path):
    rows = [
        {"head": head, "steps": steps, "image_auroc": 0.5 + 0.1 * steps + 0.01 * (head == "irf")}
        for head in ("likelihood", "irf")
        for steps in (1, 2, 3)
    ]
    fig = Figure()
    fig.subplots().plot([1, 2, 3], [0.6, 0.7, 0.8])
    fig.savefig(tmp_path / "auroc_vs_steps.png")
    logger = Logger(save_dir=str(tmp_path))
    log_ablation(logger, rows, {"auroc_vs_steps": tmp_path / "auroc_vs_steps.png"}, lines=[("steps", "image_auroc")])
    logger.finalize("success")
    flush_runs()
    (run,) = offline_runs(tmp_path)
    (table,) = (run / "files" / "media" / "table" / "ablation").glob("table_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["head", "steps", "image_auroc"]
    assert content["data"] == [[r["head"], r["steps"], pytest.approx(r["image_auroc"])] for r in rows]
    assert list((run / "files" / "media" / "images" / "ablation").glob("auroc_vs_steps_*.png"))
    values = logged_values(run)
    assert values["ablation/table"]["nrows"] == len(rows)
    assert values["ablation/image_auroc_vs_steps_table"]["_type"] == "table-file"  # the W&B line plot's data


def test_log_ablation_refuses_unknown_line_columns(offline_env, tmp_path):
    with pytest.raises(ValueError, match="timestep/image_auroc"):
        rows = [{"head": "irf", "steps": 1, "image_auroc": 0.9}]
        log_ablation(Logger(save_dir=str(tmp_path)), rows, lines=[("timestep", "image_auroc")])


def test_no_credentials_means_offline_and_never_a_prompt(offline_env, monkeypatch):
    calls = []
    monkeypatch.setattr(wandb, "login", lambda **kw: calls.append(kw) or False)
    assert Logger(save_dir="x")._wandb_init["mode"] == "offline"
    assert calls == [{"prompt": False, "verify": False}]  # no prompt, no server call
    with pytest.raises(ValueError, match="wandb login"):
        Logger(save_dir="x", offline=False)


def test_credentials_or_a_chosen_mode_are_left_to_wandb(offline_env, monkeypatch):
    monkeypatch.setattr(wandb, "login", lambda **kw: True)
    assert Logger(save_dir="x")._wandb_init.get("mode") is None  # online
    assert Logger(save_dir="x", offline=True)._wandb_init["mode"] == "offline"
    monkeypatch.setattr(wandb, "login", lambda **kw: False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert Logger(save_dir="x")._wandb_init.get("mode") is None  # WANDB_MODE decides
    assert Logger(save_dir="x", mode="disabled")._wandb_init["mode"] == "disabled"


def test_metric_keys_name_category_head_and_metric():
    metrics = {
        "heads": {"irf": {"image_auroc": 0.8, "pixel_auroc": None}},
        "categories": {"nut": {"heads": {"irf": {"image_auroc": 0.7, "pixel_auroc": None, "nfe": 1}}}},
    }
    expected = {"test/nut/irf/image_auroc": 0.7, "test/nut/irf/nfe": 1, "test/mean/irf/image_auroc": 0.8}
    assert metric_items(metrics) == expected  # missing (None) values are left out

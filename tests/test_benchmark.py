"""`benchmark`: fit + test per category, the documented table, resumable."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from ad_lightning import benchmark
from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import main
from ad_lightning.errors import UsageError
from ad_lightning.evaluation.report import COMPLETE, mark_complete
from ad_lightning.evaluation.tables import RESULT_COLUMNS as COLUMNS
from ad_lightning.run_config import DEFAULT_CONFIG

DATA = ["--data", "MVTecAD", "--data.image_size", "64", "--data.train_batch_size", "8", "--trainer.max_epochs", "1"]
DATA += ["--model.denoiser", "tiny", "--model.heads", "likelihood"]


def test_benchmark_writes_table_with_mean_row_and_resumes(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for category in ("widget", "gadget"):
        make_mvtec_tree(tmp_path / "data", category, n_train=20, n_test_good=4)
    out = tmp_path / "bench" / "results.csv"
    args = ["benchmark", "--categories", "widget,gadget", "--out", str(out), "--data.root", str(tmp_path / "data")]
    main([*args, *DATA])
    with out.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    heads = ["likelihood", "likelihood_nll", "likelihood_sp"]
    assert [(r["category"], r["head"]) for r in rows] == [(c, h) for c in ("widget", "gadget", "mean") for h in heads]
    by = {(r["category"], r["head"]): r for r in rows}
    mean = (float(by["widget", "likelihood"]["image_auroc"]) + float(by["gadget", "likelihood"]["image_auroc"])) / 2
    assert float(by["mean", "likelihood"]["image_auroc"]) == mean
    assert all(by[c, "likelihood"][col] != "" for c in ("widget", "mean") for col in COLUMNS[2:])
    assert by["widget", "likelihood_nll"]["accuracy"] == ""  # a raw term has no deployed threshold
    assert out.with_suffix(".md").read_text().startswith("| category | head | image_auroc")

    metrics = tmp_path / "bench" / "results" / "widget" / "test" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr("ad_lightning.benchmark.fit_category", lambda *a: calls.append(a))
    main([*args, *DATA])  # both categories are done: nothing reruns
    assert calls == [] and metrics.stat().st_mtime_ns == stamp


def test_shared_end_to_end_one_training_and_heads_per_category(tmp_path, make_mvtec_tree, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for category in ("widget", "gadget"):
        make_mvtec_tree(tmp_path / "data", category, n_train=20, n_test_good=4)
    out = tmp_path / "bench" / "results.csv"
    main(["benchmark", "--shared", "--categories", "widget,gadget", "--out", str(out), "--data.root",
          str(tmp_path / "data"), *DATA])  # fmt: skip
    shared = load_checkpoint(tmp_path / "bench" / "results" / "all_categories" / "fit" / "checkpoints" / "last.ckpt")
    assert shared["heads_fitted_on"] == ["gadget", "widget"]
    said = capsys.readouterr().out
    assert "this data holds widget" in said and "this data holds gadget" in said  # each category's own heads
    with out.open() as f:
        rows = {(r["category"], r["head"]) for r in csv.DictReader(f)}
    assert {("widget", "likelihood"), ("gadget", "likelihood"), ("mean", "likelihood")} <= rows
    assert not (tmp_path / "bench" / "results" / "widget" / "fit").exists()  # no model of its own


class FakeCli:
    """Stands in for `python -m ad_lightning`: records (subcommand, category) and writes what a test run
    writes into its run directory: metrics.json with one head whose image AUROC is the call's number, and
    the completion marker the real `test` writes when it returns."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.checkpoints: list[str | None] = []  # each test's --ckpt_path (None for a fit)

    def __call__(self, argv: list[str]) -> None:
        option = lambda name: argv[argv.index(name) + 1]
        self.calls.append((argv[0], option("--data.category")))
        self.checkpoints.append(option("--ckpt_path") if argv[0] == "test" else None)
        run_dir = Path(option("--trainer.logger.init_args.save_dir")) / option("--trainer.logger.init_args.name")
        run_dir /= option("--trainer.logger.init_args.version")
        run_dir.mkdir(parents=True, exist_ok=True)
        if argv[0] == "test":
            metrics = {"heads": {"h": {"image_auroc": len(self.calls) / 100}}}
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
            mark_complete(run_dir)


def fake_benchmark(out: Path, cli: FakeCli, *extra: str) -> dict[str, str]:
    benchmark.main(["--categories", "widget,gadget", "--out", str(out), *extra], cli=cli)
    with out.open() as f:
        return {row["category"]: row["image_auroc"] for row in csv.DictReader(f)}


def test_a_category_without_completion_marker_is_rerun_from_scratch(tmp_path):
    out = tmp_path / "results.csv"
    cli = FakeCli()
    first = fake_benchmark(out, cli)
    assert cli.calls == [("fit", "widget"), ("test", "widget"), ("fit", "gadget"), ("test", "gadget")]
    assert first == {"widget": "0.02", "gadget": "0.04", "mean": "0.03"}
    widget = tmp_path / "results" / "widget"
    (widget / "test" / COMPLETE).unlink()  # as if killed after metrics.json, while plotting
    (widget / "test" / "stale.png").write_bytes(b"")
    cli.calls.clear()
    second = fake_benchmark(out, cli)
    assert cli.calls == [("fit", "widget"), ("test", "widget")]  # gadget is complete: skipped
    assert second == {"widget": "0.02", "gadget": "0.04", "mean": "0.03"}
    assert not (widget / "test" / "stale.png").exists()  # rerun from scratch
    assert (widget / "test" / COMPLETE).is_file()


def test_force_reruns_complete_categories(tmp_path):
    """The rerun's test runs are the 6th and 8th calls: the table then holds their numbers, not the first run's."""
    cli = FakeCli()
    first = fake_benchmark(tmp_path / "results.csv", cli)
    second = fake_benchmark(tmp_path / "results.csv", cli, "--force")
    assert [category for _, category in cli.calls[4:]] == ["widget", "widget", "gadget", "gadget"]
    assert first == {"widget": "0.02", "gadget": "0.04", "mean": "0.03"}
    assert second == {"widget": "0.06", "gadget": "0.08", "mean": "0.07"}


def test_results_tables_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "results.csv"
    fake_benchmark(out, FakeCli())
    before = out.read_bytes(), out.with_suffix(".md").read_bytes()

    def write_half_then_fail(path, rows, columns):
        path.write_text(",".join(columns) + "\nwidget,h\n")
        raise OSError("disk full")

    monkeypatch.setattr(benchmark, "write_csv", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        fake_benchmark(out, FakeCli(), "--force")
    assert (out.read_bytes(), out.with_suffix(".md").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "results.csv", "results.md"]


def test_rescore_tests_the_fitted_models_again_with_the_default_heads(tmp_path):
    out = tmp_path / "results.csv"
    cli = FakeCli()
    fake_benchmark(out, cli)
    for run in ("fit", "test"):  # as if gadget's fit had been killed: neither run is complete
        (tmp_path / "results" / "gadget" / run / COMPLETE).unlink()
    cli.calls.clear()
    argv = []
    cli_calls = lambda args: argv.append(args) or cli(args)  # noqa: E731
    benchmark.main(["--categories", "widget,gadget", "--out", str(out), "--rescore"], cli=cli_calls)
    assert cli.calls == [("test", "widget"), ("fit", "gadget"), ("test", "gadget")]  # gadget was never fitted
    rescored = argv[0]
    heads = rescored[rescored.index("--model.heads") + 1]
    assert heads == yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]["heads"]
    assert "--model.head_args" in rescored and "--ckpt_path" in rescored


def test_shared_trains_one_model_on_every_category_and_tests_each_with_it(tmp_path):
    """`--shared`: one fit on all the categories, then one test per category on its checkpoint (the heads are
    refitted per category by `test`); a second run reuses the complete shared model and the complete tests."""
    out, cli = tmp_path / "results.csv", FakeCli()
    assert fake_benchmark(out, cli, "--shared") == {"widget": "0.02", "gadget": "0.03", "mean": "0.025"}
    assert cli.calls == [("fit", "widget,gadget"), ("test", "widget"), ("test", "gadget")]
    shared = str(tmp_path / "results" / benchmark.SHARED / "fit" / "checkpoints" / "last.ckpt")
    assert cli.checkpoints == [None, shared, shared]
    (tmp_path / "results" / "gadget" / "test" / COMPLETE).unlink()  # as if killed while testing gadget
    cli.calls.clear()
    fake_benchmark(out, cli, "--shared")
    assert cli.calls == [("test", "gadget")]
    cli.calls.clear()
    fake_benchmark(out, cli, "--shared", "--force")  # everything again, the shared model too
    assert cli.calls == [("fit", "widget,gadget"), ("test", "widget"), ("test", "gadget")]


def test_ckpt_path_tests_every_category_with_a_trained_model(tmp_path):
    model = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {}}, model)  # `benchmark` only checks that it loads; the fake `test` reads nothing
    cli = FakeCli()
    fake_benchmark(tmp_path / "results.csv", cli, "--ckpt_path", str(model))
    assert cli.calls == [("test", "widget"), ("test", "gadget")] and cli.checkpoints == [str(model)] * 2
    cli.calls.clear()
    fake_benchmark(tmp_path / "results.csv", cli, "--ckpt_path", str(model), "--rescore")
    assert cli.calls == [("test", "widget"), ("test", "gadget")]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shared", "--ckpt_path", "m.ckpt"], "pass one of them"),
        (["--categories", "all_categories,widget"], "collides"),
    ],
)
def test_conflicting_shared_options_are_refused(tmp_path, extra, message):
    cli = FakeCli()
    with pytest.raises(UsageError, match=message):
        benchmark.main(["--categories", "widget", "--out", str(tmp_path / "r.csv"), *extra], cli=cli)
    assert cli.calls == []

"""`benchmark`: fit + test per category, the documented table, resumable."""

import csv

from ad_lightning.benchmark import COLUMNS
from ad_lightning.cli import main

DATA = ["--data", "MVTecAD", "--data.image_size", "64", "--data.train_batch_size", "8", "--trainer.max_epochs", "1"]
DATA += ["--model.heads", "likelihood"]


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
    monkeypatch.setattr("ad_lightning.benchmark.run_category", lambda *a: calls.append(a))
    main([*args, *DATA])  # both categories are done: nothing reruns
    assert calls == [] and metrics.stat().st_mtime_ns == stamp

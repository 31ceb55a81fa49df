"""experiments/recon_vs_inversion.py and experiments/reverse_scoring.py on a tiny tree with tiny settings;
headline.py on fake test runs; first_command.py's reading of the README; anomalib_patchcore.py without anomalib."""

import argparse
import contextlib
import csv
import io
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_mvtec_tree

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TINY = ["--category", "widget", "--latency_images", "0", "--device", "cpu"]


def run_script(name: str, *args: str) -> str:
    """Run experiments/<name> as `python experiments/<name> args`, in this process; returns what it printed.
    The torch thread count the script sets is restored afterwards."""
    printed, threads = io.StringIO(), torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
            mp.setattr(sys, "argv", [name, *args])
            mp.syspath_prepend(str(EXPERIMENTS))  # as `python experiments/<name>` puts it first
            runpy.run_path(str(EXPERIMENTS / name), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


@pytest.fixture(scope="module")
def recon_vs_inversion(tmp_path_factory) -> tuple[Path, str]:
    """The script with no checkpoint: it trains a 1-epoch model on the tree first, then scores
    reconstruction p {0.2, 0.5} x S {1, 2} at equal NFE, both inversions at S {1, 2} and the one
    non-empty paper cell (S = 2, p = 0.5: grid index 1)."""
    tmp = tmp_path_factory.mktemp("experiments")
    root = build_mvtec_tree(tmp / "data", n_train=20, n_test_good=4)
    out = tmp / "recon_vs_inversion"
    printed = run_script("recon_vs_inversion.py", "--root", str(root), *TINY, "--epochs", "1", "--image_size", "64",
                         "--steps", "2,1", "--perturbation", "0.2,0.5", "--out", str(out))  # fmt: skip
    return out, printed


def table_rows(table: str) -> list[list[str]]:
    """The cells of a Markdown table's body rows."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("|")]


@pytest.mark.slow  # trains a model, then scores 9 settings: 6 s (idle) to 90 s (loaded) on the shared 2-core CPU
def test_recon_vs_inversion_prints_and_saves_its_tables_and_figure(recon_vs_inversion):
    out, printed = recon_vs_inversion
    assert "trained here, a short run of 1 epoch(s)" in printed and "image size 64" in printed
    assert "CPU cores" in printed and "thread(s)" in printed
    assert (out / "fit" / "checkpoints" / "last.ckpt").is_file()
    tables = out.with_suffix(".md").read_text()
    assert tables.strip() in printed
    _, image, pixel, paper = re.split(r"^\(.\) .*$", tables, flags=re.MULTILINE)
    recon = "| S | recon p=20% | recon p=50% |"
    assert image.strip().startswith(f"{recon} inversion | inversion NLL | inversion sp | inversion paper text |")
    assert pixel.strip().startswith(f"{recon} inversion | inversion paper text |")
    assert paper.strip().startswith(f"{recon} inversion | inversion paper text |")
    for table in (image, pixel):
        rows = table_rows(table.strip())
        assert [row[0] for row in rows] == ["1", "2"]  # sorted by S
        assert all(0 <= float(cell) <= 1 for row in rows for cell in row[1:])  # every equal-NFE cell scored
    auroc = r"\d\.\d{3}"
    # S = 1 has no paper cell (p S < 1); S = 2: p = 20 % gives 0.4 (empty), p = 50 % grid index 1 (NFE 1)
    one, two = table_rows(paper.strip())
    assert one[:3] == ["1", "-", "-"] and two[:2] == ["2", "-"] and re.fullmatch(rf"{auroc} \(NFE 1\)", two[2])
    assert all(re.fullmatch(rf"{auroc} \(NFE {s}\)", cell) for s, row in ((1, one), (2, two)) for cell in row[3:])
    assert (out / "recon_vs_inversion.png").stat().st_size > 0
    assert len((out / "ablation.csv").read_text().splitlines()) == 1 + 9


@pytest.mark.slow  # scores 2 settings of the model trained above
def test_reverse_scoring_reuses_a_checkpoint_and_prints_its_table(recon_vs_inversion, tmp_path):
    out, fitted = tmp_path / "reverse", recon_vs_inversion[0] / "fit"
    printed = run_script("reverse_scoring.py", "--ckpt_path", str(fitted), *TINY, "--steps", "2,1", "--out", str(out))
    assert "given (1 training steps)" in printed and "CPU cores" in printed  # what was measured, and where
    table = out.with_suffix(".md").read_text()
    assert table.strip() in printed
    assert "| S | NLL AUROC | spatial norm AUROC | combined AUROC | NLL median normal | NLL median anomalous |" in table
    assert [line.split(" | ")[0] for line in table.splitlines() if line[:3] in ("| 1", "| 2")] == ["| 1", "| 2"]
    assert (out / "reverse_scoring.png").stat().st_size > 0
    assert not (out / "fit").exists()  # the given checkpoint was used, nothing trained


def fake_test_run(run: Path, normal_scores: list[float], threshold: float, category: str = "widget",
                  irf_auroc: float = 0.9) -> Path:  # fmt: skip
    """A test run directory as `test` writes it: metrics.json (one category, an irf head with a map, an
    iforest head without one, a raw term) and scores.csv (two anomalous images, then the normal ones)."""
    run.mkdir(parents=True)
    irf = {"image_auroc": irf_auroc, "pixel_auroc": 0.8, "aupro": 0.7, "f1": 0.6, "ms_per_image": 5.0}
    iforest = {"image_auroc": 0.55, "f1": 0.1, "ms_per_image": 1.0}
    heads = {"irf": irf, "irf_prior": {"image_auroc": 0.5}, "iforest": iforest}
    metrics = {"heads": heads, "categories": {category: {"heads": heads}},
               "thresholds": {"deployed_image_threshold": {"irf": threshold, "iforest": 100.0}}}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = [("a0.png", 1, 9.0), ("a1.png", 1, 8.0)] + [(f"n{i}.png", 0, s) for i, s in enumerate(normal_scores)]
    lines = ["path,label,irf,irf_prior,iforest"] + [f"/d/widget/test/x/{p},{label},{s},0,{s}" for p, label, s in rows]
    (run / "scores.csv").write_text("\n".join(lines) + "\n")
    return run


def test_headline_reports_every_decided_head_and_the_normal_false_positive_rate(tmp_path):
    demo = fake_test_run(tmp_path / "demo", [1.0, 2.0, 3.0, 4.0], threshold=3.0)  # 2 of 4 normals at/above 3
    photos = fake_test_run(tmp_path / "photos", [1.0, 2.0], threshold=5.0)  # none
    out = tmp_path / "headline.csv"
    run_script("headline.py", "--run", f"demo={demo}", "--run", f"photos={photos}", "--out", str(out))
    with out.open() as f:
        rows = {(r["set"], r["head"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("demo", "irf"), ("demo", "iforest"), ("photos", "irf"), ("photos", "iforest")}  # no raw term
    assert float(rows["demo", "irf"]["normal FPR"]) == 0.5 and float(rows["photos", "irf"]["normal FPR"]) == 0.0
    assert float(rows["demo", "iforest"]["normal FPR"]) == 0.0 and rows["demo", "iforest"]["pixel AUROC"] == ""
    assert float(rows["demo", "irf"]["image AUROC"]) == 0.9
    categories = (tmp_path / "headline_categories.md").read_text()
    assert "| demo | widget | irf | 0.900 | 0.800 |" in categories


def test_headline_reads_a_benchmark_as_one_run_of_its_categories(tmp_path):
    """A benchmark directory (a test run per category): means over the categories, the normal FPR pooled over
    every normal test image (2 of 6 here), each category's own row."""
    bench = tmp_path / "bench"
    fake_test_run(bench / "widget" / "test", [1.0, 2.0, 3.0, 4.0], threshold=3.0)  # 2 of 4 normals flagged
    fake_test_run(bench / "gadget" / "test", [1.0, 2.0], threshold=5.0, category="gadget", irf_auroc=0.7)
    (bench / "all_categories" / "fit").mkdir(parents=True)  # the shared model's run: no test, not a category
    out = tmp_path / "headline.csv"
    run_script("headline.py", "--run", f"photos={bench}", "--out", str(out))
    with out.open() as f:
        rows = {(r["set"], r["head"]): r for r in csv.DictReader(f)}
    assert float(rows["photos", "irf"]["image AUROC"]) == pytest.approx(0.8)
    assert float(rows["photos", "irf"]["normal FPR"]) == pytest.approx(2 / 6)
    categories = (tmp_path / "headline_categories.md").read_text()
    assert "| photos | gadget | irf | 0.700 | 0.800 |" in categories and "| photos | widget | irf | 0.900" in categories


def test_first_command_runs_the_readme_first_bash_block_stage_by_stage(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # its `harness` import, as `python experiments/...` finds it
    script = runpy.run_path(str(EXPERIMENTS / "first_command.py"))
    readme = Path(__file__).parents[1] / "README.md"
    command = script["first_command"](readme)
    assert command == readme.read_text().split("```bash\n")[1].split("\n```")[0].strip()
    stages = command.split(" && ")
    assert stages[0].startswith("python3 -m venv") and stages[-1].endswith("test --ckpt_path runs")


def test_training_levers_tables_finished_variants_with_paired_differences_to_the_first(tmp_path):
    out = tmp_path / "levers"
    for name, normals in (("default", [1.0, 2.0, 8.5, 3.0]), ("finer", [1.0, 2.0, 3.0, 4.0])):
        fake_test_run(out / name / "test", normals, threshold=5.0)
        (out / name / "fit_seconds.txt").write_text("12.5\n")
    variants = "{default: [], finer: [--model.grid, finest], unfinished: {steps: 10}}"
    printed = run_script("training_levers.py", "--variants", variants, "--only", "default,finer", "--heads", "irf",
                         "--out", str(out))  # fmt: skip
    rows = {(r["variant"], r["head"]): r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert set(rows) == {("default", "irf"), ("finer", "irf")}  # `unfinished` was neither asked for nor run
    assert float(rows["default", "irf"]["image_auroc"]) == pytest.approx(0.875)  # 8.5 outranks the anomaly 8
    assert float(rows["finer", "irf"]["image_auroc"]) == pytest.approx(1.0)
    assert float(rows["finer", "irf"]["image_vs_default"]) == pytest.approx(0.125)
    assert rows["default", "irf"]["image_vs_default_interval"] == "[0.000, 0.000]"
    assert rows["finer", "irf"]["fit_seconds"] == "12.5" and rows["finer", "irf"]["pixel_auroc"] == "0.8"
    assert out.with_suffix(".md").read_text().strip() in printed


def test_training_levers_refuses_a_bad_variant_and_runs_of_other_images(tmp_path):
    with pytest.raises(SystemExit, match="variant 'x' has unknown keys \\['step'\\]"):
        run_script("training_levers.py", "--variants", "{x: {step: 10}}", "--out", str(tmp_path / "a"))
    with pytest.raises(SystemExit, match="no variants \\['y'\\]"):
        run_script("training_levers.py", "--variants", "{x: []}", "--only", "y", "--out", str(tmp_path / "a"))
    out = tmp_path / "b"
    fake_test_run(out / "default" / "test", [1.0, 2.0], threshold=5.0)
    fake_test_run(out / "other" / "test", [1.0, 2.0, 3.0], threshold=5.0)  # one more normal image
    for name in ("default", "other"):
        (out / name / "fit_seconds.txt").write_text("1.0\n")
    with pytest.raises(SystemExit, match="did not score the same test images"):
        run_script("training_levers.py", "--variants", "{default: [], other: []}", "--heads", "irf", "--out", str(out))


@pytest.fixture
def anomalib_patchcore(monkeypatch) -> dict:
    """experiments/anomalib_patchcore.py's functions; its anomalib imports are inside the functions that fit and
    score anomalib's model, so the timing, latency-model and report code runs without anomalib installed."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # its `harness` import
    return runpy.run_path(str(EXPERIMENTS / "anomalib_patchcore.py"))


def test_anomalib_patchcore_times_every_model_on_each_image_in_rotating_order(anomalib_patchcore):
    calls = []
    scorers = {name: (lambda image, name=name: calls.append((name, int(image[0, 0])))) for name in ("a", "b", "c")}
    images = torch.arange(5.0).view(5, 1, 1, 1)  # image i holds the value i
    seconds = anomalib_patchcore["batch1_latency"](scorers, images, 2)
    assert calls[:6] == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]  # the first model rotates
    assert sorted(calls) == sorted((n, i) for n in "abc" for i in range(5))  # each model once on each image
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3, "c": 3}  # 2 warm-up dropped
    rows = anomalib_patchcore["timing_rows"]({"scorers": scorers, "images": images}, [1], 2)
    assert {(r["model"], r["metric"], r["threads"]) for r in rows} == {
        (n, m, 1) for n in "abc" for m in ("median_ms", "p90_ms")
    }


def test_anomalib_patchcore_times_a_checkpoints_head_as_configured(anomalib_patchcore, easy_model):
    latency_scorers = anomalib_patchcore["latency_scorers"]
    image = torch.rand(1, 3, 128, 128)
    (default,) = latency_scorers([f"ensemble={easy_model.ckpt}:ensemble"], None).values()
    assert set(default(image)) == {"irf", "irf_bank", "ensemble"}  # the default ensemble and its members
    (irf_only,) = latency_scorers([f"e={easy_model.ckpt}:ensemble"], {"ensemble": {"weights": {"irf": 1.0}}}).values()
    assert set(irf_only(image)) == {"irf", "ensemble"}  # head_args took effect (the heads refitted first)
    with pytest.raises(SystemExit, match="expected LABEL=CHECKPOINT:HEAD"):
        latency_scorers([str(easy_model.ckpt)], None)
    with pytest.raises(SystemExit, match="has no head 'nope'"):
        latency_scorers([f"x={easy_model.ckpt}:nope"], None)


def test_anomalib_patchcore_reports_means_and_latency_with_its_settings(anomalib_patchcore, tmp_path):
    rows = [{"model": m, "category": c, "metric": f"{k}_auroc", "value": v}
            for m, c, k, v in [("anomalib", "x", "image", 0.9), ("anomalib", "y", "image", 0.7),
                               ("anomalib", "x", "pixel", 0.8), ("anomalib", "y", "pixel", 0.6),
                               ("ours", "x", "image", 1.0), ("ours", "y", "image", 0.8),
                               ("ours", "x", "pixel", 0.9), ("ours", "y", "pixel", 0.7)]]  # fmt: skip
    rows += anomalib_patchcore["mean_rows"](rows)
    means = {(r["model"], r["metric"]): r["value"] for r in rows if r["category"] == "mean"}
    assert means == pytest.approx({("anomalib", "image_auroc"): 0.8, ("anomalib", "pixel_auroc"): 0.7,
                                   ("ours", "image_auroc"): 0.9, ("ours", "pixel_auroc"): 0.8})  # fmt: skip
    common = {"category": "latency", "threads": 2, "load_before": 0.5, "load_after": 0.6}
    rows += [{**common, "model": "ours", "metric": "median_ms", "value": 21.0},
             {**common, "model": "ours", "metric": "p90_ms", "value": 23.0}]  # fmt: skip
    args = argparse.Namespace(data_root=tmp_path / "photos", latency_category="x", warmup=3, images=20)
    report = anomalib_patchcore["report"](args, ["- header"], rows, {"max_difference": 0.0,
                                          "fit_seconds": {"x": 12.4, "y": None}}, ["anomalib", "ours"])  # fmt: skip
    assert report.startswith("# Our patchcore head against anomalib's PatchCore (photos)\n\n- header")
    assert "| mean | 0.800 | 0.700 | 0.900 | 0.800 |" in report
    assert "| ours | 2 | 21.000 | 23.000 | 0.500 | 0.600 |" in report
    assert "x 12 s, y reused" in report


def test_anomalib_patchcore_pairs_a_model_with_anomalib_on_the_same_images(anomalib_patchcore, tmp_path):
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    masks = torch.zeros(6, 8, 8)
    masks[3:, 2:5, 2:5] = 1  # the anomalous images' defects
    theirs = (labels + torch.rand(6, generator=generator), masks + torch.rand(6, 8, 8, generator=generator))
    ours = (labels * 2 + torch.rand(6, generator=generator), masks * 2 + torch.rand(6, 8, 8, generator=generator))
    split = lambda pair: [(pair[0][:3], pair[1][:3]), (pair[0][3:], pair[1][3:])]  # noqa: E731 categories a, b
    order = [0, 3, 1, 4, 2, 5]  # each category holds both classes
    theirs, ours = [(scores[order], maps[order]) for scores, maps in (theirs, ours)]
    truth = {"groups": ["a"] * 3 + ["b"] * 3, "labels": [labels[order][:3], labels[order][3:]],
             "masks": [masks[order][:3], masks[order][3:]]}  # fmt: skip
    rows = anomalib_patchcore["paired_rows"]({"truth": truth, "anomalib": split(theirs), "paired": {"e": split(ours)}},
                                             200)  # fmt: skip
    value = {r["metric"]: r["value"] for r in rows if r["model"] == "e" and r["category"] == "paired"}

    def mean_auroc(scores, targets):
        return (roc_auc_score(targets[:3], scores[:3]) + roc_auc_score(targets[3:], scores[3:])) / 2

    image = mean_auroc(ours[0], labels[order]) - mean_auroc(theirs[0], labels[order])
    assert value["image_difference"] == pytest.approx(image, abs=1e-9)
    pixel = (roc_auc_score(masks[order][:3].flatten(), ours[1][:3].flatten())
             + roc_auc_score(masks[order][3:].flatten(), ours[1][3:].flatten())) / 2 - (
             roc_auc_score(masks[order][:3].flatten(), theirs[1][:3].flatten())
             + roc_auc_score(masks[order][3:].flatten(), theirs[1][3:].flatten())) / 2  # fmt: skip
    assert value["pixel_difference"] == pytest.approx(pixel, abs=2e-3)  # binned as the bootstrap bins
    for unit in ("image", "pixel"):
        assert value[f"{unit}_difference_low"] <= value[f"{unit}_difference"] <= value[f"{unit}_difference_high"]
    args = argparse.Namespace(data_root=tmp_path / "photos", latency_category="a", warmup=3, images=20, boot=200)
    auroc = [{"model": m, "category": c, "metric": f"{k}_auroc", "value": 0.5}
             for m in ("anomalib", "e") for c in ("a", "b") for k in ("image", "pixel")]  # fmt: skip
    report = anomalib_patchcore["report"](args, ["- header"], auroc + rows, {"max_difference": 0.0,
                                          "fit_seconds": {"a": None}}, ["anomalib", "e"])  # fmt: skip
    assert f"| e | {value['image_difference']:+.3f} [{value['image_difference_low']:+.3f}, " in report
    assert "| b | 0.500 | 0.500 | 0.500 | 0.500 |" in report  # the paired rows are not a category


def test_anomalib_patchcore_fits_a_paired_models_heads_on_one_category(anomalib_patchcore, easy_model):
    from harness import fit_heads_on_category  # on sys.path through the anomalib_patchcore fixture

    irf_only = {"ensemble": {"weights": {"irf": 1.0}}}
    models = anomalib_patchcore["paired_models"]([f"e={easy_model.ckpt}:ensemble"], irf_only)
    model, ckpt, head = models["e"]
    assert head == "ensemble" and set(model.heads) >= {"irf", "ensemble"}
    model.heads_fitted_on = ["other"]
    assert fit_heads_on_category(model, ckpt, easy_model.root, "easy").categories == ["easy"]
    model.prepare_inference()
    assert model.heads_fitted_on == ["easy"] and model.refit_reason(["easy"]) is None
    scores, maps = anomalib_patchcore["our_outputs"](model, torch.rand(2, 3, 128, 128), "ensemble")
    assert scores.shape == (2,) and maps.shape == (2, 128, 128) and torch.isfinite(maps).all()
    with pytest.raises(SystemExit, match="has no head 'nope'"):
        anomalib_patchcore["paired_models"]([f"x={easy_model.ckpt}:nope"], None)


def test_stage_view_reproduces_irf_bank_before_it_changes_the_view(easy_model, tmp_path):
    out = tmp_path / "stage_view.csv"
    run_script("stage_view.py", "--ckpt_path", str(easy_model.ckpt), "--data_root", str(easy_model.root),
               "--categories", "easy", "--out", str(out))  # fmt: skip
    with out.open() as f:
        value = {(r["category"], r["variant"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}
    variants = {"irf", "irf_bank", "ensemble", "bank_fused", "bank_stages", "stages_only", "ensemble_stages"}
    assert {v for _, v, _ in value} == variants and {c for c, _, _ in value} == {"easy", "mean"}
    # the script's own bank on [z0, r] is the irf_bank head: same image scores' order, same maps up to float noise
    assert value[("easy", "bank_fused", "image_auroc")] == value[("easy", "irf_bank", "image_auroc")]
    pixel = value[("easy", "irf_bank", "pixel_auroc")]
    assert value[("easy", "bank_fused", "pixel_auroc")] == pytest.approx(pixel, abs=1e-3)
    assert all(0.0 <= v <= 1.0 for v in value.values())
    means, per_category = out.with_suffix(".md").read_text().split("Per category:")
    assert "| mean | stages_only |" in means and "| easy | stages_only |" in per_category


def test_anomalib_patchcore_shows_paths_under_the_home_directory_with_a_tilde(anomalib_patchcore):
    shown = anomalib_patchcore["shown"]
    assert shown(Path.home() / ".cache" / "photos") == "~/.cache/photos"
    assert shown("/tmp/x") == "/tmp/x" and shown(str(Path.home()) + "x/y") == str(Path.home()) + "x/y"

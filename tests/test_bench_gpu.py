"""experiments/bench_gpu.py on the CPU at tiny settings, on a small demo set rendered into tmp."""

import argparse
import contextlib
import csv
import importlib.util
import io
import math
import runpy
import sys
from itertools import product
from pathlib import Path

import pytest
import torch

from ad_lightning.data.demo import ensure_demo
from ad_lightning.data.images import BadInputError

SCRIPT = Path(__file__).parents[1] / "experiments" / "bench_gpu.py"
HEADS = ("irf", "likelihood", "reconstruction")
TINY = ["--sizes", "tiny", "--train_steps", "2", "--train_batch", "8", "--score_batch", "4", "--images", "3",
        "--repeats", "2", "--warmup", "1", "--fit_images", "8", "--image_size", "64", "--device", "cpu"]  # fmt: skip


def run_script(*args: str) -> str:
    """`python experiments/bench_gpu.py args`, in this process; returns what it printed."""
    printed, threads = io.StringIO(), torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
            mp.setattr(sys, "argv", [SCRIPT.name, *args])
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[list[dict], str, str]:
    """One run on a rendered 64-px fabric set: (CSV rows, Markdown file, printed output)."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    root = ensure_demo(tmp / "demo", categories=("fabric",), n_train=8, n_test_good=2, n_per_defect=1, image_size=64)
    out = tmp / "bench.csv"
    printed = run_script("--root", str(root), *TINY, "--heads", ",".join(HEADS), "--compile", "off", "--out", str(out))
    with out.open() as f:
        rows = list(csv.DictReader(f))
    return rows, out.with_suffix(".md").read_text(), printed


def positive(value: str) -> bool:
    return math.isfinite(float(value)) and float(value) > 0


def test_one_training_row_per_size_with_positive_rates(bench):
    rows, _, _ = bench
    train = [r for r in rows if r["kind"] == "train"]
    assert [(r["denoiser"], r["batch"], r["precision"]) for r in train] == [("tiny", "8", "fp32")]  # CPU default: fp32
    for key in ("images_per_s", "steps_per_s", "ms_median", "ms_p95", "first_call_s", "peak_mem_mb"):
        assert positive(train[0][key]), key
    assert float(train[0]["ms_p95"]) >= float(train[0]["ms_median"])


def test_one_scoring_row_per_head_batch_precision_and_compile_setting(bench):
    rows, _, _ = bench
    score = [r for r in rows if r["kind"] == "score"]
    keys = [(r["head"], int(r["batch"]), r["precision"], r["compile"]) for r in score]
    assert sorted(keys) == sorted(product(HEADS, (4, 1), ("fp32", "bf16"), ("off",)))
    for row in score:
        if row["precision"] == "bf16":  # bf16 scoring only takes effect on CUDA
            assert row["note"] == "n/a (CUDA only)" and row["images_per_s"] == row["ms_median"] == ""
            continue
        assert row["note"] == "" and row["denoiser"] == "tiny"
        assert all(positive(row[k]) for k in ("images_per_s", "ms_median", "ms_p95", "first_call_s", "peak_mem_mb"))
        assert float(row["ms_p95"]) >= float(row["ms_median"])
    nfe = {r["head"]: int(r["nfe"]) for r in score}
    assert nfe["irf"] == 1 and nfe["likelihood"] == 3  # one step; inversion at S = 3, the target's setting


def test_markdown_file_holds_the_csv_rows(bench):
    rows, markdown, _ = bench
    table = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    columns, cells = [c.strip() for c in table[0]], [[c.strip() for c in line] for line in table[2:]]
    assert columns == list(rows[0]) and len(cells) == len(rows)
    for row, line in zip(rows, cells):
        for value, cell in zip(row.values(), line):
            if value == "":
                assert cell == "-"
            elif cell.replace(".", "", 1).isdigit() and "." in cell:  # floats are shown with 3 decimals
                assert float(cell) == pytest.approx(float(value), abs=5e-4)
            else:
                assert cell == value


def test_prints_where_and_what_it_measured(bench):
    _, markdown, printed = bench
    assert f"torch {torch.__version__}" in printed and "device: " in printed
    assert "speed does not depend on weight values" in printed and "64 x 64" in printed
    assert "CPU run: target not applicable" in printed
    header = markdown.split("\n\n")[0].splitlines()
    assert len(header) >= 4 and all(line.removeprefix("- ") in printed for line in header)  # the printed lines


def test_renders_the_demo_set_when_no_root_is_given(tmp_path):
    out = tmp_path / "bench.csv"
    printed = run_script(*TINY, "--heads", "irf", "--out", str(out))
    assert "the demo set ('fabric', rendered for this run), 64 x 64" in printed
    assert "heads fitted on 6 + 2 normal images" in printed  # --fit_images 8, a quarter held out
    assert len(out.read_text().splitlines()) == 1 + 1 + 4  # header, training, irf x (4, 1) x (fp32, bf16)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "huge"], "--sizes ['huge']"),
        (["--heads", "ensemble"], "--heads ['ensemble']"),
        (["--category", "bottle"], "not a demo category"),
        (["--warmup", "0"], "--warmup 0"),
    ],
)
def test_refuses_settings_that_cannot_take_effect(args, message):
    with pytest.raises(BadInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_script(*args, "--device", "cpu")


def row(head: str, batch: int, rate: float | None, precision: str) -> dict:
    """A compiled scoring row as bench_gpu records it."""
    fields = {"kind": "score", "head": head, "batch": batch, "precision": precision, "compile": "on"}
    return {**fields, "images_per_s": rate}


def test_the_target_is_judged_by_each_heads_fastest_batch_row():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    rows = [
        row("irf", 64, 500.0, "fp32"),
        row("irf", 64, 900.0, "bf16"),  # 900 >= 10 x 88 = 880
        row("irf", 1, 5000.0, "bf16"),  # batch 1 does not count
        row("likelihood", 64, 879.0, "bf16"),
        {**row("likelihood", 64, None, "fp32"), "note": "failed: OutOfMemoryError"},
    ]
    args = argparse.Namespace(device=torch.device("cuda"), heads=["irf", "likelihood"], score_batch=64, image_size=256)
    irf, likelihood = bench_gpu.target_lines(rows, args)
    assert irf.endswith("900 (bf16, compile on) -> met") and ">= 880 images/s" in irf
    assert likelihood.endswith("879 (bf16, compile on) -> NOT met")
    assert bench_gpu.target_lines(rows[:3], args)[1] == "target: likelihood: no successful batch-64 row"
    assert bench_gpu.target_lines(rows, argparse.Namespace(**{**vars(args), "device": torch.device("cpu")})) == [
        "CPU run: target not applicable"
    ]

"""experiments/eval_memory.py on a few small images: runs, reports, and binned agrees with exact."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "eval_memory.py"


@pytest.fixture(scope="module")
def eval_memory():
    spec = importlib.util.spec_from_file_location("eval_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(eval_memory, tmp_path, mode, capsys):
    out = tmp_path / mode
    args = ["--images", "24", "--size", "64", "--mode", mode, "--heads", "2", "--batch", "5", "--out", str(out)]
    code = eval_memory.main(args)
    return code, json.loads((out / "metrics.json").read_text()), capsys.readouterr().out


def test_binned_run_reports_memory_and_matches_exact(eval_memory, tmp_path, capsys):
    code, binned, printed = run(eval_memory, tmp_path, "binned", capsys)
    assert code == 0
    assert "images: 24, pixels per head: 98,304, mode: binned" in printed
    assert "peak resident memory:" in printed and "within 3072 MB" in printed
    assert binned["n_test_images"] == 24 and 6 <= binned["n_anomalous"] <= 18
    assert set(binned["categories"]) == set(eval_memory.CATEGORIES)
    assert all(note.startswith("binned") for note in binned["pixel_metrics_mode"].values())
    assert 0 < binned["heads"]["head0"]["pixel_recall"] < 1  # head0 makes pixel decisions
    _, exact, _ = run(eval_memory, tmp_path, "exact", capsys)
    assert exact["pixel_metrics_mode"]["head0"].startswith("exact")
    for head in ("head0", "head1"):
        for metric in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
            assert 0.05 < exact["heads"][head][metric] < 1.0
            assert binned["heads"][head][metric] == pytest.approx(exact["heads"][head][metric], abs=0.005)


def test_over_the_limit_fails_in_binned_mode_only(eval_memory, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_memory, "LIMIT_MB", 1)
    assert run(eval_memory, tmp_path, "binned", capsys)[0] == 1
    assert run(eval_memory, tmp_path, "exact", capsys)[0] == 0

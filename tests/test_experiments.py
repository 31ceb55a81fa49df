"""experiments/recon_vs_inversion.py and experiments/reverse_scoring.py on a tiny tree with tiny settings."""

import contextlib
import io
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
    reconstruction p {0.2, 0.4} x S {1, 2} and inversion S {1, 2}."""
    tmp = tmp_path_factory.mktemp("experiments")
    root = build_mvtec_tree(tmp / "data", n_train=20, n_test_good=4)
    out = tmp / "recon_vs_inversion"
    printed = run_script("recon_vs_inversion.py", "--root", str(root), *TINY, "--epochs", "1", "--image_size", "64",
                         "--steps", "2,1", "--perturbation", "0.2,0.4", "--out", str(out))  # fmt: skip
    return out, printed


@pytest.mark.slow  # trains a model, then scores 6 settings: 4 s (idle) to 70 s (loaded) on the shared 2-core CPU
def test_recon_vs_inversion_prints_and_saves_its_table_and_figure(recon_vs_inversion):
    out, printed = recon_vs_inversion
    assert "trained here, a short run of 1 epoch(s)" in printed and "image size 64" in printed
    assert "CPU cores" in printed and "thread(s)" in printed
    assert (out / "fit" / "checkpoints" / "last.ckpt").is_file()
    tables = (out / "recon_vs_inversion.md").read_text()
    assert tables.strip() in printed
    image, pixel = tables.split("pixel AUROC")
    header = "| S | recon p=20% | recon p=40% | inversion | inversion NLL | inversion sp |"
    assert header in image and "| S | recon p=20% | recon p=40% | inversion |" in pixel
    rows = [line for line in image.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [line.split(" | ")[0] for line in rows] == ["| 1", "| 2"]  # sorted by S
    assert all(cell.strip() not in ("", "-") for line in rows for cell in line.strip("|").split("|"))
    assert (out / "recon_vs_inversion.png").stat().st_size > 0
    assert len((out / "ablation.csv").read_text().splitlines()) == 1 + 6


@pytest.mark.slow  # scores 2 settings of the model trained above
def test_reverse_scoring_reuses_a_checkpoint_and_prints_its_table(recon_vs_inversion, tmp_path):
    out, fitted = tmp_path / "reverse", recon_vs_inversion[0] / "fit"
    printed = run_script("reverse_scoring.py", "--ckpt_path", str(fitted), *TINY, "--steps", "2,1", "--out", str(out))
    assert "given (1 training steps)" in printed and "CPU cores" in printed  # what was measured, and where
    table = (out / "reverse_scoring.md").read_text()
    assert table.strip() in printed
    assert "| S | NLL AUROC | spatial norm AUROC | combined AUROC | NLL median normal | NLL median anomalous |" in table
    assert [line.split(" | ")[0] for line in table.splitlines() if line[:3] in ("| 1", "| 2")] == ["| 1", "| 2"]
    assert (out / "reverse_scoring.png").stat().st_size > 0
    assert not (out / "fit").exists()  # the given checkpoint was used, nothing trained

"""Detection quality against the training budget: one model per budget (optimizer steps), every
other setting at its default, scored by `test`; the curve the default `--trainer.max_steps` is chosen from.

    python experiments/training_budget.py --data Demo --steps 250,500,1000,2000 --out results/training_budget/demo
    python experiments/training_budget.py --data Photos --steps 250,500,1000,2000 --out results/training_budget/photos

Each budget trains one model on all categories of the set (as the README's first command does) with
the learning-rate schedule stretched to that budget, fits the heads once at its end, then tests it.
Any other option is passed to `fit` (e.g. `--model.lr 1e-3`, `--data.feature_cache disk`).
Writes `<out>.csv` (one row per budget and head: mean image and pixel AUROC over the categories, and
the training time) with a Markdown table beside it, and `<out>/auroc_vs_steps.png`. A budget whose
test run is complete is not retrained (`--force` redoes it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ad_lightning.ablate import int_list, line_plot
from ad_lightning.cli import main as cli
from ad_lightning.evaluation.tables import markdown_table, write_csv

COLUMNS = ("steps", "head", "image_auroc", "pixel_auroc", "aupro", "fit_seconds")


def run_budget(args: argparse.Namespace, steps: int, name: str | None = None, options: list[str] = ()) -> Path:
    """Fit (`steps` optimizer steps, `args.fit_args` then `options` passed to `fit`) then test one model
    in `<args.out>/<name>` (default `steps<steps>`); returns the test run's directory."""
    name = name or f"steps{steps}"
    base = ["--data", args.data, "--data.category", args.category, "--model.heads", args.heads,
            "--model.latency_images", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(args.out), "--trainer.logger.init_args.name", name]  # fmt: skip
    if args.root:
        base += ["--data.root", args.root]
    start = time.perf_counter()
    cli(["fit", *base, *args.fit_args, *options, "--trainer.max_steps", str(steps),
         "--trainer.logger.init_args.version", "fit"])  # fmt: skip
    seconds = time.perf_counter() - start
    run = args.out / name
    cli(["test", *base, "--trainer.logger.init_args.version", "test",
         "--ckpt_path", str(run / "fit" / "checkpoints" / "last.ckpt")])  # fmt: skip
    (run / "fit_seconds.txt").write_text(f"{seconds:.1f}\n")
    return run / "test"


def budget_rows(steps: int, run: Path) -> list[dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    seconds = float((run.parent / "fit_seconds.txt").read_text())
    return [
        {"steps": steps, "head": head, **{c: values.get(c) for c in COLUMNS[2:5]}, "fit_seconds": seconds}
        for head, values in metrics["heads"].items()
        if "pixel_auroc" in values
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="Demo", help="DataModule short name (Demo, Photos, MVTecAD, ...)")
    parser.add_argument("--root", help="data root (default: the DataModule's)")
    parser.add_argument("--category", default="all")
    parser.add_argument("--heads", default="likelihood,irf,irf_bank,ensemble", help="heads scored (an ensemble needs its members)")
    parser.add_argument("--steps", type=int_list, default=[250, 500, 1000, 2000], help="training budgets")
    parser.add_argument("--out", type=Path, required=True, help="output directory; <out>.csv and .md beside it")
    parser.add_argument("--force", action="store_true", help="retrain budgets that already have results")
    args, args.fit_args = parser.parse_known_args()  # any other option goes to `fit`, e.g. --model.lr 1e-3
    rows = []
    for steps in args.steps:
        run = args.out / f"steps{steps}" / "test"
        if args.force or not (run / "metrics.json").is_file():
            run = run_budget(args, steps)
        rows += budget_rows(steps, run)
    csv_path = args.out.with_suffix(".csv")
    write_csv(csv_path, rows, COLUMNS)
    csv_path.with_suffix(".md").write_text(markdown_table(rows, COLUMNS) + "\n")
    for metric in ("image_auroc", "pixel_auroc"):
        series = {h: ([r["steps"] for r in rows if r["head"] == h], [r[metric] for r in rows if r["head"] == h])
                  for h in dict.fromkeys(r["head"] for r in rows)}  # fmt: skip
        line_plot(args.out / f"{metric}_vs_steps.png", series, "training steps", metric, log_x=True)
    print("\n" + markdown_table(rows, COLUMNS) + f"\n\nresults: {csv_path}")


if __name__ == "__main__":
    main()

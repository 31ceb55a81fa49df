"""The README's headline tables: every head of one model per development set (trained on all of the set's
categories, as the README's first command trains on the demo set), from the sets' `test` runs.

    python experiments/headline.py --run demo=results/first_command_runs/version_1 \\
        --run photos=results/headline_runs/photos/version_0

Writes results/headline.csv and .md (per head and set: mean over categories of image / pixel AUROC,
AUPRO, F1 at the deployed threshold, the share of normal test images flagged at that threshold (its target
is 1 - threshold_q, 1 %), ms per image at batch 1) and results/headline_categories.csv and
.md (image / pixel AUROC per set, category and head). A run may also be a `benchmark` directory (one test
run per category, e.g. `benchmark --ckpt_path`: the heads fitted on each category alone).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ad_lightning.evaluation.tables import markdown_table, write_csv

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1", "normal_fpr", "ms_per_image")
SHORT = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "f1": "F1",
         "normal_fpr": "normal FPR", "ms_per_image": "ms / image"}  # fmt: skip


def named_run(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not path or not (is_run(Path(path)) or benchmark_runs(Path(path))):
        raise argparse.ArgumentTypeError(
            f"--run {text!r}: give NAME=DIR, DIR a complete test run (its metrics.json) or a benchmark's directory "
            "(<category>/test/metrics.json under it)"
        )
    return name, Path(path)


def is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file()


def benchmark_runs(path: Path) -> dict[str, Path]:
    """category -> its test run, of a `benchmark` directory (one test run per category), sorted by category."""
    return {run.parent.name: run for run in sorted(path.glob("*/test")) if is_run(run)}


def scored_heads(heads: dict) -> dict[str, dict]:
    """The heads with a deployed decision (raw terms such as likelihood_nll left out)."""
    return {h: v for h, v in heads.items() if "f1" in v}


def normal_rows(run: Path) -> list[dict]:
    """The rows of the normal test images (label 0) of a run's scores.csv."""
    with (run / "scores.csv").open() as f:
        return [row for row in csv.DictReader(f) if row["label"] == "0"]


def load_run(run: Path) -> dict:
    """A test run's metrics.json, with each head's normal_fpr (the share of normal test images at or above its
    deployed threshold) and the number of normal test images (`normal_images`) added."""
    metrics = json.loads((run / "metrics.json").read_text())
    normal = normal_rows(run)
    for head, threshold in metrics["thresholds"]["deployed_image_threshold"].items():
        metrics["heads"][head]["normal_fpr"] = sum(float(row[head]) >= threshold for row in normal) / len(normal)
    metrics["normal_images"] = len(normal)
    return metrics


def load_benchmark(path: Path) -> dict:
    """A benchmark's test runs (one per category, each with its own heads) as one run's metrics: per head the
    mean over categories of each metric, except the normal FPR, pooled over every normal test image."""
    runs = {category: load_run(run) for category, run in benchmark_runs(path).items()}
    normal = sum(metrics["normal_images"] for metrics in runs.values())
    heads: dict[str, dict] = {}
    for head in scored_heads(next(iter(runs.values()))["heads"]):
        values = [metrics["heads"][head] for metrics in runs.values()]
        means = {m: sum(v[m] for v in values) / len(values) for m in METRICS if values[0].get(m) is not None}
        flagged = sum(m["heads"][head]["normal_fpr"] * m["normal_images"] for m in runs.values())
        heads[head] = {**means, "normal_fpr": flagged / normal}
    return {"heads": heads, "categories": {c: metrics["categories"][c] for c, metrics in runs.items()}}


def summary(runs: dict[str, dict]) -> list[dict]:
    """A row per set and head: its mean over the set's categories."""
    return [
        {"set": s, "head": h, **{SHORT[m]: v.get(m) for m in METRICS}}
        for s, metrics in runs.items()
        for h, v in scored_heads(metrics["heads"]).items()
    ]


def by_category(runs: dict[str, dict]) -> list[dict]:
    return [
        {"set": s, "category": c, "head": h, "image_auroc": v["image_auroc"], "pixel_auroc": v.get("pixel_auroc")}
        for s, metrics in runs.items()
        for c, values in metrics["categories"].items()
        for h, v in scored_heads(values["heads"]).items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=named_run, action="append", required=True,
                        help="NAME=DIR of a test run, or of a benchmark (heads fitted per category)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/headline.csv"))
    args = parser.parse_args()
    runs = {name: load_run(path) if is_run(path) else load_benchmark(path) for name, path in args.run}
    rows, columns = summary(runs), ["set", "head", *SHORT.values()]
    write_csv(args.out, rows, columns)
    table = markdown_table(rows, columns)
    args.out.with_suffix(".md").write_text(table + "\n")
    categories = args.out.with_name(args.out.stem + "_categories.csv")
    category_columns = ("set", "category", "head", "image_auroc", "pixel_auroc")
    category_rows = by_category(runs)
    write_csv(categories, category_rows, category_columns)
    categories.with_suffix(".md").write_text(markdown_table(category_rows, category_columns) + "\n")
    print(table + f"\n\nresults: {args.out}, {categories}")


if __name__ == "__main__":
    main()

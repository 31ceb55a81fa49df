"""Detection-quality levers, measured on one model of several categories or one model per category (a
benchmark's fitted checkpoints): every head setting of a grid is fitted on the normal train/validation
splits and tested,
and the table holds each setting's mean over categories with 95 % bootstrap intervals over test images.

    python experiments/levers.py --ckpt_path results/budget_demo/steps1000/fit/checkpoints/last.ckpt \\
        --grid experiments/levers.yaml --out results/levers_demo
    python experiments/levers.py --benchmark results/mvtec --out results/levers_mvtec \\
        --grid '{irf: {ridge_mode: [absolute, relative]}, patchcore: {coreset_ratio: [0.1]}}'

`--benchmark DIR` is the run directory `python -m ad_lightning benchmark --out DIR.csv` wrote (one
`<category>/fit/checkpoints/last.ckpt` each); `--ckpt_path CKPT` is instead one model of several categories
(e.g. one trained with `--data.category all`), scored on all of them at once. `--grid` is `ablate`'s (inline YAML or a YAML file such as
experiments/levers.yaml): head -> argument -> values, or a list of such mappings;
an `ensemble` setting fits its members too. Writes `<out>.csv` and `<out>.md` (a row per setting:
mean image / pixel AUROC and their intervals, AUPRO, F1, NFE, ms per image, and the paired difference
of image AUROC to the first setting of the grid, positive = better, with its interval) and each
category's `ablation.csv` under `<out>/<category>/`.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from harness import machine

from ad_lightning.ablate import METRICS, Result, Setting, grid_option, grid_settings, run_ablation
from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.data.stored import datamodule_of
from ad_lightning.evaluation.bootstrap import (
    bootstrap_image_auroc,
    bootstrap_image_auroc_difference,
    interval_of_mean,
)
from ad_lightning.evaluation.tables import markdown_table, write_csv
from ad_lightning.inference import resolve_device

SUMMARY = ("setting", "image_auroc", "image_interval", "pixel_auroc", "pixel_interval", "aupro", "f1", "nfe",
           "ms_per_image", "image_vs_first", "image_vs_first_interval")  # fmt: skip
BOOTSTRAP = 1000


def checkpoints(benchmark: Path) -> dict[str, str]:
    """category -> its fitted checkpoint, for every category of a benchmark run directory."""
    found = {p.parents[2].name: str(p) for p in sorted(benchmark.glob("*/fit/checkpoints/last.ckpt"))}
    if not found:
        raise SystemExit(f"no <category>/fit/checkpoints/last.ckpt under {benchmark}; run `benchmark` first")
    return found


def score_category(ckpt_path: str, settings: list[Setting], out: Path, device: torch.device) -> list[Result]:
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    datamodule = datamodule_of(ckpt, source=ckpt_path)
    results, _ = run_ablation(ckpt_path, settings, datamodule, out, device, {"latency_images": 0})
    return results


def saved_result(setting: Setting, run: Path, categories: list[str]) -> Result:
    """A setting's Result rebuilt from the run directory it left (scores.csv, metrics.json), with no
    pixel draws; each test image's category is the directory component of its path that names one."""
    metrics = json.loads((run / "metrics.json").read_text())
    with (run / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    groups = [next((c for c in Path(r["path"]).parts if c in categories), None) for r in rows]
    if None in groups:
        raise SystemExit(f"{run}/scores.csv: a path names none of the categories {categories}")
    heads = metrics["heads"]
    row = {"nfe": heads[setting.head].get("nfe"), **{m: heads[setting.head].get(m) for m in METRICS}}
    row["ms_per_image"] = heads[setting.head].get("ms_per_image")
    scores = {h: torch.tensor([float(r[h]) for r in rows]) for h in rows[0] if h not in ("path", "label")}
    return Result(setting, row, torch.tensor([int(r["label"]) for r in rows]), groups, scores)


def saved_results(out: Path, settings: list[Setting]) -> dict[str, list[Result]]:
    """Every setting's Results from the run directories a finished levers run left under `out`."""
    by_setting: dict[str, list[Result]] = {s.name: [] for s in settings}
    for model in sorted(p for p in out.iterdir() if (p / "ablation.csv").is_file()):
        categories = list(json.loads((model / "runs" / settings[0].name / "metrics.json").read_text())["categories"])
        for setting in settings:
            by_setting[setting.name].append(saved_result(setting, model / "runs" / setting.name, categories))
    return by_setting


def interval_text(low: float, high: float) -> str:
    return f"[{low:.3f}, {high:.3f}]"


def summary_row(setting: Setting, per_category: list[Result], first: list[Result]) -> dict:
    """The mean over categories of one setting, with bootstrap intervals over the pooled test images."""
    rows = [r.row for r in per_category]
    mean = lambda key: float(np.mean([r[key] for r in rows if r[key] is not None])) if any(r[key] is not None for r in rows) else None  # noqa: E731
    labels = torch.cat([r.labels for r in per_category])
    groups = [c for r in per_category for c in r.categories]
    scores = torch.cat([r.scores[setting.head] for r in per_category])
    image = bootstrap_image_auroc(scores, labels, groups, BOOTSTRAP)
    baseline = torch.cat([r.scores[r.setting.head] for r in first])
    delta = bootstrap_image_auroc_difference(scores, baseline, labels, groups, BOOTSTRAP)
    draws = [d for r in per_category for d in r.pixel_draws.values()]
    pixel = interval_of_mean(draws) if draws else None  # none when the maps were binned (many test pixels)
    return {
        "setting": setting.name, "image_auroc": image.mean, "image_interval": interval_text(image.low, image.high),
        "pixel_auroc": mean("pixel_auroc") if pixel is None else pixel.mean,
        "pixel_interval": None if pixel is None else interval_text(pixel.low, pixel.high),
        "aupro": mean("aupro"), "f1": mean("f1"), "nfe": rows[0]["nfe"], "ms_per_image": mean("ms_per_image"),
        "image_vs_first": delta.mean, "image_vs_first_interval": interval_text(delta.low, delta.high),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--benchmark", type=Path, help="a benchmark's run directory (one model per category)")
    models.add_argument("--ckpt_path", help="one model, scored on all of its categories")
    parser.add_argument("--grid", type=grid_option, required=True, help="head -> argument -> values (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="output stem: <out>.csv, <out>.md, <out>/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--from_runs", action="store_true", help="only summarise the runs a finished levers run left in <out>/")
    args = parser.parse_args()
    settings = grid_settings(args.grid)
    by_setting = saved_results(args.out, settings) if args.from_runs else score_all(args, settings)
    first = by_setting[settings[0].name]
    rows = [summary_row(s, by_setting[s.name], first) for s in settings]
    write_csv(args.out.with_suffix(".csv"), rows, SUMMARY)
    table = markdown_table(rows, SUMMARY)
    args.out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {args.out.with_suffix('.csv')}")


def score_all(args: argparse.Namespace, settings: list[Setting]) -> dict[str, list[Result]]:
    """Every setting scored on every model; setting name -> its Result per model."""
    device = resolve_device(args.device)
    models = {"all": args.ckpt_path} if args.ckpt_path else checkpoints(args.benchmark)
    print(f"levers: {len(settings)} settings x {len(models)} model(s); machine: {machine()}")
    by_setting: dict[str, list[Result]] = {s.name: [] for s in settings}
    for category, ckpt_path in models.items():
        print(f"levers: category {category}", flush=True)
        for result in score_category(ckpt_path, settings, args.out / category, device):
            by_setting[result.setting.name].append(result)
    return by_setting


if __name__ == "__main__":
    main()

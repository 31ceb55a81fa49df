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
from pathlib import Path

import numpy as np
import torch
from harness import machine

from ad_lightning.ablate import Result, Setting, grid_option, grid_settings, run_ablation
from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.evaluation.bootstrap import (
    bootstrap_image_auroc,
    bootstrap_image_auroc_difference,
    interval_of_mean,
)
from ad_lightning.evaluation.tables import markdown_table, write_csv
from ad_lightning.inference import datamodule_of, resolve_device

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
    pixel = interval_of_mean(draws) if draws else None
    return {
        "setting": setting.name, "image_auroc": image.mean, "image_interval": interval_text(image.low, image.high),
        "pixel_auroc": None if pixel is None else pixel.mean,
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
    args = parser.parse_args()
    settings = grid_settings(args.grid)
    device = resolve_device(args.device)
    models = {"all": args.ckpt_path} if args.ckpt_path else checkpoints(args.benchmark)
    print(f"levers: {len(settings)} settings x {len(models)} model(s); machine: {machine()}")
    by_setting: dict[str, list[Result]] = {s.name: [] for s in settings}
    for category, ckpt_path in models.items():
        print(f"levers: category {category}", flush=True)
        for result in score_category(ckpt_path, settings, args.out / category, device):
            by_setting[result.setting.name].append(result)
    first = by_setting[settings[0].name]
    rows = [summary_row(s, by_setting[s.name], first) for s in settings]
    write_csv(args.out.with_suffix(".csv"), rows, SUMMARY)
    table = markdown_table(rows, SUMMARY)
    args.out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()

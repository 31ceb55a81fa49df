"""Training-side detection-quality levers: backbone, denoiser size, augmentation, training budget. One model
per variant (all of a set's categories, as the README's first command trains), every other setting at its
default; each is tested with the same heads, and the table holds each head's mean image / pixel AUROC over
the categories with a 95 % bootstrap interval over test images, and the paired difference of image AUROC to
the same head of the first variant (the default configuration), positive = better.

    python experiments/training_levers.py --data Demo --out results/training_levers_demo
    python experiments/training_levers.py --data Photos --out results/training_levers_photos

`--variants` (a YAML file or inline YAML, default experiments/training_levers.yaml): name -> `fit` options
(a list) or {steps: N, options: [...]}; `--only a,b` trains just those (e.g. to split the work between two
processes), then the table is rebuilt from every variant whose test run is complete. A variant whose test
run is complete is not retrained (`--force` redoes it). Writes `<out>.csv` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from harness import machine
from levers import interval_text, saved_result
from training_budget import run_budget

from ad_lightning.ablate import Setting
from ad_lightning.evaluation.bootstrap import bootstrap_image_auroc, bootstrap_image_auroc_difference
from ad_lightning.evaluation.tables import markdown_table, write_csv

COLUMNS = ("variant", "head", "image_auroc", "image_interval", "pixel_auroc", "aupro", "fit_seconds",
           "image_vs_default", "image_vs_default_interval")  # fmt: skip
BOOTSTRAP = 1000
DEFAULT_STEPS = 1000
HEADS = "likelihood,irf,irf_bank,patchcore,ensemble"


def parse_variants(text: str) -> dict[str, dict]:
    """name -> {steps, options} from a YAML file or inline YAML (name -> option list, or {steps, options})."""
    path = Path(text)
    spec = yaml.safe_load(path.read_text() if path.is_file() else text)
    if not isinstance(spec, dict) or not spec:
        raise SystemExit(f"--variants {text!r}: expected a YAML mapping of variant name -> fit options")
    variants = {}
    for name, value in spec.items():
        value = {"options": value} if isinstance(value, list) else dict(value or {})
        unknown = set(value) - {"steps", "options"}
        if unknown:
            raise SystemExit(f"--variants: variant {name!r} has unknown keys {sorted(unknown)}; use steps and options")
        variants[str(name)] = {"steps": int(value.get("steps", DEFAULT_STEPS)),
                               "options": [str(o) for o in value.get("options") or []]}  # fmt: skip
    return variants


def variant_rows(name: str, run: Path, heads: list[str], default: Path | None) -> list[dict]:
    """One row per head of a finished test run; the paired difference to `default`'s run of the same images."""
    metrics = json.loads((run / "metrics.json").read_text())
    seconds = float((run.parent / "fit_seconds.txt").read_text())
    categories = list(metrics["categories"])
    result = saved_result(Setting(heads[0]), run, categories)  # holds every head's scores
    reference = None if default is None else saved_result(Setting(heads[0]), default, categories)
    same_images = reference is None or (
        reference.categories == result.categories and torch.equal(reference.labels, result.labels)
    )
    if not same_images:
        raise SystemExit(f"{run} and {default} did not score the same test images; retrain one (--force)")
    rows = []
    for head in heads:
        image = bootstrap_image_auroc(result.scores[head], result.labels, result.categories, BOOTSTRAP)
        measured = metrics["heads"][head]
        row = {"variant": name, "head": head, "image_auroc": image.mean,
               "image_interval": interval_text(image.low, image.high), "pixel_auroc": measured.get("pixel_auroc"),
               "aupro": measured.get("aupro"), "fit_seconds": seconds}  # fmt: skip
        if reference is not None:
            delta = bootstrap_image_auroc_difference(
                result.scores[head], reference.scores[head], result.labels, result.categories, BOOTSTRAP
            )
            row |= {"image_vs_default": delta.mean, "image_vs_default_interval": interval_text(delta.low, delta.high)}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="Demo", help="DataModule short name (Demo, Photos, MVTecAD, ...)")
    parser.add_argument("--root", help="data root (default: the DataModule's)")
    parser.add_argument("--category", default="all")
    parser.add_argument("--heads", default=HEADS, help="heads scored (an ensemble needs its members)")
    parser.add_argument("--variants", default=str(Path(__file__).with_name("training_levers.yaml")))
    parser.add_argument("--only", help="comma-separated variant names to train now (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="output directory; <out>.csv and .md beside it")
    parser.add_argument("--force", action="store_true", help="retrain variants that already have results")
    args = parser.parse_args()
    args.fit_args = []
    variants = parse_variants(args.variants)
    chosen = args.only.split(",") if args.only else list(variants)
    unknown = [name for name in chosen if name not in variants]
    if unknown:
        raise SystemExit(f"--only: no variants {unknown} in --variants (it has {list(variants)})")
    print(f"training levers: {chosen} on {args.data}; machine: {machine()}", flush=True)
    for name in chosen:
        if args.force or not (args.out / name / "test" / "metrics.json").is_file():
            run_budget(args, variants[name]["steps"], name, variants[name]["options"])
    runs = {name: args.out / name / "test" for name in variants}
    done = {name: run for name, run in runs.items() if (run / "metrics.json").is_file()}
    first = next(iter(variants))
    heads = args.heads.split(",")
    rows = [row for name, run in done.items() for row in variant_rows(name, run, heads, done.get(first))]
    csv_path = args.out.with_suffix(".csv")
    write_csv(csv_path, rows, COLUMNS)
    csv_path.with_suffix(".md").write_text(markdown_table(rows, COLUMNS) + "\n")
    print("\n" + markdown_table(rows, COLUMNS) + f"\n\nresults: {csv_path}")


if __name__ == "__main__":
    main()

"""`python -m ad_lightning benchmark`: fit + test per category, one results table.

    python -m ad_lightning benchmark --config CFG --data.root ROOT --categories a,b --out results.csv

Every other argument is passed to both `fit` and `test`. Each category runs in
`<out dir>/<category>/{fit,test}/`; a category whose `test` run is complete (its completion marker
is written once the test and everything after it has finished) is skipped unless `--force`, so an
interrupted benchmark resumes where it stopped; any other category is rerun from scratch, even if
a metrics.json of a killed run is there. `--rescore` re-tests the fitted models (a fit run is marked
complete when `fit` returns) with the current default head settings, without retraining. Writes `results.csv` with one row per (category, head)
plus a mean row, and a Markdown table next to it, each atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from ad_lightning.checkpoint import atomic_path
from ad_lightning.evaluation.report import is_complete, mark_complete, nan_mean
from ad_lightning.evaluation.tables import RESULT_COLUMNS, markdown_table, write_csv
from ad_lightning.run_config import DEFAULT_CONFIG


def category_args(category: str, out_dir: Path, passthrough: list[str], version: str) -> list[str]:
    logs = ["--trainer.logger.init_args.save_dir", str(out_dir), "--trainer.logger.init_args.name", category]
    return [*passthrough, "--data.category", category, *logs, "--trainer.logger.init_args.version", version]


def fit_category(cli: Callable[[list[str]], None], category: str, out_dir: Path, passthrough: list[str]) -> None:
    """Fit one category; its run is marked complete when `fit` returns (training ended, heads fitted)."""
    cli(["fit", *category_args(category, out_dir, passthrough, "fit")])
    mark_complete(out_dir / category / "fit")


def test_category(cli: Callable[[list[str]], None], category: str, out_dir: Path, passthrough: list[str]) -> None:
    """Test one category's fitted model (`test` marks its run complete once its report and plots are written)."""
    checkpoint = out_dir / category / "fit" / "checkpoints" / "last.ckpt"
    cli(["test", *category_args(category, out_dir, passthrough, "test"), "--ckpt_path", str(checkpoint)])


def current_heads(passthrough: list[str]) -> list[str]:
    """`--model.heads` and `--model.head_args` of the default configuration, unless given: a rescore scores
    with today's head settings, not the ones stored in the checkpoints."""
    model = yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]
    given = {token.split("=", 1)[0] for token in passthrough}
    extra = [] if "--model.heads" in given else ["--model.heads", model["heads"]]
    return extra + ([] if "--model.head_args" in given else ["--model.head_args", json.dumps(model["head_args"])])


def category_rows(category: str, metrics: dict) -> list[dict]:
    """One row per score column of a category's metrics.json (mean over its categories = itself)."""
    return [
        {"category": category, "head": head, **{c: values.get(c) for c in RESULT_COLUMNS[2:]}}
        for head, values in metrics["heads"].items()
    ]


def mean_rows(rows: list[dict]) -> list[dict]:
    """The mean over categories of every metric, per head."""
    means = []
    for head in dict.fromkeys(r["head"] for r in rows):
        own = [r for r in rows if r["head"] == head]
        row = {"category": "mean", "head": head}
        for column in RESULT_COLUMNS[2:]:
            mean = nan_mean([r[column] for r in own if r[column] is not None])
            row[column] = None if math.isnan(mean) else mean
        means.append(row)
    return means


def write_tables(rows: list[dict], out: Path) -> None:
    """`out` (CSV) and the Markdown table beside it, each atomically: a kill leaves the old or the new one."""
    with atomic_path(out) as partial:
        write_csv(partial, rows, RESULT_COLUMNS)
    with atomic_path(out.with_suffix(".md")) as partial:
        partial.write_text(markdown_table(rows, RESULT_COLUMNS, missing="n/a") + "\n")


def main(argv: list[str], cli: Callable[[list[str]], None]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ad_lightning benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--categories", required=True, help="comma-separated categories, e.g. bottle,cable")
    parser.add_argument("--out", default="results.csv", type=Path, help="results table (CSV; .md written beside)")
    parser.add_argument("--force", action="store_true", help="rerun categories that already have results")
    parser.add_argument("--rescore", action="store_true", help="re-test the models already fitted (with the default "
                        "head settings unless --model.heads/--model.head_args say otherwise), no retraining")  # fmt: skip
    args, passthrough = parser.parse_known_args(argv)
    out_dir = args.out.parent / args.out.stem
    rows = []
    for category in [c.strip() for c in args.categories.split(",") if c.strip()]:
        test_dir = out_dir / category / "test"
        if args.rescore and is_complete(out_dir / category / "fit"):
            shutil.rmtree(test_dir, ignore_errors=True)
            test_category(cli, category, out_dir, [*passthrough, *current_heads(passthrough)])
        elif is_complete(test_dir) and not args.force:
            print(f"benchmark: {category} already done ({test_dir}); --force reruns it")
        else:
            shutil.rmtree(out_dir / category, ignore_errors=True)
            fit_category(cli, category, out_dir, passthrough)
            test_category(cli, category, out_dir, passthrough)
        rows += category_rows(category, json.loads((test_dir / "metrics.json").read_text()))
    write_tables(rows + mean_rows(rows), args.out)
    print(f"results: {args.out}\ntable:   {args.out.with_suffix('.md')}")

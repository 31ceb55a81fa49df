"""`python -m ad_lightning benchmark`: fit + test per category, one results table.

    python -m ad_lightning benchmark --config CFG --data.root ROOT --categories a,b --out results.csv
    python -m ad_lightning benchmark --shared --categories a,b --out results.csv
    python -m ad_lightning benchmark --ckpt_path CKPT --categories a,b --out results.csv

Every other argument is passed to both `fit` and `test`. Each category runs in
`<out dir>/<category>/{fit,test}/`; a category whose `test` run is complete (its completion marker
is written once the test and everything after it has finished) is skipped unless `--force`, so an
interrupted benchmark resumes where it stopped; any other category is rerun from scratch, even if
a metrics.json of a killed run is there. `--rescore` re-tests the fitted models (a fit run is marked
complete when `fit` returns) with the current default head settings, without retraining. Writes `results.csv` with one row per (category, head)
plus a mean row, and a Markdown table next to it, each atomically.

`--shared` trains one denoiser on all the categories instead (`<out dir>/all_categories/fit/`, reused
once complete), and `--ckpt_path` takes one already trained: each category is then tested with it, its
heads fitted on that category's normal training and validation images alone (`test` refits the heads
of a model whose heads were fitted on other categories), so N categories cost one training.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from ad_lightning.checkpoint import atomic_path, resolve_checkpoint
from ad_lightning.errors import UsageError
from ad_lightning.evaluation.report import is_complete, mark_complete, nan_mean
from ad_lightning.evaluation.tables import RESULT_COLUMNS, markdown_table, write_csv
from ad_lightning.run_config import DEFAULT_CONFIG

SHARED = "all_categories"  # the run directory of the one model `--shared` trains on all the categories


def run_args(category: str, name: str, out_dir: Path, passthrough: list[str], version: str) -> list[str]:
    """The options of one run on `category` (one name or a comma list), logged to <out_dir>/<name>/<version>."""
    logs = ["--trainer.logger.init_args.save_dir", str(out_dir), "--trainer.logger.init_args.name", name]
    return [*passthrough, "--data.category", category, *logs, "--trainer.logger.init_args.version", version]


def fit_category(cli: Callable[[list[str]], None], category: str, out_dir: Path, passthrough: list[str],
                 name: str | None = None) -> None:  # fmt: skip
    """Fit one category, or a comma list of them logged under `name`; the run is marked complete when
    `fit` returns (training ended, heads fitted)."""
    name = name or category
    cli(["fit", *run_args(category, name, out_dir, passthrough, "fit")])
    mark_complete(out_dir / name / "fit")


def test_category(cli: Callable[[list[str]], None], category: str, out_dir: Path, passthrough: list[str],
                  checkpoint: Path | None = None) -> None:  # fmt: skip
    """Test one category with its own fitted model, or with `checkpoint` (`test` marks its run complete once
    its report and plots are written)."""
    checkpoint = checkpoint or out_dir / category / "fit" / "checkpoints" / "last.ckpt"
    cli(["test", *run_args(category, category, out_dir, passthrough, "test"), "--ckpt_path", str(checkpoint)])


def shared_model(cli: Callable[[list[str]], None], categories: list[str], out_dir: Path, passthrough: list[str],
                 force: bool) -> Path:  # fmt: skip
    """The checkpoint of the one model trained on all `categories` (trained unless complete, or `force`)."""
    fit_dir = out_dir / SHARED / "fit"
    if force or not is_complete(fit_dir):
        shutil.rmtree(out_dir / SHARED, ignore_errors=True)
        fit_category(cli, ",".join(categories), out_dir, passthrough, name=SHARED)
    else:
        print(f"benchmark: the shared model is trained ({fit_dir}); --force trains it again")
    return fit_dir / "checkpoints" / "last.ckpt"


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
    parser.add_argument("--shared", action="store_true", help="train one model on all the categories, then test each "
                        "category with it, its heads fitted on that category alone")  # fmt: skip
    parser.add_argument("--ckpt_path", type=Path, help="test each category with this trained model (no training), "
                        "its heads fitted on that category alone")  # fmt: skip
    args, passthrough = parser.parse_known_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if args.shared and args.ckpt_path is not None:
        raise UsageError("--shared trains the model that --ckpt_path gives; pass one of them")
    if SHARED in categories:
        raise UsageError(f"category {SHARED!r} collides with the shared model's run directory; rename that category")
    out_dir = args.out.parent / args.out.stem
    shared = None
    if args.ckpt_path is not None:
        shared = Path(resolve_checkpoint(str(args.ckpt_path)))
    elif args.shared:
        shared = shared_model(cli, categories, out_dir, passthrough, args.force)
    rows = []
    for category in categories:
        test_dir = out_dir / category / "test"
        if args.rescore and (shared is not None or is_complete(out_dir / category / "fit")):
            shutil.rmtree(test_dir, ignore_errors=True)
            test_category(cli, category, out_dir, [*passthrough, *current_heads(passthrough)], checkpoint=shared)
        elif is_complete(test_dir) and not args.force:
            print(f"benchmark: {category} already done ({test_dir}); --force reruns it")
        else:
            shutil.rmtree(out_dir / category, ignore_errors=True)
            if shared is None:
                fit_category(cli, category, out_dir, passthrough)
            test_category(cli, category, out_dir, passthrough, checkpoint=shared)
        rows += category_rows(category, json.loads((test_dir / "metrics.json").read_text()))
    write_tables(rows + mean_rows(rows), args.out)
    print(f"results: {args.out}\ntable:   {args.out.with_suffix('.md')}")

"""The README's headline table: every head's mean over categories on both development sets, from the
benchmark tables the `benchmark` command wrote (one model per category).

    python experiments/headline.py        # reads results/demo.csv and results/photos.csv

Writes results/headline.csv and results/headline.md (image / pixel AUROC, AUPRO, F1 at the deployed
threshold, ms per image at batch 1, per set).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ad_lightning.evaluation.tables import markdown_table, write_csv

SETS = {"demo": Path("results/demo.csv"), "photos": Path("results/photos.csv")}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1", "ms_per_image")
SHORT = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "f1": "F1",
         "ms_per_image": "ms / image"}  # fmt: skip


def mean_rows(path: Path) -> dict[str, dict]:
    """head -> its mean row of a benchmark CSV (raw terms such as likelihood_nll left out)."""
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["category"] == "mean" and r["accuracy"] != ""]
    return {r["head"]: r for r in rows}


def number(text: str) -> float | None:
    return None if text in ("", None) else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/headline.csv"))
    args = parser.parse_args()
    means = {name: mean_rows(path) for name, path in SETS.items()}
    heads = list(dict.fromkeys(h for rows in means.values() for h in rows))
    columns = ["head", *(f"{s} {SHORT[m]}" for s in SETS for m in METRICS)]
    rows = []
    for head in heads:
        row = {"head": head}
        for name in SETS:
            source = means[name].get(head, {})
            row.update({f"{name} {SHORT[m]}": number(source.get(m)) for m in METRICS})
        rows.append(row)
    write_csv(args.out, rows, columns)
    table = markdown_table(rows, columns)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table + f"\n\nresults: {args.out}")


if __name__ == "__main__":
    main()

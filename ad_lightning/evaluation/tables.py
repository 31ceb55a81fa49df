"""Result tables as files: CSV for tools, Markdown for people (benchmark, ablate, plots' data)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


RESULT_COLUMNS = (
    "category", "head", "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
    "pixel_f1max", "aupro", "accuracy", "precision", "recall", "f1", "ms_per_image",
)  # fmt: skip  # one results row of a head on a category: benchmark, ablate


def write_csv(path: Path, rows: list[dict], columns: Sequence[str] | None = None) -> None:
    """`rows` as CSV with `columns` (default: the first row's keys); a missing or None cell is empty."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns or rows[0]), restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: Sequence[str], missing: str = "-") -> str:
    """A Markdown table; floats with 3 decimals, missing or None values as `missing`."""
    fmt = lambda v: missing if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows])

"""The README's first command on a fresh clone, timed stage by stage, and what its `test` reported.

    python experiments/first_command.py --out results/first_command

Clones the repository's committed HEAD into a temporary directory, takes the first ```bash block of its
README.md (the command a new user runs), splits it at ` && ` into stages and runs them one after the
other in the clone, timing each, with the demo data generated afresh into a temporary directory
(`AD_LIGHTNING_DATA`), as on a new machine. Writes `<out>.md` (two tables: seconds per stage, and each
head's mean image and pixel AUROC over the demo categories from the test run's metrics.json; then the
machine, CPU model included: the trained denoiser differs between CPU models) and
`<out>.csv` (the heads' table). `--keep DIR` keeps the run directories (the trained model) in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harness import machine

from ad_lightning.evaluation.tables import markdown_table, write_csv

REPO = Path(__file__).resolve().parents[1]
HEAD_COLUMNS = ("head", "image_auroc", "pixel_auroc", "aupro", "f1")


def first_command(readme: Path) -> str:
    """The first ```bash block of a README: the command a new user runs first."""
    block = re.search(r"```bash\n(.+?)\n```", readme.read_text(), re.DOTALL)
    if block is None:
        raise SystemExit(f"{readme} has no ```bash block")
    return block.group(1).strip()


def run_stages(command: str, clone: Path, env: dict) -> list[dict]:
    """Each ` && `-joined part of `command` run in `clone` in turn; its wall-clock seconds."""
    rows = []
    for stage in command.split(" && "):
        start = time.perf_counter()
        subprocess.run(stage, shell=True, cwd=clone, env=env, check=True, stdin=subprocess.DEVNULL)
        rows.append({"stage": stage, "seconds": round(time.perf_counter() - start, 1)})
    rows.append({"stage": "total", "seconds": round(sum(r["seconds"] for r in rows), 1)})
    return rows


def head_rows(clone: Path) -> list[dict]:
    """Each head's mean over the categories (heads with a deployed decision), from the newest test run's metrics.json."""
    path = max(clone.glob("runs/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    heads = json.loads(path.read_text())["heads"]
    return [{"head": h, **{c: v.get(c) for c in HEAD_COLUMNS[1:]}} for h, v in heads.items() if "f1" in v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.md and <out>.csv")
    parser.add_argument("--keep", type=Path, help="copy the clone's runs/ (the trained model) here")
    args = parser.parse_args()
    measured_on = machine()  # before the run: the load it started under
    with tempfile.TemporaryDirectory() as tmp:
        clone, data = Path(tmp) / "clone", Path(tmp) / "data"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        fresh = ("PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # as in a new shell
        env = {k: v for k, v in os.environ.items() if k not in fresh}
        env.update(AD_LIGHTNING_DATA=str(data), PIP_NO_INPUT="1", WANDB_MODE="offline")
        stages = run_stages(first_command(clone / "README.md"), clone, env)
        heads = head_rows(clone)
        if args.keep:
            shutil.copytree(clone / "runs", args.keep, dirs_exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out.with_suffix(".csv"), heads, HEAD_COLUMNS)
    table = markdown_table(stages, ("stage", "seconds")) + "\n\n" + markdown_table(heads, HEAD_COLUMNS)
    args.out.with_suffix(".md").write_text(f"{table}\n\nmeasured on {measured_on}\n")
    print(f"{table}\n\nmeasured on {measured_on}\nresults: {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

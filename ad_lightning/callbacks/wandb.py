"""Weights & Biases: a logger that never prompts, the test results on the dashboard, ablation tables.

    python -m ad_lightning fit  --config configs/wandb.yaml
    python -m ad_lightning test --config configs/wandb.yaml --ckpt_path runs

`Logger` runs offline (files in `<save_dir>/wandb/offline-run-*`) when W&B finds no credentials, so a
run never prompts for a key or waits on the network. To go online, log in once (`wandb login`, or
export WANDB_API_KEY); upload an offline run later with `wandb sync runs/wandb/offline-run-<...>`.
WANDB_MODE (e.g. `offline`, `disabled`) decides instead when it is set.

Training loss and learning rate reach W&B through Lightning (`self.log` of `train/loss`, `train/lr`);
`WandbReport` adds the test results; `log_ablation` is the ablation study's table and plots.
Nothing else in the package knows about W&B.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ad_lightning.callbacks.visualize import VisualReport

if TYPE_CHECKING:
    import wandb


def has_credentials() -> bool:
    """Whether W&B finds an API key (WANDB_API_KEY, its settings, ~/.netrc), asking no one and no server."""
    import wandb

    return wandb.login(prompt=False, verify=False)


def runs_offline(offline: bool | None, init_kwargs: dict) -> bool:
    """Whether `Logger` must set offline mode: asked for, or (`offline` None) no credentials found.
    A `mode` argument or WANDB_MODE is the user's own choice and is left to wandb (the CLI passes
    every `wandb.init` argument, unset ones as None)."""
    if offline:
        return True
    if init_kwargs.get("mode") or os.environ.get("WANDB_MODE"):
        return False
    if has_credentials():
        return False
    if offline is False:
        raise ValueError(
            "W&B Logger(offline=False) but no W&B API key is configured: run `wandb login` or set "
            "WANDB_API_KEY, or leave `offline` unset to log offline"
        )
    return True


class Logger(WandbLogger):
    """`WandbLogger` that picks offline mode itself when no W&B credentials are configured, and ends
    its W&B run when the trainer's `fit` / `test` ends, so each entry point (and each category of a
    benchmark run in one process) is a run of its own.

    Args:
        offline: None (default): online when W&B credentials are found, else offline; True: offline;
            False: online, an error without credentials.
        save_dir: the W&B files go to `<save_dir>/wandb/`.
        name, version, project, log_model, prefix, **kwargs: as `WandbLogger` (kwargs go to `wandb.init`).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        version: str | None = None,
        offline: bool | None = None,
        project: str | None = None,
        log_model: bool | str = False,
        prefix: str = "",
        **kwargs,
    ) -> None:
        if runs_offline(offline, kwargs):
            kwargs["mode"] = "offline"  # this run only (WandbLogger(offline=True) sets WANDB_MODE for the process)
            reason = "offline=True" if offline else "no W&B API key configured"
            rank_zero_info(
                f"W&B: logging offline into {Path(save_dir) / 'wandb'} ({reason}; `wandb login` to go online, "
                "`wandb sync <offline run dir>` to upload this run later)"
            )
        super().__init__(
            name=name, save_dir=save_dir, version=version, project=project, log_model=log_model, prefix=prefix, **kwargs
        )

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None  # a later use of this logger starts a new run


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_groups(metrics: dict) -> dict[str, dict[str, dict]]:
    """metrics.json content -> {category: {head: metrics}}, plus `mean`, the mean over categories."""
    return {**{c: entry["heads"] for c, entry in metrics["categories"].items()}, "mean": metrics["heads"]}


def metric_items(metrics: dict) -> dict[str, float]:
    """metrics.json content -> `test/<category>/<head>/<metric>` and `test/mean/<head>/<metric>`, numbers only."""
    return {
        f"test/{group}/{head}/{metric}": value
        for group, heads in metric_groups(metrics).items()
        for head, values in heads.items()
        for metric, value in values.items()
        if is_number(value)
    }


def metrics_table(metrics: dict) -> wandb.Table:
    """One row per (category or `mean`, head), one column per metric."""
    import wandb

    groups = metric_groups(metrics)
    names = list(dict.fromkeys(m for heads in groups.values() for values in heads.values() for m in values))
    rows = [[group, head, *map(values.get, names)] for group, heads in groups.items() for head, values in heads.items()]
    return wandb.Table(columns=["category", "head", *names], data=rows, allow_mixed_types=True)


class WandbReport(Callback):
    """After a successful `test`, logs to every W&B logger of the trainer (global rank 0): each score's
    metrics per category (`test/<category>/<head>/<metric>`) and their mean (`test/mean/...`), the
    table of them (`test/metrics`), and the PNGs of `VisualReport` (`test/heatmaps/<head>/<category>`,
    `test/score_histograms`, `test/roc`). Does nothing without a W&B logger.

    It logs in `teardown`, after every callback's `on_test_end` (so after `VisualReport` drew its
    figures, whatever the callback order) and before the loggers are finalised.
    """

    def __init__(self) -> None:
        self.metrics: dict | None = None  # the finished test's metrics, until logged

    def on_test_end(self, trainer, pl_module) -> None:
        self.metrics = pl_module.test_metrics

    def teardown(self, trainer, pl_module, stage: str) -> None:
        metrics, self.metrics = self.metrics, None
        loggers = wandb_loggers(trainer)
        if stage != "test" or metrics is None or not loggers or not trainer.is_global_zero:
            return
        import wandb

        figures = {k: p for cb in trainer.callbacks if isinstance(cb, VisualReport) for k, p in cb.figures.items()}
        payload = {**metric_items(metrics), "test/metrics": metrics_table(metrics)}
        payload.update({f"test/{name}": wandb.Image(str(path)) for name, path in figures.items()})
        for logger in loggers:
            logger.experiment.log(payload)


def log_ablation(
    target: WandbLogger | wandb.Run,
    rows: list[dict],
    plots: dict[str, Path] | None = None,
    lines: Sequence[tuple[str, str]] = (),
    key: str = "ablation",
) -> None:
    """Log an ablation study to W&B: `rows` (one dict per setting) as the table `<key>/table`, each PNG
    of `plots` as the image `<key>/<name>`, and for each (x, y) column pair of `lines` a W&B line plot
    `<key>/<y>_vs_<x>` with one line per `head` (when the rows have that column).

    `target` is a W&B logger (e.g. `Logger(save_dir=out)`; call its `finalize("success")` afterwards to
    end the run) or a run from `wandb.init`."""
    import wandb

    if not rows:
        raise ValueError("log_ablation: no rows to log; pass one dict per ablation setting")
    columns = list(dict.fromkeys(column for row in rows for column in row))
    missing = [f"{x}/{y}" for x, y in lines if x not in columns or y not in columns]
    if missing:
        raise ValueError(f"log_ablation: line plot columns {missing} are not in the rows ({', '.join(columns)})")
    run = target.experiment if isinstance(target, WandbLogger) else target
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows], allow_mixed_types=True)
    payload = {f"{key}/table": table}
    payload.update({f"{key}/{name}": wandb.Image(str(path)) for name, path in (plots or {}).items()})
    stroke = "head" if "head" in columns else None
    for x, y in lines:
        payload[f"{key}/{y}_vs_{x}"] = wandb.plot.line(table, x, y, stroke=stroke, title=f"{y} vs {x}")
    run.log(payload)

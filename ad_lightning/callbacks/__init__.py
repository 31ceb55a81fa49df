"""Callbacks and loggers of `test` runs: pictures into the run directory (`VisualReport`) and
Weights & Biases (`Logger`, `WandbReport`, `log_ablation`)."""

from ad_lightning.callbacks.checkpoint import RunCheckpoint
from ad_lightning.callbacks.visualize import VisualReport
from ad_lightning.callbacks.wandb import Logger, WandbReport, log_ablation

__all__ = ["Logger", "RunCheckpoint", "VisualReport", "WandbReport", "log_ablation"]

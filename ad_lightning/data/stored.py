"""The DataModule a checkpoint was trained on, rebuilt from the hyper-parameters it stores."""

from __future__ import annotations

import importlib

from ad_lightning.data.base import AnomalyDataModule
from ad_lightning.data.images import BadInputError
from ad_lightning.errors import UsageError
from ad_lightning.run_config import checkpoint_data

DEFAULT_DATA = "ad_lightning.data.Demo"  # for a checkpoint that names no DataModule


def datamodule_of(
    ckpt: dict, name: str | None = None, overrides: dict | None = None, source: str = ""
) -> AnomalyDataModule:
    """The checkpoint's DataModule with its arguments, `overrides` on top; `name` (a short name such as
    `MVTecAD`, or a class path) picks another class, keeping only the checkpoint's image size."""
    stored = dict(ckpt.get("datamodule_hyper_parameters") or {})
    stored.setdefault("_class_path", DEFAULT_DATA)
    wanted = None if name is None else (name if "." in name else f"ad_lightning.data.{name}")
    config = checkpoint_data(stored, wanted, overrides or {}, source or "the checkpoint")
    module, _, cls_name = config["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name, None)
    except ModuleNotFoundError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, AnomalyDataModule)):
        raise UsageError(
            f"--data {name or config['class_path']} is not a DataModule; use e.g. Demo, MVTecAD, VisA or a class path"
        )
    return cls(**config["init_args"])


def trained_categories(ckpt: dict) -> list[str] | None:
    """The categories of the checkpoint's training DataModule, sorted: those its heads were fitted on at the
    end of `fit`. None when they cannot be told here (its DataModule class is not installed, or its data
    root, needed to list 'all' of a layout without a fixed list, is gone)."""
    try:
        return sorted(datamodule_of(ckpt).categories)
    except (UsageError, BadInputError, FileNotFoundError):
        return None

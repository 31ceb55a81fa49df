"""How the command line completes a run's configuration before anything is built.

- With `--ckpt_path`, the checkpoint's model and data settings fill in what the user did not give;
  what the user gave (on the command line or in a `--config` file) wins, or is refused when it
  cannot change after training (the backbone, the denoiser, the image size trained at).
- `fit` trains for a budget of optimizer steps unless told otherwise.
- Output follows `--trainer.default_root_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import yaml

from ad_lightning.errors import UsageError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"  # every subcommand's defaults
DEFAULT_ROOT = "runs"  # the configs' output directory (trainer.default_root_dir and the loggers' save_dir)
DEFAULT_MAX_STEPS = 1000  # the training budget when neither --trainer.max_steps nor --trainer.max_epochs is given
FROZEN = {  # model options fixed by training, and why
    "backbone": "the denoiser was trained on this backbone's features",
    "out_indices": "the denoiser was trained on these stages' features",
    "grid": "the denoiser was trained on features on this grid",
    "feature_aggregate": "the denoiser was trained on features aggregated this way",
    "pretrained": "the backbone's weights are the checkpoint's",
    "backbone_weights": "the backbone's weights are the checkpoint's",
    "feature_norm": "the denoiser was trained on features normalised this way",
    "denoiser": "the checkpoint holds this denoiser's weights",
    "denoiser_args": "the checkpoint holds this denoiser's weights",
    "num_timesteps": "the denoiser was trained on this noise schedule",
    "beta_start": "the denoiser was trained on this noise schedule",
    "beta_end": "the denoiser was trained on this noise schedule",
}
ADDED_LATER = {"feature_aggregate": 1}  # frozen options newer than some checkpoints: what those were trained with
TRAINING_ONLY = ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "ema_decay", "fit_heads_every_n_epochs")
PRIVATE = ("_instantiator", "_class_path")  # bookkeeping Lightning stores with the hyper-parameters


def given_options(argv: Iterable[str], config_files: Iterable[str | Path], section: str) -> set[str]:
    """The top-level keys of `section` ("model", "data", "trainer") that the user set: `--model.heads X`,
    `--model.heads=X`, a `model:` key of a `--config` file; `--data NAME` counts as `class_path`, and a
    data config's `init_args` keys count as themselves."""
    keys = set()
    for token in argv:
        name = token.split("=", 1)[0]
        if name == f"--{section}":
            keys.add("class_path")
        elif name.startswith(f"--{section}."):
            keys.add(name[len(section) + 3 :].split(".", 1)[0])
    for path in config_files:
        values = (yaml.safe_load(Path(path).read_text()) or {}).get(section) or {}
        keys |= set(values) | set(values.get("init_args") or {})
    return keys


def same(a, b) -> bool:
    """Equal as configuration values (a tuple equals the list with the same items)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def merge_model(stored: dict, given: dict, subcommand: str, source: str) -> dict:
    """The model options to lay over the checkpoint's (`stored`): every `given` one, after refusing
    those that cannot change after training (or, outside `fit`, only affect training). `head_args`
    are merged per head: a setting given for one head keeps the checkpoint's other settings."""
    merged = {key: value for key, value in ADDED_LATER.items() if key not in stored}  # what older ones trained with
    stored = {**ADDED_LATER, **stored}
    for key, value in given.items():
        if key in FROZEN and key in stored and not same(value, stored[key]):
            raise UsageError(
                f"--model.{key} {value!r} cannot change after training: {source} was trained with "
                f"{stored[key]!r} ({FROZEN[key]}); drop the option, or train a new model with it"
            )
        if key in TRAINING_ONLY and key in stored and not same(value, stored[key]):
            why = "when resuming (the optimizer and schedule continue from the checkpoint)" if subcommand == "fit" else (
                f"in {subcommand}: it only affects training"
            )
            raise UsageError(f"--model.{key} {value!r} cannot change {why}; {source} has {stored[key]!r}")
        if key == "head_args":
            stored_args = stored.get("head_args") or {}
            value = {h: {**stored_args.get(h, {}), **(value or {}).get(h, {})} for h in {**stored_args, **(value or {})}}
        merged[key] = value
    return merged


def checkpoint_data(stored: dict, given_class: str | None, given_args: dict, source: str) -> dict:
    """The data configuration of a run on a checkpoint: the checkpoint's DataModule and arguments with
    the user's on top; another DataModule (`given_class`) keeps only the image size trained at. An image
    size other than the one trained at is refused: per-position statistics are fitted on that grid."""
    class_path = stored_class = stored.get("_class_path")
    stored = {k: v for k, v in stored.items() if k not in PRIVATE}
    trained_size = stored.get("image_size")
    if given_class is not None and given_class != stored_class:
        class_path, stored = given_class, {k: v for k, v in stored.items() if k == "image_size"}
    size = given_args.get("image_size", trained_size)
    if trained_size is not None and size != trained_size:
        raise UsageError(
            f"--data.image_size {size}: {source} was trained at {trained_size} x {trained_size} px and its heads "
            f"hold per-position statistics of that grid; drop --data.image_size (or use {trained_size})"
        )
    return {"class_path": class_path, "init_args": {**stored, **given_args}}


def set_training_budget(trainer) -> None:
    """Training length in optimizer steps by default, so every category gets the same budget whatever
    its size: `DEFAULT_MAX_STEPS` unless --trainer.max_steps or --trainer.max_epochs says otherwise
    (epochs alone: that many epochs; both: whichever ends first, as Lightning does). A budget of 0
    trains nothing and is refused."""
    if trainer.get("max_epochs") == 0 or trainer.get("max_steps") == 0:
        raise UsageError("--trainer.max_epochs 0 / --trainer.max_steps 0 trains nothing; give a positive budget")
    if trainer.get("max_epochs") is None and trainer.get("max_steps", -1) in (None, -1):
        trainer.max_steps = DEFAULT_MAX_STEPS


def follow_root_dir(trainer, given: set[str]) -> None:
    """Loggers whose save_dir is the configs' default write under --trainer.default_root_dir (where
    checkpoints, `--ckpt_path last` and the run directories are then found), unless the user set it."""
    root = trainer.get("default_root_dir") or DEFAULT_ROOT
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None) if not isinstance(logger, bool) else None
        if init_args is not None and init_args.get("save_dir") == DEFAULT_ROOT and "logger" not in given:
            init_args.save_dir = str(root)

"""Command line: `python -m ad_lightning <command>`: `fit`, `validate`, `test` through LightningCLI, and
`predict`, `benchmark`, `ablate`, `export`, `download` (each its own module). A leaf: nothing in the
package imports it.

Defaults (ad_lightning/configs/default.yaml) train the `small` denoiser on the built-in demo set,
so `python -m ad_lightning fit` needs no arguments. DataModules are chosen by short name
(`--data MVTecAD --data.root R --data.category C`); configs may use `${...}` interpolation.
"""

from __future__ import annotations

import difflib
import os
import shutil
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from ad_lightning import ablate, benchmark, export, predict
from ad_lightning.checkpoint import UnsafeCheckpointError, load_checkpoint, resolve_checkpoint
from ad_lightning.data import AnomalyDataModule, BadInputError, download
from ad_lightning.data.download import DownloadError
from ad_lightning.errors import UsageError
from ad_lightning.evaluation.report import mark_complete
from ad_lightning.lit import FeatureDDPM, NonFiniteLossError
from ad_lightning.run_config import (
    DEFAULT_CONFIG,
    DEFAULT_ROOT,
    checkpoint_data,
    follow_root_dir,
    given_options,
    merge_model,
    set_training_budget,
)

SUBCOMMANDS = ("fit", "validate", "test")  # LightningCLI's own `predict` is replaced by ad_lightning.predict


class ADLightningCLI(LightningCLI):
    """LightningCLI with the project's rules: options the user gives win over a checkpoint's saved ones
    or are refused; `fit` trains a step budget; output follows --trainer.default_root_dir."""

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        follow_root_dir(config.trainer, self.given(subcommand, "trainer"))
        if "ckpt_path" in config:
            root = config.trainer.get("default_root_dir") or DEFAULT_ROOT
            config.ckpt_path = resolve_checkpoint(config.ckpt_path, root, missing_last_ok=subcommand == "fit")
            config.weights_only = True  # the Trainer loads it weights-only too, whatever the command line says
        if subcommand == "fit":
            set_training_budget(config.trainer)

    def given(self, subcommand: str, section: str) -> set[str]:
        """Keys of `section` the user set on the command line or in a --config file."""
        files = [str(path) for path in self.config[subcommand].get("config") or []]
        return given_options(self.argv, files, section)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's model and data settings under the user's (Lightning lays the checkpoint's
        hyper-parameters over everything the user gave, silently)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if not ckpt_path:
            return
        before = self.config[subcommand].clone()
        super()._parse_ckpt_path()
        config, ckpt = self.config[subcommand], load_checkpoint(ckpt_path, mmap=True)
        model_keys = self.given(subcommand, "model")
        given_model = {key: before.model[key] for key in model_keys if key in before.model}
        for key, value in merge_model(ckpt.get("hyper_parameters") or {}, given_model, subcommand, ckpt_path).items():
            config.model[key] = value
        data_keys = self.given(subcommand, "data")
        init_args = before.data.get("init_args") or {}
        given_data = {key: init_args[key] for key in data_keys if key in init_args}
        given_class = before.data.class_path if "class_path" in data_keys else None
        data = checkpoint_data(ckpt.get("datamodule_hyper_parameters") or {}, given_class, given_data, ckpt_path)
        if data["class_path"] is not None:
            self.config = self.parser.parse_object({subcommand: {"data": data}}, self.config)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run that fails before writing anything but its config leaves no directory behind."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_run(self.trainer)
            raise

    def after_test(self) -> None:
        """Mark the run complete once its report and plots are all written (`benchmark` trusts only that)."""
        log_dir = run_dir(self.trainer)
        if log_dir is not None:
            mark_complete(log_dir)

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and self.trainer.is_global_zero:
            print(f"checkpoint: {callback.best_model_path or callback.last_model_path}")


def run_dir(trainer) -> Path | None:
    """The run directory on global rank 0 (None elsewhere, or without a logger), read from the logger:
    `Trainer.log_dir` is a collective under DDP, which a rank must not call alone."""
    logger = getattr(trainer, "logger", None)
    if trainer is None or not trainer.is_global_zero or logger is None or logger.log_dir is None:
        return None
    return Path(logger.log_dir)


def remove_empty_run(trainer) -> None:
    """Delete the run directory of a failed run if all it holds is its saved configuration."""
    log_dir = run_dir(trainer)
    if log_dir is not None and log_dir.is_dir() and {p.name for p in log_dir.iterdir()} <= CONFIG_FILES:
        shutil.rmtree(log_dir, ignore_errors=True)


COMMANDS = {  # every subcommand, with the one line `python -m ad_lightning` shows for it
    "fit": "train the denoiser on normal images, then fit the scoring heads (default: the built-in demo set)",
    "validate": "the held-out diffusion loss of a checkpoint on the normal validation split",
    "test": "score the test split with every head: metrics.json, scores.csv, plots",
    "predict": "score new, unlabelled images with one head: predictions.csv and overlays",
    "benchmark": "fit + test one model per category, one results table",
    "ablate": "score one checkpoint under many head settings, without retraining",
    "export": "one head's scoring graph as an ONNX file that predict can run",
    "download": "fetch, verify and extract a benchmark data set",
}
PROG = "python -m ad_lightning"
CONFIG_FILES = {"config.yaml", "hparams.yaml"}  # what a run writes before it does anything
DEBUG_ENV = "AD_LIGHTNING_DEBUG"  # set to 1 (or pass --debug) to see tracebacks of input errors too


def usage() -> str:
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)", "", "commands:"]
    return "\n".join(lines + [f"  {name:<10} {line}" for name, line in COMMANDS.items()])


def dispatch(argv: list[str]) -> int | None:
    """Run one subcommand; returns the exit status of those that report one (predict, export, download)."""
    command, rest = argv[0], argv[1:]
    if command == "download":  # not a Trainer entry point: fetch and verify a benchmark
        return download.main(rest)
    if command == "benchmark":  # fit + test per category, through this same CLI
        return benchmark.main(rest, cli=lightning_cli)
    if command == "ablate":  # one checkpoint scored under many head settings, no retraining
        return ablate.main(rest)
    if command == "predict":  # new images, no labels: a CSV of decisions and overlays, not a Trainer run
        return predict.main(rest)
    if command == "export":  # one head's scoring graph as an ONNX file that `predict` can run
        return export.main(rest)
    return lightning_cli(argv)


def lightning_cli(argv: list[str]) -> None:
    """`fit`, `validate`, `test` through LightningCLI, with the default config."""
    # The frozen backbone is in eval mode on purpose, and `main` passes its arguments on explicitly:
    # Lightning's notices about either only confuse.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    sub_kwargs = {"parser_mode": "omegaconf", "default_config_files": [str(DEFAULT_CONFIG)]}
    ADLightningCLI(
        FeatureDDPM,
        AnomalyDataModule,
        subclass_mode_data=True,
        parser_kwargs={"prog": PROG, "parser_mode": "omegaconf", **{name: dict(sub_kwargs) for name in SUBCOMMANDS}},
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def user_error_status(err: BaseException) -> int | None:
    """The exit status of an error that is the user's input (2: usage, 1: data, files, checkpoints); None for a bug."""
    if isinstance(err, UsageError):
        return 2
    if isinstance(err, (BadInputError, UnsafeCheckpointError, DownloadError, NonFiniteLossError, FileNotFoundError)):
        return 1
    return None


def main(args: list[str] | None = None) -> None:
    """`python -m ad_lightning <command> ...`; input errors print one message (a traceback only with
    --debug or AD_LIGHTNING_DEBUG=1), bugs their traceback."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{PROG}: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        status = dispatch(argv)
    except Exception as err:
        status = user_error_status(err)
        if status is None or debug:
            raise
        print(f"{PROG} {argv[0]}: error: {err}", file=sys.stderr)
    if status is not None:
        sys.exit(status)

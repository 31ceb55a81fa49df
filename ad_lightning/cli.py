"""Command line: `python -m ad_lightning fit|validate|test` (LightningCLI), and `predict`, `benchmark`, `download`.

Defaults (ad_lightning/configs/default.yaml) train the `tiny` denoiser on the built-in demo set,
so `python -m ad_lightning fit` needs no arguments. DataModules are chosen by short name
(`--data MVTecAD --data.root R --data.category C`); configs may use `${...}` interpolation.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from ad_lightning import benchmark
from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.data import AnomalyDataModule, download
from ad_lightning.lit import FeatureDDPM

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test")  # LightningCLI's own `predict` is replaced by ad_lightning.predict
DEFAULT_MAX_STEPS = 1000  # the training budget when neither --trainer.max_steps nor --trainer.max_epochs is given


def resolve_checkpoint(path: str | None, root: str | Path = "runs", missing_last_ok: bool = False) -> str | None:
    """The checkpoint file `path` stands for, checked to load weights-only (`UnsafeCheckpointError` if not).

    A directory stands for the newest `*.ckpt` below it (e.g. `--ckpt_path runs`); `last` for the
    newest `last.ckpt` below `root` (each run writes into a new version directory, where Lightning's
    own `last` would find nothing and silently start from scratch). With `missing_last_ok` (resuming
    `fit`) a missing `last` means a fresh start, said out loud.
    """
    if path is None:
        return None
    if path == "last":
        found = sorted(Path(root).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
        if not found and missing_last_ok:
            print(f"no last.ckpt under {root}: starting from scratch")
            return None
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {root}; train with `python -m ad_lightning fit`")
    elif Path(path).is_dir():
        found = sorted(Path(path).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no *.ckpt file under {path}; train one with `python -m ad_lightning fit` first")
    else:
        found = [Path(path)]
    if not found[-1].is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .ckpt file, a directory of runs or `last`")
    load_checkpoint(found[-1], mmap=True)  # refuses a file that needs arbitrary unpickling, before anything else reads it
    if str(found[-1]) != path:
        print(f"checkpoint: {found[-1]}")
    return str(found[-1])


def set_training_budget(trainer) -> None:
    """Training length in optimizer steps by default, so every category gets the same budget whatever
    its size: `DEFAULT_MAX_STEPS` unless --trainer.max_steps or --trainer.max_epochs says otherwise
    (epochs alone: train that many epochs; both: whichever ends first, as Lightning does)."""
    if trainer.get("max_epochs") is None and trainer.get("max_steps", -1) in (None, -1):
        trainer.max_steps = DEFAULT_MAX_STEPS


class ADLightningCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and "ckpt_path" in self.config[subcommand]:
            config = self.config[subcommand]
            root = config.trainer.get("default_root_dir") or "runs"
            config.ckpt_path = resolve_checkpoint(config.ckpt_path, root, missing_last_ok=subcommand == "fit")
            config.weights_only = True  # the Trainer loads it weights-only too, whatever the command line says
        if subcommand == "fit":
            set_training_budget(self.config[subcommand].trainer)

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and self.trainer.is_global_zero:
            print(f"checkpoint: {callback.best_model_path or callback.last_model_path}")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["download"]:  # not a Trainer entry point: fetch and verify a benchmark
        sys.exit(download.main(argv[1:]))
    if argv[:1] == ["benchmark"]:  # fit + test per category, through this same CLI
        return benchmark.main(argv[1:], cli=main)
    if argv[:1] == ["ablate"]:  # one checkpoint scored under many head settings, no retraining
        from ad_lightning import ablate  # here, not at the top: ablate imports resolve_checkpoint from this module

        return ablate.main(argv[1:])
    if argv[:1] == ["predict"]:  # new images, no labels: a CSV of decisions and overlays, not a Trainer run
        from ad_lightning import predict  # here, not at the top: predict imports resolve_checkpoint from this module

        sys.exit(predict.main(argv[1:]))
    if argv[:1] == ["export"]:  # one head's scoring graph as an ONNX file that `predict` can run
        from ad_lightning import export  # here, not at the top: export imports resolve_checkpoint from this module

        sys.exit(export.main(argv[1:]))
    # The frozen backbone is in eval mode on purpose; Lightning's notice about it only confuses.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    sub_kwargs = {"parser_mode": "omegaconf", "default_config_files": [str(DEFAULT_CONFIG)]}
    ADLightningCLI(
        FeatureDDPM,
        AnomalyDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", **{name: dict(sub_kwargs) for name in SUBCOMMANDS}},
        save_config_kwargs={"overwrite": True},
        args=args,
    )

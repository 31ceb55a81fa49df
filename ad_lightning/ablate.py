"""`python -m ad_lightning ablate`: score one trained model under many head settings, without retraining.

    python -m ad_lightning ablate --ckpt_path CKPT [--heads likelihood,irf,reconstruction]
        [--steps 1,2,3,5] [--timesteps 0,50,200,500] [--perturbation 0.1,0.2,0.4] --out DIR

Settings: `likelihood` over steps S x the start index of its inversion grid (`--timesteps`); `irf`
over t* (`--timesteps`); `reconstruction` over perturbation p x steps S. For every setting the model
is rebuilt from the checkpoint with that one head, the head is fitted and calibrated on the normal
train / validation splits (`FeatureDDPM.fit_heads`, as a validation epoch does) and the test split
is scored by `Trainer.test` (its metrics.json and scores.csv in `DIR/runs/<setting>/`), all in this
process. Writes `DIR/ablation.csv` (one row per setting: `head, steps, timestep, perturbation`, the
benchmark's metrics, the sub-scores' image AUROCs, `nfe`, `ms_per_image`) and the plots
`DIR/<metric>_vs_steps.png` (likelihood and reconstruction) and `DIR/<metric>_vs_timestep.png` (irf).

The data are the checkpoint's DataModule and arguments; `--data NAME` and `--data.root`,
`--data.category`, ... override them. The experiments/ scripts reuse this module.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import Tensor

from ad_lightning.benchmark import COLUMNS as BENCHMARK_COLUMNS
from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import resolve_checkpoint
from ad_lightning.data import AnomalyDataModule, BadInputError
from ad_lightning.heads import build_head
from ad_lightning.evaluation.tables import markdown_table, write_csv
from ad_lightning.lit import FeatureDDPM, parse_names
from ad_lightning.predict import resolve_device

HEADS = ("likelihood", "irf", "reconstruction")
METRICS = tuple(c for c in BENCHMARK_COLUMNS[2:] if c != "ms_per_image")  # image_auroc ... f1
TERMS = ("nll", "sp", "prior")  # sub-scores reported as `<term>_image_auroc`: likelihood's nll, sp; irf's prior
SETTING = ("head", "steps", "timestep", "perturbation")
COLUMNS = (*SETTING, *METRICS, *(f"{t}_image_auroc" for t in TERMS), "nfe", "ms_per_image")
PLOT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
SUMMARY = (*SETTING, "image_auroc", "pixel_auroc", "aupro", "f1", "nfe", "ms_per_image")  # the columns printed
DATA_OPTIONS = ("root", "category", "image_size", "eval_batch_size", "num_workers")  # --data.<option>
DEFAULT_DATA = "ad_lightning.data.Demo"  # for a checkpoint that names no DataModule
DEMO_CATEGORY = "fabric"  # what the experiments train on by default


@dataclass(frozen=True)
class Setting:
    """One head configuration to score. `timestep`: likelihood's grid start, or irf's t*."""

    head: str
    steps: int | None = None
    timestep: int | None = None
    perturbation: float | None = None

    @property
    def head_args(self) -> dict:
        """The head's constructor arguments this setting changes."""
        if self.head == "likelihood":
            return {"steps": self.steps, "start": self.timestep}
        if self.head == "irf":
            return {"t_star": self.timestep}
        return {"perturbation": self.perturbation, "steps": self.steps}

    @property
    def name(self) -> str:
        """Run directory name, e.g. `likelihood_S3_t0`, `irf_t200`, `reconstruction_p0.2_S5`."""
        parts = {
            "likelihood": {"S": self.steps, "t": self.timestep},
            "irf": {"t": self.timestep},
            "reconstruction": {"p": self.perturbation, "S": self.steps},
        }[self.head]
        return "_".join([self.head, *(f"{k}{v:g}" for k, v in parts.items())])


@dataclass
class Result:
    """One scored setting: its CSV row, and per test image the label [N] and every score column [N]."""

    setting: Setting
    row: dict
    labels: Tensor
    scores: dict[str, Tensor]


def settings_grid(
    heads: Sequence[str], steps: Sequence[int], timesteps: Sequence[int], perturbations: Sequence[float]
) -> list[Setting]:
    """likelihood: S x start; irf: t*; reconstruction: p x S (in that order, start / p outermost)."""
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise BadInputError(f"ablate cannot sweep head(s) {unknown}; set --heads to some of: {', '.join(HEADS)}")
    grid = {
        "likelihood": [Setting("likelihood", steps=s, timestep=t) for t in timesteps for s in steps],
        "irf": [Setting("irf", timestep=t) for t in timesteps],
        "reconstruction": [Setting("reconstruction", steps=s, perturbation=p) for p in perturbations for s in steps],
    }
    return [setting for head in heads for setting in grid[head]]


def check_settings(settings: Iterable[Setting], num_timesteps: int) -> None:
    """Build every setting's head once, so a bad value stops the run before anything is scored."""
    for setting in settings:
        try:
            build_head(setting.head, num_timesteps=num_timesteps, **setting.head_args)
        except ValueError as err:
            raise BadInputError(
                f"ablate setting {setting.name} is invalid for T = {num_timesteps}: {err}; "
                "change --steps, --timesteps or --perturbation"
            ) from None


def load_datamodule(ckpt: dict, name: str | None = None, overrides: dict | None = None) -> AnomalyDataModule:
    """The checkpoint's DataModule with its arguments, `overrides` on top; `name` (a short name such
    as `MVTecAD`, or a class path) picks another class, keeping only the checkpoint's image size."""
    stored = dict(ckpt.get("datamodule_hyper_parameters") or {})
    stored.pop("_instantiator", None)
    class_path = stored.pop("_class_path", None) or DEFAULT_DATA
    if name is not None:
        wanted = name if "." in name else f"ad_lightning.data.{name}"
        if wanted != class_path:
            stored = {k: v for k, v in stored.items() if k == "image_size"}
        class_path = wanted
    module, _, cls_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name, None)
    except ModuleNotFoundError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, AnomalyDataModule)):
        raise BadInputError(
            f"--data {name or class_path} is not a DataModule; use e.g. Demo, MVTecAD, VisA or a class path"
        )
    return cls(**{**stored, **(overrides or {})})


class FeaturesOnce:
    """The DataModule as `FeatureDDPM.fit_heads` sees it, running the backbone over the train and
    validation splits only for the first setting: every setting shares the checkpoint's backbone."""

    def __init__(self, datamodule: AnomalyDataModule) -> None:
        self.datamodule = datamodule
        self.train: Tensor | None = None

    def cache_features(self, backbone, device) -> Tensor:
        if self.train is None:
            self.train = self.datamodule.cache_features(backbone, device)
        return self.train

    def val_dataloader(self):
        return self.datamodule.val_dataloader()


def load_setting(ckpt_path: str, ckpt: dict, setting: Setting, device: torch.device, overrides: dict) -> FeatureDDPM:
    """The checkpoint's model with `setting`'s head only (its other stored arguments kept), in eval mode.

    The backbone weights come from the checkpoint (no pretrained lookup). Loading is not strict only
    for head buffers (the head is refitted): every other weight must be in the checkpoint."""
    stored_args = (ckpt["hyper_parameters"].get("head_args") or {}).get(setting.head, {})
    head_args = {setting.head: {**stored_args, **setting.head_args}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found keys that are")  # other heads' buffers; checked below
        model = FeatureDDPM.from_checkpoint(
            ckpt_path, device, strict=False, heads=setting.head, head_args=head_args, **overrides
        )
    missing = [k for k in model.state_dict() if k not in ckpt["state_dict"] and not k.startswith("heads.")]
    if missing:
        raise BadInputError(
            f"checkpoint {ckpt_path} lacks {len(missing)} model weights (e.g. {missing[0]}); "
            "pass a checkpoint written by `python -m ad_lightning fit`"
        )
    return model.eval()


def score_setting(
    ckpt_path: str,
    ckpt: dict,
    setting: Setting,
    data: FeaturesOnce,
    out_dir: Path,
    device: torch.device,
    overrides: dict,
) -> Result:
    """Fit and calibrate the setting's head, then `Trainer.test` it (reports in out_dir/runs/<setting>)."""
    model = load_setting(ckpt_path, ckpt, setting, device, overrides)
    with torch.no_grad():
        model.fit_heads(data)
    trainer = Trainer(
        accelerator=device.type, devices=1, logger=CSVLogger(out_dir / "runs", name="", version=setting.name),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=out_dir,
    )  # fmt: skip
    trainer.test(model, datamodule=data.datamodule, verbose=False)
    payload = model.test_scores
    labels = torch.tensor([row["label"] for row in payload["rows"]])
    return Result(setting, setting_row(setting, model.test_metrics["heads"]), labels, payload["scores"])


def setting_row(setting: Setting, heads: dict) -> dict:
    """The CSV row of one setting from metrics.json's `heads` (a metric absent there stays None)."""
    own = heads[setting.head]
    row = dict(zip(SETTING, (setting.head, setting.steps, setting.timestep, setting.perturbation)))
    row.update({metric: own.get(metric) for metric in METRICS})
    row.update({f"{t}_image_auroc": heads.get(f"{setting.head}_{t}", {}).get("image_auroc") for t in TERMS})
    return {**row, "nfe": own["nfe"], "ms_per_image": own["ms_per_image"]}


def run_ablation(
    ckpt_path: str,
    settings: Sequence[Setting],
    datamodule: AnomalyDataModule,
    out_dir: Path,
    device: torch.device | str = "cpu",
    overrides: dict | None = None,
) -> tuple[list[Result], list[Path]]:
    """Score every setting of one checkpoint in this process; writes out_dir/ablation.csv and the
    plots. Returns the results and the plots' paths.

    `overrides`: FeatureDDPM arguments other than heads to change (e.g. `latency_images`)."""
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    check_settings(settings, ckpt["hyper_parameters"].get("num_timesteps", 1000))
    out_dir.mkdir(parents=True, exist_ok=True)
    data, device = FeaturesOnce(datamodule), torch.device(device)
    results = []
    for i, setting in enumerate(settings, 1):
        print(f"ablate: setting {i}/{len(settings)}: {setting.name}", flush=True)
        results.append(score_setting(ckpt_path, ckpt, setting, data, out_dir, device, overrides or {}))
        write_csv(out_dir / "ablation.csv", [r.row for r in results], COLUMNS)  # after each setting: partial results survive
    return results, plot_ablation([r.row for r in results], out_dir)


# ----- tables and plots --------------------------------------------------------------------------
def line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """One line per `series` entry (label -> (x, y)), markers at the points; saved as PNG."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, (x, y) in series.items():
        ax.plot(x, [math.nan if v is None else v for v in y], marker="o", label=label)
    if log_x:
        ticks = sorted({v for x, _ in series.values() for v in x})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def series_by(rows: list[dict], key: str, x: str, y: str, label: str) -> dict[str, tuple[list, list]]:
    """rows grouped by `key` -> {label.format(value): (x values, y values)}, sorted by x."""
    series = {}
    for value in dict.fromkeys(r[key] for r in rows):
        group = sorted((r for r in rows if r[key] == value), key=lambda r: r[x])
        series[label.format(value)] = ([r[x] for r in group], [r[y] for r in group])
    return series


def plot_ablation(rows: list[dict], out_dir: Path) -> list[Path]:
    """`<metric>_vs_steps.png`: likelihood (a line per grid start) and reconstruction (a line per p);
    `<metric>_vs_timestep.png`: irf over t*."""
    by_head = {head: [r for r in rows if r["head"] == head] for head in HEADS}
    paths = []
    for metric in PLOT_METRICS:
        if by_head["likelihood"] or by_head["reconstruction"]:
            series = series_by(by_head["likelihood"], "timestep", "steps", metric, "likelihood, start {}")
            series |= series_by(by_head["reconstruction"], "perturbation", "steps", metric, "reconstruction, p = {:g}")
            paths.append(line_plot(out_dir / f"{metric}_vs_steps.png", series, "steps S (NFE)", metric, log_x=True))
        if by_head["irf"]:
            series = series_by(by_head["irf"], "head", "timestep", metric, "irf")
            paths.append(line_plot(out_dir / f"{metric}_vs_timestep.png", series, "t*", metric))
    return paths


# ----- command line ------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return number_list(text, int)


def float_list(text: str) -> list[float]:
    return number_list(text, float)


def number_list(text: str, kind: type) -> list:
    """'1,2,3' -> [1, 2, 3] (duplicates dropped, order kept)."""
    try:
        return list(dict.fromkeys(kind(v) for v in text.split(",") if v.strip()))
    except ValueError:
        message = f"{text!r} is not a comma-separated list of {kind.__name__}s, e.g. 1,2,3"
        raise argparse.ArgumentTypeError(message) from None


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """`--data NAME` and `--data.<option>`: which data to score (default: the checkpoint's)."""
    parser.add_argument("--data", help="DataModule short name or class path (default: the checkpoint's)")
    types = {"image_size": int, "eval_batch_size": int, "num_workers": int}
    for option in DATA_OPTIONS:
        parser.add_argument(f"--data.{option}", dest=f"data_{option}", type=types.get(option, str))


def data_overrides(args: argparse.Namespace) -> dict:
    return {o: getattr(args, f"data_{o}") for o in DATA_OPTIONS if getattr(args, f"data_{o}") is not None}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ad_lightning ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file, or a directory (its newest *.ckpt)")
    parser.add_argument("--heads", default=",".join(HEADS), help="heads to sweep (all of: " + ",".join(HEADS) + ")")
    parser.add_argument("--steps", type=int_list, default=[1, 2, 3, 5], help="S of likelihood, reconstruction: %(default)s")
    parser.add_argument("--timesteps", type=int_list, default=[0, 50, 200, 500], help="grid start, t*: %(default)s")
    parser.add_argument("--perturbation", type=float_list, default=[0.1, 0.2, 0.4], help="p in (0, 1]: %(default)s")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--latency_images", type=int, help="test images timed at batch 1 (default: the checkpoint's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if present")
    parser.add_argument("--wandb", action="store_true", help="also log table and plots to W&B (offline without a key)")
    add_data_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    settings = settings_grid(parse_names(args.heads), args.steps, args.timesteps, args.perturbation)
    ckpt_path = resolve_checkpoint(args.ckpt_path)
    datamodule = load_datamodule(load_checkpoint(ckpt_path, mmap=True), args.data, data_overrides(args))
    overrides = {} if args.latency_images is None else {"latency_images": args.latency_images}
    results, plots = run_ablation(ckpt_path, settings, datamodule, args.out, resolve_device(args.device), overrides)
    rows = [r.row for r in results]
    if args.wandb:
        log_to_wandb(rows, plots, args.out, Path(ckpt_path))
    print("\n" + markdown_table(rows, SUMMARY))
    print(f"ablation: {args.out / 'ablation.csv'} ({len(rows)} settings)\nplots:    {args.out}/*_vs_*.png")


def log_to_wandb(rows: list[dict], plots: list[Path], out_dir: Path, ckpt_path: Path) -> None:
    """The ablation table, its plots and line plots of each plotted metric over steps and timestep, as one
    W&B run under out_dir/wandb (offline without credentials, see callbacks/wandb.py)."""
    from ad_lightning.callbacks.wandb import Logger, log_ablation  # W&B only when asked for

    logger = Logger(save_dir=str(out_dir), name=f"ablate-{ckpt_path.stem}")
    swept = {row["head"] for row in rows}
    axes = [x for x, heads in (("steps", {"likelihood", "reconstruction"}), ("timestep", {"irf"})) if heads & swept]
    log_ablation(logger, rows, {p.stem: p for p in plots}, lines=[(x, m) for x in axes for m in PLOT_METRICS])
    logger.finalize("success")


# ----- shared by the experiments/ scripts ----------------------------------------------------------
def add_experiment_args(parser: argparse.ArgumentParser, epochs: int, steps: list[int]) -> None:
    """Data, model and output options every experiment script takes."""
    parser.add_argument("--root", help="an MVTec-layout root (default: the built-in demo set)")
    parser.add_argument("--category", help=f"one category (default: the checkpoint's, or demo {DEMO_CATEGORY})")
    parser.add_argument("--ckpt_path", help="a trained model; without it a short tiny model is trained first")
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs of that short training")
    parser.add_argument("--image_size", type=int, default=128, help="image size of that short training")
    parser.add_argument("--steps", type=int_list, default=steps, help="S values, e.g. 3,5,10,50")
    parser.add_argument("--latency_images", type=int, default=0, help="test images timed at batch 1 (0: batched time)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 on a busy CPU, else torch's choice)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def train_short(args: argparse.Namespace) -> str:
    """Fit a `tiny` model (likelihood head only, `args.epochs` epochs) into `args.out/fit`; its checkpoint."""
    from ad_lightning.cli import main as cli  # the same entry point as `python -m ad_lightning fit`

    if args.root is not None and args.category is None:
        raise BadInputError(f"--root {args.root} needs --category: the one category to train and score")
    data = ["--data", "Demo"] if args.root is None else ["--data", "MVTecAD", "--data.root", str(args.root)]
    logs = ["--trainer.logger.init_args.save_dir", str(args.out), "--trainer.logger.init_args.version", "fit"]
    cli(["fit", *data, "--data.category", args.category or DEMO_CATEGORY, "--data.image_size", str(args.image_size),
         "--model.denoiser", "tiny", "--model.heads", "likelihood", "--trainer.max_epochs", str(args.epochs),
         "--trainer.default_root_dir", str(args.out), "--trainer.enable_progress_bar", "false", *logs])  # fmt: skip
    return str(args.out / "fit" / "checkpoints" / "last.ckpt")


def prepare_experiment(args: argparse.Namespace) -> tuple[str, AnomalyDataModule, torch.device]:
    """(checkpoint, its data, device): the given checkpoint or a freshly trained short one; prints
    what is measured (data, category, image size, epochs, machine)."""
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads or threads_for_load())
    trained = args.ckpt_path is None
    ckpt_path = train_short(args) if trained else resolve_checkpoint(args.ckpt_path)
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    overrides = {"root": args.root, "category": args.category}
    datamodule = load_datamodule(ckpt, None, {k: v for k, v in overrides.items() if v is not None})
    device = resolve_device(args.device)
    source = f"trained here, a short run of {args.epochs} epoch(s)" if trained else "given"
    print(
        f"measured: data {datamodule.root} ({type(datamodule).__name__}), category {datamodule.category}, "
        f"image size {datamodule.image_size}; model {ckpt['hyper_parameters'].get('denoiser')} {source} "
        f"({ckpt['global_step']} training steps): {ckpt_path}\n"
        f"machine:  {machine()}, device {device}",
        flush=True,
    )
    return ckpt_path, datamodule, device


def threads_for_load() -> int:
    """One torch thread when the CPU is busier than its cores (1-minute load average >= CPU count), else
    torch's default. On the shared 2-core machine under load 5 to 7, two threads per process made a
    short training about 10x slower than one (oversubscribed cores)."""
    return 1 if os.getloadavg()[0] >= (os.cpu_count() or 1) else torch.get_num_threads()


def machine() -> str:
    """CPU count and load, platform, torch version and threads, for the record next to a measurement."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU cores (load average {load}), {platform.platform()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
    )

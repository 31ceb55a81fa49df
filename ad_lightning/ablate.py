"""`python -m ad_lightning ablate`: score one trained model under many head settings, without retraining.

    python -m ad_lightning ablate --ckpt_path CKPT [--heads likelihood,irf,reconstruction]
        [--steps 1,2,3,5] [--timesteps 0,50,200,500] [--perturbation 0.1,0.2,0.4] --out DIR
    python -m ad_lightning ablate --ckpt_path CKPT --grid '{irf: {ridge_mode: [absolute, relative]}}' --out DIR

Settings: each head sweeps the options it declares (`Head.sweeps`): `likelihood` the start index of its
inversion grid (`--timesteps`) x steps S, `irf` t* (`--timesteps`), `reconstruction` perturbation p x S.
`--grid` sweeps any constructor arguments of any heads instead (a YAML/JSON mapping head -> argument ->
list of values; every combination is a setting). For every setting the model is rebuilt from the
checkpoint with that one head, the head is fitted and calibrated on the normal train / validation
splits (`FeatureDDPM.fit_heads`) and the test split is scored by `Trainer.test` (its metrics.json and
scores.csv in `DIR/runs/<setting>/`), all in this process. Writes `DIR/ablation.csv` (one row per
setting: `head, steps, timestep, perturbation, args`, the benchmark's metrics with 95 % bootstrap
intervals of the image and pixel AUROC over test images, the sub-scores' image AUROCs, `nfe`,
`ms_per_image`) and the plots `DIR/<metric>_vs_steps.png` and `DIR/<metric>_vs_timestep.png`.

The data are the checkpoint's DataModule and arguments; `--data NAME` and `--data.root`,
`--data.category`, ... override them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import Tensor

from ad_lightning.callbacks.wandb import Logger, log_ablation
from ad_lightning.checkpoint import load_checkpoint, resolve_checkpoint
from ad_lightning.data import AnomalyDataModule
from ad_lightning.data.stored import datamodule_of
from ad_lightning.errors import BadInputError, UsageError
from ad_lightning.evaluation.bootstrap import bootstrap_image_auroc, category_pixel_draws, interval_of_mean
from ad_lightning.evaluation.tables import RESULT_COLUMNS, markdown_table, write_csv
from ad_lightning.heads import HEADS, build_head
from ad_lightning.inference import resolve_device
from ad_lightning.lit import FeatureDDPM, parse_names

OPTION_LABELS = {"timesteps": "t", "steps": "S", "perturbation": "p"}  # how a swept option appears in a setting name
METRICS = tuple(c for c in RESULT_COLUMNS[2:] if c != "ms_per_image")  # image_auroc ... f1
INTERVALS = ("image_auroc_low", "image_auroc_high", "pixel_auroc_low", "pixel_auroc_high")  # 95 % bootstrap
TERMS = ("nll", "sp", "prior")  # sub-scores reported as `<term>_image_auroc`: likelihood's nll, sp; irf's prior
SETTING = ("head", "steps", "timestep", "perturbation", "args")
COLUMNS = (*SETTING, *METRICS, *INTERVALS, *(f"{t}_image_auroc" for t in TERMS), "nfe", "ms_per_image")
PLOT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
SUMMARY = (*SETTING, "image_auroc", "image_auroc_low", "image_auroc_high", "pixel_auroc", "aupro", "f1", "nfe",
           "ms_per_image")  # fmt: skip
DATA_OPTIONS = ("root", "category", "image_size", "eval_batch_size", "num_workers")  # --data.<option>
BOOTSTRAP = 1000  # resamples of the test images per interval


def sweeps(head: str) -> dict[str, str]:
    """The ablate options a head sweeps -> its constructor arguments (`Head.sweeps`), outermost first."""
    return dict(getattr(HEADS.get(head), "sweeps", {}))


@dataclass(frozen=True)
class Setting:
    """One head configuration to score: `values` are (ablate option or constructor argument, value) pairs,
    in nesting and naming order; options map to arguments through the head's `sweeps`."""

    head: str
    values: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, head: str, **values) -> Setting:
        return cls(head, tuple(values.items()))

    @property
    def head_args(self) -> dict:
        """The head's constructor arguments this setting changes."""
        to_arg = sweeps(self.head)
        return {to_arg.get(key, key): value for key, value in self.values}

    @property
    def name(self) -> str:
        """Run directory name, e.g. `likelihood_t0_S3`, `irf_t200`, `irf_ridge_mode=relative`."""
        label = lambda key: OPTION_LABELS[key] if key in sweeps(self.head) else f"{key}="  # noqa: E731
        return "_".join([self.head, *(f"{label(k)}{value_text(v)}" for k, v in self.values)])

    def columns(self) -> dict:
        """The setting's CSV columns: the classic options, and any other arguments as JSON in `args`."""
        values = dict(self.values)
        other = {k: v for k, v in values.items() if k not in OPTION_LABELS}
        return {"head": self.head, "steps": values.get("steps"), "timestep": values.get("timesteps"),
                "perturbation": values.get("perturbation"), "args": json.dumps(other) if other else None}  # fmt: skip


def value_text(value: object) -> str:
    """A setting value as it appears in a run name: 0.2, [100,200], irf+patchcore (a weights mapping)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "+".join(k if w == 1 else f"{k}{value_text(w)}" for k, w in value.items())
    return str(value).replace(" ", "")


@dataclass
class Result:
    """One scored setting: its CSV row; per test image the label [N], category and every score column [N];
    per category the pixel AUROC bootstrap draws of its head (when it has maps and the data masks)."""

    setting: Setting
    row: dict
    labels: Tensor
    categories: list[str]
    scores: dict[str, Tensor]
    pixel_draws: dict[str, np.ndarray] = field(default_factory=dict)


def settings_grid(
    heads: Sequence[str], steps: Sequence[int], timesteps: Sequence[int], perturbations: Sequence[float]
) -> list[Setting]:
    """Each head over the options it sweeps, every combination (its first option outermost)."""
    lists = {"steps": steps, "timesteps": timesteps, "perturbation": perturbations}
    sweepable = [name for name in HEADS if sweeps(name)]
    unknown = [h for h in heads if h not in sweepable]
    if unknown:
        raise UsageError(
            f"ablate cannot sweep head(s) {unknown} with --steps/--timesteps/--perturbation; set --heads to some "
            f"of: {', '.join(sweepable)}, or sweep any head's arguments with --grid"
        )
    settings = []
    for head in heads:
        options = list(sweeps(head))
        settings += [Setting(head, tuple(zip(options, combo))) for combo in itertools.product(*(lists[o] for o in options))]
    return settings


def grid_settings(grid: dict[str, dict[str, list]] | list[dict[str, dict[str, list]]]) -> list[Setting]:
    """`--grid`: head -> argument -> values; every combination of each head's values is a setting (`{}`:
    the head as configured). A list of such mappings gives their settings one after another (so one
    head can vary one argument at a time)."""
    if isinstance(grid, list):
        return [setting for part in grid for setting in grid_settings(part)]
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        raise UsageError(f"--grid {grid!r} must map heads to {{argument: [values]}}, e.g. '{{irf: {{t_star: [100, 200]}}}}'")
    settings = []
    for head, arguments in grid.items():
        lists = {key: values if isinstance(values, list) else [values] for key, values in arguments.items()}
        settings += [Setting(head, tuple(zip(lists, combo))) for combo in itertools.product(*lists.values())]
    return settings


def check_settings(settings: Iterable[Setting], num_timesteps: int) -> None:
    """Build every setting's head once, so a bad value stops the run before anything is scored."""
    for setting in settings:
        if setting.head not in HEADS:
            raise UsageError(f"ablate setting {setting.name}: unknown head; available: {', '.join(sorted(HEADS))}")
        try:
            build_head(setting.head, num_timesteps=num_timesteps, **setting.head_args)
        except (ValueError, TypeError) as err:
            raise UsageError(
                f"ablate setting {setting.name} is invalid for T = {num_timesteps}: {err}; "
                "change --steps, --timesteps, --perturbation or --grid"
            ) from None


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

    def val_images(self) -> Tensor | None:
        return self.datamodule.val_images()

    @property
    def head_features(self) -> Tensor | None:
        return self.datamodule.head_features

    @property
    def categories(self) -> list[str]:
        return self.datamodule.categories


def load_setting(ckpt_path: str, ckpt: dict, setting: Setting, device: torch.device, overrides: dict) -> FeatureDDPM:
    """The checkpoint's model with `setting`'s head only (an ensemble with its members before it; their
    other stored arguments kept), in eval mode.

    The backbone weights come from the checkpoint (no pretrained lookup). Loading is not strict only
    for head buffers (the heads are refitted): every other weight must be in the checkpoint."""
    stored = ckpt["hyper_parameters"].get("head_args") or {}
    own = {**stored.get(setting.head, {}), **setting.head_args}
    members = list(build_head(setting.head, **own).members)
    head_args = {name: stored.get(name, {}) for name in members} | {setting.head: own}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found keys that are")  # other heads' buffers; checked below
        model = FeatureDDPM.from_checkpoint(
            ckpt_path, device, strict=False, heads=[*members, setting.head], head_args=head_args, **overrides
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
    categories = [row["category"] for row in payload["rows"]]
    pixel_draws = category_pixel_bootstrap(payload, setting.head, categories)
    row = setting_row(setting, model.test_metrics["heads"], payload["scores"][setting.head], labels, categories)
    if pixel_draws:
        interval = interval_of_mean(list(pixel_draws.values()))
        row["pixel_auroc_low"], row["pixel_auroc_high"] = interval.low, interval.high
    return Result(setting, row, labels, categories, payload["scores"], pixel_draws)


def category_pixel_bootstrap(payload: dict, head: str, categories: list[str]) -> dict[str, np.ndarray]:
    """Per category, the pixel AUROC bootstrap draws of `head`'s maps (exact pixel mode only; {} otherwise)."""
    maps, masks = payload["maps"].get(head), payload["masks"]
    if maps is None or masks is None:
        return {}
    groups, draws = np.asarray(categories), {}
    for name in sorted(set(categories)):
        index = torch.from_numpy(np.flatnonzero(groups == name))
        if masks[index].any():  # a category without anomalous pixels has no pixel AUROC
            draws[name] = category_pixel_draws(maps[index], masks[index], name, BOOTSTRAP)
    return draws


def setting_row(setting: Setting, heads: dict, scores: Tensor, labels: Tensor, categories: list[str]) -> dict:
    """The CSV row of one setting from metrics.json's `heads` (a metric absent there stays None), with
    the bootstrap interval of its image AUROC."""
    own = heads[setting.head]
    row = {**setting.columns(), **{metric: own.get(metric) for metric in METRICS}}
    interval = bootstrap_image_auroc(scores, labels, categories, BOOTSTRAP)
    row["image_auroc_low"], row["image_auroc_high"] = interval.low, interval.high
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


# ----- plots --------------------------------------------------------------------------------------
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
    """`<metric>_vs_steps.png`: a line per head and value of its other swept option, over S;
    `<metric>_vs_timestep.png`: heads that sweep only a timestep, over it."""
    classic = [r for r in rows if r["args"] is None]
    over_steps = [r for r in classic if r["steps"] is not None]
    over_time = [r for r in classic if r["steps"] is None and r["timestep"] is not None]
    paths = []
    for metric in PLOT_METRICS:
        if over_steps:
            series = {}
            for head in dict.fromkeys(r["head"] for r in over_steps):
                own = [r for r in over_steps if r["head"] == head]
                key = "timestep" if own[0]["timestep"] is not None else "perturbation"
                series |= series_by(own, key, "steps", metric, f"{head}, {key} = {{}}")
            paths.append(line_plot(out_dir / f"{metric}_vs_steps.png", series, "steps S (NFE)", metric, log_x=True))
        if over_time:
            series = series_by(over_time, "head", "timestep", metric, "{}")
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


def grid_option(text: str) -> dict | list:
    """`--grid` as YAML (JSON is YAML too), given inline or as the path of a YAML file."""
    if text.endswith((".yaml", ".yml")) and Path(text).is_file():
        text = Path(text).read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"--grid {text!r} is not YAML/JSON ({err})") from None


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """`--data NAME` and `--data.<option>`: which data to score (default: the checkpoint's)."""
    parser.add_argument("--data", help="DataModule short name or class path (default: the checkpoint's)")
    types = {"image_size": int, "eval_batch_size": int, "num_workers": int}
    for option in DATA_OPTIONS:
        parser.add_argument(f"--data.{option}", dest=f"data_{option}", type=types.get(option, str))


def data_overrides(args: argparse.Namespace) -> dict:
    return {o: getattr(args, f"data_{o}") for o in DATA_OPTIONS if getattr(args, f"data_{o}") is not None}


def parse_args(argv: list[str]) -> argparse.Namespace:
    sweepable = [name for name in HEADS if sweeps(name)]
    parser = argparse.ArgumentParser(prog="python -m ad_lightning ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file, or a directory (its newest *.ckpt)")
    parser.add_argument("--heads", default=",".join(sweepable), help="heads to sweep (of: " + ",".join(sweepable) + ")")
    parser.add_argument("--steps", type=int_list, default=[1, 2, 3, 5], help="S of likelihood, reconstruction: %(default)s")
    parser.add_argument("--timesteps", type=int_list, default=[0, 50, 200, 500], help="grid start, t*: %(default)s")
    parser.add_argument("--perturbation", type=float_list, default=[0.1, 0.2, 0.4], help="p in (0, 1]: %(default)s")
    parser.add_argument("--grid", type=grid_option, help="head -> argument -> values, e.g. '{irf: {t_star: [100, 400]}}' "
                        "(replaces --heads/--steps/--timesteps/--perturbation)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--latency_images", type=int, help="test images timed at batch 1 (default: the checkpoint's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if present")
    parser.add_argument("--wandb", action="store_true", help="also log table and plots to W&B (offline without a key)")
    add_data_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.grid is not None:
        settings = grid_settings(args.grid)
    else:
        settings = settings_grid(parse_names(args.heads), args.steps, args.timesteps, args.perturbation)
    ckpt_path = resolve_checkpoint(args.ckpt_path)
    datamodule = datamodule_of(load_checkpoint(ckpt_path, mmap=True), args.data, data_overrides(args), ckpt_path)
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
    logger = Logger(save_dir=str(out_dir), name=f"ablate-{ckpt_path.stem}")
    axes = [x for x in ("steps", "timestep") if any(r[x] is not None for r in rows)]
    log_ablation(logger, rows, {p.stem: p for p in plots}, lines=[(x, m) for x in axes for m in PLOT_METRICS])
    logger.finalize("success")

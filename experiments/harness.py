"""What every experiment script shares: its data, model and output options, a short training run when no
checkpoint is given, and a record of what was measured on which machine.

The scripts import it as `harness` (their own directory is on `sys.path` when run as
`python experiments/<script>.py`).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from ad_lightning.ablate import int_list
from ad_lightning.checkpoint import load_checkpoint, resolve_checkpoint
from ad_lightning.cli import main as cli  # the same entry point as `python -m ad_lightning fit`
from ad_lightning.data import AnomalyDataModule
from ad_lightning.data.stored import datamodule_of
from ad_lightning.errors import UsageError
from ad_lightning.inference import resolve_device

DEMO_CATEGORY = "fabric"  # what the experiments train on by default


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
    if args.root is not None and args.category is None:
        raise UsageError(f"--root {args.root} needs --category: the one category to train and score")
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
    datamodule = datamodule_of(ckpt, None, {k: v for k, v in overrides.items() if v is not None}, ckpt_path)
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


def fit_heads_on_category(model, ckpt: dict, data_root: Path, category: str) -> AnomalyDataModule:
    """Fit `model`'s heads on `category`'s normal training and validation images alone, from the checkpoint's
    DataModule at `data_root` (as `benchmark --ckpt_path` does); returns that DataModule."""
    datamodule = datamodule_of(ckpt, overrides={"root": str(data_root), "category": category})
    model.fit_heads(datamodule)
    return datamodule


def threads_for_load() -> int:
    """One torch thread when the CPU is busier than its cores (1-minute load average >= CPU count), else
    torch's default. On the shared 2-core machine under load 5 to 7, two threads per process made a
    short training about 10x slower than one (oversubscribed cores)."""
    return 1 if os.getloadavg()[0] >= (os.cpu_count() or 1) else torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux): trained weights, and so the diffusion heads' scores,
    differ between CPU models by their floating-point kernels."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def machine() -> str:
    """CPU model, count and load, platform, torch version and threads, for the record next to a measurement."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU cores ({cpu_model()}, load average {load}), {platform.platform()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
    )

"""Training speed with the feature cache against running the backbone every step (issue 7).

One demo category at 256 x 256 and the `tiny` denoiser, trained twice through Lightning's Trainer
with the same model, data, batch size and seed: once with `--data.feature_cache memory` (or
`disk`) and once with `off`. A callback times every training epoch (on_train_epoch_start ->
on_train_epoch_end), so the one-off feature pass in `setup` is excluded. The first epoch also
pays warm-up costs, and on a shared machine other jobs only ever add time, so the comparison uses
each mode's fastest later epoch. Prints wall and process CPU times per epoch, their ratios (the
issue's target: the cache at least 5x faster; CPU time is the estimate that other jobs on a shared
machine barely disturb) and the machine, with its load average before and after.

    python experiments/bench_train_cache.py                      # fabric, 3 epochs, batch 32
    python experiments/bench_train_cache.py --threads 1          # steady numbers on a shared machine
    python experiments/bench_train_cache.py --category nut --cache disk
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer, seed_everything

from ad_lightning.data import AnomalyDataModule, Demo
from ad_lightning.lit import FeatureDDPM

TARGET_SPEEDUP = 5.0


class EpochTimer(Callback):
    """Wall and process CPU seconds of every training epoch (no validation). Wall time is what a user
    waits; CPU time (all of this process's threads) is what the epoch cost, whatever other jobs take."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def time_epochs(data: AnomalyDataModule, epochs: int, model: FeatureDDPM | None = None, seed: int = 0) -> EpochTimer:
    """Per-epoch times of training `model` (default: `tiny`, likelihood head) on `data`, validation off."""
    seed_everything(seed, verbose=False)
    model = model or FeatureDDPM(denoiser="tiny", heads="likelihood", latency_images=0)
    timer = EpochTimer()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=data)
    return timer


def steady(seconds: list[float]) -> float:
    """The fastest epoch after the first (warm-up), or the only one: the least disturbed by other jobs."""
    return min(seconds[1:] or seconds)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (interop {torch.get_num_interop_threads()}); load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="fabric")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", choices=("memory", "disk"), default="memory")
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine, fewer threads than cores wait less on each other
    print(machine())
    timers = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for mode in (args.cache, "off"):
            data = Demo(
                category=args.category,
                image_size=args.image_size,
                train_batch_size=args.batch_size,
                feature_cache=mode,
                cache_dir=cache_dir if mode == "disk" else None,
                hflip=args.hflip,
            )
            timers[mode] = time_epochs(data, args.epochs)
            wall, cpu = (", ".join(f"{s:.2f}" for s in times) for times in (timers[mode].wall, timers[mode].cpu))
            print(f"feature_cache={mode}: wall {wall} s; CPU {cpu} s per epoch")
    served = len(data.feature_sets.get("train", data.train_dataset))
    print(f"demo {args.category}, {args.image_size} px, batch {args.batch_size}, {served} training items per epoch")
    speedup = {}
    for clock in ("wall", "cpu"):
        cached, recomputed = (steady(getattr(timers[mode], clock)) for mode in (args.cache, "off"))
        speedup[clock] = recomputed / cached
        verdict = "met" if speedup[clock] >= TARGET_SPEEDUP else "not met"
        print(
            f"one epoch, {clock} time: {args.cache} cache {cached:.2f} s, backbone every step {recomputed:.2f} s, "
            f"{speedup[clock]:.1f}x (target {TARGET_SPEEDUP:.0f}x {verdict})"
        )
    print(machine())
    return 0 if speedup["wall"] >= TARGET_SPEEDUP else 1


if __name__ == "__main__":
    raise SystemExit(main())

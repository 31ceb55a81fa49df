"""Latency of the scoring heads against the reconstruction baseline, one model, one process (issue 7).

    python experiments/bench_latency.py [--ckpt_path CKPT] [--category fabric] [--images 20]
        [--no-channels_last] [--no-fold_batchnorm] [--compile] [--threads N]

Heads under the issue's settings, all on one backbone and one denoiser (from --ckpt_path, else an
untrained `tiny` denoiser: latency does not depend on weight values): `irf` (t* = 200, 1 NFE),
`likelihood` (S = 2) and `reconstruction` (p = 20 %, S = 10). Each head is fitted on normal demo
images through its own fit_train / calibrate, and scored through `FeatureDDPM.score_batch` after
`prepare_inference`. Batch 1: per-stage median and p95 ms per image (`StageTimer`), the heads
interleaved image by image so a shared CPU's load falls on all of them alike. Batch 32: images per
second. Prints a table, the ratios to the baseline and whether the issue's targets are met.

Defaults, measured on the project's 2-core CPU (irf, batch 1):
- channels-last on: backbone 15.5 against 18.2 ms, denoiser 6.6 against 8.1 ms per call (1 thread);
  irf at batch 32: 31.8 against 14.4 images per second;
- BatchNorm folded into the backbone's convolutions (`prepare_inference`): backbone 9.8 -> 7.7 ms
  (2 threads), 14.7 -> 12.2 ms (1 thread), features equal within 6e-5 (of values up to 22);
- compile off: it costs 1 to 2.5 min per process for 15 % (backbone) and 21 % (denoiser) less time,
  and leaves the ratios to the baseline where they were (or worse: the denoiser gains more);
- threads: torch's default, one per core. On an idle machine 2 threads take the backbone from
  14.7 to 9.8 ms but the batch-1 denoiser only from 6.0 to 5.2 ms (its 4 x 4 to 16 x 16 maps are
  too small to share), so the ratios improve a little. While other jobs load the machine, 2 threads
  wait on each other (irf median 295 against 56 ms at load 7.6): use `--threads 1` there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from torch import Tensor, nn

from ad_lightning.data.demo import DEMO_CATEGORIES, ensure_demo
from ad_lightning.data.images import list_images, read_image
from ad_lightning.evaluation.timing import StageTimer
from ad_lightning.heads import build_head
from ad_lightning.lit import FeatureDDPM
from ad_lightning.inference import load_model

IMAGE_SIZE = 256
BASELINE = "reconstruction"
HEADS = {  # the issue's settings
    "irf": {"t_star": 200, "input": "noise_free"},
    "likelihood": {"steps": 2},
    BASELINE: {"perturbation": 0.2, "steps": 10},
}
END_TO_END_TARGETS = {"irf": 0.25, "likelihood": 0.35}  # max total ms per image relative to the baseline
IRF_HEAD_TARGET = 1.0  # irf's denoiser + head time at most this fraction of the backbone's own time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", help="a trained checkpoint (default: an untrained tiny denoiser)")
    parser.add_argument("--category", default="fabric", choices=DEMO_CATEGORIES, help="demo category")
    parser.add_argument("--images", type=int, default=20, help="timed batch-1 images per head (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="batch-1 images per head discarded first")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the throughput measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed throughput batches per head")
    parser.add_argument("--fit_images", type=int, default=32, help="normal images that fit the heads")
    # Defaults chosen by measurement (see the module docstring).
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last weights for the backbone and denoiser (default: on)")  # fmt: skip
    parser.add_argument("--fold_batchnorm", action=argparse.BooleanOptionalAction, default=True,
                        help="fold the backbone's BatchNorms into its convolutions (default: on)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and denoiser (default: off)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    return parser.parse_args()


def build_model(ckpt_path: str | None) -> tuple[FeatureDDPM, str]:
    """The model whose backbone and denoiser every head shares, and a line saying where its weights are from."""
    if ckpt_path:
        return load_model(ckpt_path, torch.device("cpu"))[0], f"trained weights from {ckpt_path}"
    note = "untrained tiny denoiser, pretrained backbone (latency does not depend on weight values)"
    return FeatureDDPM(denoiser="tiny", heads=BASELINE).eval(), note


def fit_heads(model: FeatureDDPM, train: Tensor, normal: Tensor) -> None:
    """Replace the model's heads by the benchmark's and fit them: statistics on `train` images,
    normalisers, map ranges and thresholds on the held-out normal images (feature statistics too
    when the model is untrained)."""
    with torch.no_grad():
        if not bool(model.feature_norm.fitted):
            model.feature_norm.fit(model.backbone(train))
        z_train, z_normal = model.encode(train), model.encode(normal)
        heads = {name: build_head(name, len(model.alpha_bar), **args) for name, args in HEADS.items()}
        for head in heads.values():
            head.fit_train(z_train.split(8), model.eps_fn, model.alpha_bar)
            head.calibrate(head.evaluate(z_normal, model.eps_fn, model.alpha_bar))
    model.heads = nn.ModuleDict(heads)


def batch1(model: FeatureDDPM, images: list[Tensor], warmup: int) -> dict[str, StageTimer]:
    """Per head, the stage times (backbone, the head, total) of scoring each image alone; the heads
    take turns on every image, the first `warmup` images are not recorded."""
    timers = {name: StageTimer() for name in HEADS}
    for i, image in enumerate(images):
        for name in HEADS:
            timer = timers[name] if i >= warmup else StageTimer()
            with timer("total", image):
                model.score_batch(image[None], timer, heads=[name])
    return timers


def throughput(model: FeatureDDPM, batch: Tensor, repeats: int) -> dict[str, float]:
    """Images per second of each head on one batch: the median of `repeats` timed runs after one warm-up."""
    rates = {}
    for name in HEADS:
        model.score_batch(batch, heads=[name])
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.score_batch(batch, heads=[name])
            seconds.append(time.perf_counter() - start)
        rates[name] = len(batch) / statistics.median(seconds)
    return rates


def ms(timer: StageTimer, stage: str) -> tuple[float, float]:
    """(median, p95) ms of one stage."""
    samples = np.array(timer.samples[stage]) * 1000.0
    return float(np.median(samples)), float(np.percentile(samples, 95))


def report(model: FeatureDDPM, timers: dict[str, StageTimer], rates: dict[str, float], batch: int) -> None:
    """The table, the ratios to the baseline and the targets."""
    base_total = ms(timers[BASELINE], "total")[0]
    columns = ("backbone ms", "head ms", "total ms")
    print(f"{'head':<15}{'NFE':>4}  " + "  ".join(f"{c:>13}" for c in columns) + f"  {f'img/s @{batch}':>10}  x recon")
    print(f"{'':<19}  " + "  ".join(f"{'median / p95':>13}" for _ in columns))
    for name, timer in timers.items():
        cells = [f"{m:6.1f} / {p:4.0f}" for m, p in (ms(timer, "backbone"), ms(timer, name), ms(timer, "total"))]
        ratio = ms(timer, "total")[0] / base_total
        print(f"{name:<15}{model.heads[name].nfe:>4}  {'  '.join(cells)}  {rates[name]:>10.1f}  {ratio:>7.2f}")
    print()
    for name, target in END_TO_END_TARGETS.items():
        ratio = ms(timers[name], "total")[0] / base_total
        print(f"target: {name} end-to-end <= {target:.2f} x {BASELINE}: {ratio:.3f} -> {verdict(ratio <= target)}")
    irf = timers["irf"]
    added = ms(irf, "irf")[0] / ms(irf, "backbone")[0]
    met = verdict(added <= IRF_HEAD_TARGET)
    print(f"target: irf denoiser + head add <= {IRF_HEAD_TARGET:.0%} to the backbone: {added:.0%} -> {met}")


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def demo_images(category: str, split: str, count: int) -> list[Tensor]:
    """The first `count` images of a demo split (train: normal; test: normal then each defect type),
    repeated when the split has fewer, each [3, 256, 256] in [0, 1]."""
    folder = ensure_demo() / category / split
    paths = [p for kind in sorted(d for d in folder.iterdir() if d.is_dir()) for p in list_images(kind)]
    return [read_image(paths[i % len(paths)], IMAGE_SIZE) for i in range(count)]


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, weights = build_model(args.ckpt_path)
    train = torch.stack(demo_images(args.category, "train", args.fit_images + 8))
    fit_heads(model, train[: args.fit_images], train[args.fit_images :])
    if args.threads:
        torch.set_num_threads(args.threads)
    model.prepare_inference(channels_last=args.channels_last, fold_batchnorm=args.fold_batchnorm, compile=args.compile)
    test = demo_images(args.category, "test", args.warmup + args.images)
    load_before = os.getloadavg()
    print(f"demo '{args.category}', {IMAGE_SIZE} x {IMAGE_SIZE}, {weights}")
    cpu = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {cpu}, "
          f"channels_last={args.channels_last}, fold_batchnorm={args.fold_batchnorm}, compile={args.compile}")  # fmt: skip
    timers = batch1(model, test, args.warmup)
    rates = throughput(model, torch.stack([test[i % len(test)] for i in range(args.batch)]), args.repeats)
    print(f"batch 1: {args.images} images per head after {args.warmup} warm-up; "
          f"batch {args.batch}: median of {args.repeats} runs")  # fmt: skip
    print(f"load average (1, 5, 15 min) before timing {tuple(round(v, 2) for v in load_before)}, after "
          f"{tuple(round(v, 2) for v in os.getloadavg())}: the CPU may be shared with other jobs\n")  # fmt: skip
    report(model, timers, rates, args.batch)


if __name__ == "__main__":
    main()

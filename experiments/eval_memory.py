"""Peak memory and wall time of test-time pixel metrics on a full-size test set, no model needed.

Generates synthetic test maps and masks batch by batch (smooth random fields at a raw score
scale; about half the images anomalous, with blob masks and raised scores there; a few
categories), feeds them through the real `TestRecorder` (add -> compute -> write metrics.json)
and prints the pixel metrics and the peak resident memory of the process. Issue 5 acceptance:
2,000 images of 256 x 256 in binned mode within 3 GB (exit code 1 otherwise).

    python experiments/eval_memory.py                       # 2000 images, 256 x 256, binned
    python experiments/eval_memory.py --mode exact --heads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ad_lightning.evaluation.report import PIXEL_MODES, TestRecorder
from ad_lightning.evaluation.timing import peak_memory_mb
from ad_lightning.heads.base import Scores

LIMIT_MB = 3 * 1024
CATEGORIES = ("bottle", "cable", "screw", "tile")
DECISION_THRESHOLD = 130.0  # head0's deployed pixel rule, on the raw score scale below


def smooth_field(generator: torch.Generator, batch: int, size: int, cells: int) -> Tensor:
    """Unit Gaussian noise on a cells x cells grid, bicubically upsampled to [B, size, size]."""
    coarse = torch.randn(batch, 1, cells, cells, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine[:, 0]  # [B, 1, S, S] -> [B, S, S]


def synthetic_masks(generator: torch.Generator, batch: int, size: int) -> tuple[Tensor, Tensor]:
    """Labels [B] (about half anomalous) and masks [B, S, S]: the top 3 % of a blob field."""
    labels = torch.rand(batch, generator=generator) < 0.5
    blobs = smooth_field(generator, batch, size, 8)
    cut = blobs.flatten(1).quantile(0.97, dim=1)  # [B, S, S] -> [B, S*S] -> [B]
    return labels, (blobs > cut[:, None, None]) & labels[:, None, None]


def synthetic_map(generator: torch.Generator, masks: Tensor, strength: float) -> Tensor:
    """Raw-scale anomaly maps [B, S, S]: smooth background, raised (blurred) over the masks, noise."""
    raised = F.avg_pool2d(masks[:, None].float(), 9, stride=1, padding=4)[:, 0]  # [B, 1, S, S] -> [B, S, S]
    background = 0.3 * smooth_field(generator, *masks.shape[:2], 32)
    noise = 0.1 * torch.randn(masks.shape, generator=generator)
    return 100.0 + 40.0 * (background + strength * raised + noise)


def synthetic_batch(generator: torch.Generator, start: int, batch: int, size: int, heads: int) -> tuple[dict, dict]:
    """One test batch as the LightningModule hands it to the recorder, and every head's Scores."""
    labels, masks = synthetic_masks(generator, batch, size)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(start, start + batch)]
    data = {
        "image": torch.zeros(batch, 3, size, size),
        "mask": masks[:, None].float(),  # [B, S, S] -> [B, 1, S, S]
        "label": labels.long(),
        "path": [f"{c}/{i:05d}.png" for c, i in zip(categories, range(start, start + batch))],
        "category": categories,
    }
    results = {}
    for h in range(heads):
        maps = synthetic_map(generator, masks, strength=1.0 - 0.2 * h)
        decisions = maps >= DECISION_THRESHOLD if h == 0 else None
        results[f"head{h}"] = Scores(maps.flatten(1).amax(1), {}, maps, pixel_decisions=decisions)
    return data, results


def evaluate(args: argparse.Namespace, out_dir: Path) -> dict:
    """Feed every synthetic batch through a TestRecorder, then compute and write the metrics."""
    generator = torch.Generator().manual_seed(args.seed)
    recorder = TestRecorder({f"head{h}": 1 for h in range(args.heads)}, pixel_mode=args.mode)
    for start in range(0, args.images, args.batch):
        recorder.add(*synthetic_batch(generator, start, min(args.batch, args.images - start), args.size, args.heads))
    metrics = recorder.compute(has_masks=True)
    recorder.write(out_dir, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mode", choices=PIXEL_MODES, default="binned")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep metrics.json here (default: a temp dir)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        metrics = evaluate(args, out_dir)
        wall = time.perf_counter() - start
        peak = peak_memory_mb(torch.device("cpu"))  # ru_maxrss of this process
        print(f"\nimages: {args.images}, pixels per head: {args.images * args.size**2:,}, mode: {args.mode}")
        print(f"wall time: {wall:.1f} s")
        for head, values in metrics["heads"].items():
            pixel = {k: values[k] for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")}
            print(f"{head}: {json.dumps(pixel)} ({metrics['pixel_metrics_mode'][head].split(' (')[0]})")
        within = peak <= LIMIT_MB
        print(f"peak resident memory: {peak:.0f} MB ({'within' if within else 'over'} {LIMIT_MB} MB)")
    return 1 if args.mode == "binned" and not within else 0


if __name__ == "__main__":
    raise SystemExit(main())

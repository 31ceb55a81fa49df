"""Stage timing and peak memory, measured the way docs/methods.md section 9 asks: batch 1, warm-up
excluded, median and p95 ms per image, split by stage (backbone, then each head)."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor


class StageTimer:
    """Wall time of every call of named stages; CUDA is synchronised so the numbers are real."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, stage: str, like: Tensor):
        sync = torch.cuda.synchronize if like.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.samples[stage].append(time.perf_counter() - start)

    def total(self, stage: str) -> float:
        return sum(self.samples.get(stage, []))

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {median_ms, p95_ms, n}} over the recorded calls."""
        return {
            stage: {
                "median_ms": 1000.0 * float(np.median(s)),
                "p95_ms": 1000.0 * float(np.percentile(s, 95)),
                "n": len(s),
            }
            for stage, s in self.samples.items()
        }


def batch1_latency(score: Callable[[Tensor, StageTimer], object], images: list[Tensor], warmup: int = 3) -> dict:
    """Score each image alone (batch 1) through `score(image [1, 3, H, W], timer)`; the first
    `warmup` calls are discarded. Returns the per-stage summary."""
    for image in images[:warmup]:
        score(image, StageTimer())
    timer = StageTimer()
    for image in images[warmup:]:
        score(image, timer)
    return timer.summary()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB

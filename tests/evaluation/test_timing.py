import time

import torch

from ad_lightning.evaluation.timing import StageTimer, batch1_latency, peak_memory_mb


def test_stage_timer_records_each_call():
    timer = StageTimer()
    for delay in (0.01, 0.02, 0.03):
        with timer("sleep", torch.zeros(1)):
            time.sleep(delay)
    summary = timer.summary()["sleep"]
    assert summary["n"] == 3 and 15 <= summary["median_ms"] <= 60 and summary["p95_ms"] >= summary["median_ms"]
    assert 0.05 <= timer.total("sleep") <= 0.2


def test_batch1_latency_discards_warmup_and_sees_single_images():
    shapes = []

    def score(image, timer):
        shapes.append(image.shape[0])
        with timer("backbone", image):
            pass

    summary = batch1_latency(score, [torch.zeros(1, 3, 8, 8)] * 7, warmup=3)
    assert summary["backbone"]["n"] == 4 and shapes == [1] * 7


def test_peak_memory_is_positive_on_cpu():
    assert peak_memory_mb(torch.device("cpu")) > 10

import csv
import json
import math
import multiprocessing
import os
import signal
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ad_lightning.evaluation import report
from ad_lightning.evaluation.metrics import aupro, pixel_auroc, thresholded
from ad_lightning.evaluation.report import TestRecorder, build_metrics, merge_payloads
from ad_lightning.heads.base import Scores

REAL_CSV_WRITER, REAL_FSYNC = csv.writer, os.fsync


def batch_of(paths, labels, categories, masks):
    return {
        "image": torch.zeros(len(paths), 3, *masks.shape[-2:]),
        "mask": masks[:, None].float(),  # [B, H, W] -> [B, 1, H, W]
        "label": torch.tensor(labels),
        "path": list(paths),
        "category": list(categories),
    }


def small_batches():
    """Two categories of 4 images 4x4 in two batches; head h separates category a perfectly."""
    rows = [(f"{c}/{i}.png", i % 2, c) for c in ("a", "b") for i in range(4)]
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.5, 0.4, 0.6, 0.7])
    masks = torch.zeros(8, 4, 4, dtype=torch.bool)
    masks[1::2, 0] = True
    maps = masks.float() + 0.01 * torch.arange(8.0)[:, None, None]
    for part in (slice(0, 5), slice(5, 8)):
        paths, labels, categories = zip(*rows[part])
        yield batch_of(paths, labels, categories, masks[part]), {
            "h": Scores(scores[part], {"t": -scores[part]}, maps[part])
        }


def recorded(batches, mode="auto", thresholds=None):
    recorder = TestRecorder({"h": 2, "g": 1}, thresholds, pixel_mode=mode)
    for batch, results in batches:
        recorder.add(batch, results)
    return recorder


def test_per_category_then_mean_and_counts():
    recorder = recorded(small_batches())
    recorder.latency = {"h": {"backbone": {"median_ms": 1.0}, "h": {"median_ms": 2.0}}}
    m = recorder.compute()
    assert m["n_test_images"] == 8 and m["n_anomalous"] == 4 and m["evaluation_resolution"] == [4, 4]
    assert m["categories"]["a"]["heads"]["h"]["image_auroc"] == 1.0
    assert m["categories"]["b"]["heads"]["h"]["image_auroc"] == 0.5
    assert m["heads"]["h"]["image_auroc"] == 0.75 and m["heads"]["h_t"]["image_auroc"] == 0.25
    assert m["heads"]["h"]["pixel_auroc"] == 1.0 and "pixel_auroc" not in m["heads"]["h_t"]
    assert m["heads"]["h"]["nfe"] == m["heads"]["h_t"]["nfe"] == 2 and m["heads"]["h"]["ms_per_image"] == 3.0
    assert m["pixel_metrics_mode"] == {"h": report.MODE_NOTES["exact"]}


def test_without_masks_the_run_is_image_level_and_says_so():
    m = recorded(small_batches()).compute(has_masks=False)
    assert "pixel_auroc" not in m["heads"]["h"] and m["pixel_metrics"].startswith("none")
    assert "pixel_metrics_mode" not in m


def test_full_metric_set_and_deployed_threshold_only_for_heads():
    m = recorded(small_batches(), thresholds={"h": 0.65}).compute()
    a = m["categories"]["a"]["heads"]["h"]
    assert a["image_ap"] == 1.0 and a["image_f1max"] == 1.0
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"]) == (1.0, 1.0, 1.0, 1.0)  # 0.9, 0.8 >= 0.65
    b = m["categories"]["b"]["heads"]["h"]  # only 0.7 >= 0.65, and it is anomalous
    assert (b["accuracy"], b["precision"], b["recall"]) == (0.75, 1.0, 0.5)
    assert "accuracy" not in m["heads"]["h_t"]  # a raw term has no deployed threshold
    assert {"pixel_ap", "pixel_f1max", "aupro"} <= set(m["heads"]["h"]) and m["heads"]["h"]["aupro"] == 1.0
    assert m["oracle_metrics"] == ["image_f1max", "pixel_f1max"]


def synthetic_batches(seed, n=24, size=32, batch=5, categories=("a", "b")):
    """Smooth noisy raw-scale maps, blob defects on every other image; head `g` has no map and
    head `h` also makes deployed pixel decisions (map >= 20)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for image in range(0, n, 2):
        blobs = gaussian_filter(rng.random((size, size)), 3.0)
        masks[image] = blobs > np.quantile(blobs, 0.95)
    maps = gaussian_filter(masks.astype(float), (0, 2, 2)) + 0.4 * gaussian_filter(rng.normal(size=masks.shape), 1)
    maps = torch.tensor(maps * 100.0 - 5.0, dtype=torch.float32)
    masks = torch.tensor(masks)
    for start in range(0, n, batch):
        part = slice(start, start + batch)
        index = range(start, min(start + batch, n))
        paths = [f"img{i}.png" for i in index]
        labels = [int(i % 2 == 0) for i in index]
        cats = [categories[(i // 2) % len(categories)] for i in index]  # both with defects
        score = maps[part].flatten(1).amax(1)
        yield batch_of(paths, labels, cats, masks[part]), {
            "h": Scores(score, {}, maps[part], pixel_decisions=maps[part] >= 20.0),
            "g": Scores(-score, {}),
        }


def all_of(batches):
    batches = list(batches)
    maps = torch.cat([results["h"].maps for _, results in batches])
    masks = torch.cat([batch["mask"][:, 0] for batch, _ in batches])
    categories = [c for batch, _ in batches for c in batch["category"]]
    return maps, masks, categories


PIXEL = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def flat(metrics):
    """{(category, column, metric): value} of a metrics dict, for pytest.approx."""
    categories = metrics["categories"].items()
    return {(c, k, m): v for c, cat in categories for k, values in cat["heads"].items() for m, v in values.items()}


@pytest.mark.parametrize("seed", range(2))
def test_binned_recorder_keeps_no_maps_and_is_within_0005_of_exact(seed):
    exact = recorded(synthetic_batches(seed), mode="exact")
    binned = recorded(synthetic_batches(seed), mode="binned")
    assert not binned.maps and not binned.masks and len(binned.histograms) == 2  # (h, a), (h, b)
    assert len(exact.masks) == 5 and exact.maps["h"][0].shape == (5, 32, 32)
    m_exact, m_binned = exact.compute(), binned.compute()
    maps, masks, categories = all_of(synthetic_batches(seed))
    in_a = torch.tensor([c == "a" for c in categories])
    exact_a = m_exact["categories"]["a"]["heads"]["h"]
    assert exact_a["pixel_auroc"] == pytest.approx(pixel_auroc(maps[in_a], masks[in_a]))
    assert exact_a["aupro"] == pytest.approx(aupro(maps[in_a], masks[in_a]))
    for category in ("a", "b"):
        got, want = m_binned["categories"][category]["heads"]["h"], m_exact["categories"][category]["heads"]["h"]
        assert [got[k] for k in PIXEL] == pytest.approx([want[k] for k in PIXEL], abs=0.005)
        assert 0.3 < min(want[k] for k in PIXEL) < max(want[k] for k in PIXEL) < 1.0
    assert m_binned["pixel_metrics_mode"]["h"].startswith("binned")
    assert set(m_binned["pixel_bin_width"]["h"]) == {"a", "b"}
    assert m_exact["pixel_metrics_mode"]["h"].startswith("exact") and "pixel_bin_width" not in m_exact
    assert m_binned["heads"]["g"]["image_auroc"] == m_exact["heads"]["g"]["image_auroc"]
    assert "pixel_auroc" not in m_binned["heads"]["g"] and set(m_binned["pixel_metrics_mode"]) == {"h"}


def test_auto_spills_to_the_same_histograms_as_binned_from_the_start(monkeypatch):
    monkeypatch.setattr(report, "EXACT_MAX_PIXELS", 12 * 32 * 32)
    auto = TestRecorder({"h": 1, "g": 1})
    batches = list(synthetic_batches(3))
    for batch, results in batches[:2]:
        auto.add(batch, results)
    assert not auto.binned and len(auto.masks) == 2  # 10 images stored
    auto.add(*batches[2])  # 15 images: past the limit
    assert auto.binned and not auto.maps and not auto.masks
    for batch, results in batches[3:]:
        auto.add(batch, results)
    binned = recorded(synthetic_batches(3), mode="binned")
    for key, histogram in binned.histograms.items():
        assert (auto.histograms[key].level, auto.histograms[key].offset) == (histogram.level, histogram.offset)
        np.testing.assert_allclose(auto.histograms[key].counts, histogram.counts, rtol=0, atol=1e-9)
    assert flat(auto.compute()) == pytest.approx(flat(binned.compute()), abs=1e-12)


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_pixel_decisions_give_per_category_rates(mode):
    m = recorded(synthetic_batches(1), mode=mode).compute()
    maps, masks, categories = all_of(synthetic_batches(1))
    for category in ("a", "b"):
        index = torch.tensor([c == category for c in categories])
        want = thresholded(maps[index].flatten(), masks[index].flatten(), 20.0)
        got = m["categories"][category]["heads"]["h"]
        assert {k: got[f"pixel_{k}"] for k in want} == pytest.approx(want)
    assert 0 < m["heads"]["h"]["pixel_recall"] < 1 and "pixel_f1" not in m["heads"]["g"]


def test_a_path_seen_before_is_skipped():
    batches = list(synthetic_batches(0))
    recorder = recorded(batches, mode="binned")
    repeat = recorded(batches + batches[:1], mode="binned")
    assert len(repeat.rows) == len(repeat.scores["h"]) == 24
    assert flat(repeat.compute()) == flat(recorder.compute())


def merged_metrics(recorders):
    payload = merge_payloads([r.payload() for r in recorders])
    return payload, build_metrics(payload, recorders[0].owner, recorders[0].nfe, {}, True, {})


@pytest.mark.parametrize("modes", [("exact", "exact"), ("binned", "binned"), ("exact", "binned")])
def test_merging_two_ranks_equals_one_recorder(modes):
    batches = list(synthetic_batches(2))
    ranks = [recorded(batches[0::2], mode=modes[0]), recorded(batches[1::2], mode=modes[1])]
    one = recorded(batches[0::2] + batches[1::2], mode="binned" if "binned" in modes else "exact")
    payload, merged = merged_metrics(ranks)
    assert payload["binned"] == ("binned" in modes)
    assert [row["path"] for row in payload["rows"]] == [row["path"] for row in one.rows]
    assert flat(merged) == pytest.approx(flat(one.compute()), abs=1e-12)


def test_merge_keeps_a_cross_rank_repeat_once_and_counts_it():
    """Exact maps drop the repeat; streamed pixel decision counts cannot, and keep it (documented)."""
    batches = list(synthetic_batches(4))
    ranks = [recorded(batches[:3], mode="exact"), recorded(batches[2:], mode="exact")]
    payload, merged = merged_metrics(ranks)
    assert len(payload["rows"]) == 24 and payload["masks"].shape[0] == 24 and payload["repeats"] == 5
    assert merged["repeated_images"]["count"] == 5
    rates = ("pixel_accuracy", "pixel_precision", "pixel_recall", "pixel_f1")
    decisions = [key for key in flat(merged) if key[2] in rates]
    want = {k: v for k, v in flat(recorded(batches, mode="exact").compute()).items() if k not in decisions}
    assert {k: v for k, v in flat(merged).items() if k not in decisions} == pytest.approx(want, abs=1e-12)
    assert sum(counts.sum() for counts in payload["decisions"].values()) == (24 + 5) * 32 * 32


def test_write_and_bad_input(tmp_path):
    recorder = recorded(synthetic_batches(0), mode="binned")
    metrics = recorder.compute()
    recorder.write(tmp_path, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_test_images"] == 24
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,label,h,g" and len(lines) == 25
    assert not math.isnan(metrics["heads"]["h"]["aupro"])
    with pytest.raises(ValueError, match="pixel_mode"):
        TestRecorder({}, pixel_mode="fast")
    batch, results = next(synthetic_batches(0))
    with pytest.raises(ValueError, match="every batch or for none"):
        recorder.add(batch, {"h": Scores(results["h"].score, {})})


class DyingWriter:
    """csv.writer that SIGKILLs its own process once it has written and flushed `rows` rows."""

    def __init__(self, f, rows: int = 10):
        self.f, self.writer, self.left = f, REAL_CSV_WRITER(f), rows

    def writerow(self, row):
        self.writer.writerow(row)
        self.left -= 1
        if self.left == 0:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def write_then_die(out_dir, killed_in: str) -> None:
    """In a forked child: write a new 100-image report into out_dir and be killed while writing
    scores.csv (ten rows in) or metrics.json (complete in its temporary file, before it reaches the disk)."""
    if killed_in == "scores":
        csv.writer = DyingWriter
    else:
        fsyncs = []

        def dying_fsync(fd):  # the first fsync is scores.csv's, the second metrics.json's
            fsyncs.append(fd)
            os.kill(os.getpid(), signal.SIGKILL) if len(fsyncs) == 2 else REAL_FSYNC(fd)

        os.fsync = dying_fsync
    recorder = TestRecorder({"h": 1})
    rows = [{"path": f"{i}.png", "label": i % 2} for i in range(100)]
    recorder.merged = {"rows": rows, "scores": {"h": torch.arange(100.0)}}
    recorder.write(out_dir, {"n_test_images": 100})


@pytest.mark.parametrize("killed_in", ["scores", "metrics"])
def test_a_kill_while_writing_leaves_whole_files_and_no_completion_marker(tmp_path, killed_in):
    recorder = recorded(synthetic_batches(0), mode="binned")
    recorder.write(tmp_path, recorder.compute())
    report.mark_complete(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("scores.csv", "metrics.json")}
    child = multiprocessing.get_context("fork").Process(target=write_then_die, args=(tmp_path, killed_in))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert (tmp_path / "metrics.json").read_bytes() == before["metrics.json"]
    scores = (tmp_path / "scores.csv").read_bytes()
    if killed_in == "scores":
        assert scores == before["scores.csv"]
    else:  # scores.csv was complete before metrics.json was begun
        assert scores.decode().splitlines()[1:3] == ["0.png,0,0", "1.png,1,1"] and len(scores.splitlines()) == 101
    assert not report.is_complete(tmp_path)  # the rewrite started: the earlier run's marker no longer holds


def test_a_writer_failing_half_way_leaves_no_file(tmp_path, monkeypatch):
    class FailingWriter:
        def __init__(self, f):
            self.writer, self.rows = REAL_CSV_WRITER(f), 0

        def writerow(self, row):
            self.writer.writerow(row)
            self.rows += 1
            if self.rows == 10:
                raise OSError("disk full")

    monkeypatch.setattr(report.csv, "writer", FailingWriter)
    recorder = recorded(synthetic_batches(0), mode="binned")
    with pytest.raises(OSError, match="disk full"):
        recorder.write(tmp_path, recorder.compute())
    assert list(tmp_path.iterdir()) == []  # neither scores.csv nor metrics.json, no temporary file


def test_completion_marker(tmp_path):
    recorder = recorded(synthetic_batches(0), mode="binned")
    assert not report.is_complete(tmp_path)
    recorder.write(tmp_path, recorder.compute())
    assert not report.is_complete(tmp_path)  # the report alone: plots may still be missing
    before = datetime.now(timezone.utc).replace(microsecond=0)
    marker = report.mark_complete(tmp_path)
    assert report.is_complete(tmp_path) and marker.parent == tmp_path
    assert before <= datetime.fromisoformat(marker.read_text().strip()) <= datetime.now(timezone.utc)

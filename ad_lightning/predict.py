"""`python -m ad_lightning predict`: score new images with one head of a trained model.

    python -m ad_lightning predict --ckpt_path runs --data.path photos/ --head likelihood [--out runs/predict]

`--data.path` is a directory (every image below it) or a quoted glob pattern. Images are read and
resized as in training (a model trained on tiles scores each image tile by tile at native size).
Writes `<out>/predictions.csv` (`path, score, decision, error, overlay`, one row per input in input
order) and, for heads with an anomaly map, `<out>/overlays/*.png`: the image beside the image
blended with its map, on one colour range for all images. An unreadable image gets a row with the
reason and no score; the others are still scored and the exit status is 1 at the end.
`--ckpt_path` may also be a `.onnx` file written by `python -m ad_lightning export`: onnxruntime
scores with it, at the head and image size it was exported for.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib import colormaps
from torch import Tensor

from ad_lightning.rendering import side_by_side_overlay, stored_map_range
from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.cli import resolve_checkpoint
from ad_lightning.data.images import IMAGE_EXTENSIONS, BadFileError, BadInputError, read_image
from ad_lightning.evaluation.thresholds import is_anomalous
from ad_lightning.heads import Head, Scores
from ad_lightning.lit import FeatureDDPM

DEFAULT_IMAGE_SIZE = 256  # when neither --image_size nor the checkpoint gives one
COLUMNS = ("path", "score", "decision", "error", "overlay")


@dataclass
class Prediction:
    path: Path
    score: float | None = None  # None when the image could not be read
    anomalous: bool | None = None  # the deployed decision, score >= the head's threshold
    image: Tensor | None = None  # the image as scored, [3, H, W] in [0, 1]
    amap: Tensor | None = None  # its anomaly map [H, W], None for heads without a map
    error: str = ""


def find_images(spec: str) -> list[Path]:
    """Images under a directory (recursively) or matching a glob pattern, sorted; hidden files skipped."""
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = path.rglob("*")
    elif path.is_file():
        candidates = [path]
    else:
        candidates = map(Path, glob.glob(os.path.expanduser(spec), recursive=True))
    images = sorted(p for p in candidates if p.is_file() and is_image_name(p))
    if not images:
        kinds = "/".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(
            f"no images ({kinds}) at --data.path {spec!r}; give a directory of images or a quoted glob "
            f"pattern, e.g. --data.path 'photos/**/*.png'"
        )
    return images


def is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    return torch.device(name)


def load_model(ckpt_path: str, device: torch.device) -> tuple[FeatureDDPM, dict]:
    """The trained model in eval mode on `device`, and the training datamodule's hyper-parameters.

    The checkpoint holds the backbone weights, so the backbone is built without resolving
    pretrained weights (no hub probe, works offline)."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist; pass a .ckpt file or a directory of runs")
    peek = load_checkpoint(ckpt_path, mmap=True)  # hparams only, no copy
    return FeatureDDPM.from_checkpoint(ckpt_path, device).eval(), dict(peek.get("datamodule_hyper_parameters") or {})


def fitted_head(model: FeatureDDPM, name: str, ckpt_path: str) -> Head:
    """`model.heads[name]`, refusing unknown heads and heads whose threshold was never fitted."""
    if name not in model.heads:
        raise BadInputError(f"unknown head {name!r} in {ckpt_path}; set --head to one of: {', '.join(model.heads)}")
    head = model.heads[name]
    if math.isnan(float(head.threshold)):
        raise BadInputError(
            f"head {name!r} in {ckpt_path} has no fitted threshold (NaN): thresholds are fitted on the normal "
            "validation split during `python -m ad_lightning fit`; use a checkpoint written after validation"
        )
    return head


@dataclass
class Scorer:
    """What `predict` scores with: one head of a checkpoint, or an exported graph."""

    score: Callable[[Tensor], Scores]  # images [B, 3, H, W] -> the head's Scores
    threshold: float  # the head's deployed decision threshold
    map_range: tuple[float, float] | None  # its maps' normal-validation range, when stored
    size: int  # the image size it scores at
    tiled: bool = False  # trained on tiles: tiles are cut from the native image, one image a batch


def checkpoint_scorer(ckpt_path: str, head: str, image_size: int | None, device: torch.device) -> Scorer:
    """One head of a trained checkpoint, on the fast inference path (`prepare_inference`)."""
    model, data_hparams = load_model(ckpt_path, device)
    fitted = fitted_head(model, head, ckpt_path)
    model.prepare_inference()
    size = image_size or data_hparams.get("image_size") or DEFAULT_IMAGE_SIZE
    scorer = make_scorer(model, head, data_hparams, size)
    tiled = data_hparams.get("tile_size") is not None
    return Scorer(scorer, float(fitted.threshold), stored_map_range(fitted), size, tiled)


def exported_scorer(path: str, head: str, image_size: int | None, device: torch.device) -> Scorer:
    """A graph written by `export`, run by onnxruntime; its head and image size are fixed."""
    from ad_lightning.export import OnnxScorer  # here, not at the top: export imports this module's loaders

    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model {path} does not exist; write one with `python -m ad_lightning export`")
    graph = OnnxScorer(path, device)
    if head != graph.head:
        raise BadInputError(
            f"{path} scores head {graph.head!r}, not {head!r}; pass --head {graph.head} or export {head!r}"
        )
    if image_size not in (None, graph.image_size):
        raise BadInputError(
            f"{path} was exported for {graph.image_size} x {graph.image_size} images, not {image_size}; drop "
            f"--image_size or export again with --image_size {image_size}"
        )
    return Scorer(graph, graph.threshold, graph.map_range, graph.image_size)


def make_scorer(model: FeatureDDPM, head: str, data_hparams: dict, size: int) -> Callable[[Tensor], Scores]:
    """Images [B, 3, H, W] -> the head's `Scores`; tile by tile (B = 1, native size) when trained on tiles."""
    tile = data_hparams.get("tile_size")
    if tile is None:
        return lambda images: model.score_batch(images, heads=[head])[head]
    overlap = data_hparams.get("tile_overlap", 0)
    return lambda images: model.score_tiled(images[0], tile, overlap, size, heads=[head])[head]


def predict(
    paths: list[Path],
    scorer: Callable[[Tensor], Scores],
    threshold: float,
    size: int | None,
    batch_size: int,
    device: torch.device,
) -> Iterator[Prediction]:
    """One `Prediction` per path, in order, scoring `batch_size` readable images at a time."""
    for start in range(0, len(paths), batch_size):
        batch = [read(path, size) for path in paths[start : start + batch_size]]
        good = [p for p in batch if not p.error]
        if good:
            scores = scorer(torch.stack([p.image for p in good]).to(device))  # [B, 3, H, W]
            anomalous = is_anomalous(scores.score, threshold)  # [B], the rule `test` reports
            for i, p in enumerate(good):
                p.score, p.anomalous = float(scores.score[i]), bool(anomalous[i])
                p.amap = None if scores.maps is None else scores.maps[i].float().cpu()
        yield from batch


def read(path: Path, size: int | None) -> Prediction:
    """The image as in training, or a `Prediction` carrying why it could not be read."""
    try:
        return Prediction(path, image=read_image(path, size))
    except BadFileError as err:
        return Prediction(path, error=err.reason)


def overlay_names(paths: list[Path]) -> list[str]:
    """Unique PNG names: the path below the inputs' common folder, '/' -> '__' (a.png -> a.png.png),
    with -1, -2, ... added on the rare clash."""
    root = Path(os.path.commonpath([p.parent.resolve() for p in paths]))
    names, taken = [], set()
    for path in paths:
        base = "__".join(path.resolve().relative_to(root).parts)
        name, n = f"{base}.png", 0
        while name in taken:
            n += 1
            name = f"{base}-{n}.png"
        taken.add(name)
        names.append(name)
    return names


class OverlayWriter:
    """Writes overlays on one colour range for every image: the head's stored normal-validation range
    when it has one (written as they come), else the min/max over all predicted maps (held until `close`)."""

    def __init__(self, directory: Path, value_range: tuple[float, float] | None, cmap: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.range, self.cmap = directory, value_range, cmap
        self.pending: list[tuple[Path, Tensor, Tensor]] = []

    def add(self, path: Path, image: Tensor, amap: Tensor) -> None:
        if self.range is None:
            self.pending.append((path, image, amap))
        else:
            side_by_side_overlay(image, amap, *self.range, self.cmap).save(path)

    def close(self) -> tuple[float, float] | None:
        """Write held overlays; returns the range used (None when there was nothing to draw)."""
        if self.pending:
            maps = torch.stack([amap.flatten() for _, _, amap in self.pending])
            self.range = (float(maps.min()), float(maps.max()))
            pending, self.pending = self.pending, []
            for path, image, amap in pending:
                self.add(path, image, amap)
        return self.range


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ad_lightning predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ckpt_path", required=True,
                        help="a .ckpt file, a directory (its newest *.ckpt), or an exported .onnx file")  # fmt: skip
    parser.add_argument("--data.path", dest="data_path", required=True, help="image directory or quoted glob")
    parser.add_argument("--head", required=True, help="the head whose score, threshold and map are used")
    parser.add_argument("--out", type=Path, default=Path("runs/predict"), help="output directory")
    parser.add_argument("--batch_size", type=int, default=8, help="images scored per forward pass")
    parser.add_argument("--image_size", type=int, help="resize to N x N (default: the training image size)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="auto = cuda if present")
    parser.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        parser.error(f"--batch_size {args.batch_size} and --image_size {args.image_size} must be positive")
    if args.cmap not in colormaps:
        parser.error(f"--cmap {args.cmap!r} is not a matplotlib colour map; try jet, inferno or viridis")
    return args


def write_predictions(
    predictions: Iterator[Prediction], names: list[str], csv_path: Path, overlays: OverlayWriter
) -> tuple[int, int]:
    """Write one CSV row per prediction and an overlay per map; returns (images failed, overlays)."""
    n_failed = n_overlays = 0
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for p, name in zip(predictions, names):
            row = {"path": str(p.path), "score": "", "decision": "", "error": p.error, "overlay": ""}
            if p.score is not None:
                row.update(score=p.score, decision="anomalous" if p.anomalous else "normal")
            if p.amap is not None:
                row["overlay"] = overlays.directory / name
                overlays.add(row["overlay"], p.image, p.amap)
            writer.writerow(row)
            n_failed += bool(p.error)
            n_overlays += p.amap is not None
    return n_failed, n_overlays


def main(argv: list[str]) -> int:
    """Run `predict`; 0 when every image was scored, 1 when some could not be read."""
    args = parse_args(argv)
    paths = find_images(args.data_path)
    device = resolve_device(args.device)
    exported = Path(args.ckpt_path).suffix.lower() == ".onnx"
    if exported:
        scorer = exported_scorer(args.ckpt_path, args.head, args.image_size, device)
    else:
        scorer = checkpoint_scorer(resolve_checkpoint(args.ckpt_path), args.head, args.image_size, device)
    size, tiled = scorer.size, scorer.tiled
    engine = f"{args.head} (exported graph, onnxruntime)" if exported else args.head
    print(f"predict: {len(paths)} image(s), head {engine}, image size {size}{' (tiles)' * tiled}, device {device}")

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, stored_range = args.out / "predictions.csv", scorer.map_range
    overlays = OverlayWriter(args.out / "overlays", stored_range, args.cmap)
    with torch.inference_mode():
        predictions = predict(
            paths, scorer.score, scorer.threshold, None if tiled else size, 1 if tiled else args.batch_size, device
        )
        n_failed, n_overlays = write_predictions(predictions, overlay_names(paths), csv_path, overlays)
    value_range = overlays.close()

    print(f"predictions: {csv_path}")
    if n_overlays:
        source = "the head's normal-validation range" if stored_range else "min/max over these predicted maps"
        low, high = value_range
        print(f"overlays:    {overlays.directory} ({n_overlays} PNG; map range [{low:.4g}, {high:.4g}], {source})")
    elif n_failed < len(paths):
        print(f"overlays:    none (head {args.head} makes no anomaly map)")
    if n_failed:
        print(f"predict: {n_failed} of {len(paths)} image(s) could not be read; see the error column of {csv_path}")
    return 1 if n_failed else 0

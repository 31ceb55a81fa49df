"""`python -m ad_lightning predict`: score new images with one head of a trained model.

    python -m ad_lightning predict --ckpt_path runs --data.path photos/ --head likelihood [--out runs/predict]

`--data.path` is a directory (every image below it) or a quoted glob pattern. Images are read and
resized as in training (a model trained on tiles scores each image tile by tile at native size).
Writes `<out>/predictions.csv` (`path, score, decision, error, overlay`, one row per input in input
order) and, for heads with an anomaly map, `<out>/overlays/*.png`: the image beside the image
blended with its map, on one colour range for all images. An unreadable image gets a row with the
reason and no score; the others are still scored and the exit status is 1 at the end.
`--ckpt_path` may also be a `.onnx` file written by `python -m ad_lightning export`: onnxruntime
scores with it, at the head and image size it was exported for (so `--head` is not needed).
Scoring goes through the Python API (`ad_lightning.Detector`), the code `test` scores with.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib import colormaps
from torch import Tensor

from ad_lightning.api import Detector
from ad_lightning.data.images import IMAGE_EXTENSIONS, BadFileError
from ad_lightning.evaluation.thresholds import is_anomalous
from ad_lightning.rendering import side_by_side_overlay

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
    if not images and not path.exists() and not glob.has_magic(spec):
        raise FileNotFoundError(f"--data.path {spec!r} does not exist; give a directory of images or a quoted glob pattern")
    if not images:
        kinds = "/".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(
            f"no images ({kinds}) at --data.path {spec!r}; give a directory of images or a quoted glob "
            f"pattern, e.g. --data.path 'photos/**/*.png'"
        )
    return images


def is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def predict(paths: list[Path], detector: Detector, batch_size: int) -> Iterator[Prediction]:
    """One `Prediction` per path, in order, scoring `batch_size` readable images at a time (one at a
    time for a model trained on tiles)."""
    step = 1 if detector.scorer.tiled else batch_size
    for start in range(0, len(paths), step):
        batch = [read(path, detector) for path in paths[start : start + step]]
        good = [p for p in batch if not p.error]
        if good:
            scores = detector.score(torch.stack([p.image for p in good]))  # [B, 3, H, W]
            anomalous = is_anomalous(scores.score, detector.threshold)  # [B], the rule `test` reports
            for i, p in enumerate(good):
                p.score, p.anomalous = float(scores.score[i]), bool(anomalous[i])
                p.amap = None if scores.maps is None else scores.maps[i].float().cpu()
        yield from batch


def read(path: Path, detector: Detector) -> Prediction:
    """The image as in training, or a `Prediction` carrying why it could not be read."""
    try:
        return Prediction(path, image=detector.load(path))
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
    parser.add_argument("--head", help="the head whose score, threshold and map are used (an .onnx file carries "
                        "its own; a checkpoint with one head needs none)")
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
    detector = Detector.from_checkpoint(args.ckpt_path, args.head, args.device, args.image_size)
    scorer, exported = detector.scorer, Path(args.ckpt_path).suffix.lower() == ".onnx"
    engine = f"{scorer.head} (exported graph, onnxruntime)" if exported else scorer.head
    tiles = " (tiles)" * scorer.tiled
    print(f"predict: {len(paths)} image(s), head {engine}, image size {scorer.image_size}{tiles}, device {args.device}")

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "predictions.csv"
    overlays = OverlayWriter(args.out / "overlays", scorer.map_range, args.cmap)
    predictions = predict(paths, detector, args.batch_size)
    n_failed, n_overlays = write_predictions(predictions, overlay_names(paths), csv_path, overlays)
    value_range = overlays.close()

    print(f"predictions: {csv_path}")
    if n_overlays:
        source = "the head's normal-validation range" if scorer.map_range else "min/max over these predicted maps"
        low, high = value_range
        print(f"overlays:    {overlays.directory} ({n_overlays} PNG; map range [{low:.4g}, {high:.4g}], {source})")
    elif n_failed < len(paths):
        print(f"overlays:    none (head {scorer.head} makes no anomaly map)")
    if n_failed:
        print(f"predict: {n_failed} of {len(paths)} image(s) could not be read; see the error column of {csv_path}")
    return 1 if n_failed else 0

"""The Python API: score images with one head of a trained model, from a notebook or a service.

    from ad_lightning import Detector
    det = Detector.from_checkpoint("runs/version_0/checkpoints/last.ckpt", head="irf")  # or an exported .onnx
    results = det.predict(["a.png", "b.png"])  # also numpy arrays, PIL images or a tensor batch
    results[0].score, results[0].anomaly_map, results[0].is_anomalous

Images are read and resized exactly as in training (a model trained on tiles scores each image tile by
tile at its native size), then scored by the same code `test` uses, so an image gets the same score
here as in `test`'s scores.csv (at the same batch size).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ad_lightning.data.images import image_tensor, read_image
from ad_lightning.errors import BadInputError
from ad_lightning.evaluation.thresholds import is_anomalous
from ad_lightning.heads import Scores
from ad_lightning.inference import Scorer, open_scorer

ImageLike = str | Path | np.ndarray | Image.Image | Tensor


@dataclass
class Result:
    """One image's result: its score, anomaly map [H, W] at the scored image size (None for a head without
    maps) and the deployed decision (score >= the head's threshold fitted on normal validation images)."""

    score: float
    anomaly_map: np.ndarray | None
    is_anomalous: bool


class Detector:
    """One head of a trained model (a checkpoint or an exported ONNX file), ready to score images."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, head: str | None = None, device: str = "cpu", image_size: int | None = None
    ) -> Detector:
        """`path`: a `.ckpt`, a run directory (its newest checkpoint) or an `.onnx` export; `head`: the
        head to score with (an export carries its own; a checkpoint with one head needs none)."""
        return cls(open_scorer(str(path), head, image_size, device))

    @property
    def head(self) -> str:
        return self.scorer.head

    @property
    def threshold(self) -> float:
        return self.scorer.threshold

    @property
    def image_size(self) -> int:
        return self.scorer.image_size

    def load(self, image: ImageLike) -> Tensor:
        """One image as the model reads it, [3, H, W] in [0, 1]: a file path, a numpy array (H x W or
        H x W x 3/4, uint8 or floats in [0, 1], converted to 8 bits as a file would be), a PIL image, or a
        tensor [3, H, W] in [0, 1] (resized with antialiasing when its size differs)."""
        size = None if self.scorer.tiled else self.scorer.image_size
        if isinstance(image, (str, Path)):
            return read_image(Path(image), size)
        if isinstance(image, np.ndarray):
            pixels = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            return image_tensor(Image.fromarray(pixels), size)
        if isinstance(image, Image.Image):
            return image_tensor(image, size)
        if isinstance(image, Tensor) and image.ndim == 3:
            if size is None or tuple(image.shape[-2:]) == (size, size):
                return image.float()
            return torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                                   antialias=True, align_corners=False)[0]  # fmt: skip
        raise BadInputError(f"cannot score a {type(image).__name__}; give a path, numpy array, PIL image or tensor")

    def score(self, images: Tensor) -> Scores:
        """Raw scoring of a batch [B, 3, H, W] in [0, 1] (B = 1 for a tiled model): the head's `Scores`."""
        return self.scorer(images)

    def predict(self, images: Iterable[ImageLike] | Tensor, batch_size: int = 8) -> list[Result]:
        """Score images (a sequence of image-likes, or a tensor batch [B, 3, H, W]) in order."""
        items = list(images.unbind(0)) if isinstance(images, Tensor) and images.ndim == 4 else list(images)
        return [result for batch in self._batches(items, batch_size) for result in self._results(batch)]

    def _batches(self, items: Sequence[ImageLike], batch_size: int) -> Iterator[Tensor]:
        step = 1 if self.scorer.tiled else batch_size
        for start in range(0, len(items), step):
            yield torch.stack([self.load(item) for item in items[start : start + step]])  # [b, 3, H, W]

    def _results(self, batch: Tensor) -> list[Result]:
        scores = self.score(batch)
        anomalous = is_anomalous(scores.score, self.threshold)  # the rule `test` reports
        maps = None if scores.maps is None else scores.maps.float().cpu().numpy()
        return [
            Result(float(scores.score[i]), None if maps is None else maps[i], bool(anomalous[i]))
            for i in range(len(scores.score))
        ]

"""Scoring a trained model outside `test`: loading a checkpoint (its heads fitted if they are not current),
its data, the device, and the scorers that `predict`, `export`, `ablate` and the Python API share.

A scorer maps images [B, 3, H, W] in [0, 1] to one head's `Scores`: `TorchScorer` runs a checkpoint
through `FeatureDDPM.score_batch` / `score_tiled` (the code `test` scores with), `OnnxScorer` a graph
written by `export` through onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
from torch import Tensor

from ad_lightning.checkpoint import load_checkpoint, resolve_checkpoint
from ad_lightning.data.stored import datamodule_of
from ad_lightning.errors import BadInputError, UsageError
from ad_lightning.heads import Scores
from ad_lightning.lit import FeatureDDPM
from ad_lightning.rendering import finite_range, stored_map_range

DEFAULT_IMAGE_SIZE = 256  # when neither the caller nor the checkpoint gives one
ONNX_FORMAT = "ad_lightning-scoring-1"  # the `format` metadata of an export: what `OnnxScorer` reads
ONNX_INPUT, ONNX_OUTPUTS = "image", ["score", "map"]


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU; use --device cpu (or auto)")
    return torch.device(name)


def load_model(ckpt_path: str, device: torch.device | str = "cpu", **overrides) -> tuple[FeatureDDPM, dict]:
    """The trained model in eval mode on `device`, and its training DataModule's hyper-parameters.
    `overrides` replace saved hyper-parameters (`FeatureDDPM.from_checkpoint`, e.g. `heads`). A checkpoint
    written mid-training, or one whose scoring settings are overridden, holds no heads fitted as now
    configured: they are fitted here, on the normal training and validation splits of its data, and that is said."""
    ckpt_path = resolve_checkpoint(ckpt_path)
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    model = FeatureDDPM.from_checkpoint(ckpt_path, device, **overrides).eval()
    reason = model.refit_reason()
    if reason is not None:
        print(f"{ckpt_path}: {reason}")
        model.fit_heads(datamodule_of(ckpt, source=ckpt_path))
    return model, dict(ckpt.get("datamodule_hyper_parameters") or {})


def fitted_head(model: FeatureDDPM, name: str | None, source: str) -> str:
    """The head to score with: `name`, or the model's only head; refuses unknown and uncalibrated heads."""
    if name is None:
        if len(model.heads) != 1:
            raise UsageError(f"{source} has heads {', '.join(model.heads)}; name one with --head")
        name = next(iter(model.heads))
    if name not in model.heads:
        raise UsageError(f"unknown head {name!r} in {source}; set --head to one of: {', '.join(model.heads)}")
    if math.isnan(float(model.heads[name].threshold)):
        raise BadInputError(
            f"head {name!r} in {source} has no fitted threshold (NaN): thresholds are fitted on the normal "
            "validation split during `python -m ad_lightning fit`; use a checkpoint written by it"
        )
    return name


@dataclass
class Scorer:
    """One head, ready to score: `__call__(images [B, 3, H, W] in [0, 1]) -> Scores` (maps at image size)."""

    head: str
    threshold: float  # the deployed image decision threshold (score >= threshold: anomalous)
    map_range: tuple[float, float] | None  # the maps' normal-validation range, when calibrated
    image_size: int  # images are resized to image_size x image_size (tiled: tiles are)
    tiled: bool = False  # trained on tiles: tiles are cut from each native image, one image per call

    def __call__(self, images: Tensor) -> Scores:
        raise NotImplementedError


@dataclass
class TorchScorer(Scorer):
    """One head of a checkpoint on the fast inference path (`prepare_inference`), through the model's own
    `score_batch` (or `score_tiled` for a model trained on tiles): the code `test` scores with."""

    model: FeatureDDPM | None = None
    tile: tuple[int, int] | None = None  # (tile size, overlap) of a model trained on tiles

    def __call__(self, images: Tensor) -> Scores:
        images = images.to(self.model.device)
        with torch.inference_mode():
            if self.tile is None:
                return self.model.score_batch(images, heads=[self.head])[self.head]
            return self.model.score_tiled(images[0], *self.tile, self.image_size, heads=[self.head])[self.head]


def torch_scorer(ckpt_path: str, head: str | None, image_size: int | None, device: torch.device) -> TorchScorer:
    """A scorer for one head of a checkpoint (the model's only head when `head` is None)."""
    model, data = load_model(ckpt_path, device)
    head = fitted_head(model, head, ckpt_path)
    model.prepare_inference()
    size = image_size or data.get("image_size") or DEFAULT_IMAGE_SIZE
    tile = None if data.get("tile_size") is None else (data["tile_size"], data.get("tile_overlap", 0))
    fitted = model.heads[head]
    return TorchScorer(head, float(fitted.threshold), stored_map_range(fitted), size, tile is not None, model, tile)


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime's execution provider for `device`, refusing CUDA when this onnxruntime has none."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UsageError("this onnxruntime has no CUDA provider; install onnxruntime-gpu or use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass
class OnnxScorer(Scorer):
    """A graph written by `export`, run by onnxruntime; its head, image size, threshold and map range come
    from the file's metadata (`OnnxScorer.open`)."""

    session: ort.InferenceSession | None = None

    @classmethod
    def open(cls, path: str | Path, device: torch.device | str = "cpu") -> OnnxScorer:
        if not Path(path).is_file():
            raise FileNotFoundError(f"exported model {path} does not exist; write one with `python -m ad_lightning export`")
        try:
            session = ort.InferenceSession(str(path), providers=onnx_providers(torch.device(device)))
        except Exception as err:  # onnxruntime raises its own untyped errors for unreadable files
            raise BadInputError(f"{path} is not a readable ONNX file ({err}); export one with `export`") from None
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("format") != ONNX_FORMAT:
            raise BadInputError(
                f"{path} is not an ad_lightning scoring export (metadata format {meta.get('format')!r}, expected "
                f"{ONNX_FORMAT!r}); export one with `python -m ad_lightning export --ckpt_path CKPT --head irf`"
            )
        value_range = finite_range(float(meta["map_low"]), float(meta["map_high"]))
        return cls(meta["head"], float(meta["threshold"]), value_range, int(meta["image_size"]), session=session)

    def __call__(self, images: Tensor) -> Scores:
        score, maps = self.session.run(ONNX_OUTPUTS, {ONNX_INPUT: images.detach().float().cpu().numpy()})
        return Scores(torch.from_numpy(score), {}, torch.from_numpy(maps))


def open_scorer(path: str, head: str | None = None, image_size: int | None = None, device: str = "cpu") -> Scorer:
    """A scorer for a checkpoint (`.ckpt`, a run directory, `last`) or an exported `.onnx` file. An export
    carries its head and image size: a different `head` or `image_size` is refused."""
    device = resolve_device(device)
    if Path(path).suffix.lower() != ".onnx":
        return torch_scorer(path, head, image_size, device)
    scorer = OnnxScorer.open(path, device)
    if head not in (None, scorer.head):
        raise UsageError(f"{path} scores head {scorer.head!r}, not {head!r}; drop --head or export {head!r}")
    if image_size not in (None, scorer.image_size):
        raise UsageError(
            f"{path} was exported for {scorer.image_size} x {scorer.image_size} images, not {image_size}; drop "
            f"--image_size or export again with --image_size {image_size}"
        )
    return scorer


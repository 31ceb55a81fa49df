"""The one protocol every scoring head follows, and the pieces heads share.

A head turns standardised features z0 [B, C, h, w] and the denoiser (an `eps_fn`) into raw
per-image terms and a raw anomaly map (`evaluate`). Its state comes from normal data only:
`fit_train` (statistics of the normal training features, e.g. OSD-IRF's Gaussians; optional)
and `calibrate` (normalisers, the map range and the deployed threshold, from the normal
validation split). `score` turns a raw output into the image score and the final map.

All fitted state lives in buffers, so it is saved in the checkpoint and `test`/`predict` need
nothing else. Buffers whose shape is only known after fitting (a Gaussian per position, an
Isolation Forest's training points) are resized or created when a checkpoint is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import median_abs_deviation
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from ad_lightning.diffusion import EpsFn
from ad_lightning.evaluation.thresholds import fit_threshold


@dataclass
class HeadOutput:
    terms: dict[str, Tensor]  # raw per-image quantities, each [B]
    map: Tensor | None  # raw anomaly map on the feature grid [B, h, w] (ensemble: [B, M, h, w]); None if pooled
    score: Tensor | None = None  # the image score [B] when the head computes it directly (a novelty detector)

    def to(self, device: torch.device | str) -> HeadOutput:
        move = lambda v: None if v is None else v.detach().to(device)
        return HeadOutput({k: move(v) for k, v in self.terms.items()}, move(self.map), move(self.score))

    @staticmethod
    def cat(outputs: list[HeadOutput]) -> HeadOutput:
        """Concatenate batch outputs along the batch dimension."""
        join = lambda values: None if values[0] is None else torch.cat(values)
        terms = {k: torch.cat([o.terms[k] for o in outputs]) for k in outputs[0].terms}
        return HeadOutput(terms, join([o.map for o in outputs]), join([o.score for o in outputs]))


@dataclass
class Scores:
    score: Tensor  # image score [B]
    terms: dict[str, Tensor]  # raw per-image terms, each [B]
    maps: Tensor | None = None  # anomaly maps at the image size [B, H, W]; None for heads without a map
    pixel_decisions: Tensor | None = None  # deployed per-pixel decisions [B, H, W] bool, for heads that make them


class FittedState(nn.Module):
    """A module whose buffers may change shape when fitted; loading a checkpoint adopts the saved
    shapes and creates buffers the fresh module does not have yet (direct buffers only)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if not key.startswith(prefix) or "." in name or name in self._parameters:
                continue
            current = self._buffers.get(name)
            if current is None or current.shape != value.shape or current.dtype != value.dtype:
                self.register_buffer(name, torch.empty_like(value, device=getattr(current, "device", "cpu")))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self.on_load()

    def on_load(self) -> None:
        """Hook: drop caches derived from the buffers (e.g. a rebuilt scikit-learn estimator)."""


class Head(FittedState):
    """Base class: subclasses set `name`, implement `nfe`, `evaluate` and, where needed,
    `fit_train`, `fit` and `score`.

    Buffers every head has: `threshold`, the deployed image decision threshold on the score, and
    `map_low` / `map_high`, the range of its final maps on the normal validation split (the
    binning grid for pixel metrics, the display range of heatmaps); NaN until calibrated.
    """

    name: str = ""
    needs_train_fit = False  # True: `fit_train` must see the normal training features first
    blur_sigma: float | None = None  # the head's own blur of upsampled maps; None: the model's `blur_sigma`
    exportable = False  # whether `export` can trace its scoring to ONNX (plain tensor maths only)
    sweeps: dict[str, str] = {}  # `ablate` options (steps, timesteps, perturbation) -> constructor arguments
    neutral_settings: tuple[str, ...] = ()  # constructor arguments that change memory or speed, never a score

    def __init__(self) -> None:
        super().__init__()
        for buffer in ("threshold", "map_low", "map_high"):
            self.register_buffer(buffer, torch.tensor(float("nan"), dtype=torch.float64))
        self.config: dict = {}  # every setting it was built with, defaults included (set by `build_head`)

    def resolved_settings(self) -> dict:
        """Settings the constructor resolves beyond its signature's defaults (e.g. a default chosen in its
        body), for `config`; none by default."""
        return {}

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        raise NotImplementedError

    @property
    def network_calls(self) -> set[tuple]:
        """The denoiser queries its `nfe` calls per image make, as keys: heads scored in one pass whose keys
        meet share those calls (`SharedCalls`); by default every call is the head's own."""
        return {(self.name, i) for i in range(self.nfe)}

    @property
    def members(self) -> list[str]:
        """Heads whose outputs this one combines (an ensemble's); none for a head that scores z0."""
        return []

    def fit_train(self, batches: Iterable[Tensor], eps_fn: EpsFn, alpha_bar: Tensor) -> None:
        """Fit statistics of normal training features, z0 batches [B, C, h, w]; no-op by default."""

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        raise NotImplementedError

    def fit(self, normal: HeadOutput) -> None:
        """Fit normalisers on raw outputs of normal validation images; nothing to fit by default."""

    def score(self, out: HeadOutput) -> tuple[Tensor, Tensor | None]:
        """Raw output -> (image score [B], final map [B, h, w] or None); by default the score the
        head computed directly."""
        if out.score is None:
            raise NotImplementedError(f"head {self.name!r} must implement `score`")
        return out.score, out.map

    def decision_threshold(self, normal_scores: Tensor, method: str, q: float) -> float:
        """The deployed image threshold from normal validation scores (percentile or Otsu), the same
        false-positive target for every head; a detector's own boundary is an option of its head."""
        return fit_threshold(normal_scores, method, q)

    def map_blur(self, default: float) -> float:
        """The Gaussian blur sigma of this head's upsampled maps: its own, else the model's `default`."""
        return default if self.blur_sigma is None else self.blur_sigma

    def pixel_decisions(self, maps: Tensor, anomalous: Tensor) -> Tensor | None:
        """Per-pixel decisions [B, H, W] from image-size maps and image decisions [B]; None if the
        head makes none."""
        return None

    def calibrate(
        self, normal: HeadOutput, method: str = "percentile", q: float = 99.0, images: Tensor | None = None
    ) -> None:
        """Everything fitted on the normal validation split: `fit`, the map range, the threshold.

        `images` [N]: which validation image each output comes from when the outputs are tiles; the
        threshold is then fitted on each image's maximum tile score, the statistic deployed on test
        images (so n tiles do not multiply the false-positive rate)."""
        self.fit(normal)
        scores, maps = self.score(normal)
        if maps is not None:
            self.map_low.fill_(float(maps.min()))
            self.map_high.fill_(float(maps.max()))
        if images is not None:
            scores = per_image_max(scores, images)
        self.threshold.fill_(self.decision_threshold(scores, method, q))


class Normalizer(nn.Module):
    """Affine normalisation of a scalar score, fitted on normal validation values only.

    `minmax`: (v - min) / (max - min); `zscore`: (v - mean) / std. Stored as buffers. Two rules keep
    small or degenerate splits sane (neither applies to 10 or more values spread by more than a
    thousandth of their magnitude, where the plain rule is used unchanged):
    - with fewer than 10 values, either mode becomes a robust z-score, (v - median) / (1.4826 MAD):
      the range or std of a handful of values is a noisy spread estimate set by its single most
      extreme value, while the median absolute deviation ignores one extreme value among three or
      more (1.4826 MAD estimates the std of normal data);
    - the scale is at least a thousandth of the values' mean magnitude (and 1e-12), so a constant
      split gives scores of about 1e3 x a value's relative deviation instead of dividing by ~0.
    """

    FEW = 10  # below this many values, the robust z-score
    RELATIVE_FLOOR = 1e-3  # the least scale, as a fraction of the values' mean magnitude

    MODES = ("minmax", "zscore")

    def __init__(self, mode: str = "minmax") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"normalization must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.register_buffer("loc", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))

    def fit(self, values: Tensor) -> None:
        values = values.detach().to("cpu", torch.float64).flatten()
        if values.numel() < 2:
            raise ValueError(f"need at least 2 normal validation values to fit a normaliser, got {values.numel()}")
        if values.numel() < self.FEW:
            v = values.numpy()
            loc, scale = torch.tensor(np.median(v)), torch.tensor(median_abs_deviation(v, scale="normal"))
        elif self.mode == "minmax":
            loc, scale = values.min(), values.max() - values.min()
        else:
            loc, scale = values.mean(), values.std()
        floor = max(self.RELATIVE_FLOOR * float(values.abs().mean()), 1e-12)
        self.loc.copy_(loc)
        self.scale.copy_(scale.clamp_min(floor))
        self.fitted.fill_(True)

    def forward(self, values: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError(
                "score normaliser is not fitted: heads are fitted on the normal validation split during "
                "`fit`; use a checkpoint written by `python -m ad_lightning fit`"
            )
        return ((values.to(torch.float64) - self.loc.to(values.device)) / self.scale.to(values.device)).float()


def per_image_max(values: Tensor, images: Tensor) -> Tensor:
    """The maximum of the values [N] of each image, `images` [N] its index: -> [number of images]."""
    images = images.to(values.device)
    out = torch.full((int(images.max()) + 1,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, images, values, reduce="amax")


def shared_noise(z0: Tensor, seed: int) -> Tensor:
    """One seeded noise field [C, h, w] for every image of z0 [B, C, h, w], so an image's score does
    not depend on its batch or position in it."""
    return torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(seed)).to(z0.device)


def to_image_map(feature_map: Tensor, size: tuple[int, int], blur_sigma: float = 0.0) -> Tensor:
    """Bilinearly upsample [B, h, w] maps to the image size, with an optional Gaussian blur.

    The kernel is 2 * round(4 sigma) + 1 wide (sigma 4 -> 33, as in DDAD); blur is off by default.
    """
    maps = F.interpolate(feature_map[:, None].float(), size=size, mode="bilinear", align_corners=False)
    if blur_sigma > 0:
        k = 2 * round(4 * blur_sigma) + 1
        maps = gaussian_blur(maps, kernel_size=[k, k], sigma=[blur_sigma, blur_sigma])
    return maps[:, 0]  # [B, 1, H, W] -> [B, H, W]


def at_resolution(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """[B, C, H, W] resized to `size` unless it already has it (tiled test images are native size)."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode=mode)

"""What every scoring head provides, and the pieces they share.

A head turns standardised features z0 [B, C, h, w] and the denoiser (as an `eps_fn`) into raw
per-image terms and an anomaly map on the feature grid; `fit` sets its state from normal
validation terms; `score` turns terms into the image score. All fitted state lives in buffers,
so it is saved in the checkpoint and `test`/`predict` need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from ad_lightning.diffusion import EpsFn


@dataclass
class HeadOutput:
    terms: dict[str, Tensor]  # raw per-image quantities, each [B]
    map: Tensor  # anomaly map on the feature grid [B, h, w]


@dataclass
class Scores:
    score: Tensor  # image score [B]
    terms: dict[str, Tensor]  # raw per-image terms, each [B]
    maps: Tensor  # anomaly maps at the image size [B, H, W]


class Head(nn.Module):
    """Base class: subclasses set `name`, implement `evaluate`, `fit` and `score`.

    `threshold` is the deployed image decision threshold on `score`, fitted on the normal
    validation split (NaN until then)."""

    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        raise NotImplementedError

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        raise NotImplementedError

    def fit(self, normal_terms: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def score(self, terms: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class Normalizer(nn.Module):
    """Affine normalisation of a scalar score, fitted on normal validation values only.

    `minmax`: (v - min) / (max - min); `zscore`: (v - mean) / std. Stored as buffers.
    """

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
        values = values.detach().to(torch.float64).flatten()
        if values.numel() < 2:
            raise ValueError(f"need at least 2 normal validation values to fit a normaliser, got {values.numel()}")
        if self.mode == "minmax":
            loc, scale = values.min(), values.max() - values.min()
        else:
            loc, scale = values.mean(), values.std()
        self.loc.copy_(loc)
        self.scale.copy_(scale.clamp_min(1e-12))
        self.fitted.fill_(True)

    def forward(self, values: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError(
                "score normaliser is not fitted: heads are fitted on the normal validation split during "
                "`fit`; use a checkpoint written by `python -m ad_lightning fit`"
            )
        return ((values.to(torch.float64) - self.loc) / self.scale).to(torch.float32)


def to_image_map(feature_map: Tensor, size: tuple[int, int], blur_sigma: float = 0.0) -> Tensor:
    """Bilinearly upsample [B, h, w] maps to the image size, with an optional Gaussian blur.

    The kernel is 2 * round(4 sigma) + 1 wide (sigma 4 -> 33, as in DDAD); blur is off by default.
    """
    maps = F.interpolate(feature_map[:, None].float(), size=size, mode="bilinear", align_corners=False)
    if blur_sigma > 0:
        k = 2 * round(4 * blur_sigma) + 1
        maps = gaussian_blur(maps, kernel_size=[k, k], sigma=[blur_sigma, blur_sigma])
    return maps[:, 0]  # [B, 1, H, W] -> [B, H, W]

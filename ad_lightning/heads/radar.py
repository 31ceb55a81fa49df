"""Head `radar` (RADAR): one forward pass, attention-based anomaly maps, hard decisions (docs/methods.md section 7)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import sobel, threshold_otsu
from torch import Tensor

from ad_lightning.diffusion import EpsFn
from ad_lightning.heads.base import Head, HeadOutput
from ad_lightning.heads.novelty import NoveltyDetector

MAPS = ("attention", "noise")
EPS = 1e-8


def head_averaged_rows(attention: list[Tensor], layers: list[int] | None) -> list[Tensor]:
    """The designated layers' attention probabilities [B, heads, N, N], heads averaged -> [B, N, N]."""
    chosen = attention if layers is None else [attention[i] for i in layers]
    return [a.float().mean(1) for a in chosen]


def layer_grid(n: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """(h', w', f): the grid of an attention layer with n positions over a feature grid `size`, and its
    downsampling factor f, the power of two with ceil(h / f) * ceil(w / f) = n. A grid the denoiser
    padded keeps the positions that cover `size`, so h' * f may exceed h (by less than f)."""
    for k in range(max(size).bit_length() + 1):  # up to the first f >= h, w (a 1 x 1 grid)
        height, width = -(-size[0] // 2**k), -(-size[1] // 2**k)
        if height * width == n:
            return height, width, 2**k
    raise ValueError(f"an attention layer with {n} positions does not tile the {size[0]}x{size[1]} feature grid")


def kl_rows(rows: Tensor, mean_rows: Tensor) -> Tensor:
    """KL(row || mean row) per query position: [B, N, N] and [N, N] -> [B, N]."""
    p, q = rows.clamp_min(EPS), mean_rows.to(rows.device).clamp_min(EPS)
    return (p * (p.log() - q.log())).sum(-1)


def attention_map(rows: list[Tensor], mean_rows: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Per query position, the KL divergence of its attention row from the normal mean row, each
    layer's [B, N] upsampled to the region its grid covers, cropped to the feature grid `size` and
    summed over layers -> [B, h, w]."""
    total = torch.zeros(rows[0].shape[0], *size, device=rows[0].device)
    for a, mean in zip(rows, mean_rows):
        height, width, factor = layer_grid(a.shape[-1], size)
        divergence = kl_rows(a, mean).view(-1, 1, height, width)  # [B, N] -> [B, 1, h', w']
        covered = F.interpolate(divergence, size=(height * factor, width * factor), mode="bilinear", align_corners=False)
        total += covered[:, 0, : size[0], : size[1]]  # the region the grid covers, cropped to the feature grid
    return total


def noise_map(eps: Tensor) -> Tensor:
    """Sobel edge magnitude of ||eps_theta|| per position: [B, C, h, w] -> [B, h, w]."""
    norm = torch.linalg.vector_norm(eps.float(), dim=1).cpu().numpy()  # [B, C, h, w] -> [B, h, w]
    return torch.from_numpy(np.stack([sobel(m) for m in norm])).float().to(eps.device)


def image_features(m: Tensor) -> Tensor:
    """The 2-D image features of a map [B, h, w]: (global L2, local max = max of the 3x3 mean) -> [B, 2]."""
    local = F.avg_pool2d(m[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]  # [B, h, w]
    return torch.stack([torch.linalg.vector_norm(m.flatten(1), dim=1), local.flatten(1).amax(1)], dim=1)


class RadarHead(Head):
    """One NFE at `t_r` on the clean input; the map is either the attention divergence (per query
    position, KL of its head-averaged attention row from the mean row of normal training images,
    summed over the designated layers, each upsampled to the feature grid) or `noise`, the Sobel
    edge magnitude of ||eps_theta|| per position.

    Image decision: an Isolation Forest on (global L2, local max) of the map, fitted on normal
    training images; image score = its anomaly score, deployed threshold calibrated on normal
    validation images like every head's (`decision: validation`), or the forest's own boundary
    (`decision: detector`, the paper's rule, with its `contamination`). Pixel decision: the Otsu
    threshold of each map, inside images decided anomalous.
    """

    name = "radar"
    needs_train_fit = True

    def __init__(
        self,
        t_r: int = 20,
        map: str = "attention",
        layers: list[int] | None = None,
        seed: int = 0,
        decision: str = "validation",
        contamination: str | float = "auto",
        num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if map not in MAPS:
            raise ValueError(f"radar map must be one of {MAPS}, got {map!r}")
        if not 0 <= t_r < num_timesteps:
            raise ValueError(f"radar t_r must be in [0, {num_timesteps - 1}], got {t_r}")
        self.t_r, self.map_kind, self.layers = t_r, map, layers
        self.forest = NoveltyDetector("iforest", seed, contamination, decision)
        # mean_rows_<l> [N_l, N_l] buffers are created by fit_train (attention maps only)

    @property
    def nfe(self) -> int:
        return 1

    def _forward(self, z0: Tensor, eps_fn: EpsFn) -> tuple[Tensor, list[Tensor]]:
        t = torch.full((z0.shape[0],), self.t_r, device=z0.device, dtype=torch.long)
        if self.map_kind == "noise":
            return eps_fn(z0.float(), t), []
        eps, attention = eps_fn(z0.float(), t, return_attention=True)
        if not attention:
            raise ValueError("radar's attention map needs a denoiser with attention layers; use `map: noise`")
        return eps, head_averaged_rows(attention, self.layers)

    def _mean_rows(self) -> list[Tensor]:
        keys = sorted((k for k in self._buffers if k.startswith("mean_rows_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        rows = [self._buffers[k] for k in keys]
        if not rows:
            raise RuntimeError("radar is not fitted: it is fitted on normal training features during `fit`")
        return rows

    def raw_map(self, z0: Tensor, eps_fn: EpsFn) -> Tensor:
        """The anomaly map [B, h, w] on the feature grid."""
        eps, rows = self._forward(z0, eps_fn)
        if self.map_kind == "noise":
            return noise_map(eps)
        return attention_map(rows, self._mean_rows(), tuple(z0.shape[-2:]))

    def fit_train(self, batches: Iterable[Tensor], eps_fn: EpsFn, alpha_bar: Tensor) -> None:
        """Mean attention rows of the normal training images, then the Isolation Forest on their maps.

        One forward pass: attention rows are kept (on the CPU) until their mean is known."""
        if self.map_kind == "noise":
            maps = [noise_map(self._forward(z0, eps_fn)[0]).cpu() for z0 in batches]
        else:
            kept = [(tuple(z0.shape[-2:]), [r.cpu() for r in self._forward(z0, eps_fn)[1]]) for z0 in batches]
            n = sum(rows[0].shape[0] for _, rows in kept)
            for l in range(len(kept[0][1])):
                self.register_buffer(f"mean_rows_{l}", sum(rows[l].sum(0) for _, rows in kept) / n)
            maps = [attention_map(rows, self._mean_rows(), size) for size, rows in kept]
        self.forest.fit(torch.cat([image_features(m) for m in maps]))

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        m = self.raw_map(z0, eps_fn)
        features = image_features(m)
        return HeadOutput(terms={"l2": features[:, 0], "local_max": features[:, 1]}, map=m)

    def score(self, out: HeadOutput) -> tuple[Tensor, Tensor]:
        features = torch.stack([out.terms["l2"], out.terms["local_max"]], dim=1)  # [B, 2]
        return self.forest.anomaly_score(features).float().to(out.map.device), out.map

    def decision_threshold(self, normal_scores: Tensor, method: str, q: float) -> float:
        return self.forest.decision_threshold(normal_scores, method, q)

    def pixel_decisions(self, maps: Tensor, anomalous: Tensor) -> Tensor:
        """Pixels at or above their map's Otsu threshold, in images decided anomalous: [B, H, W] bool."""
        decisions = torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
        for i in torch.nonzero(anomalous.flatten()).flatten().tolist():
            m = maps[i].detach().float().cpu().numpy()
            if m.max() > m.min():
                decisions[i] = torch.from_numpy(m >= threshold_otsu(m)).to(maps.device)
        return decisions

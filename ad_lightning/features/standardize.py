"""Per-channel feature standardisation z0 = (f - mu) / sigma (docs/methods.md section 1, a choice).

mu and sigma come from the normal training features and live in buffers, so the checkpoint
carries them. `mode="none"` keeps raw features (InvAD's setting).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureStandardizer(nn.Module):
    MODES = ("channel", "none")

    def __init__(self, channels: int, mode: str = "channel") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"feature_norm must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("fitted", torch.tensor(mode == "none"))

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """Statistics over images and positions of normal training features [N, C, h, w]."""
        if self.mode == "none":
            return
        flat = features.transpose(0, 1).flatten(1).double()  # [N, C, h, w] -> [C, N*h*w]
        self.mean.copy_(flat.mean(dim=1))
        self.std.copy_(flat.std(dim=1).clamp_min(1e-6))
        self.fitted.fill_(True)

    def forward(self, features: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError("feature statistics are not fitted; they are computed from the training set in `fit`")
        if self.mode == "none":
            return features
        return (features - self.mean[:, None, None]) / self.std[:, None, None]

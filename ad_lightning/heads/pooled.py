"""Statistical baselines (docs/methods.md section 7.4): Isolation Forest, LOF and one-class SVM on the
backbone features averaged over positions. No denoiser (NFE 0), no map; the deployed threshold is
calibrated on normal validation images like every head's, or the detector's own (`decision: detector`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ad_lightning.diffusion import EpsFn
from ad_lightning.heads.base import Head, HeadOutput
from ad_lightning.heads.novelty import NoveltyDetector


def pool(z0: Tensor) -> Tensor:
    """Global average pooling: [B, C, h, w] -> [B, C]."""
    return z0.float().mean(dim=(2, 3))


class PooledDetectorHead(Head):
    """A scikit-learn novelty detector (`iforest`, `lof`, `ocsvm`) fitted on pooled normal training
    features; image score = the detector's anomaly score. `decision` and `contamination`: see
    `NoveltyDetector`."""

    needs_train_fit = True

    def __init__(
        self, detector: str = "iforest", seed: int = 0, decision: str = "validation", contamination: str | float = "auto"
    ) -> None:
        super().__init__()
        self.name = detector
        self.detector = NoveltyDetector(detector, seed, contamination, decision)

    @property
    def nfe(self) -> int:
        return 0

    def fit_train(self, batches: Iterable[Tensor], eps_fn: EpsFn, alpha_bar: Tensor) -> None:
        self.detector.fit(torch.cat([pool(z0) for z0 in batches]))

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        return HeadOutput(terms={}, map=None, score=self.detector.anomaly_score(pool(z0)).float().to(z0.device))

    def decision_threshold(self, normal_scores: Tensor, method: str, q: float) -> float:
        return self.detector.decision_threshold(normal_scores, method, q)

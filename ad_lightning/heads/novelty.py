"""Novelty detectors from scikit-learn (Isolation Forest, LOF, one-class SVM) fitted on normal data.

The checkpoint holds plain data only (loadable with `weights_only=True`): the normal training
points the detector was fitted on. The estimator is refitted from them, deterministically (fixed
`random_state`), the first time it is needed after loading, which takes milliseconds for the
few thousand low-dimensional points used here.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.svm import OneClassSVM
from torch import Tensor

from ad_lightning.heads.base import FittedState

DETECTORS = {
    "iforest": lambda seed: IsolationForest(n_estimators=200, contamination="auto", random_state=seed),
    "lof": lambda seed: LocalOutlierFactor(n_neighbors=20, novelty=True, contamination="auto"),
    "ocsvm": lambda seed: OneClassSVM(kernel="rbf", gamma="scale", nu=0.05),
}


class NoveltyDetector(FittedState):
    """A scikit-learn novelty detector over feature vectors [N, D].

    `anomaly_score` is the negated `score_samples` (higher = more anomalous); the detector's own
    decision (`predict` == -1) is `anomaly_score >= threshold` with threshold = -offset_.
    """

    def __init__(self, kind: str = "iforest", seed: int = 0) -> None:
        super().__init__()
        if kind not in DETECTORS:
            raise ValueError(f"unknown novelty detector {kind!r}; choose one of {', '.join(DETECTORS)}")
        self.kind, self.seed = kind, seed
        self.register_buffer("points", torch.empty(0, 0, dtype=torch.float64))  # normal training vectors [N, D]
        self._estimator = None

    def fit(self, points: Tensor) -> None:
        if points.ndim != 2 or points.shape[0] < 2:
            raise ValueError(f"a novelty detector needs normal vectors [N >= 2, D], got {tuple(points.shape)}")
        self.points = points.detach().to("cpu", torch.float64)
        self._estimator = None

    def on_load(self) -> None:
        self._estimator = None

    @property
    def estimator(self):
        if self.points.numel() == 0:
            raise RuntimeError(
                f"the {self.kind} detector is not fitted: it is fitted on normal training features during "
                "`fit`; use a checkpoint written by `python -m ad_lightning fit`"
            )
        if self._estimator is None:
            self._estimator = DETECTORS[self.kind](self.seed).fit(self.points.numpy())
        return self._estimator

    def anomaly_score(self, vectors: Tensor) -> Tensor:
        """Vectors [B, D] -> anomaly scores [B] (float64)."""
        values = vectors.detach().to("cpu", torch.float64).numpy()
        return torch.from_numpy(-self.estimator.score_samples(values).astype(np.float64))

    @property
    def threshold(self) -> float:
        """The detector's own decision boundary on `anomaly_score`."""
        return -float(np.asarray(self.estimator.offset_).item())

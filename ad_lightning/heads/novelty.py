"""Novelty detectors from scikit-learn (Isolation Forest, LOF, one-class SVM) fitted on normal data,
and the operating point of the heads built on them.

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

from ad_lightning.evaluation.thresholds import fit_threshold
from ad_lightning.heads.base import FittedState

DETECTORS = {
    "iforest": lambda seed, contamination: IsolationForest(n_estimators=200, contamination=contamination, random_state=seed),
    "lof": lambda seed, contamination: LocalOutlierFactor(n_neighbors=20, novelty=True, contamination=contamination),
    "ocsvm": lambda seed, contamination: OneClassSVM(kernel="rbf", gamma="scale", nu=0.05),
}
WITH_CONTAMINATION = ("iforest", "lof")  # the one-class SVM's boundary is set by nu instead
DECISIONS = ("validation", "detector")


def check_contamination(kind: str, contamination: str | float) -> str | float:
    """`auto` or a fraction in (0, 0.5] (scikit-learn's range), for a detector that has the option."""
    if contamination == "auto":
        return contamination
    if kind not in WITH_CONTAMINATION:
        raise ValueError(f"contamination applies to {' and '.join(WITH_CONTAMINATION)} only, not {kind}; remove it")
    if isinstance(contamination, bool) or not isinstance(contamination, (int, float)) or not 0 < contamination <= 0.5:
        raise ValueError(f"contamination must be 'auto' or a number in (0, 0.5], got {contamination!r}")
    return float(contamination)


class NoveltyDetector(FittedState):
    """A scikit-learn novelty detector over feature vectors [N, D], with its deployed operating point.

    `anomaly_score` is the negated `score_samples` (higher = more anomalous); the detector's own
    decision (`predict` == -1) is `anomaly_score >= threshold` with threshold = -offset_.
    `contamination` (Isolation Forest, LOF) moves only that boundary: `offset_` becomes the
    contamination-quantile of the training scores, so about that fraction of the training points is
    flagged (LOF scores its training points leave-one-out there, so it is approximate).

    `decision` picks the deployed threshold: `validation` (default) calibrates it on normal
    validation scores like every other head, so all heads are compared at the same false-positive
    target; `detector` deploys the detector's own boundary (the published rule).
    """

    def __init__(
        self, kind: str = "iforest", seed: int = 0, contamination: str | float = "auto", decision: str = "validation"
    ) -> None:
        super().__init__()
        if kind not in DETECTORS:
            raise ValueError(f"unknown novelty detector {kind!r}; choose one of {', '.join(DETECTORS)}")
        if decision not in DECISIONS:
            raise ValueError(
                f"decision must be 'validation' (the threshold percentile of normal validation scores) or "
                f"'detector' (the detector's own boundary), got {decision!r}"
            )
        self.contamination = check_contamination(kind, contamination)
        if self.contamination != "auto" and decision != "detector":
            raise ValueError(
                f"contamination {contamination} moves only the detector's own boundary, which decision "
                f"{decision!r} does not deploy; set `decision: detector` or remove contamination"
            )
        self.kind, self.seed, self.decision = kind, seed, decision
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
            self._estimator = DETECTORS[self.kind](self.seed, self.contamination).fit(self.points.numpy())
        return self._estimator

    def anomaly_score(self, vectors: Tensor) -> Tensor:
        """Vectors [B, D] -> anomaly scores [B] (float64)."""
        values = vectors.detach().to("cpu", torch.float64).numpy()
        return torch.from_numpy(-self.estimator.score_samples(values).astype(np.float64))

    @property
    def threshold(self) -> float:
        """The detector's own decision boundary on `anomaly_score`."""
        return -float(np.asarray(self.estimator.offset_).item())

    def decision_threshold(self, normal_scores: Tensor, method: str, q: float) -> float:
        """The deployed threshold: from normal validation scores (`method`, `q`), or the detector's own."""
        return self.threshold if self.decision == "detector" else fit_threshold(normal_scores, method, q)

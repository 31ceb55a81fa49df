"""Deployed decision thresholds, fitted on normal validation scores only (docs/methods.md section 9).

`fit_threshold` takes nothing but normal scores, so test labels cannot leak into the threshold.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm
from skimage.filters import threshold_otsu
from torch import Tensor

METHODS = ("percentile", "gaussian", "otsu")


def fit_threshold(normal_scores: Tensor, method: str = "percentile", q: float = 99.0) -> float:
    """Threshold on raw scores from normal validation scores [N].

    "percentile": the q-th percentile (numpy's linear interpolation), so about (100 - q) % of
    normal images are flagged, given enough of them: with n scores it cannot lie beyond their largest,
    which a new normal score exceeds with probability 1 / (n + 1). "gaussian": the q-th percentile of
    the normal distribution fitted to the scores (mean + z_q x standard deviation), which extrapolates
    past the largest of a few scores, right when their upper tail is about Gaussian. "otsu": skimage's
    Otsu threshold. Otsu splits two modes; on normal-only data there is one, so it cuts the normal
    distribution itself (roughly at its middle) and flags far more normals than a high percentile: an
    alternative, not the default.
    """
    scores = normal_scores.detach().cpu().double().flatten().numpy()
    if scores.size == 0:
        raise ValueError("no normal validation scores to fit a threshold on; enlarge the validation split")
    if not np.isfinite(scores).all():
        raise ValueError("normal validation scores contain NaN or inf; the model or head produced invalid values")
    if method == "percentile":
        if not 0 <= q <= 100:
            raise ValueError(f"percentile q must be in [0, 100], got {q}; the default is 99")
        return float(np.percentile(scores, q))
    if method == "gaussian":
        if not 0 < q < 100 or scores.size < 2:
            raise ValueError(f"the gaussian threshold needs q in (0, 100) and 2 or more scores: q={q}, {scores.size}")
        return float(scores.mean() + norm.ppf(q / 100) * scores.std(ddof=1))
    if method == "otsu":
        return float(threshold_otsu(scores))
    raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")


def is_anomalous(scores: Tensor, threshold: float) -> Tensor:
    """The deployed decision: a score at or above the threshold is anomalous."""
    return scores >= threshold

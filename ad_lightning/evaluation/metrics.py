"""Detection and segmentation metrics on raw anomaly scores (METHODS.md section 9).

torchmetrics' binary metrics push float inputs outside [0, 1] through a sigmoid, which saturates
large raw scores (an NLL of 1e4) into ties and silently wrecks the AUROC. Scores are therefore
first mapped into [0, 1] by their dense rank: an order- and tie-preserving map, so every
rank-based metric is unchanged and no value saturates.

AUPRO (Bergmann et al., MVTec AD) is computed here directly on raw scores: exactly over every
distinct threshold, or over a fixed grid of thresholds with `BinnedAUPRO`, whose memory does
not grow with the number of images.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
)

from ad_lightning.evaluation.thresholds import is_anomalous

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _finite(scores: Tensor) -> Tensor:
    """The scores, after refusing NaN/inf (they would silently sort to one end)."""
    if not torch.isfinite(scores).all():
        raise ValueError("anomaly scores contain NaN or inf; the model or head produced invalid values")
    return scores


def to_unit_interval(scores: Tensor) -> Tensor:
    """Dense ranks scaled to [0, 1]: keeps order and ties exactly, any scale or offset."""
    values, rank = torch.unique(_finite(scores.flatten()), sorted=True, return_inverse=True)
    return rank.to(torch.float64) / max(values.numel() - 1, 1)


def _binary_labels(scores: Tensor, labels: Tensor) -> Tensor:
    """Flat long labels, checked to pair one-to-one with the scores."""
    labels = labels.flatten().long()
    if scores.numel() != labels.numel():
        raise ValueError(f"{scores.numel()} scores but {labels.numel()} labels")
    return labels


def _same_shape(maps: Tensor, masks: Tensor) -> None:
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of raw scores against binary labels (NaN if one class is absent)."""
    labels = _binary_labels(scores, labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(to_unit_interval(scores), labels))


def image_auroc(image_scores: Tensor, labels: Tensor) -> float:
    """Image-level AUROC: one score per image [N] against its label [N]."""
    return auroc(image_scores, labels)


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """Pixel-level AUROC over every pixel of every image: maps [N, H, W] against masks [N, H, W]."""
    _same_shape(maps, masks)
    return auroc(maps, masks > 0.5)


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision (area under the step-wise PR curve, tied scores form one step, as sklearn).

    NaN when there is no positive label (recall is undefined); pixel AP: pass maps and masks > 0.5.
    """
    labels = _binary_labels(scores, labels)
    if labels.max() == 0:
        return float("nan")
    return float(binary_average_precision(to_unit_interval(scores), labels))


def f1_max(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """ORACLE metric: the best F1 over all thresholds and the raw score threshold reaching it.

    It picks the threshold with the test labels, so it is an upper bound on a deployed detector:
    report it as "oracle". Prediction rule: score >= threshold is anomalous. NaN if no positive label.
    """
    labels = _binary_labels(scores, labels)
    if labels.max() == 0:
        return float("nan"), float("nan")
    raw = _finite(scores.flatten())
    unit = to_unit_interval(raw)
    precision, recall, unit_thresholds = binary_precision_recall_curve(unit, labels)
    # the last (precision 1, recall 0) point has no threshold and F1 0
    f1 = (2 * precision * recall / (precision + recall).clamp_min(1e-12))[:-1]
    best = int(torch.argmax(f1))
    # thresholds are entries of `unit`, so the raw score at the same position is the raw threshold
    return float(f1[best]), float(raw[unit == unit_thresholds[best]][0])


def thresholded(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the deployed rule score >= threshold.

    A ratio whose denominator is zero (no predicted or no actual anomaly) is reported as 0.0.
    """
    labels = _binary_labels(scores, labels).bool()
    predicted = is_anomalous(_finite(scores.flatten()), threshold)
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = int((predicted == labels).sum()) / labels.numel()
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel 1/|region| for anomalous pixels (0 for normal ones) and the number of regions.

    Regions are the 8-connected components of each image's mask; summing the weights of the
    pixels above a threshold gives the sum over regions of their overlap.
    """
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for image, mask in enumerate(masks):
        regions, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        sizes = np.bincount(regions.ravel())
        weights[image] = np.where(regions > 0, 1.0 / sizes[regions], 0.0)
        n_regions += count
    return weights, n_regions


def _pro_inputs(maps: Tensor, masks: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Checked float64 scores, boolean masks, region weights and region count as numpy [N, H, W]."""
    _same_shape(maps, masks)
    if maps.ndim != 3:
        raise ValueError(f"AUPRO expects maps and masks [N, H, W], got {tuple(maps.shape)}")
    scores = _finite(maps).detach().cpu().to(torch.float64).numpy()
    anomalous = (masks > 0.5).cpu().numpy()
    weights, n_regions = _region_weights(anomalous)
    return scores, anomalous, weights, n_regions


def _area_under_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area of PRO over FPR in [0, fpr_limit], divided by fpr_limit.

    fpr and pro are ordered by decreasing threshold, starting at (0, 0); the curve is cut at
    fpr_limit with a point linearly interpolated exactly there.
    """
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    fpr_cut, pro_cut = fpr[:inside], pro[:inside]
    if inside < fpr.size:
        step = (fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        fpr_cut = np.append(fpr_cut, fpr_limit)
        pro_cut = np.append(pro_cut, pro[inside - 1] + step * (pro[inside] - pro[inside - 1]))
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


def _check_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}; the usual value is 0.3")


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3, bins: int | None = None) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

    PRO(t) is the mean over all defect regions (8-connected mask components, every image) of the
    fraction of the region with score >= t; FPR(t) is over all normal pixels. maps, masks
    [N, H, W]. `bins=None`: exact over every distinct score; `bins=K`: K thresholds evenly spaced
    from the min to the max score (see `BinnedAUPRO`). NaN when there is no defect region or no
    normal pixel, since the curve is then undefined.
    """
    _check_limit(fpr_limit)
    if bins is not None:
        metric = BinnedAUPRO(bins, float(_finite(maps).min()), float(maps.max()), fpr_limit)
        metric.update(maps, masks)
        return metric.compute()
    scores, anomalous, weights, n_regions = _pro_inputs(maps, masks)
    n_normal = int((~anomalous).sum())
    if n_regions == 0 or n_normal == 0:
        return float("nan")
    order = np.argsort(-scores.ravel(), kind="stable")  # [N, H, W] -> [N*H*W], high scores first
    descending = scores.ravel()[order]
    false_positives = np.cumsum(~anomalous.ravel()[order])  # normal pixels with score >= each score
    overlap = np.cumsum(weights.ravel()[order])  # sum over regions of their flagged share
    # one curve point per distinct score: the last pixel of each run of ties
    last_of_tie = np.flatnonzero(np.append(descending[1:] != descending[:-1], True))
    fpr = np.append(0.0, false_positives[last_of_tie] / n_normal)
    pro = np.append(0.0, overlap[last_of_tie] / n_regions)
    return _area_under_pro(fpr, pro, fpr_limit)


class BinnedAUPRO:
    """AUPRO over `bins` thresholds evenly spaced in [low, high], fed image by image.

    Keeps two histograms of length `bins` (normal pixels, region-overlap weights) and two counts,
    so memory does not grow with the number of images. The range must be known up front (e.g.
    from the normal validation split or a first pass); scores outside it are clamped into it.
    """

    def __init__(self, bins: int, low: float, high: float, fpr_limit: float = 0.3) -> None:
        _check_limit(fpr_limit)
        if bins < 2:
            raise ValueError(f"BinnedAUPRO needs at least 2 bins, got {bins}")
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            raise ValueError(f"BinnedAUPRO needs a finite score range low <= high, got [{low}, {high}]")
        self.bins, self.low, self.high, self.fpr_limit = bins, low, high, fpr_limit
        self.normal_hist = np.zeros(bins, dtype=np.int64)
        self.overlap_hist = np.zeros(bins, dtype=np.float64)
        self.n_regions = 0

    def thresholds(self) -> np.ndarray:
        """The K thresholds t_k = low + k (high - low) / (K - 1)."""
        return np.linspace(self.low, self.high, self.bins)

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        """Index of the highest threshold each (clamped) score reaches."""
        if self.high == self.low:
            return np.zeros(scores.shape, dtype=np.int64)
        step = (self.high - self.low) / (self.bins - 1)
        index = np.floor((np.clip(scores, self.low, self.high) - self.low) / step).astype(np.int64)
        return np.minimum(index, self.bins - 1)

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch of maps and masks [B, H, W] (regions never span two images)."""
        scores, anomalous, weights, n_regions = _pro_inputs(maps, masks)
        index = self._bin(scores)
        self.normal_hist += np.bincount(index[~anomalous], minlength=self.bins)
        self.overlap_hist += np.bincount(index[anomalous], weights[anomalous], minlength=self.bins)
        self.n_regions += n_regions

    def compute(self) -> float:
        """The normalised area, NaN when no region or no normal pixel was seen."""
        n_normal = int(self.normal_hist.sum())
        if self.n_regions == 0 or n_normal == 0:
            return float("nan")
        # counts at score >= t_k: cumulative sums from the highest threshold down
        fpr = np.append(0.0, np.cumsum(self.normal_hist[::-1]) / n_normal)
        pro = np.append(0.0, np.cumsum(self.overlap_hist[::-1]) / self.n_regions)
        return _area_under_pro(fpr, pro, self.fpr_limit)

"""Detection and segmentation metrics on raw anomaly scores (docs/methods.md section 9).

torchmetrics' binary metrics push float inputs outside [0, 1] through a sigmoid, which saturates
large raw scores (an NLL of 1e4) into ties and silently wrecks the AUROC. Scores are therefore
first mapped into [0, 1] by their dense rank: an order- and tie-preserving map, so every
rank-based metric is unchanged and no value saturates.

AUPRO (Bergmann et al., MVTec AD) is computed here directly on raw scores. Pixel metrics come
either exactly (every pixel sorted) or from a `ScoreHistogram`, whose memory does not grow with
the number of images: it bins raw scores on a canonical grid (never through a sigmoid) and
gives the exact metrics of the scores rounded down to their bin's lower edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

# 8-connected within an image, never across images (axis 0 of [N, H, W])
EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
EIGHT_CONNECTED_PER_IMAGE[1] = True


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


def confusion(predicted: Tensor, labels: Tensor) -> np.ndarray:
    """Counts [TP, FP, FN, TN] of boolean decisions against boolean labels (any equal shapes)."""
    predicted, labels = predicted.bool(), labels.bool()
    counts = [predicted & labels, predicted & ~labels, ~predicted & labels, ~predicted & ~labels]
    return np.array([int(c.sum()) for c in counts], dtype=np.int64)


def decision_rates(counts: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 from counts [TP, FP, FN, TN].

    A ratio whose denominator is zero (no predicted or no actual anomaly) is reported as 0.0.
    """
    tp, fp, fn, tn = (int(c) for c in counts)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = tp + fp + fn + tn
    return {"accuracy": (tp + tn) / total if total else 0.0, "precision": precision, "recall": recall, "f1": f1}


def thresholded(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the deployed rule score >= threshold (see `decision_rates`)."""
    labels = _binary_labels(scores, labels)
    return decision_rates(confusion(is_anomalous(_finite(scores.flatten()), threshold), labels))


@dataclass
class DefectRegions:
    """Ground truth of a batch for pixel metrics, computed once and shared by every head.

    `weights` holds 1/|region| on anomalous pixels (regions: 8-connected mask components of each
    image) and 0 elsewhere: summing them over the pixels above a threshold gives the sum over
    regions of their flagged share, the numerator of PRO.
    """

    anomalous: np.ndarray  # [N, H, W] bool
    weights: np.ndarray  # [N, H, W] float64
    n_regions: int

    @classmethod
    def of(cls, masks: Tensor) -> DefectRegions:
        """Regions of masks [N, H, W] (a pixel is anomalous where its mask is > 0.5)."""
        if masks.ndim != 3:
            raise ValueError(f"pixel metrics expect masks [N, H, W], got {tuple(masks.shape)}")
        anomalous = (masks.detach().cpu() > 0.5).numpy()
        regions, n_regions = ndimage.label(anomalous, structure=EIGHT_CONNECTED_PER_IMAGE)  # ids unique over images
        inverse_size = 1.0 / np.maximum(np.bincount(regions.ravel()), 1)
        inverse_size[0] = 0.0  # label 0 is the normal background
        weights = inverse_size[regions]
        return cls(anomalous, weights, n_regions)


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
    [N, H, W]. `bins=None`: exact over every distinct score; `bins=K`: from a `ScoreHistogram(K)`
    (thresholds at its bin edges). NaN when there is no defect region or no normal pixel, since
    the curve is then undefined.
    """
    _check_limit(fpr_limit)
    _same_shape(maps, masks)
    regions = DefectRegions.of(masks)
    if bins is not None:
        histogram = ScoreHistogram(bins)
        histogram.update(maps, regions)
        return histogram.aupro(fpr_limit)
    scores = _finite(maps).detach().cpu().to(torch.float64).numpy().ravel()  # [N, H, W] -> [N*H*W]
    n_normal = int((~regions.anomalous).sum())
    if regions.n_regions == 0 or n_normal == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")  # high scores first
    descending = scores[order]
    false_positives = np.cumsum(~regions.anomalous.ravel()[order])  # normal pixels with score >= each score
    overlap = np.cumsum(regions.weights.ravel()[order])  # sum over regions of their flagged share
    # one curve point per distinct score: the last pixel of each run of ties
    last_of_tie = np.flatnonzero(np.append(descending[1:] != descending[:-1], True))
    fpr = np.append(0.0, false_positives[last_of_tie] / n_normal)
    pro = np.append(0.0, overlap[last_of_tie] / regions.n_regions)
    return _area_under_pro(fpr, pro, fpr_limit)


MIN_LEVEL = -1074  # 2**-1074 is the smallest positive float64: no finer grid can be told apart
MAX_INDEX = 2**53  # bin indices stay exact in float64, so every lower edge k * 2**e is exact


def _start_level(lo: float, hi: float, capacity: int) -> int:
    """A lower bound on the level that scores in [lo, hi] need, from float exponents: the search in
    `ScoreHistogram._cover` then takes a step or two and no ldexp in it can overflow."""
    level = MIN_LEVEL
    biggest = max(abs(lo), abs(hi))
    if biggest > 0:  # |floor(v / 2**e)| <= 2**53 needs e >= exponent(|v|) - 54
        level = max(level, math.frexp(biggest)[1] - 54)
    if hi > lo:  # (hi - lo) / 2**e < capacity needs e >= exponent((hi - lo) / capacity) - 1; one less for rounding
        level = max(level, math.frexp((hi - lo) / capacity)[1] - 2)
    return level


class ScoreHistogram:
    """Pixel scores of normal and anomalous pixels binned on a canonical dyadic grid.

    At level e, bin k holds the scores v with floor(v / 2**e) == k; its lower edge is k * 2**e.
    The grids of all levels nest (floor(floor(x) / 2) == floor(x / 2)), so histograms fed
    different images (batches, categories, DDP ranks) merge exactly by coarsening the finer one.
    The level is the smallest e whose grid holds every score seen in at most 2 * bins bins: at
    least `bins` bins span the observed range whatever its scale or offset, no range is needed up
    front, and the histogram depends only on the scores seen, not on their order or chunking.
    Rows of `counts`: normal pixels, anomalous pixels, AUPRO region-overlap weights; the metrics
    equal the exact ones of the scores rounded down to their bin's lower edge.
    """

    def __init__(self, bins: int = 1000) -> None:
        if bins < 1:
            raise ValueError(f"a score histogram needs bins >= 1, got {bins}; the default is 1000")
        self.bins = bins
        self.level = MIN_LEVEL
        self.offset = 0  # bin index k of counts[:, 0]
        self.counts = np.zeros((3, 0))  # [normal, anomalous, overlap] x bins
        self.n_regions = 0

    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, self.level)

    def _index_range(self, level: int) -> tuple[int, int] | None:
        """First and last bin index of the stored counts once coarsened to `level` (None if empty)."""
        if not self.counts.shape[1]:
            return None
        shift = level - self.level
        return self.offset >> shift, (self.offset + self.counts.shape[1] - 1) >> shift

    def _union_range(self, lo: float, hi: float, level: int) -> tuple[int, int]:
        """First and last bin index at `level` covering the stored counts and the scores lo..hi."""
        k_lo, k_hi = math.floor(math.ldexp(lo, -level)), math.floor(math.ldexp(hi, -level))
        stored = self._index_range(level)
        return (min(k_lo, stored[0]), max(k_hi, stored[1])) if stored else (k_lo, k_hi)

    def _cover(self, lo: float, hi: float, min_level: int) -> None:
        """Coarsen to the smallest level >= min_level whose grid also holds lo..hi, and widen to it."""
        level = max(self.level, min_level, _start_level(lo, hi, 2 * self.bins))
        while True:
            k_lo, k_hi = self._union_range(lo, hi, level)
            if k_hi - k_lo < 2 * self.bins and max(-k_lo, k_hi) <= MAX_INDEX:
                break
            level += 1
        if level == self.level and (k_lo, k_hi) == self._index_range(level):
            return  # already covered: no new array (a long-lived one per batch would fragment the heap)
        widened = np.zeros((3, k_hi - k_lo + 1))
        if self.counts.shape[1]:
            first, coarse = self._rebinned(level)
            widened[:, first - k_lo : first - k_lo + coarse.shape[1]] = coarse
        self.counts, self.offset, self.level = widened, k_lo, level

    def _rebinned(self, level: int) -> tuple[int, np.ndarray]:
        """The non-empty counts coarsened to `level` (>= self.level) and their first bin index."""
        first, last = self._index_range(level)
        if level == self.level:
            return first, self.counts
        # shifts past 62 send every |k| <= 2**53 to 0 or -1, as the full shift would
        index = (self.offset + np.arange(self.counts.shape[1])) >> min(level - self.level, 62)
        coarse = np.zeros((3, last - first + 1))
        np.add.at(coarse, (slice(None), index - first), self.counts)
        return first, coarse

    def update(self, maps: Tensor, regions: DefectRegions) -> None:
        """Add maps [N, H, W] with the regions of their masks (`DefectRegions.of(masks)`)."""
        if tuple(maps.shape) != regions.anomalous.shape:
            raise ValueError(f"anomaly maps {tuple(maps.shape)} and masks {regions.anomalous.shape} differ in shape")
        scores = _finite(maps).detach().cpu().to(torch.float64).numpy().ravel()  # [N, H, W] -> [N*H*W]
        self.n_regions += regions.n_regions
        if not scores.size:
            return
        self._cover(float(scores.min()), float(scores.max()), self.level)
        n = self.counts.shape[1]
        index = np.floor(np.ldexp(scores, -self.level)).astype(np.int64) - self.offset
        by_class = np.bincount(index + n * regions.anomalous.ravel(), minlength=2 * n)
        self.counts[:2] += by_class.reshape(2, n)  # [2n] -> [normal; anomalous]
        self.counts[2] += np.bincount(index, regions.weights.ravel(), minlength=n)

    def merge(self, other: ScoreHistogram) -> None:
        """Add another histogram: exactly as if this one had seen the other's scores too."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge score histograms of {self.bins} and {other.bins} bins")
        self.n_regions += other.n_regions
        stored = other._index_range(other.level)
        if stored is None:
            return
        # the lower edges of its end bins lie in the same bins as its end scores at every level >= its own
        self._cover(math.ldexp(stored[0], other.level), math.ldexp(stored[1], other.level), other.level)
        first, coarse = other._rebinned(self.level)
        self.counts[:, first - self.offset : first - self.offset + coarse.shape[1]] += coarse

    def _at_or_above(self) -> np.ndarray:
        """Rows of `counts` summed over the bins at or above each bin, highest bin first: [3, n]."""
        return np.cumsum(self.counts[:, ::-1], axis=1)

    def auroc(self) -> float:
        """Pixel AUROC with ties inside a bin counted half (NaN if one class is absent)."""
        normal, anomalous = self.counts[0], self.counts[1]
        n_normal, n_anomalous = normal.sum(), anomalous.sum()
        if n_normal == 0 or n_anomalous == 0:
            return float("nan")
        below = np.cumsum(normal) - normal  # normal pixels in lower bins
        return float((anomalous * (below + 0.5 * normal)).sum() / (n_normal * n_anomalous))

    def average_precision(self) -> float:
        """Step-wise AP over the bin edges, as `average_precision` (NaN without anomalous pixels)."""
        false_pos, true_pos, _ = self._at_or_above()
        gained = self.counts[1, ::-1]  # anomalous pixels newly flagged at each edge
        if not true_pos.size or true_pos[-1] == 0:
            return float("nan")
        hit = gained > 0
        return float(np.sum(gained[hit] / true_pos[-1] * true_pos[hit] / (true_pos[hit] + false_pos[hit])))

    def f1_max(self) -> tuple[float, float]:
        """ORACLE: best F1 over the bin edges and the edge reaching it (NaN without anomalous pixels)."""
        false_pos, true_pos, _ = self._at_or_above()
        if not true_pos.size or true_pos[-1] == 0:
            return float("nan"), float("nan")
        f1 = 2 * true_pos / (true_pos + false_pos + true_pos[-1])  # 2TP / (2TP + FP + FN)
        best = int(np.argmax(f1))
        return float(f1[best]), math.ldexp(self.offset + self.counts.shape[1] - 1 - best, self.level)

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """AUPRO over the bin edges (see `aupro`); NaN without a defect region or a normal pixel."""
        _check_limit(fpr_limit)
        false_pos, _, overlap = self._at_or_above()
        if self.n_regions == 0 or not false_pos.size or false_pos[-1] == 0:
            return float("nan")
        fpr = np.append(0.0, false_pos / false_pos[-1])
        pro = np.append(0.0, overlap / self.n_regions)
        return _area_under_pro(fpr, pro, fpr_limit)

"""Bootstrap confidence intervals for the mean over categories of image and pixel AUROC.

Ablation settings are compared on small test sets (tens of images per category), where small
gains are noise; each result therefore carries a percentile bootstrap interval over test images.
The statistic is the aggregate the results tables show: the mean over categories of the AUROC of
each category. A resample draws, within each category, as many normal and as many anomalous
images as the data has, with replacement (stratified by label), so every resample keeps both
classes and its AUROC is always defined.

One mechanism serves both levels. Each image contributes a histogram of its normal and of its
anomalous scores over ordered bins; a resample's histograms are its multiplicities times the
per-image histograms (one matrix product for all resamples), and the AUROC of two histograms is
the Mann-Whitney statistic with the pairs that share a bin counted half.

- Image scores get one bin per distinct score, so image AUROC is exact (ties count half, as usual).
- Pixel scores get `bins` equal-mass bins per category (edges at quantiles of its pixel scores).
  The binned AUROC differs from the exact one only through a normal and an anomalous pixel that
  share a bin but differ in score (exact: 0 or 1, binned: 1/2), so the error is at most
  1/2 * sum_k n0_k * n1_k / (N0 * N1) <= 1/2 * max_k n0_k / N0, about N / (2 * bins * N0): near
  5e-4 at 1024 bins when anomalous pixels are a minority, whatever the scale or tails of the
  scores (equal-width bins give no such bound: one outlier squeezes the bulk into a few bins).

This module only reports: nothing here is fitted, so the test labels it reads leak nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import sparse
from torch import Tensor

from ad_lightning.data.images import BadInputError

Histogram = np.ndarray | sparse.csr_matrix  # [n_images, n_bins] counts of one class per image


@dataclass(frozen=True)
class Interval:
    """A point estimate on all the data and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def resample_counts(labels: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities [n_boot, N] of stratified resamples of N images with binary `labels` [N].

    Each row draws, with replacement, as many images of each label as there are, so every row
    holds the same number of normal and of anomalous images as the data.
    """
    counts = np.zeros((n_boot, labels.size))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        uniform = np.full(members.size, 1.0 / members.size)
        counts[:, members] = rng.multinomial(members.size, uniform, size=n_boot)
    return counts


def auroc_of_histograms(normal: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """AUROC from counts over ordered bins, [..., K] each -> [...].

    P(anomalous score > normal score) + P(same bin) / 2: the Mann-Whitney statistic where two
    scores in one bin tie. NaN where either class has no count.
    """
    below = np.cumsum(normal, axis=-1) - normal  # normal scores in lower bins
    pairs = normal.sum(axis=-1) * anomalous.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (anomalous * (below + 0.5 * normal)).sum(axis=-1) / pairs


def bootstrap_image_auroc(
    scores: ArrayLike | Tensor,
    labels: ArrayLike | Tensor,
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Mean over categories of image AUROC with its bootstrap interval.

    scores [N] (higher = more anomalous), labels [N] (1 = anomalous), groups: category of each image.
    """
    _check_options(n_boot, level)
    draws = _image_auroc_draws([scores], labels, groups, n_boot, seed)
    return _interval(draws[0], level)


def bootstrap_image_auroc_difference(
    scores_a: ArrayLike | Tensor,
    scores_b: ArrayLike | Tensor,
    labels: ArrayLike | Tensor,
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Paired bootstrap of (mean image AUROC of setting A) - (that of setting B) on the same images.

    Both settings are scored on the same resamples, so the noise they share cancels: A beats B
    beyond resampling noise when the interval lies above 0.
    """
    _check_options(n_boot, level)
    draws_a, draws_b = _image_auroc_draws([scores_a, scores_b], labels, groups, n_boot, seed)
    return _interval(draws_a - draws_b, level)


def bootstrap_pixel_auroc(
    maps: ArrayLike | Tensor,
    masks: ArrayLike | Tensor,
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bins: int = 1024,
) -> Interval:
    """Mean over categories of pixel AUROC (all pixels of a category's images) with its bootstrap interval.

    maps [N, H, W] anomaly scores, masks [N, H, W] (anomalous where > 0.5). Resamples are of whole
    images, stratified by image label (anomalous = any anomalous pixel); scores are binned into
    `bins` equal-mass bins per category (error bound in the module docstring).
    """
    _check_options(n_boot, level)
    return _interval(bootstrap_pixel_draws(maps, masks, groups, n_boot, seed, bins), level)


def bootstrap_pixel_auroc_difference(
    maps_a: ArrayLike | Tensor,
    maps_b: ArrayLike | Tensor,
    masks: ArrayLike | Tensor,
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bins: int = 1024,
) -> Interval:
    """Paired bootstrap of (mean pixel AUROC of maps A) - (that of maps B) on the same images and masks.

    Both draw the same resamples (the draws depend only on the masks and the seed), so the noise they
    share cancels; each is binned on its own scores, as `bootstrap_pixel_auroc` bins them.
    """
    _check_options(n_boot, level)
    draws = [bootstrap_pixel_draws(maps, masks, groups, n_boot, seed, bins) for maps in (maps_a, maps_b)]
    return _interval(draws[0] - draws[1], level)


def bootstrap_pixel_draws(
    maps: ArrayLike | Tensor, masks: ArrayLike | Tensor, groups: Sequence[str], n_boot: int, seed: int, bins: int
) -> np.ndarray:
    """Mean over categories of pixel AUROC [1 + n_boot]: on all the data, then on each resample."""
    if bins < 2:
        raise BadInputError(f"bins={bins} cannot order pixel scores; use at least 2 (the default is 1024)")
    maps, masks = torch.as_tensor(maps), torch.as_tensor(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise BadInputError(
            f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [N, H, W]; "
            "resize the maps to the masks' size"
        )
    rng = np.random.default_rng(seed)
    aurocs = []
    for name, members in _categories(groups, maps.shape[0]):
        index = torch.from_numpy(members)
        scores = _finite(maps[index].flatten(1), "anomaly maps")  # [n, H, W] -> [n, H*W]
        anomalous = (masks[index].flatten(1) > 0.5).numpy()  # [n, H, W] -> [n, H*W]
        counts = _with_full_data(resample_counts(anomalous.any(axis=1), n_boot, rng))
        aurocs.append(_resampled_auroc(name, "pixel", counts, *_pixel_histograms(scores, anomalous, bins)))
    return np.mean(aurocs, axis=0)


def category_pixel_draws(
    maps: ArrayLike | Tensor, masks: ArrayLike | Tensor, name: str, n_boot: int = 1000, seed: int = 0, bins: int = 1024
) -> np.ndarray:
    """Pixel AUROC of ONE category's images [1 + n_boot]: on all its images, then on each resample
    (stratified by image label). Categories scored by different models (one per category) combine
    through `interval_of_mean`."""
    return bootstrap_pixel_draws(maps, masks, [name] * len(maps), n_boot, seed, bins)


def interval_of_mean(draws: Sequence[np.ndarray], level: float = 0.95) -> Interval:
    """The interval of the mean over categories from each category's draws [1 + n_boot] (drawn independently)."""
    _check_options(1, level)
    return _interval(np.mean(np.stack(draws), axis=0), level)


def _image_auroc_draws(
    score_sets: list[ArrayLike | Tensor], labels: ArrayLike | Tensor, groups: Sequence[str], n_boot: int, seed: int
) -> np.ndarray:
    """Mean over categories of image AUROC, [len(score_sets), 1 + n_boot]: column 0 on all the data,
    then one column per resample; every score set is scored on the same resamples."""
    labels = _binary_labels(labels)
    score_sets = [_finite(torch.as_tensor(scores), "image scores") for scores in score_sets]
    for scores in score_sets:
        if scores.shape != labels.shape:
            raise BadInputError(f"{scores.size} image scores but {labels.size} labels; pass one score per image")
    rng = np.random.default_rng(seed)
    aurocs = []  # [categories][score sets] of [1 + n_boot]
    for name, members in _categories(groups, labels.size):
        counts = _with_full_data(resample_counts(labels[members], n_boot, rng))
        aurocs.append(
            [
                _resampled_auroc(name, "image", counts, *_image_histograms(scores[members], labels[members]))
                for scores in score_sets
            ]
        )
    return np.mean(aurocs, axis=0)  # [categories, score sets, 1 + n_boot] -> [score sets, 1 + n_boot]


def _image_histograms(scores: np.ndarray, labels: np.ndarray) -> tuple[Histogram, Histogram]:
    """Per-image one-hot histograms over the distinct scores, [n, K] normal and [n, K] anomalous."""
    _, bin_of = np.unique(scores, return_inverse=True)
    shape = (scores.size, int(bin_of.max()) + 1)
    rows = np.arange(scores.size)
    normal = sparse.csr_matrix(((labels == 0).astype(float), (rows, bin_of)), shape=shape)
    anomalous = sparse.csr_matrix(((labels == 1).astype(float), (rows, bin_of)), shape=shape)
    return normal, anomalous


def _pixel_histograms(scores: np.ndarray, anomalous: np.ndarray, bins: int) -> tuple[Histogram, Histogram]:
    """Per-image histograms of normal and of anomalous pixel scores [n, P] over equal-mass bins: [n, K] each.

    Edges are the pooled scores at the quantiles k / bins; equal scores always share a bin.
    """
    ordered = np.sort(scores, axis=None)
    edges = np.unique(ordered[np.arange(1, bins) * ordered.size // bins])
    n_bins = edges.size + 1
    bin_of = np.searchsorted(edges, scores, side="right")  # [n, P] in 0..n_bins-1
    cell = (2 * np.arange(scores.shape[0])[:, None] + anomalous) * n_bins + bin_of  # (image, class, bin)
    counts = np.bincount(cell.ravel(), minlength=2 * n_bins * scores.shape[0])
    counts = counts.reshape(scores.shape[0], 2, n_bins).astype(float)  # [n*2*K] -> [n, 2, K]
    return counts[:, 0], counts[:, 1]


def _resampled_auroc(name: str, unit: str, counts: np.ndarray, normal: Histogram, anomalous: Histogram) -> np.ndarray:
    """AUROC of a category under each row of multiplicities `counts` [R, n] -> [R]."""
    aurocs = auroc_of_histograms(np.asarray(counts @ normal), np.asarray(counts @ anomalous))
    if np.isnan(aurocs).any():
        raise BadInputError(
            f"category {name!r} lacks normal or anomalous {unit}s (in the data or in a resample), so its "
            f"{unit} AUROC is undefined; give it both classes or leave the category out"
        )
    return aurocs


def _with_full_data(counts: np.ndarray) -> np.ndarray:
    """Prepend a row of ones (every image once: the point estimate) to resample counts [B, n] -> [1 + B, n]."""
    return np.vstack([np.ones((1, counts.shape[1])), counts])


def _interval(draws: np.ndarray, level: float) -> Interval:
    """Interval from draws [1 + n_boot]: the full-data value and the central `level` percentile range."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws[1:], [tail, 1.0 - tail])
    return Interval(float(draws[0]), float(low), float(high))


def _categories(groups: Sequence[str], n: int) -> list[tuple[str, np.ndarray]]:
    """(category, indices of its images) for each distinct category, in sorted order (fixed draw order)."""
    if len(groups) != n:
        raise BadInputError(f"{len(groups)} category names for {n} images; pass one category per image")
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return [(str(name), np.flatnonzero(inverse == g)) for g, name in enumerate(names)]


def _binary_labels(labels: ArrayLike | Tensor) -> np.ndarray:
    """Labels [N] as 0/1 integers, refusing anything else."""
    labels = torch.as_tensor(labels).detach().cpu().flatten().numpy()
    if not np.isin(labels, [0, 1]).all():
        raise BadInputError(f"image labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels)}")
    return labels.astype(np.int64)


def _finite(values: Tensor, what: str) -> np.ndarray:
    """Values as float64 numpy, refusing NaN/inf (they would sort to one end and bias the AUROC)."""
    values = values.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(values).all():
        raise BadInputError(f"{what} contain NaN or inf; the model or head produced invalid values")
    return values


def _check_options(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise BadInputError(f"n_boot={n_boot}: the bootstrap needs at least 1 resample (1000 is usual)")
    if not 0.0 < level < 1.0:
        raise BadInputError(f"level={level} is not a probability in (0, 1); 0.95 gives a 95 % interval")

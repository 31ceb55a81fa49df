"""Bootstrap intervals of mean image and pixel AUROC: point estimates against the exact metrics,
known bootstrap distributions, coverage of a known population AUROC, pairing and input errors."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from ad_lightning.data.images import BadInputError
from ad_lightning.evaluation.bootstrap import (
    Interval,
    auroc_of_histograms,
    bootstrap_image_auroc,
    bootstrap_image_auroc_difference,
    bootstrap_pixel_auroc,
    bootstrap_pixel_auroc_difference,
    resample_counts,
)
from ad_lightning.evaluation.metrics import image_auroc, pixel_auroc


def gaussian_scores(seed, n_normal, n_anomalous, separation=1.0, categories=("a",)):
    """Scores N(0, 1) for normal and N(separation, 1) for anomalous images, per category."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.r_[np.zeros(n_normal), np.ones(n_anomalous)], len(categories)).astype(int)
    scores = rng.normal(size=labels.size) + separation * labels
    groups = np.repeat(categories, n_normal + n_anomalous).tolist()
    return scores, labels, groups


def blob_maps(seed, n, size=48, scale=1.0, outliers=False):
    """Smooth noisy maps [n, size, size] with raised blobs where the masks of every other image mark
    a defect; rounded scores on one image (ties), a few extreme pixels if `outliers`."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for image in range(0, n, 2):
        blobs = gaussian_filter(rng.random((size, size)), 3.0)
        masks[image] = blobs > np.quantile(blobs, 0.95)
    field = gaussian_filter(rng.normal(size=masks.shape), (0, 3, 3)) * 4.0
    maps = gaussian_filter(masks.astype(float), (0, 2, 2)) + 0.1 * field + 0.1 * rng.normal(size=masks.shape)
    maps[1] = np.round(maps[1], 1)
    if outliers:
        maps[3, :2, :2] = 1e4  # far above everything else: an equal-width grid would lose the bulk
    return torch.tensor(maps * scale, dtype=torch.float32), torch.tensor(masks)


def width(interval):
    return interval.high - interval.low


def test_interval_prints_mean_and_bounds():
    assert str(Interval(0.9534, 0.9312, 0.9718)) == "0.953 [0.931, 0.972]"


def test_point_estimate_is_mean_over_categories_of_image_auroc():
    rng = np.random.default_rng(0)
    sizes = {"bottle": (20, 30), "cable": (12, 50), "grid": (30, 9)}
    scores, labels, groups = [], [], []
    for name, (n_normal, n_anomalous) in sizes.items():
        label = np.r_[np.zeros(n_normal, int), np.ones(n_anomalous, int)]
        scores.append(np.round(rng.normal(size=label.size) + label, 1))  # rounded: ties inside and across classes
        labels.append(label)
        groups += [name] * label.size
    expected = np.mean([image_auroc(torch.tensor(s), torch.tensor(y)) for s, y in zip(scores, labels)])
    interval = bootstrap_image_auroc(np.concatenate(scores), np.concatenate(labels), groups, n_boot=50)
    assert interval.mean == pytest.approx(expected, abs=1e-6)


def test_point_estimate_ignores_image_order():
    scores, labels, groups = gaussian_scores(1, 15, 10, categories=("a", "b"))
    order = np.random.default_rng(1).permutation(labels.size)
    shuffled = bootstrap_image_auroc(scores[order], labels[order], [groups[i] for i in order], n_boot=20)
    assert shuffled.mean == bootstrap_image_auroc(scores, labels, groups, n_boot=20).mean


def test_perfect_separation_gives_one_and_constant_score_gives_half_exactly():
    _, labels, groups = gaussian_scores(0, 10, 5, categories=("a", "b", "c"))
    perfect = bootstrap_image_auroc(labels * 10.0 + np.arange(labels.size) % 3, labels, groups, n_boot=200)
    assert (perfect.mean, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
    constant = bootstrap_image_auroc(np.full(labels.size, 7.0), labels, groups, n_boot=200)
    assert (constant.mean, constant.low, constant.high) == (0.5, 0.5, 0.5)


def test_known_bootstrap_distribution_of_one_normal_and_two_anomalous_images():
    # resampling the two anomalous images gives AUROC 1 (both high), 1/2 (one each) or 0 (both low)
    # with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1], the central 40 % is [1/2, 1/2]
    scores, labels, groups = np.array([0.0, 1.0, -1.0]), np.array([0, 1, 1]), ["a"] * 3
    wide = bootstrap_image_auroc(scores, labels, groups, n_boot=4000, level=0.95)
    assert (wide.mean, wide.low, wide.high) == (0.5, 0.0, 1.0)
    central = bootstrap_image_auroc(scores, labels, groups, n_boot=4000, level=0.4)
    assert (central.low, central.high) == (0.5, 0.5)


def test_interval_contains_point_and_narrows_with_more_images():
    small = bootstrap_image_auroc(*gaussian_scores(2, 20, 20), n_boot=500)
    large = bootstrap_image_auroc(*gaussian_scores(2, 200, 200), n_boot=500)
    for interval in (small, large):
        assert interval.low < interval.mean < interval.high
    # the width scales as 1 / sqrt(N): about sqrt(10) times narrower
    assert 2.0 < width(small) / width(large) < 5.0


def test_interval_covers_known_population_auroc_about_95_percent_of_the_time():
    separation = 1.0
    truth = norm.cdf(separation / np.sqrt(2))  # AUROC of N(d, 1) against N(0, 1)
    covered = 0
    for draw in range(200):
        scores, labels, groups = gaussian_scores(100 + draw, 40, 20, separation, categories=("a", "b", "c"))
        interval = bootstrap_image_auroc(scores, labels, groups, n_boot=200, seed=draw)
        covered += interval.low <= truth <= interval.high
    assert 0.88 <= covered / 200 <= 0.99


def test_same_seed_repeats_and_other_seed_differs():
    data = gaussian_scores(3, 30, 15, categories=("a", "b"))
    assert bootstrap_image_auroc(*data, seed=5) == bootstrap_image_auroc(*data, seed=5)
    assert bootstrap_image_auroc(*data, seed=5) != bootstrap_image_auroc(*data, seed=6)


def test_resamples_keep_class_sizes_and_draw_images_uniformly():
    labels = np.array([0] * 7 + [1] * 3)
    counts = resample_counts(labels, 20000, np.random.default_rng(0))
    assert (counts[:, labels == 0].sum(axis=1) == 7).all()
    assert (counts[:, labels == 1].sum(axis=1) == 3).all()
    # each image's multiplicity is Binomial(n_class, 1 / n_class): mean 1, variance 1 - 1 / n_class
    assert counts.mean(axis=0) == pytest.approx(np.ones(10), abs=0.03)
    variance = np.where(labels == 0, 1 - 1 / 7, 1 - 1 / 3)
    assert counts.var(axis=0) == pytest.approx(variance, abs=0.04)


def test_auroc_of_histograms_equals_auroc_of_the_scores_they_count():
    rng = np.random.default_rng(4)
    normal, anomalous = rng.integers(0, 5, (3, 12)), rng.integers(0, 5, (3, 12))  # 3 histograms of 12 bins
    for row in range(3):
        # scores = bin index, so scores in one bin are equal and sklearn counts their pairs half
        scores = np.r_[np.repeat(np.arange(12), normal[row]), np.repeat(np.arange(12), anomalous[row])]
        labels = np.r_[np.zeros(normal[row].sum()), np.ones(anomalous[row].sum())]
        assert auroc_of_histograms(normal, anomalous)[row] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_paired_difference_of_a_setting_with_itself_is_exactly_zero():
    scores, labels, groups = gaussian_scores(5, 30, 15, categories=("a", "b"))
    same = bootstrap_image_auroc_difference(scores, scores, labels, groups)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_difference_is_the_difference_of_means_and_narrower_than_either_interval():
    scores_b, labels, groups = gaussian_scores(6, 40, 20, categories=("a", "b", "c"))
    scores_a = scores_b + 0.3 * labels + 0.05 * np.random.default_rng(6).normal(size=labels.size)
    difference = bootstrap_image_auroc_difference(scores_a, scores_b, labels, groups)
    a, b = bootstrap_image_auroc(scores_a, labels, groups), bootstrap_image_auroc(scores_b, labels, groups)
    assert difference.mean == pytest.approx(a.mean - b.mean, abs=1e-12)
    assert difference.low > 0  # A's extra separation is real, not resampling noise
    assert width(difference) < width(a) / 2  # the shared noise cancels in the pairing


def test_binned_pixel_auroc_is_within_1e3_of_exact_per_category_mean():
    maps_a, masks_a = blob_maps(7, 12)
    maps_b, masks_b = blob_maps(8, 10, scale=-50.0)  # negative scale: a poor detector on the second category
    exact = np.mean([pixel_auroc(maps_a, masks_a), pixel_auroc(maps_b, masks_b)])
    maps, masks = torch.cat([maps_a, maps_b]), torch.cat([masks_a, masks_b])
    interval = bootstrap_pixel_auroc(maps, masks, ["a"] * 12 + ["b"] * 10, n_boot=50)
    assert interval.mean == pytest.approx(exact, abs=1e-3)


def test_paired_pixel_difference_is_the_difference_of_means_and_narrower_than_either_interval():
    maps_b, masks = blob_maps(10, 16)
    maps_a = maps_b + 0.02 * masks  # A raises every defect pixel a little: better on each image
    groups = ["a"] * 8 + ["b"] * 8
    difference = bootstrap_pixel_auroc_difference(maps_a, maps_b, masks, groups, n_boot=200)
    a = bootstrap_pixel_auroc(maps_a, masks, groups, n_boot=200)
    b = bootstrap_pixel_auroc(maps_b, masks, groups, n_boot=200)
    assert difference.mean == pytest.approx(a.mean - b.mean, abs=1e-12)
    assert difference.low > 0
    assert width(difference) < width(a) / 2
    same = bootstrap_pixel_auroc_difference(maps_b, maps_b, masks, groups, n_boot=50)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_binned_pixel_auroc_is_within_1e3_of_exact_with_extreme_outliers():
    maps, masks = blob_maps(9, 12, scale=1e3, outliers=True)
    interval = bootstrap_pixel_auroc(maps, masks, ["a"] * 12, n_boot=50)
    assert interval.mean == pytest.approx(pixel_auroc(maps, masks), abs=1e-3)


def test_pixel_interval_contains_point_and_narrows_with_more_images():
    small = bootstrap_pixel_auroc(*blob_maps(10, 12, size=32), ["a"] * 12, n_boot=300)
    large = bootstrap_pixel_auroc(*blob_maps(10, 96, size=32), ["a"] * 96, n_boot=300)
    for interval in (small, large):
        assert interval.low <= interval.mean <= interval.high
    assert width(large) < width(small) / 2  # 8 times the images: about sqrt(8) narrower


def test_pixel_resamples_are_stratified_by_image_label():
    # one normal and one anomalous image per category: every stratified resample is the data itself
    maps, masks = blob_maps(11, 4)
    interval = bootstrap_pixel_auroc(maps, masks, ["a", "a", "b", "b"], n_boot=100, seed=3)
    assert interval.low == interval.mean == interval.high


def test_pixel_bootstrap_repeats_with_a_seed():
    maps, masks = blob_maps(12, 8, size=32)
    first, again = (bootstrap_pixel_auroc(maps, masks, ["a"] * 8, seed=1) for _ in range(2))
    assert first == again


def test_category_without_anomalous_images_is_refused_by_name():
    scores, labels, groups = gaussian_scores(13, 10, 5, categories=("a", "b"))
    with pytest.raises(BadInputError, match="'b'"):
        bootstrap_image_auroc(scores, np.where(np.array(groups) == "b", 0, labels), groups)
    maps, masks = blob_maps(13, 4)
    with pytest.raises(BadInputError, match="'b'"):
        bootstrap_pixel_auroc(maps, masks, ["a", "b", "a", "b"])  # the masks mark images 0 and 2 only


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"groups": ["a"] * 3}, "category names"),
        ({"labels": np.full(15, 2)}, "labels must be 0"),
        ({"scores": np.full(15, np.nan)}, "NaN"),
        ({"scores": np.zeros(14)}, "14 image scores"),
        ({"level": 95}, "level=95"),
        ({"n_boot": 0}, "n_boot=0"),
    ],
)
def test_bad_image_input_is_refused_with_its_value(change, message):
    scores, labels, groups = gaussian_scores(14, 10, 5)
    arguments = {"scores": scores, "labels": labels, "groups": groups} | change
    with pytest.raises(BadInputError, match=message):
        bootstrap_image_auroc(**arguments)


def test_bad_pixel_input_is_refused_with_its_value():
    maps, masks = blob_maps(15, 4, size=16)
    with pytest.raises(BadInputError, match=r"\(4, 8, 8\)"):
        bootstrap_pixel_auroc(maps, masks[:, :8, :8], ["a"] * 4)
    with pytest.raises(BadInputError, match="bins=1"):
        bootstrap_pixel_auroc(maps, masks, ["a"] * 4, bins=1)

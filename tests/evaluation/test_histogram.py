"""ScoreHistogram: canonical grid, exact merges, and binned pixel metrics against exact ones."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ad_lightning.evaluation.metrics import (
    DefectRegions,
    ScoreHistogram,
    aupro,
    average_precision,
    f1_max,
    pixel_auroc,
    thresholded,
)


def realistic_case(seed, scale=40.0, offset=-10.0, n=12, size=48):
    """Smooth noisy maps with raised blobs on about half the images; one all-normal constant map
    and rounded scores (ties) among them; float32 like real maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for image in range(0, n, 2):
        blobs = gaussian_filter(rng.random((size, size)), 3.0)
        masks[image] = blobs > np.quantile(blobs, 0.96)
    field = gaussian_filter(rng.normal(size=masks.shape), (0, 3, 3)) * 4.0
    maps = gaussian_filter(masks.astype(float), (0, 2, 2)) + 0.1 * field + 0.1 * rng.normal(size=masks.shape)
    maps[1] = 0.3  # an all-normal image with a constant map
    maps[3] = np.round(maps[3], 1)  # ties
    return torch.tensor(maps * scale + offset, dtype=torch.float32), torch.tensor(masks)


def filled(maps, masks, bins=1000):
    histogram = ScoreHistogram(bins)
    histogram.update(maps, DefectRegions.of(masks))
    return histogram


def binned_metrics(h):
    return [h.auroc(), h.average_precision(), h.f1_max()[0], h.aupro(0.3)]


def exact_metrics(maps, masks):
    positive = masks > 0.5
    return [pixel_auroc(maps, masks), average_precision(maps, positive), f1_max(maps, positive)[0], aupro(maps, masks)]


def lower_edges(maps, level):
    """Every score rounded down to the lower edge of its bin at `level` (exact in float64)."""
    return torch.tensor(np.ldexp(np.floor(np.ldexp(maps.double().numpy(), -level)), level))


SCALES = [(40.0, -10.0), (1e4, 5e4), (1e4, -3e4), (1e-3, 0.0), (1.0, -1e5)]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(("scale", "offset"), SCALES)
def test_binned_equals_exact_on_scores_rounded_to_bin_edges(seed, scale, offset):
    maps, masks = realistic_case(seed, scale, offset)
    histogram = filled(maps, masks, bins=50)  # coarse, so the rounding really changes the scores
    quantised = lower_edges(maps, histogram.level)
    assert len(torch.unique(quantised)) < len(torch.unique(maps))
    # torchmetrics returns float32 results, hence 1e-6
    assert binned_metrics(histogram) == pytest.approx(exact_metrics(quantised, masks), abs=1e-6)
    assert histogram.aupro() == pytest.approx(aupro(quantised, masks), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("scale", "offset"), SCALES)
def test_binned_is_within_0005_of_exact(seed, scale, offset):
    maps, masks = realistic_case(seed, scale, offset)
    exact = exact_metrics(maps, masks)
    assert 0.3 < min(exact) and max(exact) < 0.999  # a case where the curves matter
    assert binned_metrics(filled(maps, masks)) == pytest.approx(exact, abs=0.005)


@pytest.mark.parametrize(("scale", "offset"), SCALES)
def test_at_least_bins_and_at_most_twice_bins_over_the_observed_range(scale, offset):
    maps, masks = realistic_case(0, scale, offset)
    histogram = filled(maps, masks, bins=100)
    n_bins = histogram.counts.shape[1]
    assert 100 <= n_bins <= 200
    assert histogram.counts[:2].sum() == maps.numel()
    low, high = float(maps.min()), float(maps.max())
    assert histogram.offset * histogram.bin_width <= low and high < (histogram.offset + n_bins) * histogram.bin_width


def test_fed_in_chunks_or_merged_equals_one_pass():
    """The grid is canonical: the histogram depends on the scores only, not on how they arrive."""
    maps, masks = realistic_case(5)
    maps[4] *= 30.0  # a later batch with a far wider range forces coarsening
    one_pass = filled(maps, masks)
    streamed, first, second = ScoreHistogram(), ScoreHistogram(), ScoreHistogram()
    for image in range(len(maps)):
        streamed.update(maps[image : image + 1], DefectRegions.of(masks[image : image + 1]))
    first.update(maps[5:], DefectRegions.of(masks[5:]))
    second.update(maps[:5], DefectRegions.of(masks[:5]))
    first.merge(second)
    for other in (streamed, first):
        assert (other.level, other.offset, other.n_regions) == (one_pass.level, one_pass.offset, one_pass.n_regions)
        np.testing.assert_allclose(other.counts, one_pass.counts, rtol=0, atol=1e-9)
    assert first.counts.shape[1] < 2000 and first.level > filled(maps[5:], masks[5:]).level


def test_merge_of_a_far_finer_histogram_and_of_an_empty_one():
    tiny = filled(torch.full((1, 4, 4), 1e-6), torch.zeros(1, 4, 4))  # constant: the finest grid at 1e-6
    wide = filled(torch.linspace(-5e3, 5e3, 64).reshape(1, 8, 8), torch.eye(8)[None])
    merged = ScoreHistogram()
    merged.merge(wide)
    merged.merge(ScoreHistogram())
    merged.merge(tiny)
    assert merged.level == wide.level and merged.counts.sum(1)[:2].tolist() == [56 + 16, 8]
    bin_of_tiny = math.floor(1e-6 / merged.bin_width) - merged.offset
    assert merged.counts[0, bin_of_tiny] == 16 + wide.counts[0, bin_of_tiny]
    with pytest.raises(ValueError, match="bins"):
        merged.merge(ScoreHistogram(10))


def test_constant_maps_and_known_values():
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:5, 2:5] = 1
    constant = filled(torch.full((2, 8, 8), 7.0), masks)
    assert constant.counts.shape[1] == 1 and constant.bin_width < 1e-12  # one bin, edge exactly at 7
    assert constant.auroc() == 0.5 and constant.aupro() == pytest.approx(0.15)
    assert constant.f1_max() == (pytest.approx(2 * 9 / (9 + 128)), 7.0)  # everything flagged at edge 7
    assert constant.average_precision() == pytest.approx(9 / 128)
    perfect = filled(masks * 1e4 - 3.0, masks)
    assert binned_metrics(perfect) == [1.0, 1.0, 1.0, pytest.approx(1.0)]


def test_f1_max_threshold_is_a_bin_edge_that_reaches_it():
    maps, masks = realistic_case(2, 1e4, -3e4)
    histogram = filled(maps, masks, bins=200)
    best, threshold = histogram.f1_max()
    assert threshold % histogram.bin_width == 0.0
    assert thresholded(maps.double().flatten(), masks.flatten(), threshold)["f1"] == pytest.approx(best, abs=1e-12)


def test_undefined_cases_give_nan_and_bad_input_raises():
    normal_only = filled(torch.rand(2, 5, 5), torch.zeros(2, 5, 5))
    assert all(math.isnan(v) for v in binned_metrics(normal_only))
    anomalous_only = filled(torch.rand(2, 5, 5), torch.ones(2, 5, 5))
    assert math.isnan(anomalous_only.auroc()) and math.isnan(anomalous_only.aupro())
    assert anomalous_only.average_precision() == 1.0
    assert all(math.isnan(v) for v in binned_metrics(ScoreHistogram()))
    with pytest.raises(ValueError, match="bins >= 1"):
        ScoreHistogram(0)
    with pytest.raises(ValueError, match="shape"):
        ScoreHistogram().update(torch.rand(2, 5, 5), DefectRegions.of(torch.zeros(2, 5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        filled(torch.full((1, 2, 2), float("inf")), torch.eye(2)[None])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        DefectRegions.of(torch.zeros(5, 5))

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from ad_lightning.evaluation.metrics import thresholded
from ad_lightning.evaluation.thresholds import fit_threshold, is_anomalous


@pytest.mark.parametrize("q", [0.0, 50.0, 95.0, 99.0, 100.0])
def test_percentile_equals_numpy(q):
    scores = np.random.default_rng(0).normal(size=203) * 1e4 - 7
    assert fit_threshold(torch.tensor(scores), q=q) == pytest.approx(np.percentile(scores, q), rel=1e-12)


def test_otsu_equals_skimage_and_splits_two_modes():
    rng = np.random.default_rng(1)
    low, high = rng.uniform(0, 1, 300), rng.uniform(10, 11, 100)
    scores = np.concatenate([low, high])
    threshold = fit_threshold(torch.tensor(scores), method="otsu")
    assert threshold == pytest.approx(threshold_otsu(scores))
    assert low.max() < threshold < high.min()


def test_otsu_on_normal_only_data_cuts_inside_it():
    """Documented behaviour: one mode, so Otsu flags a large share of normal scores (unlike q=99)."""
    scores = torch.tensor(np.random.default_rng(2).normal(size=500))
    flagged_otsu = is_anomalous(scores, fit_threshold(scores, method="otsu")).float().mean()
    flagged_q99 = is_anomalous(scores, fit_threshold(scores, q=99.0)).float().mean()
    assert flagged_otsu > 0.2
    assert flagged_q99 == pytest.approx(0.01, abs=0.005)


def test_gaussian_is_the_fitted_normal_distributions_percentile():
    scores = torch.arange(10.0)  # mean 4.5, sample std 3.028
    assert fit_threshold(scores, method="gaussian", q=99.0) == pytest.approx(4.5 + 2.3263 * 3.0277, abs=1e-3)


@pytest.mark.parametrize("n", [10, 16])
def test_few_normal_scores_flag_about_1_in_n_plus_1_by_percentile_and_near_the_target_by_gaussian(n):
    """Many validation sets of n Gaussian normal scores, each threshold applied to fresh normal scores: the
    empirical 99th percentile flags about 1 / (n + 1) of them (9 % at n = 10), the fitted Gaussian's near 1 %."""
    rng = np.random.default_rng(4)
    fresh = rng.normal(size=20_000)

    def flagged(method):
        thresholds = [fit_threshold(torch.tensor(rng.normal(size=n)), method=method) for _ in range(2000)]
        return float(np.mean([(fresh >= t).mean() for t in thresholds]))

    assert flagged("percentile") == pytest.approx(1 / (n + 1), rel=0.25)
    assert 0.01 < flagged("gaussian") < 0.035  # 2.7 % and 1.9 %: the estimated spread's error fattens the tail


def test_bad_input_raises():
    with pytest.raises(ValueError, match="no normal validation scores"):
        fit_threshold(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        fit_threshold(torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="percentile"):
        fit_threshold(torch.rand(4), q=101.0)
    with pytest.raises(ValueError, match="otsu"):
        fit_threshold(torch.rand(4), method="mean")
    with pytest.raises(ValueError, match="2 or more scores"):
        fit_threshold(torch.rand(1), method="gaussian")


@pytest.mark.parametrize("method", ["percentile", "gaussian", "otsu"])
def test_threshold_does_not_depend_on_test_labels(method):
    """Tiny pipeline: fit on normal validation scores, evaluate on test with shuffled labels."""
    rng = np.random.default_rng(3)
    normal_val = torch.tensor(rng.normal(size=100))
    test_labels = torch.tensor(rng.integers(0, 2, 60))
    test_scores = torch.tensor(rng.normal(size=60)) + 2.0 * test_labels

    def evaluate(labels):
        threshold = fit_threshold(normal_val, method=method)
        return threshold, is_anomalous(test_scores, threshold), thresholded(test_scores, labels, threshold)

    threshold, predictions, metrics = evaluate(test_labels)
    shuffled = test_labels[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(shuffled, test_labels)
    threshold_shuffled, predictions_shuffled, metrics_shuffled = evaluate(shuffled)
    assert threshold_shuffled == threshold
    assert torch.equal(predictions_shuffled, predictions)
    assert metrics_shuffled != metrics  # the labels did reach the evaluation, just not the fit

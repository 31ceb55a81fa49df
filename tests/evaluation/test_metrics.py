import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ad_lightning.evaluation.metrics import image_auroc, pixel_auroc, to_unit_interval


def random_case(seed, n, scale, offset, ties):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + 0.7 * labels
    if ties:
        scores = np.round(scores, 1)  # many exact ties
    return scores * scale + offset, labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("scale", "offset", "ties"),
    [(1.0, 0.0, False), (1.0, 0.0, True), (1e4, 5e4, False), (0.05, 0.5, True), (1.0, -300.0, True)],
)
def test_image_auroc_equals_sklearn(seed, scale, offset, ties):
    scores, labels = random_case(seed, 57, scale, offset, ties)
    expected = roc_auc_score(labels, scores)
    got = image_auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert got == pytest.approx(roc_auc_score(labels, np.float32(scores)), abs=1e-6)
    assert got == pytest.approx(expected, abs=1e-3)


def test_large_scores_do_not_saturate():
    """The failure this module exists for: a sigmoid would make these all ties (AUROC 0.5)."""
    scores = torch.tensor([1000.0, 1001.0, 1002.0, 999.0])
    assert image_auroc(scores, torch.tensor([0, 1, 1, 0])) == 1.0


def test_pixel_auroc_equals_sklearn_with_constant_and_tied_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 8, 8))
    masks[0, 2:5, 2:5] = 1
    masks[2, 0:2, :] = 1
    maps = np.round(rng.normal(size=(3, 8, 8)) + 2 * masks, 1) * 50 + 10
    maps[1] = 7.0  # a constant map
    got = pixel_auroc(torch.tensor(maps, dtype=torch.float32), torch.tensor(masks))
    assert got == pytest.approx(roc_auc_score(masks.ravel(), np.float32(maps).ravel()), abs=1e-6)


def test_one_class_gives_nan_and_bad_input_raises():
    assert np.isnan(image_auroc(torch.rand(5), torch.zeros(5)))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))


def test_unit_interval_keeps_order_and_ties():
    x = torch.tensor([5.0, -1.0, 5.0, 1e6])
    u = to_unit_interval(x)
    assert u.tolist() == [0.5, 0.0, 0.5, 1.0]

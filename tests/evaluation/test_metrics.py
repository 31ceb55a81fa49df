import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ad_lightning.evaluation.metrics import (
    average_precision,
    f1_max,
    image_auroc,
    pixel_auroc,
    thresholded,
    to_unit_interval,
)


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

SCALES = [(1.0, 0.0, False), (1.0, 0.0, True), (1e4, 5e4, False), (1e4, 5e4, True), (1.0, -300.0, True)]


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = np.where(precision + recall > 0, precision + recall, 1.0)
    return float(np.max(2 * precision * recall / denominator))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("scale", "offset", "ties"), SCALES)
def test_average_precision_equals_sklearn(seed, scale, offset, ties):
    scores, labels = random_case(seed, 57, scale, offset, ties)
    scores = np.float32(scores)
    got = average_precision(torch.tensor(scores), torch.tensor(labels))
    assert got == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("scale", "offset", "ties"), SCALES)
def test_f1_max_equals_sklearn_and_its_threshold_reaches_it(seed, scale, offset, ties):
    scores, labels = random_case(seed, 57, scale, offset, ties)
    scores = np.float32(scores)
    best, threshold = f1_max(torch.tensor(scores), torch.tensor(labels))
    assert best == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-6)
    assert threshold in scores  # a raw score, not a rank
    at_threshold = thresholded(torch.tensor(scores), torch.tensor(labels), threshold)
    assert at_threshold["f1"] == pytest.approx(best, abs=1e-6)


def test_constant_scores_ap_and_f1_max():
    labels = np.array([0, 1, 1, 0, 0, 1, 0, 0])
    scores = torch.full((8,), 1234.5)
    assert average_precision(scores, torch.tensor(labels)) == pytest.approx(3 / 8)
    assert average_precision(scores, torch.tensor(labels)) == pytest.approx(
        average_precision_score(labels, scores.numpy())
    )
    best, threshold = f1_max(scores, torch.tensor(labels))
    assert best == pytest.approx(2 * (3 / 8) / (3 / 8 + 1))  # everything flagged: P = 3/8, R = 1
    assert threshold == 1234.5


def test_ap_and_f1_max_without_positives_are_nan():
    assert np.isnan(average_precision(torch.rand(6), torch.zeros(6)))
    assert all(np.isnan(v) for v in f1_max(torch.rand(6), torch.zeros(6)))


def test_thresholded_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.5, 0.9, 0.2])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # score >= 0.4 flags [0, 1, 1, 1, 0]: TP 2, FP 1, FN 1, TN 1
    got = thresholded(scores, labels, 0.4)
    assert got == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    # nothing flagged: precision and F1 divide by zero and are reported as 0.0
    assert thresholded(scores, labels, 10.0) == {"accuracy": 2 / 5, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="labels"):
        thresholded(scores, labels[:3], 0.4)

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.measure import label

from ad_lightning.evaluation.metrics import DefectRegions, ScoreHistogram, aupro


def brute_force_aupro(maps, masks, fpr_limit=0.3):
    """Plain reference: every distinct threshold, every region, trapezoid cut at fpr_limit."""
    regions = []
    for image, mask in enumerate(masks):
        components = label(mask, connectivity=2)  # 8-connectivity
        for k in range(1, components.max() + 1):
            regions.append((image, components == k))
    normal = masks == 0
    points = [(0.0, 0.0)]  # threshold above every score
    for threshold in sorted(np.unique(maps), reverse=True):
        flagged = maps >= threshold
        fpr = (flagged & normal).sum() / normal.sum()
        pro = np.mean([flagged[image][region].mean() for image, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (fpr0, pro0), (fpr1, pro1) in zip(points, points[1:]):
        if fpr0 >= fpr_limit:
            break
        if fpr1 > fpr_limit:
            pro1 = pro0 + (pro1 - pro0) * (fpr_limit - fpr0) / (fpr1 - fpr0)
            fpr1 = fpr_limit
        area += (fpr1 - fpr0) * (pro0 + pro1) / 2
    return area / fpr_limit


def small_case(seed, scale, offset):
    """5 images 10x10: random blobs, one all-normal image, one constant map, tied scores."""
    rng = np.random.default_rng(seed)
    masks = (gaussian_filter(rng.random((5, 10, 10)), 1.0) > 0.55).astype(np.uint8)
    masks[1] = 0  # an all-normal image among others
    masks[0, :2, :2] = 1
    masks[0, 2, 2] = 1  # touches the square only diagonally: same region under 8-connectivity
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1)  # rounding makes ties
    maps[3] = 0.4  # a constant map
    return maps * scale + offset, masks


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (1e4, -5e4), (0.01, 0.5), (3.0, 250.0)])
def test_exact_equals_brute_force(seed, scale, offset):
    maps, masks = small_case(seed, scale, offset)
    assert masks.any()
    got = aupro(torch.tensor(maps), torch.tensor(masks))
    assert got == pytest.approx(brute_force_aupro(maps, masks), abs=1e-6)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_exact_equals_brute_force_at_other_limits(fpr_limit):
    maps, masks = small_case(7, 1.0, 0.0)
    got = aupro(torch.tensor(maps), torch.tensor(masks), fpr_limit=fpr_limit)
    assert got == pytest.approx(brute_force_aupro(maps, masks, fpr_limit), abs=1e-6)


def test_diagonal_neighbours_form_one_region():
    """With 4-connectivity the two pixels would be two regions and the PRO at the cut differs."""
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 4, 4] = masks[0, 4, 5] = 1
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1] = 2.0  # half of the diagonal region, before any normal pixel
    got = aupro(torch.tensor(maps), torch.tensor(masks))
    assert got == pytest.approx(brute_force_aupro(maps, masks), abs=1e-9)
    # 2 regions, PRO = 0.25 at FPR 0, then rises linearly to 1 at FPR 1: PRO(f) = 0.25 + 0.75 f
    assert got == pytest.approx(0.25 + 0.75 * 0.15, abs=1e-9)


def test_known_values():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1
    perfect = masks * 10.0 - 3.0
    assert aupro(torch.tensor(perfect), torch.tensor(masks)) == pytest.approx(1.0)
    # a constant map: one threshold, the curve goes straight from (0, 0) to (1, 1)
    constant = np.full(masks.shape, 7.0)
    assert aupro(torch.tensor(constant), torch.tensor(masks)) == pytest.approx(0.15)
    assert aupro(torch.tensor(constant), torch.tensor(masks), bins=10) == pytest.approx(0.15)


def test_undefined_cases_give_nan_and_bad_input_raises():
    assert np.isnan(aupro(torch.rand(2, 5, 5), torch.zeros(2, 5, 5)))  # no defect region
    assert np.isnan(aupro(torch.rand(2, 5, 5), torch.ones(2, 5, 5)))  # no normal pixel
    assert np.isnan(aupro(torch.rand(2, 5, 5), torch.zeros(2, 5, 5), bins=50))
    with pytest.raises(ValueError, match="shape"):
        aupro(torch.rand(2, 5, 5), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        aupro(torch.rand(5, 5), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="NaN"):
        aupro(torch.full((1, 2, 2), float("nan")), torch.eye(2)[None])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(torch.rand(1, 2, 2), torch.eye(2)[None], fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(torch.rand(1, 2, 2), torch.eye(2)[None], fpr_limit=1.5, bins=10)


def realistic_case(seed):
    """20 images 64x64: about half with blob defects; maps are blurred masks plus noise."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((20, 64, 64), dtype=np.uint8)
    for image in range(0, 20, 2):
        blobs = gaussian_filter(rng.random((64, 64)), 4.0)
        masks[image] = blobs > np.quantile(blobs, 0.97)
    maps = gaussian_filter(masks.astype(float), (0, 2, 2)) + 0.15 * rng.normal(size=masks.shape)
    return maps * 40.0 - 10.0, masks  # a raw scale, far outside [0, 1]


@pytest.mark.parametrize("seed", range(3))
def test_binned_is_close_to_exact(seed):
    maps, masks = realistic_case(seed)
    exact = aupro(torch.tensor(maps), torch.tensor(masks))
    assert 0.2 < exact < 0.99  # a case where the curve matters
    assert aupro(torch.tensor(maps), torch.tensor(masks), bins=1000) == pytest.approx(exact, abs=0.005)


def test_binned_fed_image_by_image_equals_one_batch():
    maps, masks = realistic_case(3)
    metric = ScoreHistogram(1000)
    for image in range(len(maps)):
        metric.update(torch.tensor(maps[image : image + 1]), DefectRegions.of(torch.tensor(masks[image : image + 1])))
    assert 1000 <= metric.counts.shape[1] <= 2000  # memory set by the bins, not the number of images
    one_batch = aupro(torch.tensor(maps), torch.tensor(masks), bins=1000)
    assert metric.aupro() == pytest.approx(one_batch, abs=1e-12)


def test_binned_equals_exact_when_every_score_is_a_bin_edge():
    """Scores on a grid of 1/8 are their own bin edges once the grid is at least that fine."""
    maps, masks = small_case(2, 1.0, 0.0)
    maps = np.round(maps * 8) / 8
    assert aupro(torch.tensor(maps), torch.tensor(masks), bins=1000) == pytest.approx(
        brute_force_aupro(maps, masks), abs=1e-12
    )

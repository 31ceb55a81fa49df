import numpy as np
import pytest
import torch
from scipy.stats import norm

from ad_lightning.heads import Normalizer

QUARTILE = float(norm.ppf(0.75))  # the MAD of a normal distribution in stds: 1 / 1.4826


def fitted(values: list[float] | torch.Tensor, mode: str = "minmax") -> Normalizer:
    n = Normalizer(mode)
    n.fit(torch.as_tensor(values, dtype=torch.float32))
    return n


@pytest.mark.parametrize("n_values", [10, 25])
def test_ten_or_more_ordinary_values_give_exactly_the_plain_min_max(n_values):
    values = torch.randn(n_values, generator=torch.Generator().manual_seed(n_values)) * 3 + 10
    probe = torch.linspace(0, 20, 41)
    v = values.double().numpy()
    want = ((probe.double().numpy() - v.min()) / (v.max() - v.min())).astype(np.float32)
    assert torch.equal(fitted(values)(probe), torch.from_numpy(want))


def test_ten_or_more_ordinary_values_give_the_plain_z_score():
    values = torch.randn(30, generator=torch.Generator().manual_seed(1)) * 2 - 4
    probe = torch.tensor([-8.0, -4.0, 0.0])
    v = values.double().numpy()
    want = (probe.double().numpy() - v.mean()) / v.std(ddof=1)
    assert np.allclose(fitted(values, "zscore")(probe).numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["minmax", "zscore"])
@pytest.mark.parametrize("count", [3, 20])
def test_a_constant_split_scores_relative_deviations_not_huge_numbers(mode, count):
    n = fitted([5.0] * count, mode)
    got = n(torch.tensor([5.0, 5.05, 4.5]))
    # a 1 % deviation scores 10 (1e3 x the relative deviation), 10 % scores -100; the old 1e-12 clamp gave 5e10
    assert got.tolist() == pytest.approx([0.0, 10.0, -100.0], rel=1e-4)


def test_two_and_three_values_use_the_median_and_the_normal_scaled_mad():
    two = fitted([2.0, 4.0])  # median 3, MAD 1
    assert two(torch.tensor([3.0, 4.0, 1.0])).tolist() == pytest.approx([0.0, QUARTILE, -2 * QUARTILE], rel=1e-4)
    three = fitted([1.0, 2.0, 30.0], "zscore")  # median 2, |deviations| 1, 0, 28: MAD 1
    assert three(torch.tensor([2.0, 3.0])).tolist() == pytest.approx([0.0, QUARTILE], rel=1e-4)


def test_one_extreme_value_among_few_does_not_set_the_scale():
    ordinary = [0.9, 0.95, 1.0, 1.05, 1.1]
    with_outlier, without = fitted([*ordinary, 50.0]), fitted([*ordinary, 1.02])
    assert 0.5 < float(with_outlier.scale) / float(without.scale) < 2  # min-max's range grows 245-fold
    spread = with_outlier(torch.tensor([0.9, 1.1]))
    assert 1.0 < float(spread[1] - spread[0]) < 4.0  # the ordinary values stay about 2 robust stds apart


def test_nine_values_are_few_ten_are_not():
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0]
    assert float(fitted(values).scale) == pytest.approx(2.0 / QUARTILE, rel=1e-4)  # median 4, MAD 2
    assert float(fitted([*values, 8.0]).scale) == 100.0  # max - min


def test_too_few_values_and_unfitted_use_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        fitted([1.0])
    with pytest.raises(RuntimeError, match="not fitted"):
        Normalizer()(torch.ones(1))
    with pytest.raises(ValueError, match="normalization must be one of"):
        Normalizer("rank")

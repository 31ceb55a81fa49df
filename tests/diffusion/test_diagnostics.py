"""noise_correlation: 1 for a denoiser that knows the noise, 0 for one that predicts a constant."""

import pytest
import torch

from ad_lightning.diffusion import linear_alpha_bar, noise_correlation

A = linear_alpha_bar(1000)


def z0_batch() -> torch.Tensor:
    return torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 3 + 2  # far from N(0, 1)


def correlation(eps_fn) -> float:
    return noise_correlation(z0_batch(), eps_fn, A, torch.Generator().manual_seed(0))


def test_the_true_noise_correlates_one():
    z0 = z0_batch()
    seen = []

    def oracle(x, t):
        seen.append(t)
        a = A[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * z0) / (1 - a).sqrt()

    assert correlation(oracle) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(seen[0], torch.full((4,), 999))  # asked at the last timestep, every image


def test_the_state_itself_is_almost_the_noise_at_the_last_timestep():
    assert correlation(lambda x, t: x) > 0.99
    assert correlation(lambda x, t: -2 * x) < -0.99


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_a_constant_prediction_correlates_zero(value):
    assert correlation(lambda x, t: torch.full_like(x, value)) == pytest.approx(0.0, abs=1e-6)


def test_an_unrelated_prediction_correlates_near_zero():
    other = torch.Generator().manual_seed(5)
    assert abs(correlation(lambda x, t: torch.randn(x.shape, generator=other))) < 0.05


def test_the_same_generator_seed_gives_the_same_number():
    noisy = lambda x, t: x + torch.sin(3 * x)  # noqa: E731
    assert correlation(noisy) == correlation(noisy)

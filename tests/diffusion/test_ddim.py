import math

import pytest
import torch

from ad_lightning.diffusion import (
    ddim_denoise,
    ddim_invert,
    ddim_step,
    linear_alpha_bar,
    predict_x0,
    q_sample,
    space_timesteps,
)

A = linear_alpha_bar(1000)


def oracle(z0):
    """A network that returns the true noise of any state on z0's deterministic trajectory."""
    calls = []

    def eps_fn(x, t):
        calls.append(int(t[0]))
        a = A[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * z0) / (1 - a).sqrt()

    return eps_fn, calls


@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_oracle_round_trip_returns_input(steps):
    z0 = torch.randn(2, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps_fn, calls = oracle(z0)
    grid = space_timesteps(1000, steps)
    x_top = ddim_invert(z0, eps_fn, A, grid, final_alpha=None)
    back = ddim_denoise(x_top, eps_fn, A, grid[::-1], final_alpha=None)
    assert torch.allclose(back, z0, atol=1e-6, rtol=0)
    assert not torch.allclose(x_top, z0, atol=1e-2)  # the trip really went somewhere
    assert calls == grid[:-1] + grid[::-1][:-1]


def test_invad_inversion_ends_in_noise_predicted_at_top_of_grid():
    """Pins InvAD's convention: eps at the source t, last step to alpha 0, NFE = S."""
    z0 = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    seen = []

    def eps_fn(x, t):
        seen.append((int(t[0]), x.clone()))
        return 0.1 * x + 0.01 * t.double().view(-1, 1, 1, 1)

    z_T = ddim_invert(z0, eps_fn, A, [0, 500, 999], final_alpha=0.0)
    assert [t for t, _ in seen] == [0, 500, 999]
    t_last, x_last = seen[-1]
    assert torch.allclose(z_T, eps_fn(x_last, torch.tensor([t_last])), atol=1e-12)


def test_ddim_step_formula_by_hand():
    x, eps = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    a_t, a_next = 0.64, 0.36
    x0 = (2.0 - 0.6 * 0.5) / 0.8
    assert float(predict_x0(x, eps, a_t)) == pytest.approx(x0)
    assert float(ddim_step(x, eps, a_t, a_next)) == pytest.approx(0.6 * x0 + 0.8 * 0.5)


def test_final_alpha_one_returns_clean_prediction():
    z0 = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    eps_fn, _ = oracle(z0)
    x_t = q_sample(z0, float(A[200]), torch.randn_like(z0))
    out = ddim_denoise(x_t, eps_fn, A, [200, 100, 0], final_alpha=1.0)
    assert torch.allclose(out, z0, atol=1e-9)


def test_q_sample_per_sample_levels():
    z0, noise = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    out = q_sample(z0, torch.tensor([0.25, 0.81]), noise)
    assert torch.allclose(out.flatten(), torch.tensor([0.5, 0.9]))
    assert float(q_sample(torch.ones(1), 0.25, torch.ones(1))) == pytest.approx(0.5 + math.sqrt(0.75))


def test_direction_is_checked():
    z0 = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="ascending"):
        ddim_invert(z0, lambda x, t: x, A, [500, 0])
    with pytest.raises(ValueError, match="descending"):
        ddim_denoise(z0, lambda x, t: x, A, [0, 500])

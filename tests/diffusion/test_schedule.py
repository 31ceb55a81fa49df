import pytest
import torch

from ad_lightning.diffusion import linear_alpha_bar, space_timesteps


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0, 0.9999), (333, 0.31862), (500, 0.077797), (666, 0.010984), (999, 4.0358e-5)],
)
def test_alpha_bar_matches_methods_values(t, expected):
    a = linear_alpha_bar(1000)
    assert a.dtype == torch.float64
    assert float(a[t]) == pytest.approx(expected, rel=1e-4)


def test_alpha_bar_is_decreasing_in_unit_interval():
    a = linear_alpha_bar(1000)
    assert a.shape == (1000,)
    assert torch.all(a[1:] < a[:-1]) and 0.0 < float(a[-1]) < float(a[0]) < 1.0


@pytest.mark.parametrize(
    ("steps", "grid"),
    [
        (1, [0]),
        (2, [0, 999]),
        (3, [0, 500, 999]),
        (4, [0, 333, 666, 999]),
        (5, [0, 250, 500, 749, 999]),
    ],
)
def test_space_timesteps_grids(steps, grid):
    assert space_timesteps(1000, steps) == grid


def test_space_timesteps_with_start_is_config_not_code():
    assert space_timesteps(1000, 3, start=333) == [333, 666, 999]
    assert space_timesteps(1000, 2, start=100, end=200) == [100, 200]


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=3, start=900, end=901), dict(steps=2, end=1000)])
def test_space_timesteps_rejects_bad_grids(kwargs):
    with pytest.raises(ValueError):
        space_timesteps(1000, **kwargs)


def test_bad_schedule_rejected():
    with pytest.raises(ValueError, match="beta_start"):
        linear_alpha_bar(1000, beta_start=0.02, beta_end=1e-4)

"""`irf_bank`: PatchCore's memory bank over the inverse residual field (alone or beside the features)."""

import pytest
import torch

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import build_head
from ad_lightning.heads.irf import inverse_residual

ALPHA_BAR = linear_alpha_bar(1000)
C, H, W = 6, 5, 7


def eps_fn(x, t):
    """A fixed 'network': the noise it predicts is a smooth function of the state, so residuals vary."""
    return torch.tanh(0.5 * x) + 0.01 * t.float().view(-1, 1, 1, 1) / 1000


def normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def fitted(**kwargs):
    head = build_head("irf_bank", coreset_ratio=1.0, aggregate=1, blur_sigma=None, **kwargs)
    head.fit_train([normal(8, 0), normal(8, 1)], eps_fn, ALPHA_BAR)
    return head


def test_the_signal_is_the_features_beside_the_inverse_residual():
    head = build_head("irf_bank", t_star=300)
    z0 = normal(2, 5)
    r, _ = inverse_residual(z0, eps_fn, ALPHA_BAR, 300, "noise_free")
    a = float(ALPHA_BAR[300])  # r = z0 - (x - sqrt(1 - a) eps) / sqrt(a) with x = sqrt(a) z0, by hand
    by_hand = z0 - (a**0.5 * z0 - (1 - a) ** 0.5 * eps_fn(a**0.5 * z0, torch.full((2,), 300))) / a**0.5
    torch.testing.assert_close(r, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.signal(z0, eps_fn, ALPHA_BAR), torch.cat([z0, r], dim=1))
    alone = build_head("irf_bank", signal="residual", t_star=300)
    torch.testing.assert_close(alone.signal(z0, eps_fn, ALPHA_BAR), r)
    assert head.nfe == 1 and build_head("patchcore").nfe == 0


def test_each_channel_is_scaled_to_unit_spread_over_the_training_patches():
    head = fitted()
    assert head.memory_bank.shape == (16 * H * W, 2 * C)  # every position kept at ratio 1
    torch.testing.assert_close(head.memory_bank.std(0), torch.ones(2 * C), rtol=1e-4, atol=1e-4)


def test_the_map_maximum_lands_on_the_changed_position_and_scores_it_higher():
    head = fitted(signal="residual")
    z0 = normal(2, 9)
    z0[1, :, 0, W - 1] += 6.0  # top-right corner of the second image
    out = head.evaluate(z0, eps_fn, ALPHA_BAR)
    score, maps = head.score(out)
    assert maps.shape == (2, H, W)
    assert divmod(int(maps[1].argmax()), W) == (0, W - 1)
    assert score[1] > score[0]


def test_state_dict_round_trip_scores_identically():
    head = fitted()
    fresh = build_head("irf_bank", coreset_ratio=1.0, aggregate=1, blur_sigma=None)
    fresh.load_state_dict(head.state_dict())
    z0 = normal(3, 4)
    torch.testing.assert_close(fresh.evaluate(z0, eps_fn, ALPHA_BAR).map, head.evaluate(z0, eps_fn, ALPHA_BAR).map)


@pytest.mark.parametrize("bad", [{"signal": "noise"}, {"input": "blurry"}, {"t_star": [100, 200]}, {"t_star": 1000}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="irf"):
        build_head("irf_bank", **bad)


def test_config_holds_every_setting_defaults_included_also_those_forwarded_to_patchcore():
    head = build_head("irf_bank", num_timesteps=1000, coreset_ratio=0.5, t_star=100, seed=3)
    assert head.config == {
        "signal": "both", "t_star": 100, "input": "noise_free", "seed": 3, "num_timesteps": 1000,  # its own
        "coreset_ratio": 0.5, "aggregate": 3, "count_padding": True, "projection_dim": 128,  # forwarded
        "num_neighbors": 9, "chunk": 4096, "blur_sigma": 4.0,
    }  # fmt: skip
    assert build_head("ensemble").config == {"weights": {"irf": 1.0, "irf_bank": 1.0}, "normalization": "zscore"}

"""RADAR's `layers` option: only the designated attention layers make the map (checked with scipy's KL)."""

import numpy as np
import torch
from scipy.stats import entropy

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import RadarHead

A = linear_alpha_bar(1000)


def attention(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-stochastic attention of two heads over the positions of x [B, C, h, w] -> [B, 2, h*w, h*w]."""
    q = x[:, :2].flatten(2)  # [B, C, h, w] -> [B, 2, h*w]
    return torch.softmax(scale * q[..., :, None] * q[..., None, :], dim=-1)


def eps_fn_with(layer_1_scale: float):
    """A stand-in denoiser with two attention layers: layer 0 over the 4 x 4 feature grid, layer 1 over a
    2 x 2 grid; `layer_1_scale` changes layer 1 alone."""

    def eps_fn(x, t, return_attention=False):
        coarse = torch.nn.functional.avg_pool2d(x, 2)  # [B, C, 4, 4] -> [B, C, 2, 2]
        layers = [attention(x, 1.0), attention(coarse, layer_1_scale)]
        return (x, layers) if return_attention else x

    return eps_fn


def kl_map_by_hand(train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """Per query position, scipy's KL of the test image's head-averaged layer-0 row from the training mean row."""
    rows = lambda z: attention(z, 1.0).mean(1).double().numpy()  # [B, 2, N, N] -> [B, N, N]
    mean_rows = rows(train).mean(0)  # [N, N]
    test_rows = rows(test)
    kl = [[entropy(test_rows[b, i], mean_rows[i]) for i in range(16)] for b in range(len(test))]
    return np.array(kl).reshape(len(test), 4, 4)


def fitted(layers, eps_fn, train) -> RadarHead:
    head = RadarHead(map="attention", layers=layers)
    head.fit_train(iter(train.split(5)), eps_fn, A)
    return head


def test_layers_0_maps_the_divergence_of_that_layer_alone():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(20, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    head = fitted([0], eps_fn_with(1.0), train)
    assert sorted(k for k in head.state_dict() if k.startswith("mean_rows")) == ["mean_rows_0"]
    got = head.evaluate(test, eps_fn_with(1.0), A).map
    np.testing.assert_allclose(got.numpy(), kl_map_by_hand(train, test), rtol=1e-4, atol=1e-6)
    # layer 1 changed (at fit and at scoring): the map does not move
    other = fitted([0], eps_fn_with(3.0), train).evaluate(test, eps_fn_with(3.0), A).map
    assert torch.equal(other, got)
    # every layer (the default): layer 1 adds its divergence, so the map differs
    both = fitted(None, eps_fn_with(1.0), train).evaluate(test, eps_fn_with(1.0), A).map
    assert (both - got).min() >= -1e-6 and (both - got).max() > 1e-3

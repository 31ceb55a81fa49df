import math

import pytest
import torch

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import ReconstructionHead

A = linear_alpha_bar(1000)


def oracle_for(z0):
    """The network that knows the clean sample: eps(x, t) = (x - sqrt(a_t) z0) / sqrt(1 - a_t)."""

    def eps_fn(x, t):
        a = A[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * z0) / (1 - a).sqrt()

    return eps_fn


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_oracle_network_with_small_p_gives_a_near_zero_map(steps):
    z0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    head = ReconstructionHead(perturbation=0.1, steps=steps)
    out = head.evaluate(z0, oracle_for(z0.float()), A)
    assert out.map.shape == (2, 3, 3) and float(out.map.max()) < 1e-8
    # a network that predicts no noise cannot undo the perturbation: the map is far from zero
    assert float(head.evaluate(z0, lambda x, t: torch.zeros_like(x), A).map.max()) > 1e-2


def test_grid_nfe_and_seeded_perturbation():
    head = ReconstructionHead(perturbation=0.2, steps=5)
    assert head.t_p == 200 and head.timesteps == [200, 160, 120, 80, 40] and head.nfe == 5
    assert ReconstructionHead(perturbation=0.2, steps=1).timesteps == [200]
    calls = []
    z0 = torch.zeros(2, 3, 2, 2)
    head.evaluate(z0, lambda x, t: calls.append(x) or torch.zeros_like(x), A)
    first = calls[0]
    assert torch.equal(first[0], first[1])  # one noise field shared by the batch
    a = float(A[200])
    noise = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(first[0], math.sqrt(1 - a) * noise)


def test_cosine_distance_and_image_score_is_max():
    z0 = torch.randn(1, 4, 3, 3)
    out = ReconstructionHead(distance="cosine").evaluate(z0, lambda x, t: -x, A)
    assert torch.all(out.map >= -1e-6) and torch.all(out.map <= 2 + 1e-6)
    assert torch.equal(out.score, out.map.flatten(1).amax(1))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="perturbation"):
        ReconstructionHead(perturbation=0.0)
    with pytest.raises(ValueError, match="steps"):
        ReconstructionHead(perturbation=0.002, steps=5)

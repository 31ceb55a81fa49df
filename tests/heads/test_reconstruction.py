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


def test_paper_grid_denoises_from_grid_index_p_s_to_a_0():
    """S = 5, p = 0.4: k = 2 on [0, 250, 500, 749, 999]; noised to 500, the network called at 500 and 250."""
    head = ReconstructionHead(perturbation=0.4, steps=5, grid="paper")
    calls = []
    z0 = torch.zeros(1, 3, 2, 2)
    head.evaluate(z0, lambda x, t: calls.append((int(t[0]), x)) or torch.zeros_like(x), A)
    assert [t for t, _ in calls] == [500, 250] and head.nfe == 2
    noise = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(calls[0][1][0], math.sqrt(1 - float(A[500])) * noise)  # x_500 of z0 = 0


def test_paper_grid_with_the_oracle_ends_at_the_level_a_0_not_the_clean_sample():
    z0 = torch.randn(2, 4, 3, 3)
    out = ReconstructionHead(perturbation=0.4, steps=5, grid="paper").evaluate(z0, oracle_for(z0), A)
    noise = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(0))
    a0 = float(A[0])  # 0.9999: the state is sqrt(a_0) z0 + sqrt(1 - a_0) noise
    expected = ((1 - math.sqrt(a0)) * z0 - math.sqrt(1 - a0) * noise).pow(2).sum(1)
    assert torch.allclose(out.map, expected, rtol=1e-3, atol=1e-7) and float(expected.max()) > 1e-5


# S = 10: the grid is [0, 111, 222, ...] (999 / 9 = 111); S = 5: [0, 250, 500, 749, 999]
CELLS = [(0.1, 10, [111]), (0.2, 10, [222, 111]), (0.8, 5, [999, 749, 500, 250])]


@pytest.mark.parametrize(("perturbation", "steps", "calls"), CELLS)
def test_paper_cells_nfe_is_p_times_s(perturbation, steps, calls):
    head = ReconstructionHead(perturbation=perturbation, steps=steps, grid="paper")
    called = []
    head.evaluate(torch.zeros(1, 1, 1, 1), lambda x, t: called.append(int(t[0])) or x, A)
    assert called == calls and head.nfe == len(calls)


@pytest.mark.parametrize(("perturbation", "steps"), [(0.1, 5), (0.2, 3), (1.0, 5), (0.4, 1)])
def test_empty_paper_cells_are_refused(perturbation, steps):
    with pytest.raises(ValueError, match=rf"p = {perturbation}, S = {steps}.*empty cell"):
        ReconstructionHead(perturbation=perturbation, steps=steps, grid="paper")


def test_unknown_grid_is_refused_naming_it():
    with pytest.raises(ValueError, match="grid in .*'Paper'"):
        ReconstructionHead(grid="Paper")

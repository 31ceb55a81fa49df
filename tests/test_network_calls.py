"""Every head's declared NFE is the number of denoiser calls its scoring makes, and heads scored together
share the calls they declare alike (the ensemble of irf and irf_bank: one call, not two)."""

import pytest
import torch

from conftest import EASY_SIZE
from ad_lightning.lit import FeatureDDPM


@pytest.fixture(scope="module")
def counted(easy_model):
    """The easy model (every head fitted) with its denoiser calls counted per `score_batch`."""
    model = FeatureDDPM.from_checkpoint(str(easy_model.ckpt)).eval()
    calls = []
    network = model.eps_fn

    def counting(x, t, return_attention=False):
        calls.append(int(t[0]))
        return network(x, t, return_attention=return_attention)

    model.eps_fn = counting
    return model, calls


@pytest.mark.parametrize("head", ["likelihood", "irf", "irf_bank", "radar", "reconstruction", "patchcore", "ensemble"])
def test_a_head_alone_makes_its_declared_calls(counted, head):
    model, calls = counted
    calls.clear()
    model.score_batch(torch.rand(2, 3, EASY_SIZE, EASY_SIZE), heads=[head])
    assert len(calls) == model.heads[head].nfe, calls


def test_heads_scored_together_share_calls_and_scores(counted):
    model, calls = counted
    assert model.heads["ensemble"].members == ["irf", "irf_bank"] and model.heads["ensemble"].nfe == 1
    image = torch.rand(2, 3, EASY_SIZE, EASY_SIZE, generator=torch.Generator().manual_seed(0))
    calls.clear()
    together = model.score_batch(image)
    declared = set().union(*(head.network_calls for head in model.heads.values()))
    assert len(calls) == len(declared) == sum(head.nfe for head in model.heads.values()) - 2  # irf_bank, ensemble
    for name in model.heads:
        alone = model.score_batch(image, heads=[name])[name]
        assert torch.equal(alone.score, together[name].score), name
        assert (alone.maps is None) == (together[name].maps is None) and (
            alone.maps is None or torch.equal(alone.maps, together[name].maps)
        ), name

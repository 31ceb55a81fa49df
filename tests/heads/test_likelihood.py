import pytest
import torch

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import HeadOutput, LikelihoodHead, Normalizer, build_head, to_image_map

A = linear_alpha_bar(1000)


def test_one_step_latent_is_the_predicted_noise_and_terms_by_hand():
    z0 = torch.randn(2, 5, 4, 4)
    head = LikelihoodHead(steps=1)
    out = head.evaluate(z0, lambda x, t: 2.0 * x, A)  # S = 1: z_T = eps(z0, 0) = 2 z0
    z_T = 2.0 * z0
    m = z_T.pow(2).sum(1).sqrt()
    assert torch.allclose(out.map, m, atol=1e-5)
    assert torch.allclose(out.terms["nll"], 0.5 * z_T.pow(2).sum((1, 2, 3)), rtol=1e-5)
    assert torch.allclose(out.terms["sp"], m.amax((1, 2)) - m.amin((1, 2)), atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_nfe_equals_steps(steps):
    calls = []
    head = LikelihoodHead(steps=steps)
    head.evaluate(torch.zeros(1, 2, 2, 2), lambda x, t: calls.append(int(t[0])) or x, A)
    assert head.nfe == steps == len(calls)


def test_score_uses_fitted_normalisers():
    head = build_head("likelihood", steps=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        head.score(HeadOutput({"nll": torch.ones(2), "sp": torch.ones(2)}, None))
    head.fit(HeadOutput({"nll": torch.linspace(10.0, 30.0, 11), "sp": torch.linspace(1.0, 3.0, 11)}, None))
    score, _ = head.score(HeadOutput({"nll": torch.tensor([20.0, 40.0]), "sp": torch.tensor([1.0, 5.0])}, None))
    assert torch.allclose(score, torch.tensor([0.5 + 0.0, 1.5 + 2.0]))


def test_normalizer_state_round_trips_through_state_dict():
    a = Normalizer("zscore")
    a.fit(torch.tensor([1.0, 2.0, 3.0]))
    b = Normalizer("zscore")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(torch.tensor([4.0])), b(torch.tensor([4.0])))
    assert float(b(torch.tensor([3.0]))) == pytest.approx(0.6745, rel=1e-3)  # 3 values: (3 - median 2) / (1.4826 MAD 1)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="likelihood"):
        build_head("nope")
    with pytest.raises(ValueError, match="normalization"):
        Normalizer("sigmoid")


def test_to_image_map_upsamples_and_blurs():
    m = torch.zeros(1, 4, 4)
    m[0, 1:3, 1:3] = 1.0  # a 2x2 plateau keeps its peak under bilinear upsampling
    up = to_image_map(m, (32, 32))
    assert up.shape == (1, 32, 32) and float(up.max()) == pytest.approx(1.0)
    blurred = to_image_map(m, (32, 32), blur_sigma=4.0)
    assert float(blurred.max()) < float(up.max())
    assert float(blurred.sum()) == pytest.approx(float(up.sum()), rel=0.05)

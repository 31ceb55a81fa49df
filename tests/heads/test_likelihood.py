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


@pytest.mark.parametrize("inversion", ["official", "paper_text"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_nfe_equals_steps(steps, inversion):
    calls = []
    head = LikelihoodHead(steps=steps, inversion=inversion)
    head.evaluate(torch.zeros(1, 2, 2, 2), lambda x, t: calls.append(int(t[0])) or x, A)
    assert head.nfe == steps == len(calls)


@pytest.mark.parametrize(("inversion", "called_at"), [("official", [0, 500, 999]), ("paper_text", [0, 333, 666])])
def test_inversion_variants_call_the_network_where_invad_says(inversion, called_at):
    calls = []
    LikelihoodHead(steps=3, inversion=inversion).evaluate(
        torch.zeros(2, 2, 2, 2), lambda x, t: calls.append(t.tolist()) or x, A
    )
    assert calls == [[t, t] for t in called_at]  # one timestep per call, shared by the batch


def test_official_returns_the_noise_and_paper_text_the_state_at_a_999():
    """With the network that knows the clean sample x*, every inversion step lands on
    sqrt(a') x* + sqrt(1 - a') e: `official` ends at level 0 (e itself), `paper_text` at a_999."""
    g = torch.Generator().manual_seed(1)
    x_star, e = 10.0 * torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)

    def oracle(x, t):  # the noise of x relative to x*, in float64 to keep the division by sqrt(1 - a_0) exact
        a = A[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x_star.double()) / (1 - a).sqrt()).float()

    z0 = (A[0].sqrt() * x_star.double() + (1 - A[0]).sqrt() * e.double()).float()  # the state at t = 0
    a_top = float(A[999])
    expected = {"official": e, "paper_text": a_top**0.5 * x_star + (1 - a_top) ** 0.5 * e}
    assert (expected["paper_text"] - e).abs().max() > 0.05  # the two answers are told apart below
    for inversion, z_T in expected.items():
        out = LikelihoodHead(steps=3, inversion=inversion).evaluate(z0, oracle, A)
        assert torch.allclose(out.map, torch.linalg.vector_norm(z_T, dim=1), atol=2e-3), inversion
        assert torch.allclose(out.terms["nll"], 0.5 * z_T.pow(2).sum((1, 2, 3)), rtol=1e-3), inversion


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
    with pytest.raises(ValueError, match="inversion.*'paper'"):
        LikelihoodHead(inversion="paper")


def test_to_image_map_upsamples_and_blurs():
    m = torch.zeros(1, 4, 4)
    m[0, 1:3, 1:3] = 1.0  # a 2x2 plateau keeps its peak under bilinear upsampling
    up = to_image_map(m, (32, 32))
    assert up.shape == (1, 32, 32) and float(up.max()) == pytest.approx(1.0)
    blurred = to_image_map(m, (32, 32), blur_sigma=4.0)
    assert float(blurred.max()) < float(up.max())
    assert float(blurred.sum()) == pytest.approx(float(up.sum()), rel=0.05)

import torch

from ad_lightning.diffusion import SharedCalls, linear_alpha_bar
from ad_lightning.heads.irf import IRFHead
from ad_lightning.heads.irf_bank import ResidualBankHead


class Counting:
    """A toy eps_fn (a fixed channel mix of x, shifted by t) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def __call__(self, x, t, return_attention=False):
        self.calls += 1
        eps = torch.einsum("dc,bchw->bdhw", self.mix, x) + t.float().view(-1, 1, 1, 1) / 1000
        return (eps, []) if return_attention else eps


def test_the_same_state_is_one_call_and_the_first_prediction():
    net = Counting()
    shared = SharedCalls(net)
    x, t = torch.randn(2, 4, 3, 3), torch.full((2,), 200)
    first = shared(x, t)
    again = shared(x.clone(), t.clone())  # equal values, another tensor
    assert again is first and net.calls == 1


def test_another_state_timestep_or_shape_is_another_call():
    net = Counting()
    shared = SharedCalls(net)
    x, t = torch.randn(2, 4, 3, 3), torch.full((2,), 200)
    shared(x, t)
    nudged = x.clone()
    nudged[1, 2, 0, 0] = torch.nextafter(nudged[1, 2, 0, 0], torch.tensor(float("inf")))  # one ulp apart
    assert torch.equal(shared(nudged, t), Counting()(nudged, t))
    shared(x, torch.full((2,), 201))
    shared(x[:1], t[:1])
    assert net.calls == 4


def test_attention_calls_are_always_made():
    net = Counting()
    shared = SharedCalls(net)
    x, t = torch.randn(1, 4, 3, 3), torch.full((1,), 20)
    shared(x, t, return_attention=True)
    shared(x, t, return_attention=True)
    assert net.calls == 2


def test_irf_and_irf_bank_share_their_call_and_score_as_alone():
    """Both heads query the denoiser at t* on sqrt(a) z0: one call for both, and the same outputs as when each
    head has the network to itself."""
    alpha_bar = linear_alpha_bar(1000)
    irf, bank = IRFHead(t_star=200), ResidualBankHead(t_star=200, coreset_ratio=1.0, num_neighbors=1)
    normal = [torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(1))]
    irf.fit_train(normal, Counting(), alpha_bar)
    bank.fit_train(normal, Counting(), alpha_bar)
    z0 = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    net = Counting()
    shared = SharedCalls(net)
    together = irf.evaluate(z0, shared, alpha_bar), bank.evaluate(z0, shared, alpha_bar)
    alone = irf.evaluate(z0, Counting(), alpha_bar), bank.evaluate(z0, Counting(), alpha_bar)
    assert net.calls == 1 and irf.network_calls == bank.network_calls
    for a, b in zip(together, alone):
        assert torch.equal(a.map, b.map) and all(torch.equal(a.terms[k], b.terms[k]) for k in a.terms)


def test_network_calls_keys_tell_shared_states_apart():
    assert IRFHead(t_star=200).network_calls == ResidualBankHead(t_star=200).network_calls
    assert IRFHead(t_star=200).network_calls != ResidualBankHead(t_star=100).network_calls
    assert IRFHead(t_star=200, input="clean").network_calls != ResidualBankHead(t_star=200).network_calls
    stochastic = lambda head, seed: head(t_star=200, input="stochastic", seed=seed).network_calls
    assert stochastic(IRFHead, 0) == stochastic(ResidualBankHead, 0) != stochastic(ResidualBankHead, 1)
    assert IRFHead(t_star=[100, 200]).network_calls > ResidualBankHead(t_star=200).network_calls

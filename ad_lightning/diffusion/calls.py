"""One scoring pass's denoiser calls, shared between heads (docs/methods.md section 9).

`irf` and `irf_bank` both query the denoiser at t* on the same noise-free state sqrt(a) z0; scored in one
pass, the second query is answered from the first call, so an ensemble of the two costs one network
evaluation per image, not two.
"""

from __future__ import annotations

from torch import Tensor

from ad_lightning.diffusion.ddim import EpsFn


class SharedCalls:
    """An `eps_fn` that remembers its calls for one pass: a query of a state x at timesteps t that was
    already made returns the first call's prediction. Exact: a hit needs bitwise-equal x and t (the
    same maths on the same z0 gives them), so sharing never changes a score. Calls that also return
    attention (RADAR's) are always made."""

    def __init__(self, eps_fn: EpsFn) -> None:
        self.eps_fn = eps_fn
        self._seen: list[tuple[Tensor, Tensor, Tensor]] = []  # (x, t, eps) of every plain call made

    def __call__(self, x: Tensor, t: Tensor, return_attention: bool = False):
        if return_attention:
            return self.eps_fn(x, t, return_attention=True)
        for seen_x, seen_t, eps in self._seen:
            if seen_x.shape == x.shape and seen_t.equal(t) and seen_x.equal(x):
                return eps
        eps = self.eps_fn(x, t)
        self._seen.append((x, t, eps))
        return eps

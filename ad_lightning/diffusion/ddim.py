"""Deterministic DDIM (eta = 0) as pure functions over tensors and an `eps_fn` (docs/methods.md section 4).

Notation: `a_t` is alpha_bar at timestep t; `eps_fn(x, t)` is the network's noise prediction for a
state `x` [B, C, h, w] at integer timesteps `t` [B]. One step moves x from t to any t':
inversion walks the grid upwards, denoising downwards; no head re-implements this.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor], Tensor]


def q_sample(z0: Tensor, a_t: Tensor | float, noise: Tensor) -> Tensor:
    """Forward process x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps; `a_t` a float or [B] tensor."""
    if isinstance(a_t, Tensor):
        a_t = a_t.to(z0.dtype).view(-1, *([1] * (z0.dim() - 1)))  # [B] -> [B, 1, 1, 1]
        return a_t.sqrt() * z0 + (1.0 - a_t).sqrt() * noise
    return math.sqrt(a_t) * z0 + math.sqrt(1.0 - a_t) * noise


def predict_x0(x: Tensor, eps: Tensor, a_t: float) -> Tensor:
    """x0_hat(x, t) = (x - sqrt(1 - a_t) eps) / sqrt(a_t)  (DDIM eq. 12, no clipping)."""
    return (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def ddim_step(x: Tensor, eps: Tensor, a_t: float, a_next: float) -> Tensor:
    """Move x from the level a_t to a_next: sqrt(a_next) x0_hat + sqrt(1 - a_next) eps."""
    return math.sqrt(a_next) * predict_x0(x, eps, a_t) + math.sqrt(1.0 - a_next) * eps


def ddim_sweep(
    x: Tensor,
    eps_fn: EpsFn,
    alpha_bar: Tensor,
    timesteps: Sequence[int],
    final_alpha: float | None = None,
) -> Tensor:
    """Walk x along `timesteps` (the state is at timesteps[0]); one NFE per step.

    Steps go timesteps[k] -> timesteps[k+1]; with `final_alpha` one more step goes from
    timesteps[-1] to the level final_alpha (0 gives the pure-noise latent, 1 the clean sample).
    NFE = len(timesteps) - 1, plus 1 with final_alpha.
    """
    levels = [float(alpha_bar[t]) for t in timesteps[1:]]
    if final_alpha is not None:
        levels.append(float(final_alpha))
    for t, a_next in zip(timesteps, levels):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, t_batch).to(x.dtype)
        x = ddim_step(x, eps, float(alpha_bar[t]), a_next)
    return x


def ddim_invert(
    z0: Tensor,
    eps_fn: EpsFn,
    alpha_bar: Tensor,
    timesteps: Sequence[int],
    final_alpha: float | None = 0.0,
) -> Tensor:
    """DDIM inversion: z0 is taken as the state at timesteps[0] and walked up the ascending grid.

    With final_alpha=0 (InvAD) the last step returns the noise predicted at the top of the grid,
    so NFE = len(timesteps); with None the state at timesteps[-1] is returned (NFE = S - 1).
    """
    if list(timesteps) != sorted(set(timesteps)):
        raise ValueError(f"inversion needs strictly ascending timesteps, got {list(timesteps)}")
    return ddim_sweep(z0, eps_fn, alpha_bar, timesteps, final_alpha)


def ddim_denoise(
    x_t: Tensor,
    eps_fn: EpsFn,
    alpha_bar: Tensor,
    timesteps: Sequence[int],
    final_alpha: float | None = None,
) -> Tensor:
    """DDIM denoising from the state at timesteps[0] down the descending grid.

    final_alpha=1.0 takes a last step to the clean sample (alpha_bar_{-1} = 1 convention).
    """
    if list(timesteps) != sorted(set(timesteps), reverse=True):
        raise ValueError(f"denoising needs strictly descending timesteps, got {list(timesteps)}")
    return ddim_sweep(x_t, eps_fn, alpha_bar, timesteps, final_alpha)

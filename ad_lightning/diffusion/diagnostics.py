"""Whether a trained denoiser has learned anything, as a pure function of `eps_fn` (docs/methods.md section 2).

At the last timestep the state x_T = sqrt(a_T) z0 + sqrt(1 - a_T) eps is almost pure noise (sqrt(a_T) is
0.006 on the linear schedule), so predicting eps there is the easiest task a denoiser has: any denoiser
that trained at all predicts something correlated with eps. A training run that diverged and collapsed
to a constant output (e.g. a learning rate too high for the denoiser's size) predicts zero everywhere,
correlation 0, and every head built on it scores at chance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ad_lightning.diffusion.ddim import EpsFn, q_sample


def noise_correlation(z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor, generator: torch.Generator) -> float:
    """Pearson correlation over every element between eps and eps_fn(x_T, T) for x_T drawn from z0
    [B, C, h, w] at the last timestep T = len(alpha_bar) - 1; 0 for a constant prediction."""
    t = len(alpha_bar) - 1
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    t_batch = torch.full((z0.shape[0],), t, device=z0.device, dtype=torch.long)
    predicted = eps_fn(q_sample(z0, float(alpha_bar[t]), noise), t_batch)
    pair = torch.stack([predicted.float().flatten(), noise.float().flatten()])  # [2, B*C*h*w]
    return float(torch.corrcoef(pair)[0, 1].nan_to_num())  # NaN (zero spread) -> 0

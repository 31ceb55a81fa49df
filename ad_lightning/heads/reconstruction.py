"""Baseline `reconstruction`: perturb, DDIM-denoise, compare (docs/methods.md section 8)."""

from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor

from ad_lightning.diffusion import EpsFn, ddim_denoise, q_sample, space_timesteps
from ad_lightning.heads.base import Head, HeadOutput, shared_noise

DISTANCES = ("l2", "cosine")


class ReconstructionHead(Head):
    """Noise z0 to t_p = round(p T) with one seeded noise field (shared by all images), DDIM-denoise
    in `steps` steps (t_p, ..., then to the clean sample; NFE = steps) and compare the result with z0
    per position: squared L2 or 1 - cosine. Image score = max of the map."""

    name = "reconstruction"
    sweeps = {"perturbation": "perturbation", "steps": "steps"}  # ablate options -> arguments, outermost first

    def __init__(
        self, perturbation: float = 0.2, steps: int = 5, distance: str = "l2", seed: int = 0, num_timesteps: int = 1000
    ) -> None:
        super().__init__()
        if not 0 < perturbation <= 1 or distance not in DISTANCES:
            raise ValueError(
                f"reconstruction needs 0 < perturbation <= 1 and distance in {DISTANCES}, got {perturbation}, {distance!r}"
            )
        self.t_p = min(round(perturbation * num_timesteps), num_timesteps - 1)
        if steps < 1 or steps > self.t_p + 1:
            raise ValueError(f"reconstruction steps must be in [1, {self.t_p + 1}] for t_p = {self.t_p}, got {steps}")
        # descending grid of `steps` points from t_p; the last step goes to the clean sample (alpha 1)
        self.timesteps = space_timesteps(num_timesteps, steps + 1, 0, self.t_p)[:0:-1]
        self.distance, self.seed = distance, seed

    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    def reconstruct(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> Tensor:
        x_t = q_sample(z0.float(), float(alpha_bar[self.t_p]), shared_noise(z0, self.seed).expand_as(z0))
        return ddim_denoise(x_t, eps_fn, alpha_bar, self.timesteps, final_alpha=1.0)

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        z0 = z0.float()
        recon = self.reconstruct(z0, eps_fn, alpha_bar)
        if self.distance == "l2":
            m = (z0 - recon).pow(2).sum(1)  # [B, C, h, w] -> [B, h, w]
        else:
            m = 1.0 - F.cosine_similarity(z0, recon, dim=1)
        return HeadOutput(terms={}, map=m, score=m.flatten(1).amax(1))

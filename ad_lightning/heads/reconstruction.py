"""Baseline `reconstruction`: perturb, DDIM-denoise, compare (docs/methods.md section 8)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ad_lightning.diffusion import EpsFn, ddim_denoise, q_sample, space_timesteps
from ad_lightning.heads.base import Head, HeadOutput, shared_noise

DISTANCES = ("l2", "cosine")
GRIDS = ("equal_nfe", "paper")


def paper_start_index(perturbation: float, steps: int) -> int | None:
    """InvAD's Table 4 cell (S, p): the index k = p S on the S-point grid that denoising starts from,
    or None where p S is not a whole number in [1, S - 1] (the paper leaves that cell empty)."""
    k = round(perturbation * steps)
    whole = abs(perturbation * steps - k) < 1e-9  # p is a binary fraction: 0.7 * 90 = 62.99999999999999
    return k if whole and 1 <= k < steps else None


class ReconstructionHead(Head):
    """Noise z0 with one seeded noise field (shared by all images), DDIM-denoise it and compare the
    result with z0 per position: squared L2 or 1 - cosine. Image score = max of the map.

    `grid`: `equal_nfe` noises to t_p = round(p T) and denoises in `steps` steps (t_p, ..., then a last
    step to the clean sample; NFE = steps). `paper` is InvAD's Table 4 cell (S, p): on the grid
    space_timesteps(T, S) it noises to grid[k], k = p S, and walks the grid down to grid[0] = 0 (NFE = k),
    returning the state at level a_0 (0.9999, not 1); cells where p S is not a whole k >= 1 are refused."""

    name = "reconstruction"
    sweeps = {"perturbation": "perturbation", "steps": "steps"}  # ablate options -> arguments, outermost first

    def __init__(
        self,
        perturbation: float = 0.2,
        steps: int = 5,
        distance: str = "l2",
        seed: int = 0,
        num_timesteps: int = 1000,
        grid: str = "equal_nfe",
    ) -> None:
        super().__init__()
        if not 0 < perturbation <= 1 or distance not in DISTANCES or grid not in GRIDS:
            raise ValueError(
                f"reconstruction needs 0 < perturbation <= 1, distance in {DISTANCES} and grid in {GRIDS}, "
                f"got {perturbation}, {distance!r}, {grid!r}"
            )
        if grid == "paper":
            self.t_p, self.timesteps, self.final_alpha = self.paper_grid(perturbation, steps, num_timesteps)
        else:
            self.t_p, self.timesteps, self.final_alpha = self.equal_nfe_grid(perturbation, steps, num_timesteps)
        self.distance, self.seed = distance, seed

    @staticmethod
    def equal_nfe_grid(perturbation: float, steps: int, num_timesteps: int) -> tuple[int, list[int], float]:
        """t_p = round(p T), the `steps` descending points from t_p above 0, and a last step to alpha 1."""
        t_p = min(round(perturbation * num_timesteps), num_timesteps - 1)
        if steps < 1 or steps > t_p + 1:
            raise ValueError(f"reconstruction steps must be in [1, {t_p + 1}] for t_p = {t_p}, got {steps}")
        return t_p, space_timesteps(num_timesteps, steps + 1, 0, t_p)[:0:-1], 1.0

    @staticmethod
    def paper_grid(perturbation: float, steps: int, num_timesteps: int) -> tuple[int, list[int], None]:
        """t_p = grid[k], the walk grid[k], grid[k-1], ..., grid[0] = 0 and no final level: k steps, ending at a_0."""
        k = paper_start_index(perturbation, steps)
        if k is None:
            raise ValueError(
                f"reconstruction grid 'paper' needs p * S a whole number in [1, S - 1] (the grid index to denoise "
                f"from), got p = {perturbation}, S = {steps}: p * S = {perturbation * steps:g}, an empty cell of "
                "InvAD's Table 4; choose another p or S, or grid 'equal_nfe'"
            )
        grid = space_timesteps(num_timesteps, steps)
        return grid[k], grid[k::-1], None

    @property
    def nfe(self) -> int:
        """One evaluation per step between grid points, plus the step to the final level if any."""
        return len(self.timesteps) - 1 + (self.final_alpha is not None)

    def reconstruct(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> Tensor:
        x_t = q_sample(z0.float(), float(alpha_bar[self.t_p]), shared_noise(z0, self.seed).expand_as(z0))
        return ddim_denoise(x_t, eps_fn, alpha_bar, self.timesteps, final_alpha=self.final_alpha)

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        z0 = z0.float()
        recon = self.reconstruct(z0, eps_fn, alpha_bar)
        if self.distance == "l2":
            m = (z0 - recon).pow(2).sum(1)  # [B, C, h, w] -> [B, h, w]
        else:
            m = 1.0 - F.cosine_similarity(z0, recon, dim=1)
        return HeadOutput(terms={}, map=m, score=m.flatten(1).amax(1))

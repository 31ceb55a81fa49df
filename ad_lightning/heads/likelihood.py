"""Head `likelihood` (InvAD): latent likelihood after DDIM inversion (docs/methods.md section 5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ad_lightning.diffusion import EpsFn, ddim_invert, space_timesteps
from ad_lightning.heads.base import Head, HeadOutput, Normalizer

# how the S network evaluations are laid out on [start, end]: (grid points, level after the last one)
INVERSIONS = {
    "official": (0, 0.0),  # InvAD's code: S points, eps at each, then a last step to level 0 (the noise)
    "paper_text": (1, None),  # InvAD's text: S + 1 points, eps at the first S, the state at the top returned
}


class LikelihoodHead(Head):
    """Invert z0 along an S-step grid to the latent z_T and score it under N(0, I).

    `inversion`: `official` walks space_timesteps(T, S) and returns the noise predicted at its top
    (S = 3: eps at 0, 500, 999); `paper_text` walks space_timesteps(T, S + 1) and returns the state at
    its top point (S = 3: eps at 0, 333, 666, the state at 999). Both cost S network evaluations.

    Terms: `nll` = 0.5 ||z_T||^2 and `sp` = max - min of the spatial norm map
    m(i, j) = ||z_T[:, i, j]||_2. Image score = n(nll) + n(sp), each normaliser fitted on
    normal validation images; the anomaly map is m.
    """

    name = "likelihood"
    exportable = True  # plain tensor maths: `export` can trace it to ONNX
    sweeps = {"timesteps": "start", "steps": "steps"}  # ablate options -> arguments, outermost first

    def __init__(
        self,
        steps: int = 3,
        start: int = 0,
        end: int | None = None,
        num_timesteps: int = 1000,
        normalization: str = "minmax",
        inversion: str = "official",
    ) -> None:
        super().__init__()
        if inversion not in INVERSIONS:
            raise ValueError(f"likelihood inversion must be one of {tuple(INVERSIONS)}, got {inversion!r}")
        extra_point, self.final_alpha = INVERSIONS[inversion]
        self.timesteps = space_timesteps(num_timesteps, steps + extra_point, start, end)
        self.norms = nn.ModuleDict({"nll": Normalizer(normalization), "sp": Normalizer(normalization)})

    @property
    def nfe(self) -> int:
        """One evaluation per step between grid points, plus the step to the final level if any."""
        return len(self.timesteps) - 1 + (self.final_alpha is not None)

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        z_T = ddim_invert(z0.float(), eps_fn, alpha_bar, self.timesteps, final_alpha=self.final_alpha)
        m = torch.linalg.vector_norm(z_T, dim=1)  # [B, C, h, w] -> [B, h, w]
        flat = m.flatten(1)  # [B, h*w]
        nll = 0.5 * z_T.pow(2).flatten(1).sum(dim=1)
        return HeadOutput(terms={"nll": nll, "sp": flat.amax(1) - flat.amin(1)}, map=m)

    def fit(self, normal: HeadOutput) -> None:
        for key, norm in self.norms.items():
            norm.fit(normal.terms[key])

    def score(self, out: HeadOutput) -> tuple[Tensor, Tensor]:
        return self.norms["nll"](out.terms["nll"]) + self.norms["sp"](out.terms["sp"]), out.map

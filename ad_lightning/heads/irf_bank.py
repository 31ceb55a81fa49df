"""Head `irf_bank`: PatchCore's nearest-neighbour memory bank over the diffusion signal (docs/methods.md
section 12): the inverse residual field of OSD-IRF, alone or beside the backbone features, instead of a
per-position Gaussian. A diffusion head that borrows PatchCore's strongest idea."""

from __future__ import annotations

import torch
from torch import Tensor

from ad_lightning.diffusion import EpsFn
from ad_lightning.heads.irf import INPUTS, inverse_residual, residual_calls, timesteps_of
from ad_lightning.heads.patchcore import PatchCoreHead

SIGNALS = ("residual", "both")


class ResidualBankHead(PatchCoreHead):
    """A memory bank of the normal training positions' inverse residual r = z0 - x0_hat(x, t*) (`signal:
    residual`), or of [z0, r] (`both`), each channel divided by its spread over the training patches so
    neither part drowns the other; then as `patchcore`: 3 x 3 aggregation, coreset, nearest-neighbour map,
    re-weighted maximum. One network call (at `t_star`, state `input` as in `irf`; shared with `irf` at the
    same t* and input when both are scored in one pass)."""

    name = "irf_bank"
    scaled = True
    sweeps = {"timesteps": "t_star"}  # ablate options -> arguments

    def __init__(
        self,
        signal: str = "both",
        t_star: int = 200,
        input: str = "noise_free",
        seed: int = 0,
        num_timesteps: int = 1000,
        **bank,
    ) -> None:
        super().__init__(seed=seed, **bank)
        if signal not in SIGNALS or input not in INPUTS or not isinstance(t_star, int):
            raise ValueError(
                f"irf_bank needs signal in {SIGNALS}, input in {INPUTS} and one t_star, got {signal!r}, {input!r}, {t_star!r}"
            )
        self.t_star = timesteps_of(t_star, num_timesteps)[0]
        self.signal_kind, self.input = signal, input

    @property
    def nfe(self) -> int:
        return 1

    @property
    def network_calls(self) -> set[tuple]:
        return residual_calls([self.t_star], self.input, self.seed)  # irf's call at the same t* and input

    def signal(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> Tensor:
        """The residual [B, C, h, w], or [z0, residual] [B, 2C, h, w]."""
        r, _ = inverse_residual(z0, eps_fn, alpha_bar, self.t_star, self.input, self.seed)
        return r if self.signal_kind == "residual" else torch.cat([z0.float(), r], dim=1)

"""Head `irf` (OSD-IRF): one-step inverse residual field scored by a fitted Gaussian (METHODS.md section 6)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor

from ad_lightning.diffusion import EpsFn, predict_x0
from ad_lightning.heads.base import FittedState, Head, HeadOutput, shared_noise

INPUTS = ("clean", "noise_free", "stochastic")
REDUCTIONS = ("max", "topk")


class Gaussian(FittedState):
    """N(mu, Sigma + ridge I) per feature position (`position`) or shared by all (`global`), with full
    or diagonal covariance; fitted from streamed sums in float64. `distance` is the Mahalanobis map."""

    def __init__(self, per: str = "position", covariance: str = "full", ridge: float = 0.01) -> None:
        super().__init__()
        if per not in ("position", "global") or covariance not in ("full", "diagonal"):
            raise ValueError(
                f"Gaussian per must be position|global and covariance full|diagonal, got {per!r}, {covariance!r}"
            )
        self.per, self.covariance, self.ridge = per, covariance, ridge
        self.register_buffer("mean", torch.empty(0))  # [P, C], P = h*w positions or 1
        self.register_buffer("precision", torch.empty(0))  # [P, C, C] full, [P, C] diagonal

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def _vectors(self, r: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, P, C] with P = h*w (per position) or [B*h*w, 1, C] (global)."""
        if self.per == "position":
            return rearrange(r, "b c h w -> b (h w) c")
        return rearrange(r, "b c h w -> (b h w) 1 c")

    def fit(self, residuals: Iterable[Tensor]) -> None:
        n, total, outer = 0, 0.0, 0.0
        for r in residuals:
            v = self._vectors(r.double())
            n += v.shape[0]
            total = total + v.sum(0)  # [P, C]
            outer = outer + (torch.einsum("npc,npd->pcd", v, v) if self.covariance == "full" else v.pow(2).sum(0))
        if n < 2:
            raise ValueError(f"fitting a Gaussian needs at least 2 normal training samples, got {n}")
        mean = total / n
        if self.covariance == "full":
            cov = (outer - n * torch.einsum("pc,pd->pcd", mean, mean)) / (n - 1)
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
            # Sigma + ridge I is symmetric positive definite: invert through its Cholesky factor (stable,
            # and MKL's batched LU inverse fails after torch.set_num_threads(2) in torch 2.14.1)
            precision = torch.cholesky_inverse(torch.linalg.cholesky(cov + self.ridge * eye))  # [P, C, C]
        else:
            var = (outer - n * mean.pow(2)) / (n - 1)
            precision = 1.0 / (var.clamp_min(0) + self.ridge)  # [P, C]
        self.mean, self.precision = mean.float(), precision.float()

    def distance(self, r: Tensor) -> Tensor:
        """Mahalanobis distance of every position's vector: r [B, C, h, w] -> [B, h, w]."""
        if not self.fitted:
            raise RuntimeError(
                "the irf Gaussian is not fitted: it is fitted on normal training features during `fit`; "
                "use a checkpoint written by `python -m ad_lightning fit`"
            )
        b, _, h, w = r.shape
        d = rearrange(r.float(), "b c h w -> b (h w) c")
        if self.per == "position" and d.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features have {h}x{w} positions but the irf Gaussian was fitted on {self.mean.shape[0]}; "
                "score at the training image size, or use `gaussian: global`"
            )
        d = d - self.mean.to(d.device)
        precision = self.precision.to(d.device)
        if self.covariance == "full":
            squared = torch.einsum("bpc,pcd,bpd->bp", d, precision, d)
        else:
            squared = (d.pow(2) * precision).sum(-1)
        return squared.clamp_min(0).sqrt().view(b, h, w)  # [B, h*w] -> [B, h, w]


class IRFHead(Head):
    """One NFE at t*: residual r = z0 - x0_hat(x, t*), scored per position by a Gaussian fitted on
    the residuals of normal training images.

    `input`: the state fed at t*: `clean` (x = z0, as inversion does), `noise_free`
    (x = sqrt(a) z0) or `stochastic` (x = sqrt(a) z0 + sqrt(1 - a) e, e one seeded noise field
    shared by all images). Map = Mahalanobis distance; image score = its max, or the mean of the
    `topk` largest. Term `prior`: the same reduction of ||eps_theta|| per position, the score under
    the N(0, I) prior with nothing fitted.
    """

    name = "irf"
    needs_train_fit = True

    def __init__(
        self,
        t_star: int = 200,
        input: str = "noise_free",
        gaussian: str = "position",
        covariance: str = "full",
        ridge: float = 0.01,
        reduction: str = "max",
        topk: int = 8,
        seed: int = 0,
        num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if input not in INPUTS or reduction not in REDUCTIONS:
            raise ValueError(f"irf input must be one of {INPUTS} and reduction one of {REDUCTIONS}")
        if not 0 <= t_star < num_timesteps:
            raise ValueError(f"irf t_star must be in [0, {num_timesteps - 1}], got {t_star}")
        self.t_star, self.input, self.reduction, self.topk, self.seed = t_star, input, reduction, topk, seed
        self.gaussian = Gaussian(gaussian, covariance, ridge)

    @property
    def nfe(self) -> int:
        return 1

    def _state(self, z0: Tensor, a: float) -> Tensor:
        if self.input == "clean":
            return z0
        if self.input == "noise_free":
            return math.sqrt(a) * z0
        return math.sqrt(a) * z0 + math.sqrt(1.0 - a) * shared_noise(z0, self.seed)

    def residual(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """(r = z0 - x0_hat(x, t*), eps_theta(x, t*)), both [B, C, h, w]."""
        a = float(alpha_bar[self.t_star])
        x = self._state(z0.float(), a)
        eps = eps_fn(x, torch.full((z0.shape[0],), self.t_star, device=z0.device, dtype=torch.long)).float()
        return z0.float() - predict_x0(x, eps, a), eps

    def fit_train(self, batches: Iterable[Tensor], eps_fn: EpsFn, alpha_bar: Tensor) -> None:
        self.gaussian.fit(self.residual(z0, eps_fn, alpha_bar)[0].cpu() for z0 in batches)

    def _reduce(self, m: Tensor) -> Tensor:
        """[B, h, w] -> [B]: max, or mean of the top-k positions."""
        flat = m.flatten(1)
        if self.reduction == "max":
            return flat.amax(1)
        return flat.topk(min(self.topk, flat.shape[1]), dim=1).values.mean(1)

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        r, eps = self.residual(z0, eps_fn, alpha_bar)
        m = self.gaussian.distance(r)
        prior = self._reduce(torch.linalg.vector_norm(eps, dim=1))  # [B, C, h, w] -> [B, h, w] -> [B]
        return HeadOutput(terms={"prior": prior}, map=m)

    def score(self, out: HeadOutput) -> tuple[Tensor, Tensor]:
        return self._reduce(out.map), out.map

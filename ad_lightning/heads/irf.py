"""Head `irf` (OSD-IRF): one-step inverse residual field scored by a fitted Gaussian (docs/methods.md section 6)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor, nn

from ad_lightning.diffusion import EpsFn, predict_x0
from ad_lightning.heads.base import FittedState, Head, HeadOutput, shared_noise

INPUTS = ("clean", "noise_free", "stochastic")
REDUCTIONS = ("max", "topk")
SCORES = ("mahalanobis", "log_density")
RIDGE_MODES = ("absolute", "relative")


class Gaussian(FittedState):
    """N(mu, Sigma + lambda I) per feature position (`position`) or shared by all (`global`), with full
    or diagonal covariance; fitted from streamed sums in float64 (`start`, `update` per batch, `finish`).

    lambda is `ridge` (`absolute`), or `ridge` x trace(Sigma) / C per position (`relative`: a fraction
    of the mean variance, so the regularisation keeps its strength whatever the residual's scale,
    which grows as sqrt((1 - a) / a) with t*). `map` is the Mahalanobis distance d (`mahalanobis`), or
    the negative log-density without constants (`log_density`), 0.5 d^2 + 0.5 log|Sigma + lambda I|,
    which also counts how spread out each position's normal residuals are.
    """

    def __init__(
        self,
        per: str = "position",
        covariance: str = "full",
        ridge: float = 0.01,
        ridge_mode: str = "absolute",
        score: str = "mahalanobis",
    ) -> None:
        super().__init__()
        if per not in ("position", "global") or covariance not in ("full", "diagonal"):
            raise ValueError(
                f"Gaussian per must be position|global and covariance full|diagonal, got {per!r}, {covariance!r}"
            )
        if ridge_mode not in RIDGE_MODES or score not in SCORES:
            raise ValueError(
                f"irf ridge_mode must be one of {RIDGE_MODES} and score one of {SCORES}, got {ridge_mode!r}, {score!r}"
            )
        if not ridge > 0:
            raise ValueError(f"irf ridge must be positive (it keeps the covariance invertible), got {ridge}")
        self.per, self.covariance, self.ridge, self.ridge_mode, self.score = per, covariance, ridge, ridge_mode, score
        self.register_buffer("mean", torch.empty(0))  # [P, C], P = h*w positions or 1
        self.register_buffer("precision", torch.empty(0))  # [P, C, C] full, [P, C] diagonal
        if score == "log_density":
            self.register_buffer("log_det", torch.empty(0))  # [P], log|Sigma_p + lambda I|
        self.start()

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def _vectors(self, r: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, P, C] with P = h*w (per position) or [B*h*w, 1, C] (global)."""
        if self.per == "position":
            return rearrange(r, "b c h w -> b (h w) c")
        return rearrange(r, "b c h w -> (b h w) 1 c")

    def start(self) -> None:
        """Reset the streamed count, sum [P, C] and sum of outer products [P, C, C] (squares [P, C])."""
        self._n, self._total, self._outer = 0, 0.0, 0.0

    def update(self, r: Tensor) -> None:
        """Add a batch of normal residuals [B, C, h, w] to the sums."""
        v = self._vectors(r.double())
        self._n += v.shape[0]
        self._total = self._total + v.sum(0)  # [P, C]
        self._outer = self._outer + (torch.einsum("npc,npd->pcd", v, v) if self.covariance == "full" else v.pow(2).sum(0))

    def _lambda(self, variances: Tensor) -> Tensor:
        """The ridge per position [P] from the variances [P, C] of each position's channels."""
        if self.ridge_mode == "relative":
            return self.ridge * variances.mean(-1)  # trace / C
        return torch.full(variances.shape[:1], self.ridge, dtype=variances.dtype)

    def finish(self) -> None:
        """Mean, precision (and log-determinant) from the sums."""
        n = self._n
        if n < 2:
            raise ValueError(f"fitting a Gaussian needs at least 2 normal training samples, got {n}")
        mean = self._total / n
        if self.covariance == "full":
            cov = (self._outer - n * torch.einsum("pc,pd->pcd", mean, mean)) / (n - 1)  # [P, C, C]
            variances = cov.diagonal(dim1=-2, dim2=-1)  # [P, C], a view of cov
            variances += self._lambda(variances)[:, None]  # cov becomes Sigma + lambda I, in place
            # Sigma + lambda I is symmetric positive definite: invert through its Cholesky factor (stable,
            # and MKL's batched LU inverse fails after torch.set_num_threads(2) in torch 2.14.1)
            factor = torch.linalg.cholesky(cov)  # [P, C, C]
            precision = torch.cholesky_inverse(factor)
            log_det = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [P]
        else:
            var = ((self._outer - n * mean.pow(2)) / (n - 1)).clamp_min(0)  # [P, C]
            var = var + self._lambda(var)[:, None]
            precision, log_det = 1.0 / var, var.log().sum(-1)
        self.mean, self.precision = mean.float(), precision.float()
        if self.score == "log_density":
            self.log_det = log_det.float()
        self.start()

    def fit(self, residuals: Iterable[Tensor]) -> None:
        """Fit on normal residual batches [B, C, h, w], streamed."""
        self.start()
        for r in residuals:
            self.update(r)
        self.finish()

    def map(self, r: Tensor) -> Tensor:
        """The Mahalanobis distance or negative log-density of every position's vector: r [B, C, h, w] -> [B, h, w]."""
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
            squared = torch.einsum("bpc,pcd,bpd->bp", d, precision, d).clamp_min(0)
        else:
            squared = (d.pow(2) * precision).sum(-1).clamp_min(0)
        if self.score == "mahalanobis":
            m = squared.sqrt()
        else:
            m = 0.5 * squared + 0.5 * self.log_det.to(d.device)  # log_det [P] (or [1], global) broadcast over B
        return m.view(b, h, w)  # [B, h*w] -> [B, h, w]


def timesteps_of(t_star: int | list[int], num_timesteps: int) -> list[int]:
    """One t* or a list of distinct ones, each in [0, num_timesteps)."""
    t_stars = [t_star] if isinstance(t_star, int) else list(t_star)
    if not t_stars or len(set(t_stars)) != len(t_stars):
        raise ValueError(f"irf t_star must be one timestep or a list of distinct ones, got {t_star}")
    bad = [t for t in t_stars if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"irf t_star must be in [0, {num_timesteps - 1}], got {t_star}")
    return t_stars


def residual_calls(t_stars: list[int], input: str, seed: int) -> set[tuple]:
    """The keys of `inverse_residual`'s network calls at each t*: equal keys query bitwise-equal states."""
    return {("inverse_residual", t, input, seed if input == "stochastic" else None) for t in t_stars}


def inverse_residual(
    z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor, t_star: int, input: str = "noise_free", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """OSD-IRF's inverse residual field: one network call at t* on a deterministic (or seeded) state x
    built from z0 (`input`: `clean` x = z0, `noise_free` x = sqrt(a) z0, `stochastic` x = sqrt(a) z0 +
    sqrt(1 - a) e with one seeded field e); returns (r = z0 - x0_hat(x, t*), eps_theta(x, t*)), both
    [B, C, h, w]."""
    a = float(alpha_bar[t_star])
    z0 = z0.float()
    if input == "clean":
        x = z0
    elif input == "noise_free":
        x = math.sqrt(a) * z0
    else:
        x = math.sqrt(a) * z0 + math.sqrt(1.0 - a) * shared_noise(z0, seed)
    eps = eps_fn(x, torch.full((z0.shape[0],), t_star, device=z0.device, dtype=torch.long)).float()
    return z0 - predict_x0(x, eps, a), eps


class IRFHead(Head):
    """One NFE per t*: residual r = z0 - x0_hat(x, t*), scored per position by a Gaussian fitted on
    the residuals of normal training images.

    `input`: the state fed at t*: `clean` (x = z0, as inversion does), `noise_free`
    (x = sqrt(a) z0) or `stochastic` (x = sqrt(a) z0 + sqrt(1 - a) e, e one seeded noise field
    shared by all images). Map = the Gaussian's `score` map (Mahalanobis distance by default);
    image score = its max, or the mean of the `topk` largest. Term `prior`: the same reduction of
    ||eps_theta|| per position, the score under the N(0, I) prior with nothing fitted.

    `blur_sigma`: the Gaussian blur of its upsampled maps (None: the model's `blur_sigma`).
    `t_star` may list several timesteps: one Gaussian per t* (buffers `gaussians.<t*>.*`; one t*
    keeps `gaussian.*`), and the map and the prior's norm map are the means over t* of their maps,
    which have comparable scales (a Mahalanobis distance does not depend on the residual's scale).
    """

    name = "irf"
    exportable = True  # plain tensor maths: `export` can trace it to ONNX
    sweeps = {"timesteps": "t_star"}  # ablate options -> arguments
    needs_train_fit = True

    def __init__(
        self,
        t_star: int | list[int] = 200,
        input: str = "noise_free",
        gaussian: str = "position",
        covariance: str = "full",
        ridge: float = 0.01,
        ridge_mode: str = "absolute",
        score: str = "mahalanobis",
        reduction: str = "max",
        topk: int = 8,
        seed: int = 0,
        blur_sigma: float | None = None,
        num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if input not in INPUTS or reduction not in REDUCTIONS:
            raise ValueError(f"irf input must be one of {INPUTS} and reduction one of {REDUCTIONS}")
        if blur_sigma is not None and blur_sigma < 0:
            raise ValueError(f"irf blur_sigma must be >= 0 (None: the model's --model.blur_sigma), got {blur_sigma}")
        self.blur_sigma = blur_sigma
        self.t_stars = timesteps_of(t_star, num_timesteps)
        self.input, self.reduction, self.topk, self.seed = input, reduction, topk, seed
        make = lambda: Gaussian(gaussian, covariance, ridge, ridge_mode, score)
        if len(self.t_stars) == 1:
            self.gaussian = make()
        else:
            self.gaussians = nn.ModuleDict({str(t): make() for t in self.t_stars})

    @property
    def nfe(self) -> int:
        return len(self.t_stars)

    @property
    def network_calls(self) -> set[tuple]:
        return residual_calls(self.t_stars, self.input, self.seed)

    def _gaussians(self) -> list[Gaussian]:
        """One Gaussian per t*, in the order of `t_stars`."""
        return [self.gaussian] if len(self.t_stars) == 1 else [self.gaussians[str(t)] for t in self.t_stars]

    def residual(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor, t_star: int) -> tuple[Tensor, Tensor]:
        """(r = z0 - x0_hat(x, t*), eps_theta(x, t*)), both [B, C, h, w]."""
        return inverse_residual(z0, eps_fn, alpha_bar, t_star, self.input, self.seed)

    def fit_train(self, batches: Iterable[Tensor], eps_fn: EpsFn, alpha_bar: Tensor) -> None:
        """Every t*'s Gaussian from one pass over the normal training batches."""
        gaussians = self._gaussians()
        for g in gaussians:
            g.start()
        for z0 in batches:
            for t, g in zip(self.t_stars, gaussians):
                g.update(self.residual(z0, eps_fn, alpha_bar, t)[0].cpu())
        for g in gaussians:
            g.finish()

    def _reduce(self, m: Tensor) -> Tensor:
        """[B, h, w] -> [B]: max, or mean of the top-k positions."""
        flat = m.flatten(1)
        if self.reduction == "max":
            return flat.amax(1)
        return flat.topk(min(self.topk, flat.shape[1]), dim=1).values.mean(1)

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        maps, norms = [], []
        for t, g in zip(self.t_stars, self._gaussians()):
            r, eps = self.residual(z0, eps_fn, alpha_bar, t)
            maps.append(g.map(r))
            norms.append(torch.linalg.vector_norm(eps, dim=1))  # [B, C, h, w] -> [B, h, w]
        prior = self._reduce(torch.stack(norms).mean(0))  # [T*, B, h, w] -> [B, h, w] -> [B]
        return HeadOutput(terms={"prior": prior}, map=torch.stack(maps).mean(0))

    def score(self, out: HeadOutput) -> tuple[Tensor, Tensor]:
        return self._reduce(out.map), out.map

"""Peer `patchcore` (PatchCore, Roth et al., CVPR 2022) on the same standardised features as the
diffusion heads: a memory bank of normal patch vectors and a nearest-neighbour distance. No training
and no network call (NFE 0); it is the peer the diffusion heads are compared with in one `test` pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor

from ad_lightning.diffusion import EpsFn
from ad_lightning.features.backbone import aggregate
from ad_lightning.heads.base import Head, HeadOutput


def random_projection(vectors: Tensor, dim: int, seed: int) -> Tensor:
    """Seeded Gaussian projection [N, C] -> [N, dim] with entries N(0, 1/dim), which keeps pairwise
    distances up to a small factor (Johnson-Lindenstrauss). The vectors are returned unchanged when
    `dim` is 0 or does not reduce C (a projection could then only distort distances)."""
    c = vectors.shape[1]
    if dim == 0 or dim >= c:
        return vectors
    matrix = torch.randn(c, dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dim)
    return vectors @ matrix.to(vectors)


def coreset_size(n: int, ratio: float) -> int:
    """ceil(ratio * n), rounded first so 0.1 * 30 (3.0000000000000004 in floats) gives 3."""
    return max(1, math.ceil(round(ratio * n, 9)))


def greedy_coreset(vectors: Tensor, size: int, start: int) -> Tensor:
    """Greedy k-center selection: from `start`, repeatedly add the vector farthest from every centre
    chosen so far. Returns `size` distinct indices [size] into vectors [N, d]; the covering radius is
    at most twice the best possible with `size` centres.

    Each step costs one matrix-vector product with the stored [d, N] transpose (the fast layout on CPU)
    and never synchronises with the device, so the loop also runs well on a GPU.
    """
    vectors_t = vectors.t().contiguous()  # [N, d] -> [d, N]
    squared = vectors_t.pow(2).sum(0)  # [N]
    nearest_sq = torch.full_like(squared, math.inf)  # squared distance to the closest chosen centre
    chosen = torch.empty(size, dtype=torch.long, device=vectors.device)
    centre = torch.tensor([start], device=vectors.device)  # a [1] index tensor: no host round trip
    chosen[:1] = centre
    for i in range(1, size):
        # ||x||^2 + ||c||^2 - 2 x.c for every x at once: [1, d] @ [d, N] -> [1, N] -> [N]
        to_centre = squared + squared[centre] - 2 * (vectors_t.index_select(1, centre).t() @ vectors_t)[0]
        nearest_sq = torch.minimum(nearest_sq, to_centre).index_fill_(0, centre, -math.inf)  # never chosen twice
        centre = nearest_sq.argmax(dim=0, keepdim=True)
        chosen[i : i + 1] = centre
    return chosen


def nearest(queries: Tensor, bank: Tensor, k: int = 1, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The k nearest bank vectors of each query: (Euclidean distances [N, k], bank indices [N, k]),
    nearest first. Queries [N, C] go `chunk` at a time, so memory stays chunk x M for a bank [M, C].
    Candidates are ranked by ||b||^2 - 2 q.b (the squared distance less the query's own ||q||^2);
    the returned distances are computed from the differences, exact even where the expansion cancels."""
    bank_squared = bank.pow(2).sum(1)  # [M]
    distances, indices = [], []
    for q in queries.split(chunk):
        rank = torch.addmm(bank_squared, q, bank.t(), alpha=-2)  # [n, C] @ [C, M] -> [n, M]
        index = rank.argmin(1, keepdim=True) if k == 1 else rank.topk(k, dim=1, largest=False).indices  # [n, k]
        distances.append(torch.linalg.vector_norm(q[:, None] - bank[index], dim=-1))  # [n, k, C] -> [n, k]
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def reweighted_score(m_test: Tensor, s_star: Tensor, m_star: Tensor, bank: Tensor, num_neighbors: int) -> Tensor:
    """PatchCore's image score s = w s*, with w = 1 - exp(||m_test - m*||) / sum over N_b(m*) of
    exp(||m_test - m||): the softmax weight of m* among its b nearest bank vectors (m* itself among
    them), so a maximum whose bank neighbourhood is sparse counts more. Inputs per image: the
    max-map patch m_test [B, C], its distance s* [B] and nearest bank vector m* [B, C]."""
    support = nearest(m_star, bank, k=min(num_neighbors, bank.shape[0]))[1]  # [B, b]
    to_support = torch.linalg.vector_norm(m_test[:, None] - bank[support], dim=-1)  # [B, b, C] -> [B, b]
    weight = 1.0 - torch.exp(s_star - to_support.logsumexp(dim=1))  # softmax without overflow
    return weight * s_star


class PatchCoreHead(Head):
    """PatchCore on z0: a memory bank of locally aggregated normal training patches, coreset-reduced.

    `aggregate`: neighbourhood size of the patch average (odd; 1 = off); `count_padding`: count the
    zero padding at the border in that average (see `aggregate`), as the reference implementations do
    (on the demo's fabric, 0.97 against 0.93 image AUROC without it). `coreset_ratio`: the share
    of training patches kept by greedy k-center selection (1.0 keeps all), chosen on a random
    projection to `projection_dim` dims (0 = on the vectors themselves) from a first centre drawn
    with `seed`. Map = each position's distance to its nearest bank vector; image score = the map's
    maximum re-weighted by the bank neighbourhood of its nearest vector (`num_neighbors` b; 1 = the
    plain maximum), term `max_distance` = the maximum itself. `chunk` bounds the query vectors
    compared at once. `blur_sigma`: the Gaussian blur of the upsampled map (sigma 4 in the paper; None
    leaves it to the model's setting).
    """

    name = "patchcore"
    needs_train_fit = True
    scaled = False  # divide each channel by its spread on the training patches (the features are standardised)
    neutral_settings = ("chunk",)

    def __init__(
        self,
        aggregate: int = 3,
        count_padding: bool = True,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbors: int = 9,
        seed: int = 0,
        chunk: int = 4096,
        blur_sigma: float | None = 4.0,
    ) -> None:
        super().__init__()
        if aggregate < 1 or aggregate % 2 == 0:
            raise ValueError(f"patchcore aggregate must be an odd neighbourhood size >= 1 (1 = off), got {aggregate}")
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"patchcore coreset_ratio must be in (0, 1] (1 keeps every patch), got {coreset_ratio}")
        if projection_dim < 0 or num_neighbors < 1 or chunk < 1 or (blur_sigma is not None and blur_sigma < 0):
            raise ValueError(
                "patchcore needs projection_dim >= 0, num_neighbors >= 1, chunk >= 1 and blur_sigma >= 0, got "
                f"{projection_dim}, {num_neighbors}, {chunk}, {blur_sigma}"
            )
        self.aggregate, self.count_padding = aggregate, count_padding
        self.coreset_ratio, self.projection_dim = coreset_ratio, projection_dim
        self.num_neighbors, self.seed, self.chunk, self.blur_sigma = num_neighbors, seed, chunk, blur_sigma
        self.register_buffer("memory_bank", torch.empty(0))  # [M, C] after fitting
        self.register_buffer("scale", torch.empty(0))  # [C] per-channel spread when `scaled`, else empty

    @property
    def nfe(self) -> int:
        return 0

    def signal(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> Tensor:
        """The per-position vectors the bank is made of, before aggregation: here the features z0 themselves
        [B, C, h, w] (a subclass may bank another signal, e.g. the diffusion residual)."""
        return z0.float()

    def patches(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> Tensor:
        """Aggregated patch vectors of the signal of z0, each channel divided by its training spread when
        the head scales them: [B, C, h, w] -> [B, h*w, C']."""
        signal = aggregate(self.signal(z0, eps_fn, alpha_bar), self.aggregate, self.count_padding)
        vectors = rearrange(signal, "b c h w -> b (h w) c")
        return vectors / self.scale.to(vectors.device) if self.scale.numel() else vectors

    def subsample(self, vectors: Tensor) -> Tensor:
        """Indices of the coreset of vectors [N, C] (all of them, in order, at ratio 1)."""
        n = vectors.shape[0]
        if self.coreset_ratio == 1:
            return torch.arange(n, device=vectors.device)
        start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.seed)))
        projected = random_projection(vectors, self.projection_dim, self.seed)
        return greedy_coreset(projected, coreset_size(n, self.coreset_ratio), start)

    def fit_train(self, batches: Iterable[Tensor], eps_fn: EpsFn, alpha_bar: Tensor) -> None:
        self.scale = torch.empty(0)
        vectors = [self.patches(z0, eps_fn, alpha_bar).flatten(0, 1) for z0 in batches]  # [B, h*w, C] -> [B*h*w, C]
        if not vectors:
            raise ValueError(f"{self.name} needs normal training images to build its memory bank, got none")
        vectors = torch.cat(vectors)
        if self.scaled:  # each channel by its spread over the training patches, so no part drowns another
            self.scale = vectors.std(0).clamp_min(1e-6)  # [C]
            vectors = vectors / self.scale
        self.memory_bank = vectors[self.subsample(vectors)]

    def evaluate(self, z0: Tensor, eps_fn: EpsFn, alpha_bar: Tensor) -> HeadOutput:
        if self.memory_bank.numel() == 0:
            raise RuntimeError(
                f"the {self.name} memory bank is empty: it is built from the normal training features during "
                "`fit`; use a checkpoint written by `python -m ad_lightning fit`"
            )
        b, _, h, w = z0.shape
        bank = self.memory_bank.to(z0.device)
        m_test = self.patches(z0, eps_fn, alpha_bar)  # [B, h*w, C]
        distance, index = nearest(m_test.flatten(0, 1), bank, k=1, chunk=self.chunk)  # [B*h*w, 1] each
        distance, index = distance.view(b, h * w), index.view(b, h * w)
        s_star, at = distance.max(dim=1)  # the max-map position of each image
        rows = torch.arange(b, device=z0.device)
        score = s_star
        if self.num_neighbors > 1:
            score = reweighted_score(m_test[rows, at], s_star, bank[index[rows, at]], bank, self.num_neighbors)
        return HeadOutput(terms={"max_distance": s_star}, map=distance.view(b, h, w), score=score)

"""Head `ensemble`: a weighted sum of other heads' scores and maps, each normalised on the normal
validation split. No published system offers this; the README reports whether it helps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ad_lightning.heads.base import Head, HeadOutput, Normalizer


class EnsembleHead(Head):
    """Combines member heads (`weights`: name -> weight, by default {irf: 1, irf_bank: 1}).

    Its raw output is built from the members' final outputs (`combine`): terms = member image
    scores, map = member maps stacked [B, M, h, w]. Each member's score and map are z-scored with
    statistics of normal validation images, then summed with the weights. Members without a map
    contribute to the score only. NFE is the members' distinct network calls (set by `bind`): members
    that query the same state share one call (`irf` and `irf_bank` at one t*).
    """

    name = "ensemble"

    def __init__(self, weights: dict[str, float] | None = None, normalization: str = "zscore") -> None:
        super().__init__()
        self.weights = dict(weights or {"irf": 1.0, "irf_bank": 1.0})
        if not self.weights or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"ensemble weights must name member heads with non-negative weights, got {self.weights}")
        self.score_norms = nn.ModuleDict({m: Normalizer(normalization) for m in self.weights})
        self.map_norms = nn.ModuleDict({m: Normalizer(normalization) for m in self.weights})
        self._calls: set[tuple] = set()
        self.with_map: list[str] = []

    @property
    def members(self) -> list[str]:
        return list(self.weights)

    def resolved_settings(self) -> dict:
        return {"weights": self.weights}  # the default members are chosen in the constructor

    def bind(self, heads: dict[str, Head]) -> None:
        """Check the members exist and come before the ensemble; record their network calls."""
        missing = [m for m in self.members if m not in heads]
        if missing:
            raise ValueError(
                f"ensemble members {missing} are not configured heads {list(heads)}; add them to --model.heads before ensemble"
            )
        self._calls = set().union(*(heads[m].network_calls for m in self.members))

    @property
    def nfe(self) -> int:
        return len(self._calls)

    @property
    def network_calls(self) -> set[tuple]:
        return self._calls

    def combine(self, finals: dict[str, tuple[Tensor, Tensor | None]]) -> HeadOutput:
        """Members' (image score [B], map [B, h, w] or None) -> the ensemble's raw output."""
        self.with_map = [m for m in self.members if finals[m][1] is not None]
        maps = torch.stack([finals[m][1] for m in self.with_map], dim=1) if self.with_map else None  # [B, M, h, w]
        return HeadOutput(terms={m: finals[m][0] for m in self.members}, map=maps)

    def fit(self, normal: HeadOutput) -> None:
        for m in self.members:
            self.score_norms[m].fit(normal.terms[m])
        for i, m in enumerate(self.with_map):
            self.map_norms[m].fit(normal.map[:, i])

    def score(self, out: HeadOutput) -> tuple[Tensor, Tensor | None]:
        score = sum(self.weights[m] * self.score_norms[m](out.terms[m]) for m in self.members)
        if out.map is None:
            return score, None
        maps = sum(self.weights[m] * self.map_norms[m](out.map[:, i]) for i, m in enumerate(self.with_map))
        return score, maps

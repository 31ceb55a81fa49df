"""Scoring heads, all driven by the one trained denoiser."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from ad_lightning.heads.base import FittedState, Head, HeadOutput, Normalizer, Scores, to_image_map
from ad_lightning.heads.ensemble import EnsembleHead
from ad_lightning.heads.irf import IRFHead
from ad_lightning.heads.irf_bank import ResidualBankHead
from ad_lightning.heads.likelihood import LikelihoodHead
from ad_lightning.heads.patchcore import PatchCoreHead
from ad_lightning.heads.pooled import PooledDetectorHead
from ad_lightning.heads.radar import RadarHead
from ad_lightning.heads.reconstruction import ReconstructionHead

HEADS: dict[str, Callable[..., Head]] = {
    LikelihoodHead.name: LikelihoodHead,
    IRFHead.name: IRFHead,
    RadarHead.name: RadarHead,
    ReconstructionHead.name: ReconstructionHead,
    EnsembleHead.name: EnsembleHead,
    PatchCoreHead.name: PatchCoreHead,
    ResidualBankHead.name: ResidualBankHead,
    **{kind: partial(PooledDetectorHead, kind) for kind in ("iforest", "lof", "ocsvm")},
}


def build_head(name: str, num_timesteps: int = 1000, **kwargs) -> Head:
    """Instantiate a head by its registered name; `num_timesteps` goes to heads that walk the schedule."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
    if "num_timesteps" in inspect.signature(HEADS[name]).parameters:
        kwargs["num_timesteps"] = num_timesteps
    return HEADS[name](**kwargs)


__all__ = [
    "HEADS",
    "EnsembleHead",
    "FittedState",
    "Head",
    "HeadOutput",
    "IRFHead",
    "LikelihoodHead",
    "Normalizer",
    "PatchCoreHead",
    "PooledDetectorHead",
    "RadarHead",
    "ReconstructionHead",
    "ResidualBankHead",
    "Scores",
    "build_head",
    "to_image_map",
]

"""Scoring heads, all driven by the one trained denoiser."""

from __future__ import annotations

from ad_lightning.heads.base import Head, HeadOutput, Normalizer, Scores, to_image_map
from ad_lightning.heads.likelihood import LikelihoodHead

HEADS: dict[str, type[Head]] = {LikelihoodHead.name: LikelihoodHead}


def build_head(name: str, **kwargs) -> Head:
    """Instantiate a head by its registered name."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
    return HEADS[name](**kwargs)


__all__ = ["HEADS", "Head", "HeadOutput", "LikelihoodHead", "Normalizer", "Scores", "build_head", "to_image_map"]

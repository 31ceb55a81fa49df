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
    """Instantiate a head by its registered name; `num_timesteps` goes to heads that walk the schedule.
    The head keeps every setting it was built with, defaults included, in `config` (`resolved_arguments`
    and the head's own `resolved_settings`), so a checkpoint can tell when a default has changed since."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
    if "num_timesteps" in inspect.signature(HEADS[name]).parameters:
        kwargs["num_timesteps"] = num_timesteps
    head = HEADS[name](**kwargs)
    head.config = {**resolved_arguments(HEADS[name], kwargs), **head.resolved_settings()}
    return head


def resolved_arguments(factory: Callable, kwargs: dict) -> dict:
    """Every argument `factory(**kwargs)` is called with, the signature's defaults filled in. Arguments a
    class forwards through `**kwargs` to its parent are resolved against the parent's signature."""
    signature = inspect.signature(factory)
    bound = signature.bind(**kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            forwarded = arguments.pop(name)
            parent = next(base for base in factory.__mro__[1:] if "__init__" in vars(base))
            parent_parameters = inspect.signature(parent).parameters
            explicit = {k: v for k, v in arguments.items() if k in parent_parameters}
            arguments = {**resolved_arguments(parent, {**explicit, **forwarded}), **arguments}
    return arguments


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

"""Diffusion maths: schedule, timestep grids, DDIM and a training diagnostic, as pure functions; the
one-pass memo of denoiser calls that heads share."""

from ad_lightning.diffusion.calls import SharedCalls
from ad_lightning.diffusion.ddim import (
    EpsFn,
    ddim_denoise,
    ddim_invert,
    ddim_step,
    ddim_sweep,
    predict_x0,
    q_sample,
)
from ad_lightning.diffusion.diagnostics import noise_correlation
from ad_lightning.diffusion.schedule import linear_alpha_bar, space_timesteps

__all__ = [
    "SharedCalls",
    "EpsFn",
    "ddim_denoise",
    "ddim_invert",
    "ddim_step",
    "ddim_sweep",
    "linear_alpha_bar",
    "noise_correlation",
    "predict_x0",
    "q_sample",
    "space_timesteps",
]

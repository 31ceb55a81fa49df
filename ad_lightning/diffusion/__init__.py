"""Diffusion maths: schedule, timestep grids and DDIM, as pure functions."""

from ad_lightning.diffusion.ddim import (
    EpsFn,
    ddim_denoise,
    ddim_invert,
    ddim_step,
    ddim_sweep,
    predict_x0,
    q_sample,
)
from ad_lightning.diffusion.schedule import linear_alpha_bar, space_timesteps

__all__ = [
    "EpsFn",
    "ddim_denoise",
    "ddim_invert",
    "ddim_step",
    "ddim_sweep",
    "linear_alpha_bar",
    "predict_x0",
    "q_sample",
    "space_timesteps",
]

"""Noise schedule and timestep grids (docs/methods.md sections 2-3).

Everything here is float64 and stateless; the network is always called with the original
training index t in 0..T-1, whatever grid a head walks.
"""

from __future__ import annotations

import torch


def linear_alpha_bar(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for a linear beta schedule, float64 [T]."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def space_timesteps(
    num_timesteps: int, steps: int, start: int = 0, end: int | None = None
) -> list[int]:
    """`steps` evenly spaced training timesteps from `start` to `end` (default T-1), ascending.

    tau_k = round(start + k * (end - start) / (steps - 1)) with Python's round (half to even),
    so S=3 -> [0, 500, 999] and S=5 -> [0, 250, 500, 749, 999] as in InvAD's `space_timesteps`.
    S=1 -> [start].
    """
    end = num_timesteps - 1 if end is None else end
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start <= end < num_timesteps:
        raise ValueError(f"need 0 <= start <= end < {num_timesteps}, got start={start}, end={end}")
    if steps == 1:
        return [start]
    grid = [round(start + k * (end - start) / (steps - 1)) for k in range(steps)]
    if len(set(grid)) != steps:
        raise ValueError(f"{steps} steps do not fit between timesteps {start} and {end}")
    return grid

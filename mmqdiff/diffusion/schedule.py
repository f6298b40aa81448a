"""Noise schedule and sampling-step sequences, exactly as the DDIM / Q-Diffusion reference builds them."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch


def linear_betas(beta_start: float = 1e-4, beta_end: float = 0.02, num_diffusion_timesteps: int = 1000) -> torch.Tensor:
    """float64 linspace cast to float32, as the reference does."""
    return torch.from_numpy(np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)).float()


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """Betas from a model config's ``diffusion`` section (ermongroup layout); only ``linear`` exists there."""
    d = config.get("diffusion", {})
    if d.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"only the linear beta schedule is supported, got {d['beta_schedule']!r}")
    return linear_betas(d.get("beta_start", 1e-4), d.get("beta_end", 0.02), d.get("num_diffusion_timesteps", 1000))


def timesteps(num_steps: int, skip_type: str = "uniform", num_diffusion_timesteps: int = 1000) -> list[int]:
    """The reference step sequence in ascending t; sampling walks it in reverse (step index 0 = last entry).

    ``quad`` keeps its duplicated small-t entries (100 steps: 96 distinct values, max t 800). ``uniform`` needs
    ``num_steps`` to divide ``num_diffusion_timesteps``: otherwise the reference rule ``range(0, T, T // num_steps)``
    yields more than ``num_steps`` entries (3 steps: 4), which every consumer would count differently.
    """
    if not 1 <= num_steps <= num_diffusion_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_diffusion_timesteps}], got {num_steps}")
    if skip_type == "uniform":
        seq = list(range(0, num_diffusion_timesteps, num_diffusion_timesteps // num_steps))
        if len(seq) != num_steps:
            divisors = [d for d in range(1, num_diffusion_timesteps + 1) if num_diffusion_timesteps % d == 0]
            near = max(d for d in divisors if d < num_steps), min(d for d in divisors if d > num_steps)
            raise ValueError(f"skip_type 'uniform' needs num_steps to divide num_diffusion_timesteps="
                             f"{num_diffusion_timesteps}, got num_steps={num_steps} (the reference rule would give "
                             f"{len(seq)} steps); use a divisor such as {near[0]} or {near[1]}, or skip_type 'quad'")
        return seq
    if skip_type == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(num_diffusion_timesteps * 0.8), num_steps) ** 2]
    raise ValueError(f"skip_type must be 'uniform' or 'quad', got {skip_type!r}")


def alpha_bar(betas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """cumprod(1 - [0, betas])[t + 1], so that t = -1 gives 1 (the reference ``compute_alpha``)."""
    b = torch.cat([torch.zeros(1, dtype=betas.dtype, device=betas.device), betas])
    return (1 - b).cumprod(dim=0).index_select(0, t.long() + 1)

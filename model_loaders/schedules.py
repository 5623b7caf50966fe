"""Training noise schedules of the experts, as cumulative products of alphas.

Every expert carries its own ``alphas_cumprod`` table (T entries, float64). The sampler never
assumes two experts share one: ``samplers/noise_levels.py`` maps a common noise level sigma to each
expert's own continuous timestep.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020), rescaled so that any T matches T = 1000's range."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17), diffusers' squaredcos_cap_v2."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def betas_for(name: str, num_timesteps: int = 1000) -> torch.Tensor:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def alphas_cumprod_for(name: str, num_timesteps: int = 1000) -> torch.Tensor:
    return alphas_cumprod_from_betas(betas_for(name, num_timesteps))


def alphas_cumprod_at(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar at continuous timesteps ``t``, interpolated in log sigma between the table's entries.

    Log sigma is the quantity ``noise_levels`` interpolates (``samplers/noise_levels.py``), so a network
    told ``t`` sees the same noise level the sampler meant. Returns float64, clamped to the table.
    """
    table = alphas_cumprod.to(torch.float64)
    log_sigmas = (0.5 * ((1 - table) / table).log()).to(t.device)
    t = t.to(torch.float64).clamp(0, len(table) - 1)
    lo = t.floor().long().clamp(max=len(table) - 2)
    frac = t - lo
    log_sigma = log_sigmas[lo] + frac * (log_sigmas[lo + 1] - log_sigmas[lo])
    return torch.sigmoid(-2 * log_sigma)

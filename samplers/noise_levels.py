"""Noise levels: one common noise level, each expert at its own timestep.

Sampling runs on k-diffusion's variance-exploding noise levels, ``x = x0 + sigma * eps``
(Karras et al. 2022, eq. 1 with s(t) = 1). An expert trained as a variance-preserving DDPM with
``alpha_bar(t)`` sees the same point as ``x / sqrt(1 + sigma^2)`` at the timestep where

    sigma(t) = sqrt((1 - alpha_bar(t)) / alpha_bar(t))                  (Song et al. 2021, eq. 29)

equals the common sigma. Between table entries, ``log sigma`` is interpolated linearly, so the
timestep is continuous and never rounded: two experts with different schedules (linear, cosine,
any table) see exactly the noise level the sampler is at.
"""
from __future__ import annotations

from typing import Sequence

import torch


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of every training timestep, increasing with the index (float64)."""
    ac = alphas_cumprod.to(torch.float64)
    return ((1 - ac) / ac).sqrt()


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` for increasing ``xp``, clamped at both ends."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    frac = (x - x0) / (x1 - x0)
    return fp[idx - 1] + frac * (fp[idx] - fp[idx - 1])


def timestep_from_log_sigmas(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep ``t`` with ``sigma(t) = sigma`` for a table of ``log sigma(t)`` at
    t = 0, 1, ...: linear in log sigma between entries, clamped to the table's ends. Computed in
    the table's dtype on its device, so a sampler on a GPU keeps it there."""
    sigma = torch.as_tensor(sigma).to(log_sigmas)
    steps = torch.arange(len(log_sigmas), device=log_sigmas.device, dtype=log_sigmas.dtype)
    return interp(sigma.clamp_min(1e-30).log().flatten(), log_sigmas, steps).reshape(sigma.shape)


def timestep_from_sigma(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Continuous timestep ``t`` with ``sigma(t) = sigma``, interpolated in log sigma (float64).

    Sigmas outside the expert's range are clamped to its first or last timestep; the sampler keeps
    them inside the common range (:func:`common_sigma_range`).
    """
    return timestep_from_log_sigmas(sigma, sigmas_from_alphas_cumprod(alphas_cumprod).log())


def sigma_from_timestep(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`timestep_from_sigma`: ``sigma(t)`` for continuous ``t``."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    steps = torch.arange(len(log_sigmas), dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    return interp(t.flatten(), steps, log_sigmas).exp().reshape(t.shape)


def sigma_range(alphas_cumprod: torch.Tensor) -> tuple[float, float]:
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    return float(sigmas[0]), float(sigmas[-1])


def common_sigma_range(tables: Sequence[torch.Tensor], names: Sequence[str] | None = None,
                       factors: Sequence[int] | None = None) -> tuple[float, float]:
    """Intersection of the experts' sigma ranges; an empty intersection is an error. An expert at
    resolution factor k sees sigma / k (``bands``), so it serves k times its own range."""
    if not tables:
        raise ValueError("no experts: the common sigma range of an empty product is undefined")
    factors = factors or [1] * len(tables)
    ranges = [(lo * k, hi * k) for (lo, hi), k in zip((sigma_range(t) for t in tables), factors)]
    lo = max(r[0] for r in ranges)
    hi = min(r[1] for r in ranges)
    if lo >= hi:
        names = names or [f"expert {i}" for i in range(len(tables))]
        listed = "; ".join(f"{n}: [{a:.4g}, {b:.4g}]" for n, (a, b) in zip(names, ranges))
        raise ValueError(f"the experts' noise ranges do not overlap ({listed}), so no sigma is valid for all of them")
    return lo, hi


def scale_input(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The variance-preserving input ``x / sqrt(1 + sigma^2)`` of a point ``x = x0 + sigma * eps``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim:
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + sigma**2).sqrt()


def resample_table(alphas_cumprod: torch.Tensor, lo: float, hi: float, num: int | None = None) -> torch.Tensor:
    """An ``alphas_cumprod`` table with the same shape of schedule, restricted to ``[lo, hi]``.

    ComfyUI's schedulers read a model's sigma table; the product's table is the first expert's,
    cut to the common range, so that schedulers never ask for a sigma some expert cannot serve.
    """
    num = num or len(alphas_cumprod)
    t_lo = timestep_from_sigma(torch.tensor(lo), alphas_cumprod)
    t_hi = timestep_from_sigma(torch.tensor(hi), alphas_cumprod)
    t = torch.linspace(float(t_lo), float(t_hi), num, dtype=torch.float64)
    sigmas = sigma_from_timestep(t, alphas_cumprod)
    sigmas[0], sigmas[-1] = lo, hi
    return 1 / (1 + sigmas**2)

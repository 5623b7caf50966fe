"""The pack's own SDE step: Euler–Maruyama on the reverse-time diffusion SDE in variance-exploding
coordinates, ``x = x0 + sigma eps`` (Song et al. 2021, eq. 6 with f = 0, g^2 = d sigma^2 / dt).

Sampling runs sigma down from sigma_i to sigma_{i+1}. With ``delta = sigma_i^2 - sigma_{i+1}^2`` (the
diffusion's own variance over the step) and the score ``s = (denoised - x) / sigma_i^2 = -eps / sigma_i``
(Tweedie; Karras et al. 2022, eq. 3), one step is

    x_{i+1} = x_i + delta * s(x_i, sigma_i) + sqrt(delta) * z,        z ~ N(0, I).

Its injected noise is the diffusion's own (quadratic variation ``delta``), which is what SuperDiff's
Itô density estimator assumes (``superposition``), and its drift is the score at the step's start,
which is what the Feynman–Kac weights of ``particles`` are derived for. The step to sigma = 0 returns
the denoised prediction (the step's mean; its noise would be the whole last level). Flow models are
stepped in their VE view (``samplers/comfy/intervals.ve_view``).
"""
from __future__ import annotations

import math

import torch


def euler_maruyama_step(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
    """One Euler–Maruyama step of the reverse VE SDE from ``sigma`` to ``sigma_next`` (module docstring).
    ``noise`` is standard normal, drawn by the caller (so OR / AND can read it before the step)."""
    if sigma_next <= 0:
        return denoised
    if not math.isfinite(sigma):
        # From infinite noise the step's mean is the denoised image and its spread the next level's.
        return denoised + sigma_next * noise
    delta = sigma**2 - sigma_next**2
    return x + (delta / sigma**2) * (denoised - x) + math.sqrt(delta) * noise


def step_variance(sigma: float, sigma_next: float) -> float:
    """delta = sigma^2 - sigma_next^2: the diffusion's variance over the step (g^2 dt integrated)."""
    return sigma**2 - sigma_next**2

"""The pack's Euler–Maruyama step (samplers/sde.py): its transition on a Gaussian, the last step."""
from __future__ import annotations

import math

import torch

from unite_and_conquer.samplers import sde


def test_one_step_moves_by_delta_times_the_score_plus_the_diffusions_own_noise():
    """For data N(m, v) at sigma, the score is -(x - m) / (v + sigma^2): one step from a fixed x has
    mean x + delta * score and variance delta = sigma^2 - sigma_next^2."""
    m, v, s, s_next = 0.4, 0.5, 1.5, 1.2
    x = torch.full((20000, 1), 2.0, dtype=torch.float64)
    denoised = x - s**2 * (x - m) / (v + s**2)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sde.euler_maruyama_step(x, s, s_next, denoised, z)
    delta = s**2 - s_next**2
    assert sde.step_variance(s, s_next) == delta
    torch.testing.assert_close(out - math.sqrt(delta) * z, x - delta * (x - m) / (v + s**2))
    assert abs(float(out.var()) / delta - 1) < 0.03


def test_the_step_to_zero_is_the_denoised_image_and_from_infinity_its_spread_is_the_next_level():
    x = torch.randn(3, 2)
    d = torch.randn(3, 2)
    z = torch.randn(3, 2)
    assert torch.equal(sde.euler_maruyama_step(x, 0.3, 0.0, d, z), d)
    torch.testing.assert_close(sde.euler_maruyama_step(x, math.inf, 2.0, d, z), d + 2.0 * z)

"""The common-level map between VE, VP (eps, v) and rectified-flow models, on analytic Gaussians."""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.samplers import parameterization as par

MU, VAR = 0.7, 0.3


def ve_posterior(x, s):
    """E[x0 | x0 + s eps = x] for x0 ~ N(MU, VAR)."""
    return MU + VAR / (VAR + s**2) * (x - MU)


def flow_posterior(x_f, t):
    """E[x0 | (1 - t) x0 + t eps = x_f], written in the flow frame alone."""
    return MU + (1 - t) * VAR / ((1 - t) ** 2 * VAR + t**2) * (x_f - (1 - t) * MU)


def vp_posterior(z, ab):
    """E[x0 | sqrt(ab) x0 + sqrt(1 - ab) eps = z], written in the VP frame alone."""
    return MU + math.sqrt(ab) * VAR / (ab * VAR + 1 - ab) * (z - math.sqrt(ab) * MU)


@pytest.mark.parametrize("s", [0.02, 0.5, 1.0, 7.0, 80.0])
def test_flow_frame_is_the_ve_point_divided_by_one_plus_s(s):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    x_f, t = par.to_model_frame(par.FLOW, x0 + s * eps, torch.tensor(s))
    assert float(t) == pytest.approx(s / (1 + s))
    torch.testing.assert_close(x_f, (1 - t) * x0 + t * eps, atol=1e-5, rtol=1e-5)
    assert par.ve_level(float(t)) == pytest.approx(s, rel=1e-6)


@pytest.mark.parametrize("s", [0.05, 0.8, 3.0, 40.0])
def test_each_parameterisation_denoises_to_the_ve_posterior(s):
    """Each model's optimal raw output, computed in its own frame, converts to the same x0."""
    x = torch.linspace(-3, 3, 25, dtype=torch.float64).view(1, 1, 5, 5) * (1 + s)
    want = ve_posterior(x, s)
    ab = 1 / (1 + s**2)
    # eps model: input z = x / sqrt(1 + s^2), output the optimal eps
    z = par.vp_input(x, s)
    d = vp_posterior(z, ab)
    eps = (z - math.sqrt(ab) * d) / math.sqrt(1 - ab)
    torch.testing.assert_close(par.denoised_from_output("eps", eps, x, s), want)
    # v model: v = sqrt(ab) eps - sqrt(1 - ab) x0
    v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * d
    torch.testing.assert_close(par.denoised_from_output("v", v, x, s), want)
    # flow model at x_f = x / (1 + s), t = s / (1 + s): v = eps - x0
    x_f, t = par.to_model_frame(par.FLOW, x, torch.tensor(s, dtype=torch.float64))
    d_f = flow_posterior(x_f, float(t))
    v_f = (x_f - d_f) / float(t)
    torch.testing.assert_close(par.denoised_from_output("flow", v_f, x_f, t), want)
    torch.testing.assert_close(par.eps_from_denoised(x, want, s), (x - want) / s)


def test_ve_frame_is_unchanged():
    x, s = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 2.0])
    x_m, s_m = par.to_model_frame(par.VE, x, s)
    assert x_m is x and s_m is s


def test_per_row_levels_broadcast():
    x, s = torch.ones(2, 3, 4, 4), torch.tensor([1.0, 3.0])
    x_f, t = par.to_model_frame(par.FLOW, x, s)
    assert torch.equal(x_f[0], torch.full((3, 4, 4), 0.5)) and torch.equal(x_f[1], torch.full((3, 4, 4), 0.25))
    torch.testing.assert_close(t, torch.tensor([0.5, 0.75]))


def test_ranges_and_their_intersection():
    assert par.ve_range(par.VE, 0.03, 14.6) == (0.03, 14.6)
    lo, hi = par.ve_range(par.FLOW, 0.001, 1.0, below_one=0.999)
    assert lo == pytest.approx(0.001 / 0.999) and hi == pytest.approx(999.0)
    assert par.common_range([(0.03, 14.6), (lo, hi)]) == (0.03, 14.6)
    with pytest.raises(ValueError, match="has no level below 1"):
        par.ve_range(par.FLOW, 0.001, 1.0)
    with pytest.raises(ValueError, match=r"the models' noise ranges do not overlap \(a: \[0.1, 1\]; b: \[2, 3\]\)"):
        par.common_range([(0.1, 1.0), (2.0, 3.0)], ["a", "b"])
    with pytest.raises(ValueError, match="unknown frame"):
        par.to_model_frame("vp", torch.ones(1), torch.ones(1))

"""Variance-derived reliabilities (samplers/variance_reliability.py), on analytic learned-sigma experts."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_variance import LearnedSigmaGaussian
from model_loaders.schedules import alphas_cumprod_for
from samplers import bridge
from samplers import variance_reliability as vr


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [3.0, 250.5, 700.25, 990.0])
def test_x0_variance_is_recovered_from_the_learned_sigma_output(schedule, t):
    """v encodes the true reverse-step variance of N(mu, var) data; the implied Var[x0 | x_t] is the
    closed form var (1 - ab) / (ab var + 1 - ab), whatever the schedule."""
    table = alphas_cumprod_for(schedule)
    var = torch.tensor([0.05, 0.3, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    tt = torch.tensor([t])
    out = LearnedSigmaGaussian(table)(torch.zeros(1, 3, 2, 2), tt, torch.zeros(1, 3, 1, 1), var)
    v = out[:, 3:]
    assert v.min() >= -1 - 1e-5 and v.max() <= 1 + 1e-5
    coef = vr.step_coefficients(table, tt)
    got = vr.x0_variance(vr.learned_log_variance(v.double(), coef), coef)
    ab = 1 / (1 + bridge.sigma_from_timestep(tt.double(), table) ** 2)
    expected = var.double() * (1 - ab) / (ab * var.double() + 1 - ab)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-6)


def test_v_ends_are_beta_tilde_and_beta():
    table = alphas_cumprod_for("linear")
    coef = vr.step_coefficients(table, torch.tensor([100.0]))
    lo = vr.learned_log_variance(torch.full((1, 1), -1.0), coef)
    hi = vr.learned_log_variance(torch.full((1, 1), 1.0), coef)
    torch.testing.assert_close(lo.exp().flatten(), coef.beta_tilde)
    torch.testing.assert_close(hi.exp().flatten(), coef.beta)
    # On integer steps the coefficients are DDPM's (eq. 7).
    a = table.double()
    beta = 1 - a[100] / a[99]
    torch.testing.assert_close(coef.beta, beta.view(1))
    torch.testing.assert_close(coef.beta_tilde, (beta * (1 - a[99]) / (1 - a[100])).view(1))
    torch.testing.assert_close(coef.c0, (a[99].sqrt() * beta / (1 - a[100])).view(1))


def test_precision_reliabilities_are_normalised_precisions_per_pixel():
    v1 = torch.tensor([[1.0, 0.25]])
    v2 = torch.tensor([[0.5, 0.25]])
    a1, a2 = vr.precision_reliabilities([v1, v2])
    torch.testing.assert_close(a1, torch.tensor([[1 / 3, 0.5]]))
    torch.testing.assert_close(a2, torch.tensor([[2 / 3, 0.5]]))
    b1, b2 = vr.precision_reliabilities([v1, v2], reliabilities=[3.0, 1.0])
    torch.testing.assert_close(b1, torch.tensor([[0.6, 0.75]]))
    torch.testing.assert_close(b1 + b2, torch.ones(1, 2))


def test_reliabilities_from_outputs_favour_the_narrower_null_where_it_is_narrower():
    tables = [alphas_cumprod_for("linear"), alphas_cumprod_for("cosine")]
    sigma = torch.tensor([2.0])
    ts = [bridge.timestep_from_sigma(sigma, t).float() for t in tables]
    narrow_left = torch.tensor([0.2, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    outs = [LearnedSigmaGaussian(tab)(torch.zeros(1, 3, 1, 2), t, torch.zeros(1, 3, 1, 1), var)[:, 3:]
            for tab, t, var in zip(tables, ts, (narrow_left, narrow_left.flip(-1)))]
    a, b = vr.reliabilities_from_outputs(outs, tables, ts)
    # Var[x0 | x_t] at sigma 2: 0.2 * 4 / (0.2 + 4) = 0.1905 and 1 * 4 / 5 = 0.8: precisions 5.25 and 1.25.
    torch.testing.assert_close(a[0, 0, 0], torch.tensor([5.25 / 6.5, 1.25 / 6.5]), rtol=3e-3, atol=1e-4)
    torch.testing.assert_close(a + b, torch.ones_like(a))

"""The MCMC correctors at one noise level, on exact Gaussian scores.

For data N(0, 1) the level-sigma marginal in k-diffusion's x = x0 + sigma eps is N(0, 1 + sigma^2),
with denoised(x) = x / (1 + sigma^2). A corrector started from that marginal must keep it.
"""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.samplers import correctors as C

N = 4096


def gaussian_denoise(x, sigma):
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def start(sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 1, 1, generator=g) * math.sqrt(1 + sigma**2), g


def config(method, **kw):
    return C.CorrectorConfig(method=method, sigma_window=(0.0, math.inf), **kw)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
@pytest.mark.parametrize("method,kw", [("uhmc", {}), ("uhmc", {"leapfrog_steps": 3, "refresh": 0.2}),
                                       ("uhmc", {"refresh": 1.0, "step_scale": 1.0}), ("mala", {}),
                                       ("mala", {"energy": "simpson"})])
def test_exact_correctors_keep_the_marginal(method, kw, sigma):
    """U-HMC (BAOAB order) and MALA leave N(0, 1 + sigma^2) invariant at any step size."""
    v = 1 + sigma**2
    x, g = start(sigma)
    y = C.correct(gaussian_denoise, x, sigma, config(method, steps=30, **kw), g, {})
    se_mean, se_var = math.sqrt(v / N), v * math.sqrt(2 / N)
    assert abs(y.mean().item()) < 4 * se_mean
    assert abs(y.var().item() - v) < 4 * se_var, (y.var().item(), v)
    assert not torch.equal(x, y)  # it moved
    assert (y - x).std() > 0.3 * math.sqrt(v)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_ula_variance_follows_its_known_recursion(sigma):
    """ULA on N(0, V): x' = (1 - eps/V) x + sqrt(2 eps) z, so var' = (1 - eps/V)^2 var + 2 eps,
    which tends to V / (1 - eps / 2V): the unadjusted chain's known bias."""
    v = 1 + sigma**2
    cfg = config("ula", steps=30, step_scale=1.0)
    eps = C.step_size(sigma, cfg)
    expected = v
    for _ in range(cfg.steps):
        expected = (1 - eps / v) ** 2 * expected + 2 * eps
    x, g = start(sigma)
    y = C.correct(gaussian_denoise, x, sigma, cfg, g)
    assert abs(y.var().item() - expected) < 4 * expected * math.sqrt(2 / N)
    assert expected > v * 1.1  # the test can tell the biased law from the marginal
    small = config("ula", steps=30, step_scale=0.05)
    y = C.correct(gaussian_denoise, x, sigma, small, g)
    assert abs(y.var().item() - v) < 4 * v * math.sqrt(2 / N) and abs(y.mean().item()) < 4 * math.sqrt(v / N)


@pytest.mark.parametrize("method,kw,expected", [("ula", {"steps": 3}, 3), ("uhmc", {"steps": 3}, 3),
                                                ("uhmc", {"steps": 2, "leapfrog_steps": 4}, 8),
                                                ("mala", {"steps": 3}, 4),
                                                ("mala", {"steps": 3, "energy": "simpson"}, 7)])
def test_each_step_costs_the_documented_evaluations(method, kw, expected):
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_denoise(x, sigma)

    cfg = config(method, **kw)
    C.correct(counting, torch.randn(2, 3, 4, 4), 1.5, cfg, torch.Generator().manual_seed(0))
    assert len(calls) == expected == C.evaluations_per_level(cfg)
    assert set(calls) == {1.5}


def test_window_and_none():
    cfg = C.CorrectorConfig(method="ula", sigma_window=(0.1, 5.0))
    assert [C.in_window(s, cfg) for s in (0.0, 0.09, 0.1, 5.0, 5.01)] == [False, False, True, True, False]
    assert not C.in_window(0.0, C.CorrectorConfig(sigma_window=(0.0, 1.0)))
    assert not C.in_window(1.0, C.CorrectorConfig(method="none"))
    assert C.evaluations_per_level(C.CorrectorConfig(method="none")) == 0
    x = torch.randn(2, 1, 2, 2)

    def fail(*_):
        raise AssertionError("no evaluation outside the window")

    assert C.correct(fail, x, 6.0, cfg) is x


def test_same_generator_seed_same_result():
    x = torch.randn(8, 3, 2, 2)
    for method in ("ula", "uhmc", "mala"):
        cfg = config(method, steps=3)
        a = C.correct(gaussian_denoise, x, 1.0, cfg, torch.Generator().manual_seed(5), {})
        b = C.correct(gaussian_denoise, x, 1.0, cfg, torch.Generator().manual_seed(5), {})
        c = C.correct(gaussian_denoise, x, 1.0, cfg, torch.Generator().manual_seed(6), {})
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_line_integral_energy_estimates():
    """Trapezoid is exact for Gaussian (linear) scores; Simpson for quartic log-densities (cubic scores)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    lin = lambda z: -z / 2.0  # noqa: E731  log p = -|z|^2 / 4
    est = C.line_integral(lin, x, y, lin(x), lin(y), "trapezoid")
    torch.testing.assert_close(est, -(y**2).sum(1) / 4 + (x**2).sum(1) / 4, atol=1e-5, rtol=0)
    cubic = lambda z: -(z**3)  # noqa: E731  log p = -sum z^4 / 4
    est = C.line_integral(cubic, x, y, cubic(x), cubic(y), "simpson")
    torch.testing.assert_close(est, -(y**4).sum(1) / 4 + (x**4).sum(1) / 4, atol=1e-4, rtol=0)
    trap = C.line_integral(cubic, x, y, cubic(x), cubic(y), "trapezoid")
    assert (trap - est).abs().max() > 1e-2  # trapezoid is not exact there


def test_mala_acceptance_is_reported_and_high_for_small_steps():
    x, g = start(1.0)
    state = {}
    C.correct(gaussian_denoise, x[:256], 1.0, config("mala", steps=4, step_scale=0.05), g, state)
    assert state["acceptance"].shape == (256,) and state["acceptance"].mean() > 0.95
    C.correct(gaussian_denoise, x[:256], 1.0, config("mala", steps=4, step_scale=20.0), g, state)
    assert state["acceptance"].mean() < 0.5


@pytest.mark.parametrize("kw,message", [
    ({"method": "langevin"}, "unknown corrector method 'langevin'; expected one of ('none', 'ula', 'uhmc', 'mala')"),
    ({"energy": "midpoint"}, "unknown energy rule 'midpoint'; expected one of ('trapezoid', 'simpson')"),
    ({"step_scale": 0.0}, "corrector step_scale must be > 0, got 0.0"),
    ({"refresh": 0.0}, "momentum refresh must be in (0, 1], got 0.0"),
    ({"leapfrog_steps": 0}, "corrector steps must be >= 0 and leapfrog steps >= 1, got 2 and 0"),
    ({"sigma_window": (2.0, 1.0)}, "corrector sigma window must have 0 <= lo <= hi, got (2.0, 1.0)"),
])
def test_config_errors(kw, message):
    with pytest.raises(ValueError) as err:
        C.CorrectorConfig(**kw)
    assert str(err.value) == message

"""The closed forms the particle and OR / AND benchmarks score against (tests/support/analytic.py):
the mixture expert's eps and the mixture product's mode weights, checked by quadrature."""
from __future__ import annotations

import math

import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from support.analytic import GaussianEps, GaussianMixtureEps, mixture, mixture_product


def test_a_one_mode_mixture_expert_is_the_gaussian_expert():
    ac = alphas_cumprod_for("linear")
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100.0, 500.0, 900.0])
    mu, var = torch.full((1, 3, 2, 2), 0.4), torch.full((1, 3, 2, 2), 0.3)
    cond = mixture([0.4, 0.4], [0.3, 0.3], [1.0, 1.0], (3, 2, 2))
    got = GaussianMixtureEps(ac)(x, t, cond["mu"].expand(3, -1, -1, -1, -1), cond["var"].expand(3, -1, -1, -1, -1),
                                 cond["logpi"].expand(3, -1))
    torch.testing.assert_close(got, GaussianEps(ac)(x, t, mu, var), atol=1e-5, rtol=1e-5)


def test_the_mixture_eps_is_minus_sqrt_1_minus_ab_times_the_marginals_score():
    """At one level, eps* = -sqrt(1 - ab) grad log p_t: compare with autograd of the marginal mixture."""
    ac = alphas_cumprod_for("linear")
    t = torch.tensor([300.0])
    cond = mixture([-1.0, 1.0], [0.2, 0.5], [0.3, 0.7], (1, 1, 1))
    from unite_and_conquer.samplers import noise_levels

    sigma = float(noise_levels.sigma_from_timestep(t.double(), ac.double()))
    ab = 1 / (1 + sigma**2)
    x = torch.tensor([[[[0.3]]]], dtype=torch.float64, requires_grad=True)
    dens = sum(w * torch.exp(-(x - math.sqrt(ab) * m) ** 2 / (2 * (ab * v + 1 - ab))) / math.sqrt(2 * math.pi * (ab * v + 1 - ab))
               for m, v, w in ((-1.0, 0.2, 0.3), (1.0, 0.5, 0.7)))
    (grad,) = torch.autograd.grad(torch.log(dens).sum(), x)
    got = GaussianMixtureEps(ac)(x.detach().float(), t, cond["mu"], cond["var"], cond["logpi"])
    torch.testing.assert_close(got.double(), -math.sqrt(1 - ab) * grad, atol=1e-5, rtol=1e-4)


def test_the_mixture_products_mode_weights_agree_with_quadrature():
    """(0.5 N(-1, 0.2) + 0.5 N(1, 0.2)) N(0.3, 1) N(0, 1)^-0.5 N(0, 2)^-0.5 in one dimension."""
    one = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    modes = [(one(-1), one(0.2), 0.5), (one(1), one(0.2), 0.5)]
    factors = [(one(0.3), one(1.0), 1.0), (one(0.0), one(1.0), -0.5), (one(0.0), one(2.0), -0.5)]
    closed = mixture_product(modes, factors)
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64)

    def log_n(m, v):
        return -(x - m) ** 2 / (2 * v) - 0.5 * math.log(2 * math.pi * v)

    rest = sum(beta * log_n(float(m), float(v)) for m, v, beta in factors)
    mass = [float(torch.trapezoid(w * torch.exp(log_n(float(m), float(v)) + rest), x)) for m, v, w in modes]
    torch.testing.assert_close(torch.tensor([w for w, _, _ in closed]), torch.tensor(mass) / sum(mass),
                               atol=1e-6, rtol=0)
    density = [w * torch.exp(log_n(float(m), float(v)) + rest) for m, v, w in modes]
    for (_, mean, var), d in zip(closed, density):
        d = d / torch.trapezoid(d, x)
        mu = torch.trapezoid(x * d, x)
        assert abs(float(mean) - float(mu)) < 1e-6
        assert abs(float(var) - float(torch.trapezoid((x - mu) ** 2 * d, x))) < 1e-6

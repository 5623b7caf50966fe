"""Analytic experts: the exact optimal eps for Gaussian data under an expert's own schedule.

For data x0 ~ N(mu, diag(var)) and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, the marginal is
N(sqrt(ab) mu, ab var + 1 - ab), and the minimum-MSE noise prediction is

    eps*(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab var + 1 - ab).

``ab`` at a continuous timestep comes from the expert's own table through the same log-sigma
interpolation the sampler uses, so a wrong schedule bridge shows up as wrong statistics.
"""
from __future__ import annotations

import math

import torch

from unite_and_conquer.model_loaders.expert import Expert
from unite_and_conquer.samplers import noise_levels


class GaussianEps(torch.nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.calls = 0
        self.rows = 0

    def forward(self, x, t, mu, var):
        self.calls += 1
        self.rows += x.shape[0]
        sigma = noise_levels.sigma_from_timestep(t.double().cpu(), self.alphas_cumprod.cpu()).to(x.device)
        ab = (1 / (1 + sigma**2)).float().view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * var + 1 - ab)


def gaussian(mu: float, var: float, channels: int = 3) -> dict[str, torch.Tensor]:
    return {"mu": torch.full((1, channels, 1, 1), float(mu)), "var": torch.full((1, channels, 1, 1), float(var))}


def gaussian_expert(alphas_cumprod: torch.Tensor, name: str = "gauss", resolution: int = 4) -> Expert:
    return Expert(
        network=GaussianEps(alphas_cumprod), name=name, family="analytic", resolution=resolution,
        alphas_cumprod=alphas_cumprod,
        encoders={"gaussian": lambda mu, var: gaussian(mu, var)},
        null_condition=gaussian(0.0, 1.0),
    )


def product_gaussian(parts: list[tuple[float, float, float]], null_var: float = 1.0,
                     null_weight: float | None = None) -> tuple[float, float]:
    """Closed form of prod_i N(mu_i, v_i)^w_i / N(0, null_var)^(sum w - 1): (mean, var)."""
    total_w = sum(w for _, _, w in parts)
    prec = sum(w / v for _, v, w in parts) - (total_w - 1) / null_var
    mean = sum(w * m / v for m, v, w in parts) / prec
    return mean, 1 / prec


class LearnedSigmaGaussianNet(torch.nn.Module):
    """``[eps | v]`` for Gaussian data: the exact eps and IDDPM's variance values of the true
    reverse step (``benchmarks/bench_variance.LearnedSigmaGaussian``), as a network."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        from unite_and_conquer.benchmarks.bench_variance import LearnedSigmaGaussian

        self.inner = LearnedSigmaGaussian(alphas_cumprod)

    def forward(self, x, t, mu, var):
        return self.inner(x, t, mu, var)


def learned_sigma_gaussian_expert(alphas_cumprod: torch.Tensor, name: str = "gauss-learned",
                                  resolution: int = 4, null_var: float = 1.0) -> Expert:
    """An ``eps_learned_sigma`` analytic expert whose null is N(0, null_var)."""
    return Expert(
        network=LearnedSigmaGaussianNet(alphas_cumprod), name=name, family="analytic", resolution=resolution,
        alphas_cumprod=alphas_cumprod, prediction="eps_learned_sigma",
        encoders={"gaussian": lambda mu, var: gaussian(mu, var)},
        null_condition=gaussian(0.0, null_var),
    )


class GaussianMixtureEps(torch.nn.Module):
    """The exact eps for data ``sum_c pi_c N(mu_c, diag(var_c))`` (one mode for the whole image).
    Conditions: ``mu`` and ``var`` of shape 1 x C_modes x (image), ``logpi`` of shape 1 x C_modes. At
    x_t the marginal is ``sum_c pi_c N(sqrt(ab) mu_c, ab var_c + 1 - ab)``, so with responsibilities r_c

        eps*(x_t) = sqrt(1 - ab) sum_c r_c (x_t - sqrt(ab) mu_c) / (ab var_c + 1 - ab)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.calls = 0

    def forward(self, x, t, mu, var, logpi):
        self.calls += 1
        sigma = noise_levels.sigma_from_timestep(t.double().cpu(), self.alphas_cumprod.cpu()).to(x.device)
        ab = (1 / (1 + sigma**2)).double().view(-1, 1, 1, 1, 1)
        xd, mean = x.double().unsqueeze(1), ab.sqrt() * mu.double()
        spread = ab * var.double() + 1 - ab
        log_n = (-(xd - mean) ** 2 / (2 * spread) - 0.5 * torch.log(2 * torch.pi * spread)).flatten(2).sum(2)
        r = torch.softmax(log_n + logpi.double(), dim=1).view(*log_n.shape, 1, 1, 1)
        return ((1 - ab[:, 0]).sqrt() * (r * (xd - mean) / spread).sum(1)).to(x.dtype)


def mixture(mus, variances, weights, shape=(3, 4, 4)) -> dict[str, torch.Tensor]:
    """A mixture condition: per mode a mean and a variance (numbers or tensors of ``shape``) and a weight."""
    mu = torch.stack([torch.as_tensor(m, dtype=torch.float32).expand(shape) for m in mus])[None]
    var = torch.stack([torch.as_tensor(v, dtype=torch.float32).expand(shape) for v in variances])[None]
    total = sum(weights)
    return {"mu": mu, "var": var, "logpi": torch.tensor([[math.log(w / total) for w in weights]])}


def mixture_expert(alphas_cumprod: torch.Tensor, name: str = "gauss-mixture", resolution: int = 4) -> Expert:
    return Expert(network=GaussianMixtureEps(alphas_cumprod), name=name, family="analytic", resolution=resolution,
                  alphas_cumprod=alphas_cumprod, encoders={}, null_condition=mixture([0.0, 0.0], [1.0, 1.0], [1.0, 1.0]))


def mixture_product(modes: list[tuple[torch.Tensor, torch.Tensor, float]],
                    factors: list[tuple[torch.Tensor, torch.Tensor, float]]):
    """Closed form of ``sum_c pi_c N(mu_c, V_c) x prod_j N(m_j, v_j)^beta_j`` (per-pixel Gaussians): a
    mixture with, per mode, weight, mean and variance. Each mode's weight is pi_c times the integral of
    its product, ``Z_c = int exp(-a x^2 / 2 + b x + c0) dx`` per pixel with the mode's own terms."""
    out = []
    for mu, var, pi in modes:
        a = 1 / var + sum(beta / v for _, v, beta in factors)
        b = mu / var + sum(beta * m / v for m, v, beta in factors)
        c0 = -0.5 * mu**2 / var - 0.5 * torch.log(2 * math.pi * var)
        log_z = (0.5 * torch.log(2 * math.pi / a) + b**2 / (2 * a) + c0).sum()
        out.append((math.log(pi) + float(log_z), b / a, 1 / a))
    top = max(lz for lz, _, _ in out)
    total = sum(math.exp(lz - top) for lz, _, _ in out)
    return [(math.exp(lz - top) / total, mean, var) for lz, mean, var in out]


class LinearExpert:
    """An expert whose eps is affine in x and its condition's shift ``c``: enough for the per-term
    bookkeeping of particles and OR / AND, where only which prediction goes where matters."""

    def __init__(self, name: str = "L"):
        self.name = name

    def __call__(self, x, sigma, cond):
        return 0.3 * x + cond["c"].view(-1, 1, 1, 1)


def call_expert(expert, x, sigma, cond):
    """The ``eps_fn`` of ``poe.product_prediction`` for experts that are plain callables."""
    return expert(x, sigma, cond)


def shift(v: float) -> dict[str, torch.Tensor]:
    """A :class:`LinearExpert` condition."""
    return {"c": torch.tensor([float(v)])}


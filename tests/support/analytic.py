"""Analytic experts: the exact optimal eps for Gaussian data under an expert's own schedule.

For data x0 ~ N(mu, diag(var)) and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, the marginal is
N(sqrt(ab) mu, ab var + 1 - ab), and the minimum-MSE noise prediction is

    eps*(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab var + 1 - ab).

``ab`` at a continuous timestep comes from the expert's own table through the same log-sigma
interpolation the sampler uses, so a wrong schedule bridge shows up as wrong statistics.
"""
from __future__ import annotations

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

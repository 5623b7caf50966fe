"""Reliabilities from learned variances (EXPERIMENTAL; off unless a product asks for it).

PoE-GAN (Huang et al. 2022) multiplies Gaussian experts, whose product has the precision-weighted
mean ``sum_j mu_j / s_j^2 / sum_j 1 / s_j^2``. Carried over to the pooled null of the rule
(``samplers.poe``), each expert's null gets, per pixel, a reliability proportional to the
precision of its own belief about the clean image: where an expert is unsure, another expert's
prior takes over.

Learned-sigma experts (ADM, GLIDE; Nichol & Dhariwal 2021, "Improved DDPM") predict the variance
of the reverse step ``p(x_{t-1} | x_t)`` through a second block of channels ``v`` in [-1, 1]:

    log Sigma = frac * log beta_t + (1 - frac) * log beta~_t,    frac = (v + 1) / 2       (IDDPM eq. 15)

with beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) (DDPM eq. 7). That variance depends on the
expert's schedule and on the step size, so it is turned into a schedule-free quantity first. The
DDPM posterior is q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta~_t) with c0 = sqrt(ab_{t-1})
beta_t / (1 - ab_t) (DDPM eq. 7), so by the law of total variance

    Sigma = beta~_t + c0^2 Var[x0 | x_t],

and the expert's implied ``Var[x0 | x_t]`` is comparable between experts with different schedules.
The reliability of expert j at a pixel is then ``a_j / Var_j[x0 | x_t]``, normalised over j.

``poe.product_prediction`` applies it to bindings with ``reliability_from_variance``; the node
``PoEReliabilityFromVariance`` turns it on for a chain. It is measured, not a default:
BENCHMARKS.md, "Variance-derived reliability".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import noise_levels


@dataclass(frozen=True)
class StepCoefficients:
    """One DDPM step's coefficients at a (continuous) timestep, float64, shaped like ``t``.

    Args:
        beta: beta_t = 1 - ab_t / ab_{t-1}.
        beta_tilde: the posterior variance beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t).
        c0: the posterior mean's coefficient of x0, sqrt(ab_{t-1}) beta_t / (1 - ab_t).
    """

    beta: torch.Tensor
    beta_tilde: torch.Tensor
    c0: torch.Tensor


def step_coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> StepCoefficients:
    """The coefficients of the step t-1 <- t of an expert's own schedule, for continuous t.

    ``ab`` between table entries follows ``noise_levels`` (log sigma interpolated); t is kept
    >= 1, where beta~ is positive (IDDPM clips its log at t = 0 the same way).
    """
    t = torch.as_tensor(t, dtype=torch.float64).clamp_min(1.0)

    def ab(s):
        sigma = noise_levels.sigma_from_timestep(s, alphas_cumprod)
        return 1 / (1 + sigma**2)

    ab_t, ab_prev = ab(t), ab(t - 1)
    beta = 1 - ab_t / ab_prev
    return StepCoefficients(beta, beta * (1 - ab_prev) / (1 - ab_t), ab_prev.sqrt() * beta / (1 - ab_t))


def learned_log_variance(v: torch.Tensor, coef: StepCoefficients) -> torch.Tensor:
    """IDDPM eq. 15: the log variance a learned-sigma output ``v`` in [-1, 1] stands for."""
    frac = (v.double() + 1) / 2
    shape = (-1,) + (1,) * (v.ndim - 1)
    log_beta, log_beta_tilde = coef.beta.log().reshape(shape), coef.beta_tilde.log().reshape(shape)
    return frac * log_beta + (1 - frac) * log_beta_tilde


def x0_variance(log_variance: torch.Tensor, coef: StepCoefficients, floor: float = 1e-6) -> torch.Tensor:
    """Var[x0 | x_t] implied by a reverse-step log variance (law of total variance), >= ``floor``."""
    shape = (-1,) + (1,) * (log_variance.ndim - 1)
    beta_tilde, c0 = coef.beta_tilde.reshape(shape), coef.c0.reshape(shape)
    return ((log_variance.double().exp() - beta_tilde) / c0**2).clamp_min(floor)


def precision_reliabilities(x0_variances: Sequence[torch.Tensor],
                            reliabilities: Sequence[float | torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per-pixel reliabilities ``a_j / Var_j[x0 | x_t]``, normalised to sum to 1 over the experts.

    Args:
        x0_variances: one tensor per expert's null, B x C x H x W (broadcastable to each other).
        reliabilities: the user's reliabilities a_j (scalars or per-pixel), 1 each by default;
            the precision only redistributes them pixel by pixel.
    """
    if reliabilities is None:
        reliabilities = [1.0] * len(x0_variances)
    weighted = [torch.as_tensor(a, dtype=torch.float64, device=var.device) / var.double()
                for a, var in zip(reliabilities, x0_variances)]
    total = sum(weighted)
    return [(w / torch.where(total > 0, total, 1.0)).float() for w in weighted]


def x0_variance_from_values(values: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Var[x0 | x_t] from an expert's learned-sigma ``values`` (the second half of its output), its
    table and its (continuous) timestep per row, float32."""
    coef = step_coefficients(alphas_cumprod, t.detach().to("cpu", torch.float64))
    coef = StepCoefficients(*(c.to(values.device) for c in (coef.beta, coef.beta_tilde, coef.c0)))
    return x0_variance(learned_log_variance(values, coef), coef).float()


def reliabilities_from_outputs(v_outputs: Sequence[torch.Tensor], alphas_cumprods: Sequence[torch.Tensor],
                               timesteps: Sequence[torch.Tensor],
                               reliabilities: Sequence[float | torch.Tensor] | None = None) -> list[torch.Tensor]:
    """From each null's raw ``v`` channels (the second half of a learned-sigma output), each
    expert's table and its timestep for the common sigma, to per-pixel reliabilities."""
    variances = [x0_variance_from_values(v, table, t) for v, table, t in zip(v_outputs, alphas_cumprods, timesteps)]
    return precision_reliabilities(variances, reliabilities)

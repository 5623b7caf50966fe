"""MCMC correctors for the product of experts, at one noise level.

Summing the experts' scores is exact only at sigma = 0: at higher noise the product of the
diffused experts, ``pi_sigma(x) ~ prod_i p_i,sigma(x)^w_i / p_null,sigma(x)^(sum w - 1)``, is not
the diffused product, so a plain sampler following the summed score is biased (Du et al. 2023,
"Reduce, Reuse, Recycle", RRR, section 3). RRR's fix is to treat ``pi_sigma`` as an annealed
sequence of targets and run a few MCMC steps on each, using the summed score, which *is* the
exact score of ``pi_sigma``; as sigma -> 0 the targets tend to the true product.

Everything is in k-diffusion's variance-exploding space, ``x = x0 + sigma * eps``. A corrector
is given ``denoise(x, sigma) -> denoised``, the product's denoised prediction (Unite and Conquer
eq. 10 applied to denoised images), and uses the score

    grad log pi_sigma(x) = (denoised - x) / sigma^2                 (Tweedie; Karras et al. 2022, eq. 3)

Cost: every corrector step below costs exactly one product evaluation (one forward per expert),
except where stated: U-HMC costs one per leapfrog step, MALA one extra at the start of each
level (the score at the starting point), and Simpson's energy rule one extra per step.

Step sizes are multiples of sigma^2 (``epsilon = step_scale * sigma^2``): the score of data
diffused to level sigma varies on the scale sigma, so its Lipschitz constant is at most
~1 / sigma^2 and a step of c * sigma^2 is stable for every level with one constant c.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METHODS = ("none", "ula", "uhmc", "mala")
ENERGY_RULES = ("trapezoid", "simpson")


@dataclass(frozen=True)
class CorrectorConfig:
    """How the product is corrected at each noise level of a sampler's schedule.

    Args:
        method (`str`, defaults to ``"uhmc"``): ``"ula"`` (unadjusted Langevin), ``"uhmc"``
            (underdamped Langevin / HMC without accept-reject, RRR's U-HMC), ``"mala"``
            (Metropolis-adjusted Langevin with Sjöberg et al.'s line-integral energy) or ``"none"``.
        steps (`int`, defaults to 2): corrector steps per noise level. ULA and MALA: one product
            evaluation each; U-HMC: ``leapfrog_steps`` evaluations each.
        step_scale (`float`, defaults to 0.5): c in the Langevin step ``epsilon = c * sigma^2``;
            U-HMC's leapfrog step is ``h = sqrt(2 epsilon)``, the step for which one leapfrog step
            with a full momentum refresh is one Langevin step. Larger steps mix faster at low noise
            but cost accuracy where the data has fine structure, so image experts want smaller ones
            than the analytic product (BENCHMARKS.md measures both). ULA's stationary variance on a
            Gaussian of variance V is too large by 1 / (1 - eps / 2V), up to 1 / (1 - c / 2) at high
            noise; U-HMC (BAOAB order) and MALA are exact there.
        sigma_window (`tuple[float, float]`, defaults to ``(0.05, inf)``): correction runs at the
            levels lo <= sigma <= hi. RRR skips the lowest levels, where the summed score is
            already nearly exact and steps of c * sigma^2 barely move; never at sigma = 0. The
            PoECorrector node starts higher, at the levels that decide an image's layout.
        leapfrog_steps (`int`, defaults to 1): U-HMC leapfrog steps per corrector step.
        refresh (`float`, defaults to 0.5): U-HMC momentum refresh per corrector step,
            ``v <- sqrt(1 - refresh) v + sqrt(refresh) z``; 1 is a full refresh (plain HMC
            without accept), small values keep momentum (underdamped Langevin). The mass is the
            identity: a scalar mass is only a rescaling of the step.
        energy (`str`, defaults to ``"trapezoid"``): MALA's estimate of log pi(x') - log pi(x) by
            the line integral of the score from x to x' (Sjöberg et al. 2023, eq. 12):
            ``"trapezoid"`` reuses the two scores MALA needs anyway (exact for Gaussian targets),
            ``"simpson"`` adds the midpoint (one more evaluation per step).
    """

    method: str = "uhmc"
    steps: int = 2
    step_scale: float = 0.5
    sigma_window: tuple[float, float] = (0.05, math.inf)
    leapfrog_steps: int = 1
    refresh: float = 0.5
    energy: str = "trapezoid"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown corrector method {self.method!r}; expected one of {METHODS}")
        if self.energy not in ENERGY_RULES:
            raise ValueError(f"unknown energy rule {self.energy!r}; expected one of {ENERGY_RULES}")
        if self.steps < 0 or self.leapfrog_steps < 1:
            raise ValueError(f"corrector steps must be >= 0 and leapfrog steps >= 1, got {self.steps} and "
                             f"{self.leapfrog_steps}")
        if not self.step_scale > 0:
            raise ValueError(f"corrector step_scale must be > 0, got {self.step_scale}")
        if not 0 < self.refresh <= 1:
            raise ValueError(f"momentum refresh must be in (0, 1], got {self.refresh}")
        lo, hi = self.sigma_window
        if not 0 <= lo <= hi:
            raise ValueError(f"corrector sigma window must have 0 <= lo <= hi, got {self.sigma_window}")


def in_window(sigma: float, config: CorrectorConfig) -> bool:
    """Whether a corrector runs at level ``sigma`` (never at sigma = 0, where there is no score)."""
    lo, hi = config.sigma_window
    return config.method != "none" and config.steps > 0 and sigma > 0 and lo <= sigma <= hi


def evaluations_per_level(config: CorrectorConfig) -> int:
    """Product evaluations one level of correction costs."""
    if config.method == "none" or config.steps == 0:
        return 0
    if config.method == "ula":
        return config.steps
    if config.method == "uhmc":
        return config.steps * config.leapfrog_steps
    return 1 + config.steps * (2 if config.energy == "simpson" else 1)


def to_score(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """grad log p_sigma(x) from a denoised prediction (Tweedie's formula in VE space)."""
    return (denoised - x) / sigma**2


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device, then moved, so a CPU generator gives the same numbers on any device.
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _score_fn(denoise: Denoise, x: torch.Tensor, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    s_in = x.new_full([x.shape[0]], sigma)
    return lambda y: to_score(y, sigma, denoise(y, s_in))


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (x.ndim - 1)))


def step_size(sigma: float, config: CorrectorConfig) -> float:
    """The Langevin step epsilon = step_scale * sigma^2."""
    return config.step_scale * sigma**2


def ula(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Unadjusted Langevin on the product score at one level (RRR Alg. 1 with the ULA kernel;
    Roberts & Tweedie 1996):

        x <- x + epsilon * grad log pi_sigma(x) + sqrt(2 epsilon) z

    ``config.steps`` steps, one product evaluation each.
    """
    score = _score_fn(denoise, x, sigma)
    eps = step_size(sigma, config)
    for _ in range(config.steps):
        x = x + eps * score(x) + math.sqrt(2 * eps) * _randn(x, generator)
    return x


def uhmc(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
         generator: torch.Generator | None = None,
         momentum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Underdamped Langevin / HMC without accept-reject on the product score (RRR's U-HMC,
    Du et al. 2023, appendix: leapfrog steps with a partial momentum refresh and no accept step).

    Each corrector step refreshes the momentum partially,

        v <- sqrt(1 - refresh) v + sqrt(refresh) z,

    inside the first leapfrog step's drift, then takes ``leapfrog_steps`` leapfrog steps of size
    h = sqrt(2 epsilon) on H = -log pi_sigma(x) + |v|^2 / 2. Placing the refresh between the two
    half drifts makes the chain the BAOAB splitting of underdamped Langevin (Leimkuhler &
    Matthews 2013, eq. 2.10), whose position law is exact for Gaussian targets at any step and any
    refresh; with the refresh first instead (then drift-kick-drift), the variance of a Gaussian
    target shrinks by a factor 1 - h^2 / (4 var), 25% at the default step and high noise. The state is returned at the point where the score was last evaluated, and
    the score is evaluated once per leapfrog step, so a level costs ``steps * leapfrog_steps``.

    ``momentum`` (unit mass, so level-independent) may be carried from the previous level; a
    fresh one is drawn when it is ``None``. Returns ``(x, momentum)``.
    """
    score = _score_fn(denoise, x, sigma)
    h = math.sqrt(2 * step_size(sigma, config))
    v = _randn(x, generator) if momentum is None else momentum
    keep, fresh = math.sqrt(1 - config.refresh), math.sqrt(config.refresh)
    for _ in range(config.steps):
        for j in range(config.leapfrog_steps):
            if j == 0:
                x = x + 0.5 * h * v
                v = keep * v + fresh * _randn(x, generator)
                x = x + 0.5 * h * v
            else:
                x = x + h * v
            v = v + h * score(x)
    return x, v


def line_integral(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, x_new: torch.Tensor,
                  s: torch.Tensor, s_new: torch.Tensor, rule: str) -> torch.Tensor:
    """log pi(x_new) - log pi(x) per batch row, as the line integral of the score along the
    straight segment (Sjöberg et al. 2023, "MCMC-correction of score-based diffusion models for
    model composition", eq. 12): trapezoid from the end-point scores, or Simpson with the midpoint.
    """
    dx = x_new - x
    if rule == "trapezoid":
        return _row_sum(0.5 * (s + s_new) * dx)
    mid = score(0.5 * (x + x_new))
    return _row_sum((s + 4 * mid + s_new) / 6 * dx)


def mala(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Metropolis-adjusted Langevin on the product (Sjöberg et al. 2023, Alg. 1; RRR's MALA with
    the energy replaced by the score's line integral, so no energy-parameterised model is needed).
    Per step, per image:

        x' = x + epsilon s(x) + sqrt(2 epsilon) z
        log A = [log pi(x') - log pi(x)] + log q(x | x') - log q(x' | x),
        q(b | a) = N(b; a + epsilon s(a), 2 epsilon I)

    accepted with probability min(1, A). The score at the current point is kept between steps, so
    a level costs 1 + ``steps`` evaluations (Simpson: 1 + 2 ``steps``). Returns ``(x, acceptance
    rate per image)``.
    """
    score = _score_fn(denoise, x, sigma)
    eps = step_size(sigma, config)
    s = score(x)
    accepted = torch.zeros(x.shape[0], device=x.device)
    for _ in range(config.steps):
        x_new = x + eps * s + math.sqrt(2 * eps) * _randn(x, generator)
        s_new = score(x_new)
        log_pi = line_integral(score, x, x_new, s, s_new, config.energy)
        log_q_back = -_row_sum((x - x_new - eps * s_new) ** 2) / (4 * eps)
        log_q_fwd = -_row_sum((x_new - x - eps * s) ** 2) / (4 * eps)
        log_a = (log_pi + log_q_back - log_q_fwd).float()
        u = torch.rand(x.shape[0], generator=generator, device=generator.device if generator is not None else x.device)
        take = u.to(x.device).log() < log_a
        x = torch.where(_rows(take, x), x_new, x)
        s = torch.where(_rows(take, s), s_new, s)
        accepted += take.float()
    return x, accepted / max(config.steps, 1)


def correct(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
            generator: torch.Generator | None = None, state: dict | None = None) -> torch.Tensor:
    """Run ``config``'s corrector at level ``sigma`` (a no-op outside the window).

    ``state`` carries what a corrector keeps between levels (U-HMC's momentum, MALA's last
    acceptance rate); pass the same dict for every level of one sampling run.
    """
    if not in_window(sigma, config):
        return x
    state = {} if state is None else state
    if config.method == "ula":
        return ula(denoise, x, sigma, config, generator)
    if config.method == "uhmc":
        x, state["momentum"] = uhmc(denoise, x, sigma, config, generator, state.get("momentum"))
        return x
    x, state["acceptance"] = mala(denoise, x, sigma, config, generator)
    return x

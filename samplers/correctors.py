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
from dataclasses import dataclass, field
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METHODS = ("none", "ula", "uhmc", "mala")
ENERGY_RULES = ("trapezoid", "simpson")
STEP_RULES = ("sigma2", "snr")


@dataclass(frozen=True)
class CorrectorConfig:
    """How the product is corrected at each noise level of a sampler's schedule.

    Args:
        method (`str`, defaults to ``"uhmc"``): ``"ula"`` (unadjusted Langevin), ``"uhmc"``
            (underdamped Langevin / HMC without accept-reject, RRR's U-HMC), ``"mala"``
            (Metropolis-adjusted Langevin with Sjöberg et al.'s line-integral energy) or ``"none"``.
        steps (`int`, defaults to 4): corrector steps per noise level. ULA and MALA: one product
            evaluation each; U-HMC: ``leapfrog_steps`` evaluations each.
        step_scale (`float`, defaults to 0.5): c in the ``"sigma2"`` rule's Langevin step
            ``epsilon = c * sigma^2``; U-HMC's leapfrog step is ``h = sqrt(2 epsilon)``, the step for
            which one leapfrog step with a full momentum refresh is one Langevin step. One constant
            cannot suit every product: a product sharper than the noise level needs smaller steps
            and a broader one larger (BENCHMARKS.md, "Analytic products: corrector step rules"),
            which is why the default rule is ``"snr"``. ULA's stationary variance on a Gaussian of
            variance V is too large by 1 / (1 - eps / 2V); U-HMC (BAOAB order) and MALA are exact there.
        sigma_window (`tuple[float, float]`, defaults to ``(0.06, inf)``): correction runs at the
            levels lo <= sigma <= hi; never at sigma = 0. RRR skips the lowest levels, where the
            summed score is already nearly exact. The default's 0.06 is measured (BENCHMARKS.md,
            "Corrector windows"): the sharpest analytic product needs the levels down to about
            0.06. The digit experts gain from the levels above sigma 0.3. Correcting only the levels
            below sigma 1 cost them 0.05 while the rule's null coefficients
            (``poe.null_coefficients``) were negative, and nothing with reliabilities equal to the
            weights; on top of the corrected high levels, the levels below 0.3 still cost them about
            0.04 ("Reliabilities and the corrector").
        leapfrog_steps (`int`, defaults to 1): U-HMC leapfrog steps per corrector step.
        refresh (`float`, defaults to 0.5): U-HMC momentum refresh per corrector step,
            ``v <- sqrt(1 - refresh) v + sqrt(refresh) z``; 1 is a full refresh (plain HMC
            without accept), small values keep momentum (underdamped Langevin). The mass is the
            identity: a scalar mass is only a rescaling of the step.
        step_rule (`str`, defaults to ``"snr"``): how the Langevin step epsilon is sized.
            ``"sigma2"``: ``epsilon = step_scale * sigma^2``, one constant for every product.
            ``"snr"``: per image, from a target signal-to-noise ratio r = ``snr`` (Song et al. 2021,
            Alg. 5): ``epsilon = 2 (r ||z|| / ||grad log pi_sigma(x)||)^2`` with ``||z||^2`` the
            dimension, so the step follows the product's own spread (for a Gaussian of variance V
            it is 2 r^2 V) instead of the noise level; ``step_scale`` is then unused.
        snr (`float`, defaults to 0.15): the target signal-to-noise ratio of ``"snr"``.
        energy (`str`, defaults to ``"trapezoid"``): MALA's estimate of log pi(x') - log pi(x) by
            the line integral of the score from x to x' (Sjöberg et al. 2023, eq. 12):
            ``"trapezoid"`` reuses the two scores MALA needs anyway (exact for Gaussian targets),
            ``"simpson"`` adds the midpoint (one more evaluation per step).
    """

    method: str = "uhmc"
    steps: int = 4
    step_scale: float = 0.5
    sigma_window: tuple[float, float] = (0.06, math.inf)
    leapfrog_steps: int = 1
    refresh: float = 0.5
    energy: str = "trapezoid"
    step_rule: str = "snr"
    snr: float = 0.15

    def __post_init__(self):
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"unknown corrector step rule {self.step_rule!r}; expected one of {STEP_RULES}")
        if not self.snr > 0:
            raise ValueError(f"corrector snr must be > 0, got {self.snr}")
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


def run_evaluations(sigmas, config: CorrectorConfig, per_step: int = 1) -> int:
    """Product evaluations per image of one corrected run over ``sigmas``: ``per_step`` per sampler
    step, plus one level of correction after each step that lands in the window (``sigmas[1:]``,
    as ``CorrectedKSampler`` corrects)."""
    levels = [float(s) for s in sigmas[1:]]
    return per_step * len(levels) + sum(evaluations_per_level(config) for s in levels if in_window(s, config))


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
    """The Langevin step epsilon = step_scale * sigma^2 (the ``"sigma2"`` rule)."""
    return config.step_scale * sigma**2


def snr_step(score: torch.Tensor, config: CorrectorConfig) -> torch.Tensor:
    """Per-image Langevin steps from a target signal-to-noise ratio (Song et al. 2021, Alg. 5):
    ``epsilon = 2 (r ||z|| / ||score||)^2`` with ``E ||z||^2`` = the dimension, shaped to
    broadcast over ``score``."""
    dim = score[0].numel()
    norm_sq = _row_sum(score.float() ** 2).clamp_min(1e-30)
    return _rows(2 * config.snr**2 * dim / norm_sq, score).to(score.dtype)


def _step(sigma: float, config: CorrectorConfig, score: torch.Tensor | None):
    """epsilon under ``config.step_rule``: a float, or per-image steps from ``score``; without a
    score the ``"snr"`` rule falls back to the score scale of pure noise at ``sigma`` (1 / sigma)."""
    if config.step_rule == "sigma2":
        return step_size(sigma, config)
    if score is None:
        return 2 * config.snr**2 * sigma**2
    return snr_step(score, config)


def _sqrt(eps):
    return eps.sqrt() if isinstance(eps, torch.Tensor) else math.sqrt(eps)


def ula(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Unadjusted Langevin on the product score at one level (RRR Alg. 1 with the ULA kernel;
    Roberts & Tweedie 1996):

        x <- x + epsilon * grad log pi_sigma(x) + sqrt(2 epsilon) z

    ``config.steps`` steps, one product evaluation each. Returns ``(x, the steps taken)``.
    """
    score = _score_fn(denoise, x, sigma)
    steps = []
    for _ in range(config.steps):
        s = score(x)
        eps = _step(sigma, config, s)
        steps.append(eps)
        x = x + eps * s + _sqrt(2 * eps) * _randn(x, generator)
    return x, steps


def uhmc(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
         generator: torch.Generator | None = None, momentum: torch.Tensor | None = None,
         last_score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list]:
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

    Under the ``"snr"`` rule each step is sized from the last score evaluated (``last_score``,
    carried from the previous level, for the first step), so the rule costs no evaluation.
    ``momentum`` (unit mass, so level-independent) may be carried from the previous level; a
    fresh one is drawn when it is ``None``. Returns ``(x, momentum, last score, steps taken)``.
    """
    score = _score_fn(denoise, x, sigma)
    v = _randn(x, generator) if momentum is None else momentum
    keep, fresh = math.sqrt(1 - config.refresh), math.sqrt(config.refresh)
    s, steps = last_score, []
    for _ in range(config.steps):
        eps = _step(sigma, config, s)
        steps.append(eps)
        h = _sqrt(2 * eps)
        for j in range(config.leapfrog_steps):
            if j == 0:
                x = x + 0.5 * h * v
                v = keep * v + fresh * _randn(x, generator)
                x = x + 0.5 * h * v
            else:
                x = x + h * v
            s = score(x)
            v = v + h * s
    return x, v, s, steps


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
    rate per image, steps taken)``. Under the ``"snr"`` rule the step is sized at each point,
    and the reverse proposal uses the step at ``x'``.
    """
    score = _score_fn(denoise, x, sigma)
    s = score(x)
    eps = _step(sigma, config, s)
    accepted = torch.zeros(x.shape[0], device=x.device)
    steps = []
    for _ in range(config.steps):
        steps.append(eps)
        x_new = x + eps * s + _sqrt(2 * eps) * _randn(x, generator)
        s_new = score(x_new)
        eps_new = _step(sigma, config, s_new)
        log_pi = line_integral(score, x, x_new, s, s_new, config.energy)
        # The reverse proposal is sized at x_new, so an adaptive step keeps detailed balance.
        log_q_back = -_row_sum((x - x_new - eps_new * s_new) ** 2 / (4 * eps_new)) - _half_log_det(eps_new, x)
        log_q_fwd = -_row_sum((x_new - x - eps * s) ** 2 / (4 * eps)) - _half_log_det(eps, x)
        log_a = (log_pi + log_q_back - log_q_fwd).float()
        u = torch.rand(x.shape[0], generator=generator, device=generator.device if generator is not None else x.device)
        take = u.to(x.device).log() < log_a
        x = torch.where(_rows(take, x), x_new, x)
        s = torch.where(_rows(take, s), s_new, s)
        if isinstance(eps, torch.Tensor):
            eps = torch.where(_rows(take, eps), eps_new, eps)
        accepted += take.float()
    return x, accepted / max(config.steps, 1), steps


def _half_log_det(eps, x: torch.Tensor):
    """The normalising term of N(., 2 eps I) that differs between images when eps does."""
    if not isinstance(eps, torch.Tensor):
        return 0.0
    return 0.5 * x[0].numel() * eps.flatten().log()


def correct(denoise: Denoise, x: torch.Tensor, sigma: float, config: CorrectorConfig,
            generator: torch.Generator | None = None, state: dict | None = None) -> torch.Tensor:
    """Run ``config``'s corrector at level ``sigma`` (a no-op outside the window).

    ``state`` carries what a corrector keeps between levels (U-HMC's momentum and last score) and
    what it did: ``state["report"]`` is a :class:`CorrectorReport`. Pass the same dict for every
    level of one sampling run.
    """
    if not in_window(sigma, config):
        return x
    state = {} if state is None else state
    report = state.setdefault("report", CorrectorReport())
    if config.method == "ula":
        x, steps = ula(denoise, x, sigma, config, generator)
    elif config.method == "uhmc":
        x, state["momentum"], state["score"], steps = uhmc(denoise, x, sigma, config, generator,
                                                           state.get("momentum"), state.get("score"))
    else:
        x, state["acceptance"], steps = mala(denoise, x, sigma, config, generator)
        report.acceptance.append(float(state["acceptance"].mean()))
    report.levels += 1
    report.relative_steps.extend(float(torch.as_tensor(e).float().mean()) / sigma**2 for e in steps)
    return x


@dataclass
class CorrectorReport:
    """What a corrector did over one sampling run: the levels it corrected, each step's mean
    epsilon / sigma^2, and MALA's acceptance rate per level."""

    levels: int = 0
    relative_steps: list = field(default_factory=list)
    acceptance: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.levels:
            return "corrected no level (none in the window)"
        steps = self.relative_steps
        text = (f"corrected {self.levels} level(s), {len(steps)} step(s); epsilon / sigma^2 mean "
                f"{sum(steps) / len(steps):.3g} (min {min(steps):.3g}, max {max(steps):.3g})")
        if self.acceptance:
            text += f"; mean acceptance {sum(self.acceptance) / len(self.acceptance):.2f}"
        return text

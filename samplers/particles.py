"""Feynman–Kac weighted particles for the product of experts (Skreta, Akhound-Sadegh, Ohanesian,
Bondesan, Aspuru-Guzik, Doucet, Brekelmans, Tong, Neklyudov, "Feynman-Kac Correctors in Diffusion:
Annealing, Guidance, and Product of Experts", ICML 2025, arXiv 2503.02819).

**The target.** In variance-exploding coordinates, ``x = x0 + sigma eps``, let q_{k,sigma} be the
noised marginal of each term of the rule, with score ``s_k = grad log q_k = -eps_k / sigma``. The
rule (``poe``) is a weighted sum of scores,

    s_bar = sum_k beta_k s_k,   beta_i = w_i (conditional terms),
                                beta_j = -(sum_i w_i - 1) a_j (the pooled nulls, a normalised),

whose exponents sum to 1 (a null averaged over n condition rows splits its beta into n equal parts:
the mean of scores is the score of the geometric mean). ``s_bar`` is the exact score of the
annealed product ``pi_sigma ~ prod_k q_{k,sigma}^beta_k``, the target of the MCMC correctors too;
at sigma = 0 it is the product the rule stands for, but ``pi_sigma`` is not that product diffused, so
a sampler following ``s_bar`` is biased. Weighted particles remove the bias.

**The weights (derivation).** Let sampling time tau run sigma down, ``g^2 = -d sigma^2 / d tau``.
Each q_k is a diffused density, so it solves the heat equation, ``d_tau q_k = -(g^2/2) Lap q_k``,
that is ``d_tau log q_k = -(g^2/2) (Lap log q_k + |s_k|^2)``. A sampler of the family

    dx = (1 + gamma)/2 g^2 s_bar dtau + sqrt(gamma) g dW

(gamma = 1: the reverse SDE; gamma = 0: the probability-flow ODE; ancestral samplers at eta have
gamma = eta^2 to first order) moves particles whose density rho solves
``d_tau rho = -div(rho v) + (gamma g^2 / 2) Lap rho``. Feynman–Kac: if each particle's log-weight grows
at the rate A(x, tau), the weighted density solves the same equation plus ``A rho``; it equals pi at
every tau when (put rho = pi, divide by pi, use ``Lap pi / pi = Lap log pi + |grad log pi|^2``)

    A = d_tau log pi + div v + v . grad log pi - (gamma g^2 / 2) (Lap log pi + |grad log pi|^2).

With ``log pi = sum_k beta_k log q_k`` and ``v = (1 + gamma)/2 g^2 s_bar``, the Laplacians cancel
(-1/2 + (1 + gamma)/2 - gamma/2 = 0) and so does gamma:

    A = (g^2 / 2) (|s_bar|^2 - sum_k beta_k |s_k|^2)  =  -(g^2 / 2) sum_k beta_k |s_k - s_bar|^2.

The second form uses sum beta = 1. No divergence is needed and the weights do not depend on how much
noise the sampler injects. Over one step sigma_i -> sigma_{i+1} the integral of g^2 is
``delta = sigma_i^2 - sigma_{i+1}^2``; evaluated at the step's start (left point, as Euler–Maruyama
evaluates the drift), with ``s_k = -eps_k / sigma_i`` and the denoised ``D_k = x - sigma_i eps_k``:

    d log w = delta / (2 sigma_i^2) (|eps_bar|^2 - sum_k beta_k |eps_k|^2)
            = -delta / (2 sigma_i^2) sum_k beta_k |eps_k - eps_bar|^2
            = -delta / (2 sigma_i^4) sum_k beta_k |D_k - D_bar|^2,           eps_bar = sum_k beta_k eps_k,

summed over pixels, per particle. One evaluation of the rule supplies every eps_k
(``poe.Terms``); nothing else runs. A conditional term far from the consensus lowers a particle's
weight; the pooled null (negative beta when sum w > 1) raises it. :func:`log_weight_increment`
computes it; ``tests/samplers/test_particles.py`` checks A against the heat-equation identity above
on Gaussians by finite differences.

**Which steps.** The pack's Euler–Maruyama step (``sde``; gamma = 1, drift at the step's start) is
the discretisation the weights were derived for: weights and step are both first order in delta, and
the weighted set tends to pi as particles and steps grow. ComfyUI's ancestral and SDE samplers are
other discretisations of the same family, so the weights hold to first order there too. Deterministic
samplers (gamma = 0) would have valid weights in continuous time, but copies made by resampling never
separate, so they are refused. The initial weights are uniform: with sum beta = 1, pi at sigma_max is
N(0, sigma_max^2) up to O(|x0|^2 / sigma_max^2).

**Resampling.** Particles come in groups of K, one group per output image; a group shares its
conditions. When a group's effective sample size ``(sum w)^2 / sum w^2`` falls to ``ess_threshold * K``
or below, the group is resampled systematically (Carpenter, Clifford & Fearnhead 1999: one uniform per
group, K evenly spaced points on the weights' CDF, so particle i is copied floor(K w_i) or
floor(K w_i) + 1 times) and its weights reset to uniform.

**Temperature lambda.** Each increment is multiplied by lambda in [0, 1]. lambda = 1 is the exact
scheme above; lambda = 0 is the plain sampler; in between the set is tempered towards the plain
sampler's law: biased, with no target of its own, but its weights degenerate less. The increments are
sums over pixels, so their spread across particles grows with the dimension; measured at 30 steps on the
digits (3,072 dimensions) and at an SD1.5 latent's (16,428), the mean ESS / K per step stays 0.56-0.71 at
lambda = 1 (near 1 at the high levels, 0.3-0.4 at each of the low ones on the digits), and every group's
lineage collapses onto one starting particle at every lambda down to 0.1 (BENCHMARKS.md, "Particles:
weight degeneracy against lambda"); by the rule stated there the default is 1.

**What limits them, and moves.** The weights make up, one step at a time, for the gap between the
path the summed scores follow and the product diffused. Where that gap is wide (weights summing well
above 1, pooled nulls with negative exponents) the increments spread widely, few particles carry each
group, and a large group is worth far fewer independent samples than its size: on the Gaussian products
of BENCHMARKS.md ("Particles: what limits the weights, and MCMC moves at every level") 512 exact
particles stay at 1.5-7 times the noise floor of 512 exact samples, 800 steps instead of 200 change
nothing (so the step's own error is not the limit), and 4096 particles gain far less than 4096 exact
samples would. An MCMC move that leaves pi_sigma invariant keeps the weights valid and separates the
copies, so ``move = "levels"`` with MALA (exact on Gaussians) brings them close to the floor, closest
with a resampling at every step (``ess_threshold = 1``): the weights never spread beyond one step's
increment, and the next level's moves separate the copies each resampling makes, where a threshold of
0.5 lets the weights spread over several levels and then collapses the group at once. Moves alone fix
each mode's shape but no proportion between modes; only the weights move mass between modes (the
mixture product there).

**What has no target.** Spatial (per-pixel) weights or reliabilities, bands and lower-resolution
experts make a per-pixel or per-frequency combination of scores that is in general not the gradient
of any function, so there is no pi to weight towards. A lower-resolution expert's own term is a
score (that of q'(D x), ``bands``), but the pooled null is not: finer than the expert's blocks it
mixes only the finer experts' nulls, times 1 minus their weights' sum, and on the block means it
mixes every null, times 1 minus all the weights' sum, so each finer null has two exponents at once.
Noise windows and reliability ramps make beta depend on sigma, which adds
``(d beta_k / d tau) log q_k`` to A and needs the log-densities themselves.
:func:`check_bindings` refuses all of these, and OR / AND groups (``superposition``), whose
coefficients change per particle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .correctors import CorrectorConfig
from .poe import Binding, Terms, total_weight, unwrap

OUTPUTS = ("all", "draw", "best")
MOVES = ("resampled", "levels")


@dataclass(frozen=True)
class ParticleConfig:
    """How a product is sampled with weighted particles.

    Args:
        particles (`int`, defaults to 4): K, particles per output image (one group each).
        temperature (`float`, defaults to 1.0): lambda in [0, 1], the factor on each log-weight
            increment. 1 is exact; below 1 is tempered and biased (module docstring). The default is
            1 because at 30 steps the weights keep a mean ESS / K per step above 0.5 with it, on the
            digits and at an SD1.5 latent's dimension (BENCHMARKS.md, "Particles: weight degeneracy
            against lambda"); they degenerate mostly at the low noise levels.
        ess_threshold (`float`, defaults to 0.5): a group is resampled when its effective sample size
            falls to this fraction of K or below; 1 resamples at every step, 0 never. With a corrector at
            every level (``move = "levels"``) 1 measured best (module docstring, "What limits them").
        output (`str`, defaults to ``"all"``): ``"all"``: every particle, after a final systematic
            resampling of each group, so the set is an unweighted draw from the target (copies are
            possible); ``"draw"``: one particle per group, drawn with probability proportional to its
            weight; ``"best"``: the highest-weight particle of each group.
        move (`str`, defaults to ``"resampled"``): when the MCMC corrector, if one is given, runs:
            ``"resampled"``: only at the level after a step whose particles were resampled
            (resample-move, Gilks & Berzuini 2001), to separate the copies; ``"levels"``: at every level
            of its window, as the corrector alone does. The corrector targets pi_sigma, so the weights
            stay valid (to its own accuracy: U-HMC and ULA have no accept step).
        corrector (`correctors.CorrectorConfig`, *optional*): the MCMC move (``correctors``).
    """

    particles: int = 4
    temperature: float = 1.0
    ess_threshold: float = 0.5
    output: str = "all"
    move: str = "resampled"
    corrector: CorrectorConfig | None = None

    def __post_init__(self):
        if int(self.particles) != self.particles or self.particles < 1:
            raise ValueError(f"particles per image must be an integer >= 1, got {self.particles}")
        if not 0 <= self.temperature <= 1:
            raise ValueError(f"the weight temperature lambda must lie in [0, 1], got {self.temperature}")
        if not 0 <= self.ess_threshold <= 1:
            raise ValueError(f"the ESS threshold must lie in [0, 1] (a fraction of the particles per image), got "
                             f"{self.ess_threshold}")
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown particle output {self.output!r}; expected one of {OUTPUTS}")
        if self.move not in MOVES:
            raise ValueError(f"unknown corrector placement {self.move!r}; expected one of {MOVES}")


# --- the rule's exponents and the weights ---------------------------------------------------------

def _label(i: int, b: Binding) -> str:
    return f"binding {i} ({b.label or getattr(unwrap(b.expert), 'name', type(b.expert).__name__)})"


def check_bindings(bindings: Sequence[Binding]) -> None:
    """Refuse products whose rule is not the score of one annealed density with fixed exponents
    (module docstring, "What has no target"), naming the binding and what to remove."""
    for i, b in enumerate(bindings, 1):
        name = _label(i, b)
        if b.group is not None:
            raise ValueError(f"{name} is in an OR / AND group, whose coefficients change per image at every step; "
                             "particles need fixed exponents: sample the group without particles")
        if torch.as_tensor(b.weight).numel() > 1 or torch.as_tensor(b.reliability).numel() > 1:
            raise ValueError(f"{name} has a mask (a spatial weight or reliability): a per-pixel mix of scores is not "
                             "the score of any density, so particles have no target; remove the mask")
        if b.banded:
            raise ValueError(f"{name} has a band or runs at a lower resolution: a per-frequency mix of scores is not "
                             "the score of any density, so particles have no target; remove PoEBandWeights or the "
                             "smaller expert")
        if b.sigma_window != (0.0, math.inf) or b.reliability_ramp is not None:
            raise ValueError(f"{name} has a noise window or a reliability ramp: its exponent then changes with the "
                             "noise level, which the weights cannot follow without the log-densities; remove "
                             "PoEBindingSchedule from it")
        if b.reliability_from_variance:
            raise ValueError(f"{name} takes its reliability from the expert's variance, per pixel: particles have no "
                             "target then; remove PoEReliabilityFromVariance")


def exponents(terms: Terms) -> list[tuple[torch.Tensor, float]]:
    """(prediction, beta) for every term of one evaluation (module docstring): w_i for each
    conditional prediction, -(sum w - 1) a_j / n for each of the n rows of a pooled null. The betas
    sum to 1 and ``sum beta_k prediction_k`` is the rule's output."""
    total = float(total_weight(terms.bindings))
    out = [(p, float(b.weight)) for b, p in zip(terms.bindings, terms.cond) if p is not None]
    pooled = [rows for rows in terms.nulls if rows]
    for rows, a in zip(pooled, terms.reliabilities):
        beta = -(total - 1.0) * float(a) / len(rows)
        out.extend((r, beta) for r in rows)
    return out


def log_weight_increment(terms: Sequence[tuple[torch.Tensor, float]], sigma: float, sigma_next: float,
                         prediction: str = "denoised") -> torch.Tensor:
    """d log w of one step from sigma to sigma_next (VE levels), per particle (float64), from the
    terms' predictions at the step's start and their exponents (module docstring):
    ``-delta / (2 sigma^2) sum_k beta_k |eps_k - eps_bar|^2``; for denoised predictions
    ``eps_k - eps_bar = -(D_k - D_bar) / sigma``."""
    if sigma_next >= sigma or not math.isfinite(sigma):
        batch = terms[0][0].shape[0]
        return torch.zeros(batch, dtype=torch.float64, device=terms[0][0].device)
    betas = [b for _, b in terms]
    if not math.isclose(sum(betas), 1.0, abs_tol=1e-6):
        raise ValueError(f"the rule's exponents sum to {sum(betas):.6g}, not 1")
    # One stacked K x B x N float64 tensor: a handful of kernels instead of several per term (the step's
    # cost beside the forwards, BENCHMARKS.md "Particles: cost of the particle step on the CPU").
    beta = torch.tensor(betas, dtype=torch.float64, device=terms[0][0].device)
    preds = torch.stack([p.flatten(1) for p, _ in terms]).double()
    deviation = preds.sub_(torch.tensordot(beta, preds, 1))
    spread = beta @ deviation.pow_(2).sum(2)
    delta = sigma**2 - sigma_next**2
    scale = delta / (2 * sigma**2) if prediction == "eps" else delta / (2 * sigma**4)
    return -scale * spread


# --- groups, ESS and resampling ------------------------------------------------------------------

def _groups(log_w: torch.Tensor, k: int) -> torch.Tensor:
    if log_w.ndim != 1 or log_w.shape[0] % k:
        raise ValueError(f"{log_w.shape[0]} particles do not split into groups of {k}: the batch must be a multiple "
                         "of the particles per image")
    return log_w.view(-1, k)


def normalised_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """G x K weights summing to 1 within each group of K consecutive particles."""
    return torch.softmax(_groups(log_w, k).double(), dim=1)


def ess(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """Each group's effective sample size ``(sum w)^2 / sum w^2`` (Kong, Liu & Wong 1994), in [1, K]."""
    return 1.0 / normalised_weights(log_w, k).pow(2).sum(1)


def systematic_indices(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Systematic resampling of each row of G x K normalised weights: one uniform u per row, the K points
    (u + j) / K on the row's CDF; returns G x K indices within the row. Particle i is drawn
    floor(K w_i) or floor(K w_i) + 1 times, and E[count_i] = K w_i."""
    g, k = weights.shape
    u = torch.rand(g, 1, generator=generator, dtype=torch.float64)
    points = (u + torch.arange(k, dtype=torch.float64)) / k
    cdf = weights.double().cpu().cumsum(1)
    cdf[:, -1] = 1.0   # rounding must not leave the last point beyond the CDF
    return torch.searchsorted(cdf, points, right=True).clamp(max=k - 1)


def resample(log_w: torch.Tensor, k: int, threshold: float, generator: torch.Generator | None = None,
             force: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Resample the groups whose ESS is at or below ``threshold * K`` (all with ``force`` or a threshold of
    1; "at" matters for K = 2, whose ESS never falls below 1).
    Returns the indices into the batch for every particle (``None`` when no group is resampled) and a
    boolean mask of the resampled groups; their log-weights must be reset to 0."""
    groups = _groups(log_w, k)
    force = force or threshold >= 1
    low = torch.ones(groups.shape[0], dtype=torch.bool) if force else (ess(log_w, k) <= threshold * k).cpu()
    if not bool(low.any()):
        return None, low
    within = torch.arange(k).expand(groups.shape[0], k).clone()
    within[low] = systematic_indices(normalised_weights(log_w, k)[low.to(log_w.device)], generator)
    offsets = (torch.arange(groups.shape[0]) * k).unsqueeze(1)
    return (within + offsets).flatten(), low


def select_output(log_w: torch.Tensor, k: int, output: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices into the batch of the particles ``output`` keeps (``ParticleConfig.output``)."""
    weights = normalised_weights(log_w, k).cpu()
    offsets = torch.arange(weights.shape[0]) * k
    if output == "all":
        return (systematic_indices(weights, generator) + offsets.unsqueeze(1)).flatten()
    if output == "draw":
        return torch.multinomial(weights, 1, generator=generator).squeeze(1) + offsets
    if output == "best":
        return weights.argmax(1) + offsets
    raise ValueError(f"unknown particle output {output!r}; expected one of {OUTPUTS}")


# --- what happened ------------------------------------------------------------------------------

@dataclass
class ParticleReport:
    """What the particles did over one run: per step the level, the mean and smallest ESS / K over the
    groups and how many groups were resampled, and at the end the largest normalised weight of each
    group before the output was chosen and how many distinct starting particles each group's particles
    descend from (1: resampling has collapsed the group onto one lineage)."""

    particles: int = 0
    groups: int = 0
    temperature: float = 1.0
    sigmas: list = field(default_factory=list)
    ess_mean: list = field(default_factory=list)
    ess_min: list = field(default_factory=list)
    resampled: list = field(default_factory=list)
    final_max_weight: list = field(default_factory=list)
    ancestors: list = field(default_factory=list)
    output: str = ""

    def record(self, sigma: float, log_w: torch.Tensor, resampled_groups: int) -> None:
        e = ess(log_w, self.particles).float() / self.particles
        self.sigmas.append(sigma)
        self.ess_mean.append(float(e.mean()))
        self.ess_min.append(float(e.min()))
        self.resampled.append(int(resampled_groups))

    def finish(self, log_w: torch.Tensor, output: str, ancestry: torch.Tensor | None = None) -> None:
        """``ancestry``: for every particle, the index of the starting particle it descends from."""
        self.final_max_weight = normalised_weights(log_w, self.particles).max(1).values.float().tolist()
        if ancestry is not None:
            self.ancestors = [len(set(row)) for row in ancestry.view(-1, self.particles).tolist()]
        self.output = output

    def summary(self) -> str:
        if not self.sigmas:
            return "no particle step ran"
        steps, events = len(self.sigmas), sum(1 for r in self.resampled if r)
        worst = min(range(steps), key=lambda i: self.ess_min[i])
        lines = [f"{self.particles} particle(s) per image x {self.groups} image(s), lambda = {self.temperature:g}: "
                 f"resampled at {events} of {steps} step(s) ({sum(self.resampled)} group resampling(s)); "
                 f"ESS / K mean {sum(self.ess_mean) / steps:.3f}, lowest {self.ess_min[worst]:.3f} "
                 f"(at sigma {self.sigmas[worst]:.3g})"]
        if self.final_max_weight:
            top = self.final_max_weight
            lineage = f"; distinct ancestors per group: mean {sum(self.ancestors) / len(self.ancestors):.2f} of " \
                      f"{self.particles}" if self.ancestors else ""
            lines.append(f"  final largest weight in a group: mean {sum(top) / len(top):.3f}, max {max(top):.3f}"
                         f"{lineage}; output: {self.output}")
        lines.append("  ESS / K per step: " + " ".join(f"{e:.2f}" + ("*" if r else "")
                                                       for e, r in zip(self.ess_mean, self.resampled))
                     + "  (* = resampled)")
        return "\n".join(lines)

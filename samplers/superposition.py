"""OR and AND of bindings by their log-densities (SuperDiff: Skreta, Atanackovic, Bose, Tong, Neklyudov,
"The Superposition of Diffusion Models Using the Itô Density Estimator", ICLR 2025, arXiv 2412.17762).

**The Itô density estimator (derivation, VE terms).** Let q_{m,sigma} be the noised marginal of a
member's expert under its condition, ``s_m = grad log q_m = -eps_m / sigma``, and let sampling time
tau run sigma down with ``g^2 = -d sigma^2 / d tau``. q_m is a diffused density, so
``d_tau log q_m = -(g^2/2) (Lap log q_m + |s_m|^2)`` (heat equation). Along any path
``dx = u dtau + g dW`` whose noise is the diffusion's own (quadratic variation g^2 dtau), Itô's lemma
for log q_m(x_tau, sigma(tau)) gives

    d log q_m = d_tau log q_m dtau + s_m . dx + (g^2/2) Lap log q_m dtau = s_m . dx - (g^2/2) |s_m|^2 dtau:

the Laplacians cancel whatever the drift u is, so each member's log-density is tracked along the
sampler's own path from predictions the rule already makes. Over one step sigma_i -> sigma_{i+1}, with
``delta = sigma_i^2 - sigma_{i+1}^2`` and the prediction at the step's start,

    d log q_m = -<eps_m, x_{i+1} - x_i> / sigma_i - delta / (2 sigma_i^2) |eps_m|^2      (:func:`ito_increment`).

It needs the injected noise to be the diffusion's own, so only the pack's Euler–Maruyama step
(``sde``) runs OR and AND. All members start equal at sigma_max (their marginals there differ by
O(|x0|^2 / sigma_max^2)). Beware the OR branch of the authors' Stable Diffusion script
(``applications/images/clip_eval.py``): it adds the |eps|^2 term with a plus sign. Their notebooks,
their AND branch and the derivation above use the minus sign; with the plus sign a member gains
``delta |eps_m|^2 / sigma^2`` per step, which is largest for the narrowest member, and OR collapses onto
it (BENCHMARKS.md shows both).

**OR** (a mixture). The members m of an OR group, with prior weights pi_m (normalised), stand for the
mixture ``p_G = sum_m pi_m q_m``. Mixing commutes with diffusion, so p_G at level sigma is the
mixture of the members' marginals, and its score is exactly

    grad log p_G = sum_m kappa_m s_m,     kappa = softmax(log q_m + log pi_m)      (:func:`or_coefficients`).

Each member is its expert's conditional density, normalised, so the mixture's weights are pi (members
must not carry their own guidance; the group's weight guides the mixture as a whole).

**AND** (equal densities). The members of an AND group are mixed with coefficients kappa (summing to
1) chosen at each step so that every member's log-density changes by the same amount: the path stays
where the members are equally likely, as SuperDiff's AND. The step is
``x_{i+1} = x_i + A + sum_m kappa_m c_m`` with A the part of the step that does not depend on kappa
(the rest of the rule and the noise, so the noise is drawn first) and c_m the displacement per unit
kappa_m; the M - 1 equations ``d log q_m = d log q_1`` and ``sum kappa = 1`` are linear in kappa
(:func:`and_coefficients`). When members nearly agree the system is ill-conditioned and kappa large,
so each kappa is clipped to a range and the coefficients renormalised; the summary reports the range
reached and how often clipping acted. AND has no density of its own: it is a sampler, not a target.

**The mixed rule** (a group inside a product: "(style A OR style B) x class expert"). A group G with
weight w_G is one factor of the product: with the other bindings i (weights w_i), the pooled null u
(reliabilities a_j, over all bindings, members included) and ``W = w_G + sum_i w_i``, the target is

    pi  ~  p_G^{w_G}  prod_i q_i^{w_i}  prod_j q_{null_j}^{-(W - 1) a_j},

whose score, with ``grad log p_G = sum_m kappa_m s_m`` (OR), is

    eps = u + w_G (sum_m kappa_m eps_m - u) + sum_i w_i (eps_i - u):

the pack's rule with the group as one binding whose prediction is the kappa-mix of its members, that
is, each member bound with weight ``w_G kappa_m``. With w_G = 1 and nothing else it is the mixture
itself; with w_G = s + 1 it is classifier-free guidance of the mixture against the pooled null. For an
AND group the same rule holds with AND's kappa (then pi is not a density). The rule reads the
per-term predictions of one evaluation (``poe.Terms``): the group nodes give each member the weight
``w_G pi_m`` (OR) or ``w_G / M`` (AND), and :func:`mix` moves the evaluated rule to the new kappa:
``out + sum_m (w_G kappa_m - w_m) (pred_m - u)``. At most one AND group per chain (two would need a
joint solve); any number of OR groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .poe import Binding, Terms, unwrap

KINDS = ("or", "and")
# Each AND coefficient is clipped to this range, then the coefficients are renormalised to sum 1. Chosen
# on one Gaussian pair among (-1, 2), (-10, 11) and (-100, 101) (BENCHMARKS.md, "OR / AND: AND of two
# Gaussians"): the solved coefficients reach hundreds at high noise, where the members nearly agree and
# a large coefficient moves the image little; clipped there, the tracked densities drift apart.
AND_CLIP = (-100.0, 101.0)


@dataclass(frozen=True, eq=False)
class Group:
    """An OR or AND group over some bindings of a chain (members carry it as ``Binding.group``).

    Args:
        kind (`str`): ``"or"`` or ``"and"``.
        weight (`float`, defaults to 1): w_G, the group's weight in the product (module docstring).
        priors (`tuple[float, ...]`): OR's prior weights pi, one per member in chain order, normalised.
        clip (`tuple[float, float]`, defaults to ``AND_CLIP``): AND's range for each coefficient.
        label (`str`): for messages and the summary.
    """

    kind: str
    weight: float = 1.0
    priors: tuple[float, ...] = ()
    clip: tuple[float, float] = AND_CLIP
    label: str = ""


def _name(b: Binding) -> str:
    return b.label or getattr(unwrap(b.expert), "name", type(b.expert).__name__)


def member_name(i: int, b: Binding) -> str:
    """A member as the rule text numbers its bindings: ``2. SD15 MODEL · a flamingo``."""
    name = getattr(unwrap(b.expert), "name", type(b.expert).__name__)
    return f"{i + 1}. {name} · {b.label}" if b.label and b.label != name else f"{i + 1}. {name}"


def groups_of(bindings: Sequence[Binding]) -> list[Group]:
    """The distinct groups of a chain, in the order of their first member."""
    seen: list[Group] = []
    for b in bindings:
        if b.group is not None and all(b.group is not g for g in seen):
            seen.append(b.group)
    return seen


def member_indices(bindings: Sequence[Binding], group: Group) -> list[int]:
    return [i for i, b in enumerate(bindings) if b.group is group]


def make_group(bindings: Sequence[Binding], indices: Sequence[int], kind: str, weight: float = 1.0,
               priors: Sequence[float] | None = None, clip: tuple[float, float] = AND_CLIP) -> list[Binding]:
    """A copy of the chain with the bindings at ``indices`` made one group; each member's weight
    becomes ``weight * pi_m`` (OR) or ``weight / M`` (AND), the rule at the prior coefficients."""
    if kind not in KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {KINDS}")
    bindings = list(bindings)
    indices = sorted(set(indices))
    if len(indices) < 2:
        raise ValueError(f"an {kind.upper()} group needs at least 2 bindings, got {len(indices)}")
    if not math.isfinite(weight) or weight == 0:
        raise ValueError(f"the group's weight must be a finite non-zero number, got {weight}")
    n = len(indices)
    if kind == "or":
        priors = [1.0] * n if not priors else [float(p) for p in priors]
        if len(priors) != n:
            raise ValueError(f"{len(priors)} prior weight(s) for {n} members: give one per member, in chain order")
        if any(not math.isfinite(p) or p <= 0 for p in priors):
            raise ValueError(f"prior weights must be finite and > 0, got {priors}")
        total = sum(priors)
        priors = tuple(p / total for p in priors)
    else:
        priors = tuple([1.0 / n] * n)
        lo, hi = clip
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < 1.0 / n < hi):
            raise ValueError(f"the AND clip range ({lo:g}, {hi:g}) must be finite and contain the even share 1/{n}")
    group = Group(kind, float(weight), priors, tuple(clip), f"{kind.upper()}({', '.join(str(i + 1) for i in indices)})")
    for i, p in zip(indices, priors):
        if bindings[i].group is not None:
            raise ValueError(f"binding {i + 1} ({_name(bindings[i])}) is already in {bindings[i].group.label}; a "
                             "binding belongs to one group")
        bindings[i] = replace(bindings[i], group=group, weight=weight * p)
    check_groups(bindings)
    return bindings


def check_groups(bindings: Sequence[Binding]) -> None:
    """Refuse groups whose members cannot be mixed by log-density, naming the member and the fix."""
    groups = groups_of(bindings)
    if sum(g.kind == "and" for g in groups) > 1:
        raise ValueError("the chain has more than one AND group: their coefficients would need one joint solve; "
                         "make one AND group of all the bindings that must agree")
    for g in groups:
        idx = member_indices(bindings, g)
        if len(idx) != len(g.priors):
            raise ValueError(f"{g.label}: {len(idx)} member(s) in the chain but {len(g.priors)} in the group; apply the "
                             "group node again after changing its members")
        for i in idx:
            b = bindings[i]
            name = f"binding {i + 1} ({_name(b)}) in {g.label}"
            if torch.as_tensor(b.weight).numel() > 1 or torch.as_tensor(b.reliability).numel() > 1:
                raise ValueError(f"{name} has a mask: a member is one density for the whole image; remove the mask")
            if b.banded:
                raise ValueError(f"{name} has a band or runs at a lower resolution; remove it from the group")
            if b.sigma_window != (0.0, math.inf) or b.reliability_ramp is not None:
                raise ValueError(f"{name} has a noise window or ramp: its log-density must be tracked at every level; "
                                 "remove PoEBindingSchedule from it")
            if b.reliability_from_variance:
                raise ValueError(f"{name} takes its reliability from variance; remove PoEReliabilityFromVariance")


# --- the estimator and the coefficients ------------------------------------------------------------

def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).flatten(1).sum(1)


def ito_increment(eps: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor, sigma: float,
                  sigma_next: float) -> torch.Tensor:
    """d log q of one Euler–Maruyama step (VE levels), per image, float64 (module docstring)."""
    if not math.isfinite(sigma):
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    delta = sigma**2 - sigma_next**2
    return -_dot(eps, x_next - x) / sigma - delta / (2 * sigma**2) * _dot(eps, eps)


def or_coefficients(log_q: torch.Tensor, priors: Sequence[float]) -> torch.Tensor:
    """M x B mixing coefficients ``softmax_m(log q_m + log pi_m)`` from M x B log-densities."""
    log_pi = torch.tensor([math.log(p) for p in priors], dtype=torch.float64, device=log_q.device)
    return torch.softmax(log_q.double() + log_pi.unsqueeze(1), dim=0)


def and_coefficients(members: Sequence[torch.Tensor], base: torch.Tensor, pooled: torch.Tensor | None,
                     noise: torch.Tensor, sigma: float, sigma_next: float, weight: float,
                     clip: tuple[float, float] = AND_CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """AND's coefficients for one Euler–Maruyama step, from eps predictions at its start (VE levels).

    The rule with coefficients kappa is ``eps = base + weight * sum_m kappa_m (eps_m - u)``, ``base``
    being the rule without the members (u the pooled null, 0 without one), and the step is
    ``x' = x - (delta / sigma) eps + sqrt(delta) z``. Solves, per image, ``d log q_m = d log q_1``
    (m = 2..M, :func:`ito_increment`) with ``sum kappa = 1``; clips each kappa to ``clip`` and
    renormalises. Returns (kappa, unclipped kappa), each M x B float64; an image whose system is
    singular (members that agree) gets the even share."""
    m = len(members)
    delta = sigma**2 - sigma_next**2
    u = torch.zeros_like(members[0]) if pooled is None else pooled
    fixed = -(delta / sigma) * base.double() + math.sqrt(delta) * noise.double()      # A
    per_unit = [-(delta / sigma) * weight * (e.double() - u.double()) for e in members]  # c_m
    batch = members[0].shape[0]
    mat = torch.zeros(batch, m, m, dtype=torch.float64, device=members[0].device)
    rhs = torch.zeros(batch, m, dtype=torch.float64, device=members[0].device)
    e1 = members[0].double()
    for k in range(1, m):
        d = members[k].double() - e1
        for j in range(m):
            mat[:, k - 1, j] = _dot(d, per_unit[j]) / sigma
        rhs[:, k - 1] = -_dot(d, fixed) / sigma - delta / (2 * sigma**2) * (_dot(members[k], members[k]) - _dot(e1, e1))
    mat[:, m - 1, :] = 1.0
    rhs[:, m - 1] = 1.0
    solution, info = torch.linalg.solve_ex(mat, rhs)
    even = torch.full_like(solution, 1.0 / m)
    ok = (info == 0).unsqueeze(1) & torch.isfinite(solution).all(1, keepdim=True)
    raw = torch.where(ok, solution, even)
    lo, hi = clip
    clipped = raw.clamp(lo, hi)
    total = clipped.sum(1, keepdim=True)
    kappa = torch.where(total > 0, clipped / torch.where(total > 0, total, 1.0), even)
    return kappa.T.contiguous(), raw.T.contiguous()


def mix(terms: Terms, group: Group, kappa: torch.Tensor) -> torch.Tensor:
    """The rule's output with the group's members weighted ``w_G kappa_m`` (M x B) instead of the
    weights they were evaluated with (module docstring, "The mixed rule")."""
    out = terms.output.clone()
    pooled = terms.pooled
    idx = member_indices(terms.bindings, group)
    for row, i in enumerate(idx):
        b, pred = terms.bindings[i], terms.cond[i]
        coef = (group.weight * kappa[row] - float(b.weight)).to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
        out += coef * (pred if pooled is None else pred - pooled)
    return out


def base_prediction(terms: Terms, group: Group) -> torch.Tensor:
    """The rule without the group's members, ``out - sum_m w_m (eps_m - u)`` (u = 0 without a pooled
    null). Only in eps: without a pooled null the rest's coefficients no longer sum to 1, so the same
    sum over denoised predictions would not be the denoised rest."""
    out = terms.output.clone()
    for i in member_indices(terms.bindings, group):
        pred = terms.cond[i]
        out -= float(terms.bindings[i].weight) * (pred if terms.pooled is None else pred - terms.pooled)
    return out


def as_eps(terms: Terms, x: torch.Tensor, sigma: float) -> Terms:
    """The record with every denoised prediction D turned into ``eps = (x - D) / sigma`` (VE)."""
    def e(d):
        return None if d is None else (x - d) / sigma

    return replace(terms, cond=[e(d) for d in terms.cond], nulls=[[e(d) for d in rows] for rows in terms.nulls],
                   pooled=e(terms.pooled), output=e(terms.output))


# --- what happened ----------------------------------------------------------------------------------

@dataclass
class GroupReport:
    """One group over one run: its members, OR's final coefficients, AND's coefficient range and
    clipping, and the tracked log-densities at the end."""

    label: str
    kind: str
    members: list = field(default_factory=list)
    kappa_min: float = math.inf
    kappa_max: float = -math.inf
    raw_min: float = math.inf
    raw_max: float = -math.inf
    clipped: int = 0
    solved: int = 0
    final_kappa: list = field(default_factory=list)   # per member, mean over images
    final_share: list = field(default_factory=list)   # per member, fraction of images where it leads
    final_log_q: torch.Tensor | None = None            # M x B
    clip: tuple = AND_CLIP

    def record(self, kappa: torch.Tensor, raw: torch.Tensor | None = None) -> None:
        self.kappa_min = min(self.kappa_min, float(kappa.min()))
        self.kappa_max = max(self.kappa_max, float(kappa.max()))
        if raw is not None:
            self.raw_min = min(self.raw_min, float(raw.min()))
            self.raw_max = max(self.raw_max, float(raw.max()))
            self.clipped += int((raw != raw.clamp(*self.clip)).any(0).sum())
            self.solved += raw.shape[1]

    def finish(self, kappa: torch.Tensor, log_q: torch.Tensor) -> None:
        self.final_kappa = kappa.mean(1).tolist()
        lead = kappa.argmax(0)
        self.final_share = [float((lead == m).double().mean()) for m in range(kappa.shape[0])]
        self.final_log_q = log_q.detach().cpu()

    def summary(self) -> str:
        names = ", ".join(self.members)
        if self.kind == "or":
            shares = ", ".join(f"{n} {s:.2f}" for n, s in zip(self.members, self.final_share))
            return f"{self.label}: images by the member that leads at the end: {shares}"
        spread = ""
        if self.final_log_q is not None and self.final_log_q.shape[0] > 1:
            gap = (self.final_log_q - self.final_log_q.mean(0)).abs().max(0).values
            spread = f"; tracked log-density gap at the end: mean {float(gap.mean()):.3g} nats"
        return (f"{self.label} ({names}): coefficients in [{self.kappa_min:.3g}, {self.kappa_max:.3g}] after clipping "
                f"to [{self.clip[0]:g}, {self.clip[1]:g}] (solved [{self.raw_min:.3g}, {self.raw_max:.3g}]); "
                f"clipped in {self.clipped} of {self.solved} image-step(s){spread}")


@dataclass
class CompositionReport:
    """Every group of one run (``GroupReport``)."""

    groups: list = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(g.summary() for g in self.groups) if self.groups else "no OR / AND group ran"


def describe_groups(bindings: Sequence[Binding]) -> str:
    """The groups of a chain and their rule, for the rule text ('' without groups)."""
    lines = []
    for g in groups_of(bindings):
        names = [member_name(i, bindings[i]) for i in member_indices(bindings, g)]
        if g.kind == "or":
            parts = ", ".join(f"{n} (pi={p:.3g})" for n, p in zip(names, g.priors))
            lines.append(f"  {g.label}: mixture of {parts}, weight {g.weight:g}: members weighted w_G kappa_m, "
                         "kappa = softmax(log q_m + log pi_m) from Itô log-densities (SuperDiff)")
        else:
            lines.append(f"  {g.label}: AND of {', '.join(names)}, weight {g.weight:g}: kappa solved each step for "
                         f"equal log-density increments, each clipped to [{g.clip[0]:g}, {g.clip[1]:g}] (SuperDiff)")
    return "\n".join(lines)

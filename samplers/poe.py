"""The product-of-experts rule (Unite and Conquer, Nair et al. CVPR 2023, eq. 10 with weights).

For bindings i = 1..N (expert e_i, condition c_i, weight w_i, reliability a_i) at noise level sigma:

    eps = sum_i w_i eps_i(z, c_i) - (sum_i w_i - 1) * sum_j a_j eps_j(z, null_j)       (a normalised)
        = u + sum_i w_i (eps_i(z, c_i) - u),      u = sum_j a_j eps_j(z, null_j)      (pooled null)

The second form shows what the terms do: ``u`` is the pooled unconditional score, the
reliability-weighted mix of the experts' own priors, and each binding pulls away from it along
its own conditional direction. One expert bound once with w = 1 is that expert; one expert bound
with weight 1 + s (and a = 1) is classifier-free guidance ``(1 + s) eps_c - s eps_u``.

The coefficients of the rule sum to one, so the same rule combines noise predictions and
denoised images alike. Weights and reliabilities may be tensors broadcastable to the image
(spatial products); reliabilities are then normalised per pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from . import bands as bands_mod
from .bands import Band
from .variance_reliability import precision_reliabilities

Condition = dict[str, torch.Tensor]
Scalar = float | torch.Tensor
# eps_fn(expert, x, sigma, condition) -> prediction for x repeated once per condition row; called
# with with_variance=True it returns (prediction, Var[x0 | x]) for products whose reliabilities
# come from the experts' learned variances (Binding.reliability_from_variance).
EpsFn = Callable[..., Any]
# device_of(expert) -> the device its weights sit on (experts of one product may sit on different GPUs).
DeviceOf = Callable[[Any], "torch.device | str"]


@dataclass(eq=False)
class Binding:
    """One expert with one condition inside a product.

    Args:
        expert: the expert object; the core only groups by identity and hands it to ``eps_fn``.
        condition (`Condition`): keyword tensors for the expert, batch dim 1 or B.
        weight (`float` or `torch.Tensor`, defaults to 1): w_i. A tensor broadcastable to
            B x C x H x W makes the binding spatial.
        reliability (`float` or `torch.Tensor`, defaults to 0): a_i before normalisation, how much
            this binding's null contributes to the pooled null.
        null (`tuple[Condition, ...]`): conditions whose predictions are averaged to form this
            binding's null (one for a trained null, k for "mean over k classes"); empty when the
            binding supplies no null, and then its reliability must be 0.
        sigma_window (`tuple[float, float]`, defaults to all sigmas): the binding takes part only
            for lo <= sigma <= hi, and costs no forward outside (Kynkäänniemi et al. 2024).
        reliability_ramp (`tuple[float, float, float, float]`, *optional*): ``(sigma_a, f_a, sigma_b,
            f_b)`` with sigma_a > sigma_b: the reliability is multiplied by f_a at sigma >= sigma_a, by
            f_b at sigma <= sigma_b, and by the linear interpolation in log sigma between. It hands
            the prior from one expert to another during sampling.
        label (`str`): what the binding is, for messages and the rule summary.
        reliability_from_variance (`bool`, defaults to False): EXPERIMENTAL. The binding's share of
            the pooled null becomes, per pixel, ``reliability / Var[x0 | x]`` of its null's prediction
            (normalised), from its expert's learned variance (``variance_reliability``, PoE-GAN's
            precision weighting). All bindings that supply a null must agree on it.
        band (`bands.Band`, *optional*): the weight becomes ``w b(f)``, a function of the DCT frequency
            (``samplers/bands.py``); ``None`` or an all-pass band is today's rule.
        resolution_factor (`int`, defaults to 1): k when the expert makes images k times smaller than the
            canvas: it is evaluated on the k x k average-pooled input at sigma / k and its prediction
            lifted into the piecewise-constant subspace P (weight w there, 0 on I - P; ``bands``).
        group (*optional*): the OR / AND group (``superposition.Group``) this binding is a member of.
            A member's weight is then set by the group at every step, per image, so only the samplers
            of ``superposition`` (which read the per-term predictions) can sample it.
    """

    expert: Any
    condition: Condition
    weight: Scalar = 1.0
    reliability: Scalar = 0.0
    null: tuple[Condition, ...] = ()
    sigma_window: tuple[float, float] = (0.0, math.inf)
    reliability_ramp: tuple[float, float, float, float] | None = None
    label: str = ""
    reliability_from_variance: bool = False
    band: Band | None = None
    resolution_factor: int = 1
    group: Any = None

    @property
    def banded(self) -> bool:
        """Whether the binding leaves today's pixel-basis rule: a band that is not all-pass, or k > 1."""
        return self.resolution_factor != 1 or (self.band is not None and not self.band.all_pass)

    def active(self, sigma: float) -> bool:
        lo, hi = self.sigma_window
        return lo <= sigma <= hi

    def reliability_at(self, sigma: float) -> Scalar:
        if self.reliability_ramp is None:
            return self.reliability
        return self.reliability * ramp_factor(sigma, self.reliability_ramp)


def ramp_factor(sigma: float, ramp: tuple[float, float, float, float]) -> float:
    """Linear interpolation in log sigma between (sigma_a, f_a) and (sigma_b, f_b), flat outside."""
    sigma_a, f_a, sigma_b, f_b = ramp
    if sigma >= sigma_a:
        return f_a
    if sigma <= sigma_b:
        return f_b
    s = (math.log(sigma_a) - math.log(sigma)) / (math.log(sigma_a) - math.log(sigma_b))
    return f_a + s * (f_b - f_a)


def at_sigma(bindings: Sequence[Binding], sigma: float) -> list[Binding]:
    """The bindings that take part at ``sigma``, with their reliabilities evaluated there."""
    out = []
    for b in bindings:
        if b.active(sigma):
            out.append(b if b.reliability_ramp is None else replace(b, reliability=b.reliability_at(sigma),
                                                                       reliability_ramp=None))
    return out


def unwrap(expert: Any) -> Any:
    """The expert itself, from an expert or a handle that carries one as ``.expert`` (ComfyUI's)."""
    return getattr(expert, "expert", expert)


def _expert_name(expert: Any) -> str:
    if isinstance(expert, str):
        return expert
    return getattr(expert, "name", type(expert).__name__)


def _is_zero(v: Scalar) -> bool:
    return bool((torch.as_tensor(v) == 0).all())


def total_weight(bindings: Sequence[Binding]) -> torch.Tensor:
    """sum_i w_i, per pixel where a weight is spatial (float64)."""
    return sum(torch.as_tensor(b.weight, dtype=torch.float64) for b in bindings)


def null_levels(bindings: Sequence[Binding], shape: tuple[int, ...]) -> list[bool]:
    """Per resolution level (``bands.levels_of``), whether the rule's null term acts there on a canvas of
    ``shape``: its coefficient ``I - sum_i w_i F_i`` is non-zero at some pixel or frequency
    (``bands.null_levels``). Masked weights count per pixel, so 1.5 on one half and 0.5 on the other
    need it; complementary bands of weight 1 do not. The forward plan, validation and the rule text
    all read it here."""
    return bands_mod.null_levels([b.weight for b in bindings], [b.band for b in bindings],
                                 [int(b.resolution_factor) for b in bindings], shape)


def needs_pooled_null(bindings: Sequence[Binding], shape: tuple[int, ...] = (64, 64)) -> bool:
    """Whether the rule uses the pooled null anywhere (:func:`null_levels`). ``shape`` matters only for
    bands, whose response depends on the grid (64 x 64 when the canvas is not known yet)."""
    return any(null_levels(bindings, shape))


def null_coefficients(bindings: Sequence[Binding]) -> list[tuple[str, float]] | None:
    """What each distinct null weighs once every binding is guided against its own null.

    When every binding supplies a null n_i, the rule is
    ``sum_i w_i (eps_i(c_i) - eps_i(n_i)) + sum_j (w_j - (W - 1) a_j) eps_j(n_j)`` with ``W = sum_i w_i``:
    per-expert guidance plus a base whose coefficients sum to 1. Bindings of one expert with one
    null share a coefficient. A negative one makes the base extrapolate away from that expert's
    prior; ``a_j`` proportional to ``w_j`` keeps every coefficient at ``w_j / W``. Returns
    ``(labels, coefficient)`` per distinct (expert, null), or None where this reading does not
    apply: a binding without a null in the pool (no null, or reliability 0: guidance against
    another expert's null, as with a prior expert), a weight of 0 or below (a prior-only binding,
    negation), spatial weights or reliabilities, noise windows, reliability ramps, bands, or
    reliabilities from variance.
    """
    if any(not b.null or b.banded or b.reliability_ramp is not None or b.reliability_from_variance
           or b.sigma_window != (0.0, math.inf) or _scalar(b.weight) is None or _scalar(b.reliability) is None
           for b in bindings):
        return None
    if any(_scalar(b.weight) <= 0 or _scalar(b.reliability) <= 0 for b in bindings):
        return None
    total_w = sum(_scalar(b.weight) for b in bindings)
    total_a = sum(_scalar(b.reliability) for b in bindings)
    groups: list[tuple[Any, tuple[Condition, ...], list[str], float]] = []
    for b in bindings:
        coef = _scalar(b.weight) - (total_w - 1) * _scalar(b.reliability) / total_a
        label = b.label or _expert_name(unwrap(b.expert))
        for i, (expert, null, labels, c) in enumerate(groups):
            if expert is unwrap(b.expert) and len(null) == len(b.null) and all(
                    x is y or _same_condition(x, y) for x, y in zip(null, b.null)):
                groups[i] = (expert, null, labels + [label], c + coef)
                break
        else:
            groups.append((unwrap(b.expert), b.null, [label], coef))
    return [(" + ".join(labels), c) for _, _, labels, c in groups]


def normalise_reliabilities(reliabilities: Sequence[Scalar]) -> list[torch.Tensor]:
    """a_j / sum_k a_k, per pixel for tensors; uniform where every reliability is 0.

    The uniform fallback only matters for spatial reliabilities, where a region can be left
    without any reliability; the scalar all-zero case is refused whenever it would be used
    (``validation.check_rule``).
    """
    a = [torch.as_tensor(r, dtype=torch.float32) for r in reliabilities]
    total = sum(a)
    uniform = torch.as_tensor(1.0 / len(a))
    return [torch.where(total > 0, r / torch.where(total > 0, total, 1.0), uniform) for r in a]


def _scalar(v: Scalar) -> float | None:
    """``v`` as a Python number when it is one (read on the host: no device copy, no sync), else None."""
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu":
        return float(v)
    return None


def _scaled(coef: Scalar, p: torch.Tensor) -> torch.Tensor:
    c = _scalar(coef)
    return p * c if c is not None else p * torch.as_tensor(coef).to(p)


def _add_scaled(out: torch.Tensor, coef: Scalar, p: torch.Tensor) -> None:
    """``out += coef * p`` in place: one kernel, the scalar passed as its argument."""
    c = _scalar(coef)
    if c is None:
        out.addcmul_(torch.as_tensor(coef).to(p), p)
    elif c:
        out.add_(p, alpha=c)


def _weighted_sum(coefs: Sequence[Scalar], preds: Sequence[torch.Tensor]) -> torch.Tensor:
    out = _scaled(coefs[0], preds[0])
    for coef, p in zip(coefs[1:], preds[1:]):
        _add_scaled(out, coef, p)
    return out


def combine(cond_preds: Sequence[torch.Tensor], weights: Sequence[Scalar], null_preds: Sequence[torch.Tensor] = (),
            reliabilities: Sequence[Scalar] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rule on predictions that are already computed. Returns (product, pooled null).

    Scalar weights and reliabilities stay on the host as kernel arguments, so a step copies
    nothing to the device.
    """
    pooled = None
    if null_preds:
        pooled = _weighted_sum(normalise_reliabilities(reliabilities), null_preds)
    if not cond_preds:
        return torch.zeros_like(pooled), pooled
    if pooled is None:
        return _weighted_sum(weights, cond_preds), None
    # The second form, u + sum_i w_i (eps_i - u): one binding is then classifier-free guidance in
    # the order of ComfyUI's cfg_function, so it matches the stock sampler to the last bit (steps
    # such as Heun's from sigma 2e4 amplify any rounding difference).
    out = pooled + _scaled(weights[0], cond_preds[0] - pooled)
    for coef, p in zip(weights[1:], cond_preds[1:]):
        out += _scaled(coef, p - pooled)
    return out, pooled


# --- one batched forward per expert ------------------------------------------------------------

def _same_condition(a: Condition, b: Condition) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@dataclass
class ExpertCall:
    """The rows of one expert's batched forward: every distinct condition, nulls included."""
    expert: Any
    rows: list[Condition] = field(default_factory=list)
    factor: int = 1          # evaluated on the k x k pooled input at sigma / k (bands.py)

    def row(self, condition: Condition) -> int:
        for i, existing in enumerate(self.rows):
            if existing is condition or _same_condition(existing, condition):
                return i
        self.rows.append(condition)
        return len(self.rows) - 1


def stack_conditions(rows: Sequence[Condition], batch: int) -> Condition:
    """Expand each row's tensors to the batch and concatenate rows along the batch dimension."""
    keys = rows[0].keys()
    for r in rows[1:]:
        if r.keys() != keys:
            raise ValueError(f"conditions of one expert disagree on their inputs: {sorted(keys)} vs {sorted(r.keys())}")
    out = {}
    for k in keys:
        parts = []
        for r in rows:
            v = r[k]
            if v.shape[0] not in (1, batch):
                raise ValueError(f"condition input {k!r} has batch {v.shape[0]}, expected 1 or {batch}")
            parts.append(v.expand(batch, *v.shape[1:]))
        out[k] = torch.cat(parts)
    return out


@dataclass
class ForwardPlan:
    """Which forward rows feed which term of the rule, for the bindings active at one sigma."""
    calls: list[ExpertCall]
    cond_index: list[tuple[int, int]]            # binding -> (call, row)
    null_index: list[list[tuple[int, int]]]      # binding -> [(call, row), ...], empty if unused
    bindings: list[Binding]
    null_levels: list[bool]                      # per resolution level: whether the null term acts there
    variance_calls: frozenset[int] = frozenset()  # calls that also return Var[x0 | x] (their nulls need it)


def plan_forwards(bindings: Sequence[Binding], shape: tuple[int, ...] = (64, 64),
                  needed: list[bool] | None = None) -> ForwardPlan:
    """Group the rows of all bindings by expert, so each expert runs one forward per step.

    A null runs only where it is not multiplied by zero: its binding's reliability is non-zero, and
    the null term acts on some band that its expert's null covers (:func:`null_levels` on a canvas
    of ``shape``, or ``needed`` when the caller has them: a null at factor k is part of the pooled
    null on every level K >= k). A binding of weight 0 runs no conditional row.
    """
    levels = bands_mod.levels_of([int(b.resolution_factor) for b in bindings])
    needed = null_levels(bindings, shape) if needed is None else needed
    # The coarsest level on which the null term acts: nulls at factors up to it are used.
    reach = max((level for level, n in zip(levels, needed) if n), default=0)
    calls: list[ExpertCall] = []
    by_expert: dict[tuple[int, int], int] = {}

    def call_for(expert, factor: int) -> int:
        key = (id(expert), factor)
        if key not in by_expert:
            by_expert[key] = len(calls)
            calls.append(ExpertCall(expert, factor=factor))
        return by_expert[key]

    cond_index, null_index = [], []
    for b in bindings:
        c = call_for(b.expert, int(b.resolution_factor))
        cond_index.append((c, calls[c].row(b.condition)) if not _is_zero(b.weight) else (c, -1))
        if int(b.resolution_factor) <= reach and not _is_zero(b.reliability):
            null_index.append([(c, calls[c].row(n)) for n in b.null])
        else:
            null_index.append([])
    variance_calls = frozenset(c for b, idx in zip(bindings, null_index) if b.reliability_from_variance
                               for c, _ in idx)
    return ForwardPlan(calls, cond_index, null_index, list(bindings), needed, variance_calls)


def _stacked(call: ExpertCall, batch: int, device: torch.device, staged: dict | None) -> Condition:
    """The call's conditions stacked for the batch on the expert's ``device``; with ``staged``, built
    and copied there once per sampling run instead of at every step (a copy from pageable host memory
    waits for the device to empty its queue, which stops the host from queueing the next expert's
    kernels)."""
    if staged is None:
        return {k: v.to(device) for k, v in stack_conditions(call.rows, batch).items()}
    key = (id(call.expert), call.factor, tuple(id(r) for r in call.rows), batch, str(device))
    if key not in staged:
        # The rows are kept with their tensors, so no id in the key is reused while the cache lives.
        staged[key] = (list(call.rows), {k: v.to(device) for k, v in stack_conditions(call.rows, batch).items()})
    return staged[key][1]


def run_plan(plan: ForwardPlan, x: torch.Tensor, sigma: torch.Tensor, eps_fn: EpsFn,
             staged: dict | None = None, device_of: DeviceOf | None = None,
             variances: list | None = None) -> list[list[torch.Tensor]]:
    """One forward per expert call; returns each call's predictions split per row, on ``x``'s device.

    ``staged`` is a dict the caller keeps for one sampling run (see :func:`_stacked`). ``device_of``
    names the device each expert runs on (``None``: all on ``x``'s): the expert gets ``x``, ``sigma``
    and its conditions there, and its prediction comes back to ``x``'s device for the rule. With
    ``variances`` (a list), the Var[x0 | x] rows of each call in ``plan.variance_calls`` are appended
    to it in the same layout as the predictions (an empty list for the other calls)."""
    batch = x.shape[0]
    outputs = []
    for i, call in enumerate(plan.calls):
        if variances is not None:
            variances.append([])
        if not call.rows:
            outputs.append([])
            continue
        device = x.device if device_of is None else torch.device(device_of(call.expert))
        n = len(call.rows)
        # A lower-resolution expert sees D x, whose noise is sigma / k (bands.py).
        x_in, sigma_in = (x, sigma) if call.factor == 1 else (bands_mod.pool(x, call.factor), sigma / call.factor)
        # Moved before repeating, so a copy between devices carries one batch, not one per row.
        x_rows = x_in.to(device).repeat(n, *([1] * (x.ndim - 1)))
        sigma_rows = sigma_in.to(device).repeat(n) if sigma_in.ndim else sigma_in.to(device)
        stacked = _stacked(call, batch, device, staged)
        if variances is not None and i in plan.variance_calls:
            pred, var = eps_fn(call.expert, x_rows, sigma_rows, stacked, with_variance=True)
            variances[-1] = list(var.to(x.device).split(batch))
        else:
            pred = eps_fn(call.expert, x_rows, sigma_rows, stacked)
        outputs.append(list(pred.to(x.device).split(batch)))
    return outputs


def _check_finite(result: Sequence[torch.Tensor], plan: ForwardPlan, outs: list[list[torch.Tensor]],
                  sigma: float) -> None:
    """One host sync per step, after every forward is queued: a NaN or Inf in any row that the rule
    uses reaches the result. Only on failure are the experts' rows searched for the culprit."""
    if bool(torch.stack([torch.isfinite(r).all() for r in result]).all()):
        return
    for call, preds in zip(plan.calls, outs):
        if preds and not bool(torch.isfinite(torch.cat(preds)).all()):
            raise FloatingPointError(
                f"{_expert_name(call.expert)} returned NaN or Inf at sigma={sigma:.4g}; "
                "check its checkpoint and dtype (fp16 overflow is common; try bf16 or fp32)")
    raise FloatingPointError(f"the product is NaN or Inf at sigma={sigma:.4g} although every expert's prediction "
                             "is finite: check the bindings' weights and reliabilities")


def _row_mean(per_call: list[list[torch.Tensor]], idx: list[tuple[int, int]]) -> torch.Tensor:
    """The mean of the rows ``idx`` (one null, or a null averaged over several conditions)."""
    if len(idx) == 1:
        c, r = idx[0]
        return per_call[c][r]
    return _weighted_sum([1 / len(idx)] * len(idx), [per_call[c][r] for c, r in idx])


@dataclass
class Terms:
    """The terms one evaluation of the rule combined, as ``eps_fn`` returned them (noise or denoised
    predictions): what particle weights (``particles``) and OR / AND (``superposition``) read, so
    neither runs a forward of its own. Filled by :func:`product_prediction` when given a list.

    Args:
        sigma (`float`): the level the rule was evaluated at (the sampler's own sigma).
        bindings (`list[Binding]`): the bindings active there, in chain order.
        cond (`list`): each binding's conditional prediction, ``None`` where its weight is 0.
        nulls (`list[list[torch.Tensor]]`): the rows each binding's null averages (one for a trained
            null, k for a mean over k conditions), empty where its null is not pooled.
        reliabilities (`list`): the normalised a_j of the bindings whose nulls are pooled, in order.
        pooled (`torch.Tensor` or `None`): the pooled null u; output (`torch.Tensor`): the rule's result.
    """
    sigma: float
    bindings: list[Binding]
    cond: list[torch.Tensor | None]
    nulls: list[list[torch.Tensor]]
    reliabilities: list[Scalar]
    pooled: torch.Tensor | None
    output: torch.Tensor


def product_prediction(x: torch.Tensor, sigma: torch.Tensor, bindings: Sequence[Binding], eps_fn: EpsFn,
                       staged: dict | None = None, device_of: DeviceOf | None = None,
                       prediction: str = "eps", terms: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The product's prediction at ``(x, sigma)`` and the pooled null (``None`` when unused).

    ``eps_fn`` returns either noise or denoised predictions; the rule is affine with coefficients
    summing to one, so it applies to both. Bindings outside their sigma window take no part and
    cost no forward. ``staged``: an empty dict kept by the caller across the steps of one sampling
    run, which then holds each expert's stacked conditions on its device. ``device_of(expert)``:
    where each expert runs when they sit on different devices (:func:`run_plan`); the rule itself
    is computed on ``x``'s device. ``prediction`` says what ``eps_fn`` returns (``eps`` or
    ``denoised``); it matters only for experts at a lower resolution, whose lift into the canvas
    scales noise by 1/k (``bands.lift_scale``). ``staged`` also keeps, per set of active bindings, the
    levels where the null term acts (:func:`null_levels`). ``terms``: a list to which a :class:`Terms`
    record of this evaluation is appended (not for bands and resolution factors).
    """
    s = float(torch.as_tensor(sigma).flatten()[0])
    active = at_sigma(bindings, s)
    if not active:
        raise ValueError(f"no binding is active at sigma={s:.4g}: widen at least one binding's sigma window")
    if terms is None and any(b.group is not None for b in active):
        raise ValueError("the chain has an OR / AND group (PoEOrGroup, PoEAndGroup), whose members' weights change "
                         "at every step with each image's log-densities: sample it with the pack's SDE step (sampler "
                         "'poe_euler_maruyama' in PoEKSampler, or PoESDESampler as the SAMPLER of "
                         "SamplerCustomAdvanced)")
    # Which products are defined is validation's (samplers/validation.py), checked once before sampling
    # at every level of the schedule; the guards below only stop a product that skipped it.
    plan = plan_forwards(active, tuple(x.shape), _null_levels_once(active, tuple(x.shape), staged))
    variances: list[list[torch.Tensor]] = []
    outs = run_plan(plan, x, sigma, eps_fn, staged, device_of, variances)
    cond_preds, weights = [], []
    for b, (c, r) in zip(active, plan.cond_index):
        if r >= 0:
            cond_preds.append(outs[c][r])
            weights.append(b.weight)
    null_preds, rel, null_vars = [], [], []
    for b, idx in zip(active, plan.null_index):
        if idx:
            null_preds.append(_row_mean(outs, idx))
            rel.append(b.reliability)
            if b.reliability_from_variance:
                null_vars.append(_row_mean(variances, idx))
    if null_vars:
        rel = precision_reliabilities(null_vars, rel)
    if any(b.banded for b in active):
        if terms is not None:
            raise ValueError("bands and lower-resolution experts weight each frequency on its own, so the rule has no "
                             "per-term exponents for particles or OR / AND; remove PoEBandWeights or the smaller expert")
        return _banded_prediction(x, active, plan, outs, rel, prediction, s)
    if not cond_preds:
        # The empty set: every weight is 0, and the rule reduces to the pooled prior u.
        if not null_preds:
            raise ValueError("every weight is 0 and no binding supplies a null: the product is empty")
        pooled = combine([], [], null_preds, rel)[1]
        _check_finite([pooled], plan, outs, s)
        if terms is not None:
            terms.append(_terms(s, active, plan, outs, rel, pooled, pooled))
        return pooled, pooled
    out, pooled = combine(cond_preds, weights, null_preds, rel)
    if pooled is None and any(plan.null_levels):
        raise ValueError(f"the weights sum to {float(torch.as_tensor(total_weight(active)).mean()):.4g} at sigma={s:.4g} but no active binding "
                         "supplies a null with reliability > 0")
    _check_finite([out] if pooled is None else [out, pooled], plan, outs, s)
    if terms is not None:
        terms.append(_terms(s, active, plan, outs, rel, pooled, out))
    return out, pooled


def _null_levels_once(active: Sequence[Binding], shape: tuple[int, ...], staged: dict | None) -> list[bool]:
    """:func:`null_levels`, computed once per set of active weights and bands in a sampling run (``staged``):
    they change only at window edges, and a banded canvas costs a few DCTs to probe."""
    if staged is None:
        return null_levels(active, shape)
    # Ramps replace a binding but keep its weight and band objects; the entry keeps them too, so no id in its
    # key is reused while the cache lives.
    key = ("null_levels", tuple((id(b.weight), id(b.band), int(b.resolution_factor)) for b in active), shape[-2:])
    if key not in staged:
        staged[key] = ([(b.weight, b.band) for b in active], null_levels(active, shape))
    return staged[key][1]


def _terms(s: float, active: Sequence[Binding], plan: ForwardPlan, outs: list[list[torch.Tensor]],
           rel: Sequence[Scalar], pooled: torch.Tensor | None, out: torch.Tensor) -> Terms:
    cond = [outs[c][r] if r >= 0 else None for c, r in plan.cond_index]
    nulls = [[outs[c][r] for c, r in idx] for idx in plan.null_index]
    return Terms(s, list(active), cond, nulls, normalise_reliabilities(rel) if rel else [], pooled, out)


def _banded_prediction(x: torch.Tensor, active: Sequence[Binding], plan: ForwardPlan, outs: list[list[torch.Tensor]],
                       rel: Sequence[Scalar], prediction: str, s: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rule with bands and resolution factors (``bands``): the pooled null per band, then
    ``u + sum_i w_i F_i(eps_i - u)``. ``rel``: the reliabilities of the bindings that supply a null, in
    their order (already weighted by precision where reliability comes from variance)."""
    def lifted(b: Binding, p: torch.Tensor) -> torch.Tensor:
        k = int(b.resolution_factor)
        return p if k == 1 else p * bands_mod.lift_scale(prediction, k)

    null_preds, null_factors = [], []
    for b, idx in zip(active, plan.null_index):
        if idx:
            null_preds.append(lifted(b, _row_mean(outs, idx)))
            null_factors.append(int(b.resolution_factor))
    levels = bands_mod.levels_of([int(b.resolution_factor) for b in active])
    pooled = bands_mod.pooled_null(null_preds, rel, null_factors, tuple(x.shape), levels, plan.null_levels)
    cond = [(b, lifted(b, outs[c][r])) for b, (c, r) in zip(active, plan.cond_index) if r >= 0]
    if not cond:
        if pooled is None:
            raise ValueError("every weight is 0 and no binding supplies a null: the product is empty")
        _check_finite([pooled], plan, outs, s)
        return pooled, pooled
    out = bands_mod.combine_banded([p for _, p in cond], [b.weight for b, _ in cond], [b.band for b, _ in cond],
                                   [int(b.resolution_factor) for b, _ in cond], pooled, tuple(x.shape))
    _check_finite([out] if pooled is None else [out, pooled], plan, outs, s)
    return out, pooled

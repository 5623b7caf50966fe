"""How a product and its corrector describe themselves: one line per binding, the rule in words and
numbers, the corrector and its cost. Each statement comes from the function that owns the rule."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import bands
from .correctors import CorrectorConfig, evaluations_per_level
from .poe import Binding, needs_pooled_null, normalise_reliabilities, null_coefficients, total_weight, unwrap


def _fmt(v: Any) -> str:
    t = torch.as_tensor(v, dtype=torch.float32)
    if t.numel() == 1:
        return f"{float(t):.3g}"
    return f"{float(t.min()):.3g}..{float(t.max()):.3g} (spatial)"


def describe(binding: Binding, normalised_reliability: Any | None = None) -> str:
    """One line, such as ``ADM-64 · class 292: tiger · w=5 · a=0.556``."""
    e = unwrap(binding.expert)
    parts = [e.name, binding.label or "unconditional", f"w={_fmt(binding.weight)}"]
    a = binding.reliability if normalised_reliability is None else normalised_reliability
    parts.append(f"a={_fmt(a)}")
    lo, hi = binding.sigma_window
    if lo > 0 or math.isfinite(hi):
        parts.append(f"sigma in [{lo:.3g}, {hi:.3g}]")
    banded = bands.describe(binding.band, binding.resolution_factor, getattr(e, "resolution", None))
    if banded:
        parts.append(banded)
    return " · ".join(parts)


def describe_rule(bindings: Sequence[Binding]) -> str:
    """The combined rule the sampler is about to run, in words and numbers."""
    rel = normalise_reliabilities([b.reliability for b in bindings])
    lines = [f"product of {len(bindings)} binding(s) over "
             f"{len({id(b.expert) for b in bindings})} expert(s): "
             f"eps = sum_i w_i eps_i(x, c_i) - (sum_i w_i - 1) * sum_j a_j eps_j(x, null_j)",
             f"sum of weights = {_fmt_total(total_weight(bindings))}"]
    per_frequency = _banded_total(bindings)
    if per_frequency:
        lines.append(f"  per frequency, sum_i w_i F_i(f) = {per_frequency} (the weight the null term balances in each band)")
    for i, (b, a) in enumerate(zip(bindings, rel), 1):
        lines.append(f"  {i}. {describe(b, a)}")
    if any(b.banded for b in bindings):
        lines.append("  bands: eps = u + sum_i w_i F_i(eps_i - u), F_i each binding's band (DCT) or, for an expert "
                     "at 1/k of the canvas, its prediction on the k x k pooled image at sigma/k lifted into the "
                     "piecewise-constant images; the pooled null u mixes, per band, the nulls defined there")
        costs = sorted({(getattr(unwrap(b.expert), "name", "?"), b.resolution_factor) for b in bindings
                        if b.resolution_factor > 1})
        for name, k in costs:
            lines.append(f"  cost: {name} runs on 1/{k * k} of the canvas's pixels (its own size)")
    elif not needs_pooled_null(bindings):
        lines.append("  (weights sum to 1: the pooled null cancels and no null forward runs)")
    elif any(b.reliability_from_variance for b in bindings):
        lines.append("  reliabilities: a_j / Var_j[x0 | x] per pixel, from the experts' learned variances (experimental)")
    else:
        lines.extend(_negative_null_note(bindings))
    return "\n".join(lines)


def _negative_null_note(bindings: Sequence[Binding]) -> list[str]:
    """A warning when some expert's prior enters the rule with a negative net weight (``poe.null_coefficients``)."""
    coefficients = null_coefficients(bindings)
    # Not at rounding level: the paper's reliabilities 5/9 and 4/9, typed as 0.5556 and 0.4444, leave k = -0.0004.
    negative = [(label, c) for label, c in coefficients or () if c < -0.01]
    if not negative or len(coefficients) < 2:
        return []
    listed = ", ".join(f"{label} {c:.3g}" for label, c in negative)
    return [f"  note: net null weights w_j - (sum w - 1) a_j below 0 ({listed}) subtract those experts' priors; "
            "reliabilities equal to the weights guide every expert against its own null (README, 'Choosing "
            "reliabilities')"]


def _banded_total(bindings: Sequence[Binding], grid: int = 64) -> str:
    """The weight total per DCT frequency when some binding has a band ('' otherwise, or when a weight is
    spatial or an expert runs at a lower resolution, where the total is not a function of frequency alone)."""
    if not any(b.band is not None and not b.band.all_pass for b in bindings):
        return ""
    if any(b.resolution_factor > 1 or torch.as_tensor(b.weight).numel() > 1 for b in bindings):
        return ""
    total = sum(float(b.weight) * (b.band.response(grid, grid) if b.band is not None else 1.0) for b in bindings)
    lo, hi = float(total.min()), float(total.max())
    return f"{lo:.4g}" if math.isclose(lo, hi, abs_tol=1e-9) else f"{lo:.4g}..{hi:.4g}"


def _fmt_total(total: Any) -> str:
    t = torch.as_tensor(total, dtype=torch.float64)
    if t.numel() == 1:
        return f"{float(t):.4g}"
    return f"{float(t.min()):.4g}..{float(t.max()):.4g} per pixel"


def describe_corrector(config: CorrectorConfig) -> str:
    """One line, such as ``uhmc, 4 steps sized for signal-to-noise 0.15 per level for sigma in [0.06, inf] (+4 ...)``."""
    lo, hi = config.sigma_window
    if config.step_rule == "snr":
        step = f"steps sized for signal-to-noise {config.snr:g}"
    else:
        step = f"steps of {config.step_scale:g} sigma^2"
    return (f"{config.method}, {config.steps} {step} per level for sigma in [{lo:g}, {hi:g}] "
            f"(+{evaluations_per_level(config)} product evaluation(s) per level)")

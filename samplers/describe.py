"""How a product and its corrector describe themselves: one line per binding, the rule in words and
numbers, the corrector and its cost. Each statement comes from the function that owns the rule."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import bands
from .correctors import CorrectorConfig, evaluations_per_level
from .poe import Binding, normalise_reliabilities, null_coefficients, null_levels, unwrap


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


def describe_rule(bindings: Sequence[Binding], shape: Sequence[int] | None = None) -> str:
    """The combined rule the sampler is about to run, in words and numbers, on a canvas of ``shape``
    (which nulls run depends on it where bands are concerned). Before a latent fixed the canvas, the
    masks' own size stands in, else 64 x 64."""
    spatial = [torch.as_tensor(v) for b in bindings for v in (b.weight, b.reliability) if torch.as_tensor(v).ndim >= 2]
    grid = tuple(shape[-2:]) if shape else (tuple(spatial[0].shape[-2:]) if spatial else (64, 64))
    banded = any(b.banded for b in bindings)
    maps = _on_canvas(bindings, grid)
    rel = normalise_reliabilities(maps[1]) if maps else [b.reliability for b in bindings]
    head = f"product of {len(bindings)} binding(s) over {len({id(b.expert) for b in bindings})} expert(s): "
    if banded:
        # The band form is the rule that runs; the plain formula and its weight sum would mislead.
        lines = [head + "eps = u + sum_i w_i F_i(eps_i - u),  u = sum_j a_j eps_j(x, null_j) per band"]
        per_frequency = _banded_total(bindings, grid)
        if per_frequency:
            lines.append(f"  per frequency, sum_i w_i F_i(f) = {per_frequency} (the weight the null term balances in "
                         "each band)")
    else:
        lines = [head + "eps = sum_i w_i eps_i(x, c_i) - (sum_i w_i - 1) * sum_j a_j eps_j(x, null_j)"]
        if maps:
            lines.append(f"sum of weights = {_fmt_total(sum(torch.as_tensor(w, dtype=torch.float64) for w in maps[0]))}")
    for i, (b, a) in enumerate(zip(bindings, rel), 1):
        lines.append(f"  {i}. {describe(b, a)}")
    if not maps:
        # Masks of several sizes (a MODEL's is fitted to the latent when it arrives): the rest is said then.
        return "\n".join(lines)
    levels = null_levels(bindings, grid)
    if banded:
        lines.append("  bands: F_i is each binding's band (DCT) or, for an expert at 1/k of the canvas, its "
                     "prediction on the k x k pooled image at sigma/k lifted into the piecewise-constant images; "
                     "the pooled null u mixes, per band, the nulls defined there")
        costs = sorted({(getattr(unwrap(b.expert), "name", "?"), b.resolution_factor) for b in bindings
                        if b.resolution_factor > 1})
        for name, k in costs:
            lines.append(f"  cost: {name} runs on 1/{k * k} of the canvas's pixels (its own size)")
        if not any(levels):
            lines.append("  (the weights sum to 1 in every band: the null term is zero and no null forward runs)")
        elif not all(levels):
            ks = bands.levels_of([b.resolution_factor for b in bindings])
            zero = " and ".join(bands.level_words(ks, m) for m, n in enumerate(levels) if not n)
            lines.append(f"  (the null term is zero on {zero}: a null runs only if a band it covers needs it)")
    elif not any(levels):
        lines.append("  (weights sum to 1: the pooled null cancels and no null forward runs)")
    elif any(b.reliability_from_variance for b in bindings):
        lines.append("  reliabilities: a_j / Var_j[x0 | x] per pixel, from the experts' learned variances (experimental)")
    else:
        lines.extend(_negative_null_note(bindings))
    return "\n".join(lines)


def _on_canvas(bindings: Sequence[Binding], grid: tuple[int, int]) -> tuple[list, list] | None:
    """Each binding's weight and reliability on the canvas (a smaller expert's masks lifted), or None while
    their shapes do not fit together yet."""
    h, w = grid
    ws = [bands.at_canvas(b.weight, h, w, int(b.resolution_factor)) for b in bindings]
    rs = [bands.at_canvas(b.reliability, h, w, int(b.resolution_factor)) for b in bindings]
    try:
        torch.broadcast_shapes((1, 1, h, w), *(torch.as_tensor(v).shape for v in ws + rs))
    except RuntimeError:
        return None
    return ws, rs


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


def _banded_total(bindings: Sequence[Binding], grid: tuple[int, int] = (64, 64)) -> str:
    """The weight total per DCT frequency when some binding has a band ('' otherwise, or when a weight is
    spatial or an expert runs at a lower resolution, where the total is not a function of frequency alone)."""
    if not any(b.band is not None and not b.band.all_pass for b in bindings):
        return ""
    if any(b.resolution_factor > 1 or torch.as_tensor(b.weight).numel() > 1 for b in bindings):
        return ""
    total = sum(float(b.weight) * (b.band.response(*grid) if b.band is not None else 1.0) for b in bindings)
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

"""Building bindings from node inputs: how nulls are formed, and how a product describes itself.

Pure torch: ``expert`` here is anything with the fields of ``model_loaders.expert.Expert``, or a
handle that carries one as ``.expert`` (ComfyUI's wrapper).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import torch

from . import bands
from .poe import Binding, Condition

NULL_CHOICES = ("trained", "class0 (paper)", "mean of k random classes", "none")


def unwrap(expert: Any) -> Any:
    return getattr(expert, "expert", expert)


def class_nulls(expert: Any, choice: str, k: int = 8, seed: int = 0) -> tuple[Condition, ...]:
    """The null of a class binding.

    - ``trained``: the expert's own trained null (label dropout); refused if it has none.
    - ``class0 (paper)``: class 0 as the null, what Unite and Conquer's released code does for
      ADM models, which were never trained with label dropout (class 0 is "tench", a fish: its
      score is a biased stand-in for the unconditional one).
    - ``mean of k random classes``: the average of k class-conditional predictions, a Monte Carlo
      estimate of the marginal score sum_c p(c) eps(x, c) with p(c) uniform; unbiased in the
      class, at k forwards per step.
    - ``none``: no null; the binding's reliability must be 0 and another binding supplies the prior.
    """
    e = unwrap(expert)
    if choice == "none":
        return ()
    if choice == "trained":
        null = e.null_condition
        if null is None:
            raise ValueError(f"{e.name} has no trained null (it was never trained with condition dropout); "
                             "choose 'class0 (paper)', 'mean of k random classes' or 'none'")
        return (null,)
    num_classes = len(e.class_names) if e.class_names else 0
    if num_classes == 0:
        raise ValueError(f"{e.name} is not class-conditional, so a class null cannot be formed; use 'trained'")
    if choice == "class0 (paper)":
        return (e.encode("class", 0),)
    if choice == "mean of k random classes":
        g = torch.Generator().manual_seed(seed)
        picks = torch.randperm(num_classes, generator=g)[: max(1, min(k, num_classes))]
        return tuple(e.encode("class", int(c)) for c in picks)
    raise ValueError(f"unknown null choice {choice!r}; expected one of {NULL_CHOICES}")


def default_nulls(expert: Any, condition: Condition) -> tuple[Condition, ...]:
    """The expert's trained null paired with ``condition``, or none."""
    null = unwrap(expert).null_of(condition)
    return () if null is None else (null,)


def reliability_from_variance(bindings: Sequence[Binding]) -> list[Binding]:
    """The chain with every binding's null weighted by its expert's learned precision
    (``Binding.reliability_from_variance``); refused where a null's expert predicts no variance."""
    for i, b in enumerate(bindings):
        e = unwrap(b.expert)
        if b.null and not bool((torch.as_tensor(b.reliability) == 0).all()) and not getattr(e, "learned_sigma", False):
            raise ValueError(f"binding {i} ({describe(b)}) supplies a null, but {e.name} predicts no variance "
                             f"(prediction {getattr(e, 'prediction', '?')!r}); set that binding's reliability to 0 "
                             "or remove this node")
    return [replace(b, reliability_from_variance=True) for b in bindings]


def with_resolution_factors(bindings: Sequence[Binding], node: str = "PoEKSampler",
                            canvas: int | None = None) -> tuple[list[Binding], int | None]:
    """The bindings with each expert's resolution factor k = canvas / its resolution, and the canvas
    side (default: the largest expert's). Experts without a fixed resolution (ComfyUI MODELs) take
    the canvas (k = 1); sizes that are not an integer multiple, or latent experts below the canvas, are
    refused. Returns (bindings, canvas), canvas ``None`` when no expert has a fixed resolution."""
    sizes = [getattr(unwrap(b.expert), "resolution", None) for b in bindings]
    known = [s for s in sizes if s]
    if not known:
        return list(bindings), canvas
    canvas = canvas or max(known)
    out = []
    for i, (b, size) in enumerate(zip(bindings, sizes), 1):
        if not size:
            out.append(b)
            continue
        e = unwrap(b.expert)
        if size > canvas:
            raise ValueError(f"{node}: input 'experts': binding {i} ({e.name}) makes {size}px images, larger than the "
                             f"{canvas}px canvas; sample at {size}px or more, a multiple of every expert's size")
        k = bands.resolution_factor((canvas, canvas), (size, size), f"{node}: input 'experts': binding {i} ({e.name})")
        if k > 1 and getattr(e, "latent", False):
            raise ValueError(f"{node}: input 'experts': binding {i} ({e.name}) works in a latent space, which does not "
                             "pool like pixels, so it cannot serve a larger canvas; use it at its own size")
        out.append(b if k == b.resolution_factor else replace(b, resolution_factor=k))
    return out, canvas


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
    from .poe import normalise_reliabilities

    rel = normalise_reliabilities([b.reliability for b in bindings])
    total_w = sum(torch.as_tensor(b.weight, dtype=torch.float32).mean() for b in bindings)
    lines = [f"product of {len(bindings)} binding(s) over "
             f"{len({id(b.expert) for b in bindings})} expert(s): "
             f"eps = sum_i w_i eps_i(x, c_i) - (sum_i w_i - 1) * sum_j a_j eps_j(x, null_j)",
             f"sum of weights = {float(total_w):.4g}"]
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
    elif math.isclose(float(total_w), 1.0):
        lines.append("  (weights sum to 1: the pooled null cancels and no null forward runs)")
    elif any(b.reliability_from_variance for b in bindings):
        lines.append("  reliabilities: a_j / Var_j[x0 | x] per pixel, from the experts' learned variances (experimental)")
    return "\n".join(lines)

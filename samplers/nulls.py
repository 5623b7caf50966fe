"""The nulls of bindings: how a binding's null is formed, and how its share of the pooled null is weighted
(from its expert's variance, or as one share of the whole).

Pure torch: ``expert`` here is anything with the fields of ``model_loaders.expert.Expert``, or a
handle that carries one as ``.expert`` (ComfyUI's wrapper).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from .describe import describe
from .poe import Binding, Condition, unwrap

NULL_CHOICES = ("trained", "class0 (paper)", "mean of k random classes", "none")


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


def with_reliability_share(bindings: Sequence[Binding], index: int, share: float) -> list[Binding]:
    """This binding gets reliability ``share`` and the others ``1 - share`` in their proportions."""
    others = [i for i in range(len(bindings)) if i != index % len(bindings)]
    total = sum(float(bindings[i].reliability) for i in others)
    out = list(bindings)
    out[index] = replace(bindings[index], reliability=share)
    for i in others:
        part = float(bindings[i].reliability) / total if total > 0 else 1 / len(others)
        out[i] = replace(bindings[i], reliability=(1 - share) * part)
    return out

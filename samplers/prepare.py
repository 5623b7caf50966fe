"""Preparing a product for sampling, once, before its first step: the rule's validation, the image
shape every expert shares, the common noise schedule and the coverage of every level in it.

Pure torch: ``bindings[i].expert`` is an expert or a handle that carries one (``poe.unwrap``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import bands, noise_levels
from .poe import Binding, check_sigma_coverage, unwrap, validate_bindings


@dataclass(frozen=True)
class PreparedProduct:
    """A product that passed every check, with what sampling it needs.

    Args:
        bindings (`tuple[Binding, ...]`): the bindings, in chain order.
        experts (`tuple`): each distinct expert (or handle) once, in order of first use.
        resolution (`int`), image_channels (`int`): the canvas (the largest expert's side; smaller
            experts run on it pooled, ``bands``) and the channels all experts share (``None`` for a
            product of ComfyUI MODELs only, whose latent size is the sampler's choice).
        alphas_cumprod (`torch.Tensor`): the product's schedule, the first expert's cut to the
            common sigma range (``noise_levels.resample_table``), which ComfyUI's schedulers read.
        sigma_range (`tuple[float, float]`): that common range, (sigma_min, sigma_max).
    """
    bindings: tuple[Binding, ...]
    experts: tuple[Any, ...]
    resolution: int | None
    image_channels: int | None
    alphas_cumprod: torch.Tensor
    sigma_range: tuple[float, float]


def distinct_experts(bindings: Sequence[Binding]) -> list[Any]:
    seen: dict[int, Any] = {}
    for b in bindings:
        seen.setdefault(id(b.expert), b.expert)
    return list(seen.values())


def image_shape(expert: Any) -> tuple[int, int]:
    """(resolution, image channels) of an expert's images."""
    e = unwrap(expert)
    return e.resolution, e.image_channels


def check_same_shape(experts: Sequence[Any]) -> tuple[int | None, int | None]:
    """The canvas (the largest expert's side) and the channels. Experts share the channels; a smaller
    expert must divide the canvas (it then runs on the pooled canvas, ``bands``); anything else is an
    error, never a silent resize. ``(None, None)`` when no expert has a native size (ComfyUI MODELs
    take any latent size)."""
    experts = [e for e in experts if unwrap(e).resolution is not None]
    if not experts:
        return None, None
    first = unwrap(experts[0])
    canvas = max(image_shape(e)[0] for e in experts)
    for other in experts[1:]:
        e = unwrap(other)
        if e.image_channels != first.image_channels or canvas % e.resolution:
            raise ValueError(
                f"the experts mix image shapes: {first.name} is {first.resolution}px with {first.image_channels} "
                f"channels but {e.name} is {e.resolution}px with {e.image_channels}. Experts of one product share "
                f"the channels, and each expert's size must divide the largest ({canvas}px) so that it runs on the "
                "pooled canvas; otherwise sample at one resolution and use an upsampler stage (PoEBindImage) to "
                "change it.")
    return canvas, first.image_channels


def product_schedule(experts: Sequence[Any], factors: Sequence[int] | None = None) -> torch.Tensor:
    """The product's alphas_cumprod: the first canvas-sized expert's own table when its range is the
    common one, else its shape of schedule cut to the common range (an expert at resolution factor k
    serves k times its own range, ``bands``)."""
    factors = list(factors or [1] * len(experts))
    tables = [unwrap(e).alphas_cumprod for e in experts]
    lo, hi = noise_levels.common_sigma_range(tables, [unwrap(e).name for e in experts], factors)
    # A smaller expert's table stops short of k times its range, so the shape comes from a canvas-sized one.
    shape = tables[factors.index(min(factors))]
    if noise_levels.sigma_range(shape) == (lo, hi):
        return shape   # a lone expert samples on exactly its own levels, as a stock sampler would
    return noise_levels.resample_table(shape, lo, hi)


def prepare(bindings: Sequence[Binding]) -> PreparedProduct:
    """Every check a product passes before sampling, and the schedule it samples on."""
    bindings = tuple(bands.with_resolution_factors(list(bindings))[0])
    validate_bindings(bindings)
    experts = distinct_experts(bindings)
    resolution, channels = check_same_shape(experts)
    factor = {id(b.expert): b.resolution_factor for b in bindings}
    schedule = product_schedule(experts, [factor[id(e)] for e in experts])
    sigma_range = noise_levels.sigma_range(schedule)
    check_sigma_coverage(bindings, *sigma_range)
    return PreparedProduct(bindings, tuple(experts), resolution, channels, schedule, sigma_range)

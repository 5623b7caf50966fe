"""One validation for every path that samples a product of experts.

``PoEKSampler``, ``PoEGuider`` (whatever latent reaches its sampler), ``PoEScheduler``, the stock
``KSampler``/``CFGGuider`` on ``PoEEncodeCondition``'s output and the binding nodes all call the
functions here, so a product refused on one path is refused on every path with the same words. The
ComfyUI side only gathers facts (an expert's space, channels and size; the latent's shape) and names
its node and input in front of the message (:meth:`ProductError.named`).

Three stages, each a function of plain data, run in this order on every path:

1. :func:`check_chain` (the bindings alone; what a binding node checks as it chains): values,
   spaces and channels, and sizes that nest (each expert's size divides the larger ones).
2. the latent (:class:`Latent`: its shape, whether it is finite): its layout and channels, the canvas
   against every expert's size (an expert k times smaller runs on the k x k pooled canvas at sigma/k,
   ``bands``), an expert of the canvas's size, the batch of every per-image tensor.
3. the rule on that canvas, at every noise level the experts serve together (windows and ramps
   change which bindings take part): each band's null term ``C = I - sum_i w_i F_i`` must have a null
   to act on wherever it does not vanish (``bands.null_levels``, the same function that decides
   which nulls the forward plan runs).

:func:`prepare` runs stage 1 and the schedule (``PoEScheduler``'s sigmas, and what a ``PoEGuider``
can know before its latent arrives); :func:`validate` runs all three. The checks carry no ComfyUI
names: experts are read through their attributes (``name``, ``resolution``, ``image_channels``, and
for ComfyUI MODELs ``space`` and ``refusal``).

A new way of sampling a product (particles, OR/AND groups) calls ``validate(bindings, Latent(shape,
finite))`` once its latent is known, samples the bindings it returns (each with its resolution factor),
and reports a :class:`ProductError` through :meth:`ProductError.named` with its own node's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from . import bands, noise_levels
from .poe import Binding, at_sigma, unwrap

PIXELS = "pixels"


class ProductError(ValueError):
    """A product that cannot be sampled as it is.

    Args:
        message (`str`): what is wrong and how to fix it, the same on every path.
        cause (`str`): ``"experts"`` (the chain) or ``"latent"`` (what the sampler was given).
    """

    def __init__(self, message: str, cause: str = "experts"):
        super().__init__(message)
        self.cause = cause

    def named(self, node: str, latent_input: str = "latent_image", at_sampler: bool = False) -> ValueError:
        """The refusal as a node reports it: ``node: input 'experts': ...``, or for a latent that
        reached a stock sampler (``at_sampler``), ``node: the sampler's input 'latent_image': ...``."""
        if self.cause == "latent":
            where = f"the sampler's input '{latent_input}'" if at_sampler else f"input '{latent_input}'"
        else:
            where = "input 'experts'"
        return ValueError(f"{node}: {where}: {self}")


@dataclass(frozen=True)
class Latent:
    """What the sampler hands the product.

    Args:
        shape (`tuple[int, ...]`): the latent's shape, B x C x H x W for an image.
        finite (`bool`, defaults to True): whether every value is finite.
    """

    shape: tuple[int, ...]
    finite: bool = True


@dataclass(frozen=True)
class ExpertFacts:
    """What validation reads of an expert (a native expert, a handle carrying one, or a ComfyUI MODEL).

    Args:
        name (`str`): for messages.
        space (`str`): ``"pixels"``, or the latent format a MODEL works in ("SD15").
        channels (`int`): the channels of its images or latents.
        size (`int` or `None`): the side of the square images it was trained on; ``None`` for any size.
        refusal (`str` or `None`): why it can join no product at all (a MODEL sampling outside the VE and
            flow frames), else ``None``.
    """

    name: str
    space: str
    channels: int
    size: int | None
    refusal: str | None = None

    @property
    def pools(self) -> bool:
        """Whether k x k average pooling of its images is an image it knows (pixels; not latents)."""
        return self.space == PIXELS


def facts(expert: Any) -> ExpertFacts:
    e = unwrap(expert)
    return ExpertFacts(name=getattr(e, "name", type(e).__name__), space=getattr(e, "space", PIXELS),
                       channels=int(getattr(e, "image_channels", 3)), size=getattr(e, "resolution", None),
                       refusal=getattr(e, "refusal", None))


def who(i: int, b: Binding, f: ExpertFacts | None = None) -> str:
    """How messages name a binding: its index in the chain (as the nodes' ``index`` inputs count), its
    expert and its label."""
    f = f or facts(b.expert)
    return f"binding {i} ({f.name}{' · ' + b.label if b.label else ''})"


def _space_words(f: ExpertFacts) -> str:
    return f"pixels ({f.channels} channels)" if f.space == PIXELS else f"{f.space} latents ({f.channels} channels)"


def _is_zero(v) -> bool:
    return bool((torch.as_tensor(v) == 0).all())


# --- 1. the chain ---------------------------------------------------------------------------------

def check_chain(bindings: Sequence[Binding]) -> None:
    """What the bindings must satisfy whatever they are sampled on: finite weights and reliabilities,
    reliabilities >= 0 and only with a null, one space and one number of channels, and expert sizes
    that nest (each divides the larger ones, so their pooled grids nest and ``bands``' levels are
    orthogonal)."""
    if not bindings:
        raise ProductError("the product has no bindings: connect at least one PoEBind* node")
    fs = [facts(b.expert) for b in bindings]
    for i, (b, f) in enumerate(zip(bindings, fs)):
        if f.refusal:
            raise ProductError(f"{who(i, b, f)}: {f.refusal}")
        for what, v in (("weight", b.weight), ("reliability", b.reliability)):
            if not bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all()):
                raise ProductError(f"{who(i, b, f)}: its {what} holds NaN or Inf; fix the node that set it")
        if torch.as_tensor(b.reliability).lt(0).any():
            raise ProductError(f"{who(i, b, f)}: reliability must be >= 0")
        if not b.null and not _is_zero(b.reliability):
            raise ProductError(f"{who(i, b, f)}: reliability is > 0 but this binding has no null condition (its "
                               "expert has no trained null); set the reliability to 0 or choose how the null is "
                               "formed")
    first = fs[0]
    for i, f in enumerate(fs[1:], 1):
        if (f.space, f.channels) != (first.space, first.channels):
            raise ProductError(
                f"{who(0, bindings[0], first)} works on {_space_words(first)} but {who(i, bindings[i], f)} works on "
                f"{_space_words(f)}. Experts of one product must share one space: latent models only with models "
                "of the same latent format, pixel-space models (Chroma Radiance) with the native pixel experts.")
    sized = sorted(((f.size, i) for i, f in enumerate(fs) if f.size), reverse=True)
    for (big, i), (small, j) in zip(sized, sized[1:]):
        if big % small or (small != big and not first.pools):
            raise ProductError(
                f"{who(i, bindings[i], fs[i])} makes {big}px images and {who(j, bindings[j], fs[j])} {small}px: "
                + ("latent experts do not pool, so they share one size" if not first.pools else
                   "a smaller expert runs on the pooled canvas, so each expert's size must divide the larger ones "
                   "(their blocks must nest)")
                + "; sample them at one size, or use an upsampler stage (PoEBindImage) to change the size")


# --- the schedule -------------------------------------------------------------------------------

def distinct_experts(bindings: Sequence[Binding]) -> list[Any]:
    seen: dict[int, Any] = {}
    for b in bindings:
        seen.setdefault(id(b.expert), b.expert)
    return list(seen.values())


def product_schedule(experts: Sequence[Any], factors: Sequence[int] | None = None) -> torch.Tensor:
    """The product's alphas_cumprod: the first canvas-sized expert's own table when its range is the
    common one, else its shape of schedule cut to the common range (an expert at resolution factor k
    serves k times its own range, ``bands``)."""
    factors = list(factors or [1] * len(experts))
    tables = [unwrap(e).alphas_cumprod for e in experts]
    try:
        lo, hi = noise_levels.common_sigma_range(tables, [unwrap(e).name for e in experts], factors)
    except ValueError as err:
        raise ProductError(str(err)) from None
    # A smaller expert's table stops short of k times its range, so the shape comes from a canvas-sized one.
    shape = tables[factors.index(min(factors))]
    if noise_levels.sigma_range(shape) == (lo, hi):
        return shape   # a lone expert samples on exactly its own levels, as a stock sampler would
    return noise_levels.resample_table(shape, lo, hi)


@dataclass(frozen=True)
class Product:
    """A product that passed :func:`validate` (or, with ``canvas`` None, only :func:`prepare`).

    Args:
        bindings (`tuple[Binding, ...]`): the bindings in chain order, each with its resolution factor
            on this canvas.
        experts (`tuple`): each distinct expert (or handle) once, in order of first use.
        canvas (`tuple[int, int]` or `None`): (H, W) of the latent it was validated on; ``None`` before
            a latent arrived.
        size (`int` or `None`): the largest expert's size (the canvas a sampler picks by default);
            ``None`` for a product of ComfyUI MODELs only.
        space (`str`), channels (`int`): the space every expert works in, and its channels.
        alphas_cumprod (`torch.Tensor`): the product's schedule (:func:`product_schedule`), which
            ComfyUI's schedulers read.
        sigma_range (`tuple[float, float]`): the common noise range, (sigma_min, sigma_max).
    """

    bindings: tuple[Binding, ...]
    experts: tuple[Any, ...]
    canvas: tuple[int, int] | None
    size: int | None
    space: str
    channels: int
    alphas_cumprod: torch.Tensor
    sigma_range: tuple[float, float]


def _with_factors(bindings: Sequence[Binding], fs: Sequence[ExpertFacts], canvas: int | None) -> list[Binding]:
    """Each binding with k = canvas / its expert's size (1 for experts of any size)."""
    out = []
    for b, f in zip(bindings, fs):
        k = canvas // f.size if (f.size and canvas) else 1
        out.append(b if b.resolution_factor == k else replace(b, resolution_factor=k))
    return out


def _schedule(bindings: Sequence[Binding]) -> tuple[tuple[Any, ...], torch.Tensor, tuple[float, float]]:
    experts = distinct_experts(bindings)
    factor = {id(b.expert): b.resolution_factor for b in bindings}
    table = product_schedule(experts, [factor[id(e)] for e in experts])
    return tuple(experts), table, noise_levels.sigma_range(table)


def prepare(bindings: Sequence[Binding]) -> Product:
    """What can be known before a latent arrives: :func:`check_chain`, and the schedule on the canvas
    of the largest expert (``PoEScheduler``'s sigmas). The rest waits for the latent (:func:`validate`),
    so a sampler refuses a product in the same order whatever node it arrived through."""
    bindings = list(bindings)
    check_chain(bindings)
    fs = [facts(b.expert) for b in bindings]
    size = max((f.size for f in fs if f.size), default=None)
    bindings = _with_factors(bindings, fs, size)
    experts, table, sigma_range = _schedule(bindings)
    return Product(tuple(bindings), experts, None, size, fs[0].space, fs[0].channels, table, sigma_range)


# --- 2. the latent --------------------------------------------------------------------------------

def _check_latent(bindings: Sequence[Binding], fs: Sequence[ExpertFacts], latent: Latent) -> int:
    """The latent's layout, channels and values, then the canvas against every expert's size; returns
    the canvas side."""
    shape = tuple(int(n) for n in latent.shape)
    first = fs[0]
    if len(shape) != 4:
        raise ProductError(f"the latent has shape {shape}, but a product samples images, batch x channels x height x "
                           f"width; use an image latent of {_space_words(first)}", "latent")
    if shape[1] != first.channels:
        how = ("EmptyChromaRadianceLatentImage, or VAEEncode with the pixel_space VAE" if first.space == PIXELS
               else f"that family's VAE or empty latent")
        raise ProductError(f"the latent has {shape[1]} channels, but the experts work on {_space_words(first)}; "
                           f"make the latent with {how}", "latent")
    if not latent.finite:
        raise ProductError("the latent contains NaN or Inf values; fix the node that produced it", "latent")
    h, w = shape[-2:]
    sizes = [f.size for f in fs if f.size]
    anysize = len(sizes) < len(fs)
    if sizes:
        big = max(sizes)
        fix = (f"sample at {big} x {big}, the largest expert's size" if not anysize else
               f"sample at {big} x {big} or a multiple of it")
    for i, (b, f) in enumerate(zip(bindings, fs)):
        if not f.size:
            continue
        s = f.size
        if s > h or s > w:
            raise ProductError(f"{who(i, b, f)} makes {s} x {s} images, larger than the {h} x {w} canvas; {fix}",
                               "latent")
        if h % s or w % s or h // s != w // s:
            raise ProductError(f"{who(i, b, f)} makes {s} x {s} images, and the canvas is {h} x {w}: an expert smaller "
                               "than the canvas runs on its k x k pooled image, so the canvas must be the same integer "
                               f"multiple of its size on both sides; {fix}", "latent")
        if h != s and not f.pools:
            raise ProductError(f"{who(i, b, f)} works in a latent space, which does not pool like pixels, so it cannot "
                               f"serve a larger canvas; {fix}", "latent")
    if sizes and not anysize and h != max(sizes):
        j = next(i for i, f in enumerate(fs) if f.size == big)
        k = h // big
        raise ProductError(f"no expert of the product makes {h} x {w} images: the largest, {who(j, bindings[j], fs[j])}, "
                           f"makes {big} x {big}, so nothing models the detail finer than its {k} x {k} blocks; {fix}, "
                           "or add an expert of the canvas's size", "latent")
    return h


def check_batch(bindings: Sequence[Binding], batch: int) -> None:
    """Every per-image tensor of every binding must have batch 1 (shared) or the sampler's batch."""
    for i, b in enumerate(bindings):
        parts = [("weight", b.weight), ("reliability", b.reliability)]
        parts += [(f"condition input {k!r}", v) for c in (b.condition, *b.null) for k, v in c.items()]
        for what, v in parts:
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] not in (1, batch):
                raise ProductError(f"{who(i, b)}: its {what} has a batch of {v.shape[0]}, but the sampler makes "
                                   f"{batch} image(s); give it a batch of 1 (shared) or {batch}")


# --- 3. the rule at every noise level ----------------------------------------------------------------

def _total_words(bindings: Sequence[Binding]) -> str:
    t = sum(torch.as_tensor(b.weight, dtype=torch.float64).cpu() for b in bindings)
    t = torch.as_tensor(t)
    return f"{float(t):.4g}" if t.numel() == 1 else f"{float(t.min()):.4g}..{float(t.max()):.4g} per pixel"


def check_rule(active: Sequence[Binding], shape: tuple[int, ...]) -> None:
    """The rule of the bindings ``active`` at one noise level is defined on a canvas of ``shape``:
    wherever the null term does not vanish (``bands.null_levels``), a null at that resolution or finer
    has a reliability > 0; and reliability from variance is on for all of the pool or none."""
    with_null = [b for b in active if b.null and not _is_zero(b.reliability)]
    if len({b.reliability_from_variance for b in with_null}) > 1:
        i, off = next((i, b) for i, b in enumerate(active) if b in with_null and not b.reliability_from_variance)
        raise ProductError(f"{who(i, off)}: reliability from variance is on for some bindings and off for this one; "
                           "apply it to the whole chain, after its last binding")
    factors = [int(b.resolution_factor) for b in active]
    levels = bands.levels_of(factors)
    needed = bands.null_levels([b.weight for b in active], [b.band for b in active], factors, shape)
    banded = any(b.banded for b in active)
    for m, (level, need) in enumerate(zip(levels, needed)):
        if not need or any(int(b.resolution_factor) <= level for b in with_null):
            continue
        if not banded:
            raise ProductError(f"the weights sum to {_total_words(active)}, not 1, so the rule needs a pooled null, but "
                               "every reliability is 0: give at least one binding with a null a reliability > 0")
        finest = shape[-1] // level
        raise ProductError(
            f"on {bands.level_words(levels, m)}, the weights acting there (with their bands) do not sum to 1, so the "
            f"rule needs a pooled null there, but no binding whose expert makes {finest}px images or larger has a "
            "null with a reliability > 0: give one a null and a reliability > 0, or make the weights there sum "
            "to 1 (complementary bands of weight 1 need no null)")


def check_levels(bindings: Sequence[Binding], lo: float, hi: float, shape: tuple[int, ...]) -> None:
    """:func:`check_rule` at every noise level in [lo, hi]. Windows and ramps change which bindings take
    part and with what reliability only at their edges, so the rule is checked on each side of every edge."""
    if all(b.sigma_window == (0.0, math.inf) and b.reliability_ramp is None for b in bindings):
        check_rule(bindings, shape)
        return
    probes = {lo, hi}
    for b in bindings:
        for edge in b.sigma_window + (b.reliability_ramp[::2] if b.reliability_ramp else ()):
            for s in (edge * (1 - 1e-6), edge * (1 + 1e-6)):
                if lo <= s <= hi:
                    probes.add(s)
    for s in sorted(probes):
        active = at_sigma(bindings, s)
        if not active:
            raise ProductError(f"no binding is active at sigma={s:.4g}; the sampler runs from {hi:.4g} down to "
                               f"{lo:.4g}: widen a binding's noise window so that every noise level is covered")
        try:
            check_rule(active, shape)
        except ProductError as err:
            raise ProductError(f"at sigma={s:.4g} (with the noise windows and reliability ramps): {err}") from None


def validate(bindings: Sequence[Binding], latent: Latent) -> Product:
    """Every check a product passes before it samples ``latent``, in the order every path runs them
    (module docstring), and what sampling it needs. Raises :class:`ProductError`."""
    bindings = list(bindings)
    check_chain(bindings)
    fs = [facts(b.expert) for b in bindings]
    canvas = _check_latent(bindings, fs, latent)
    check_batch(bindings, int(latent.shape[0]))
    bindings = _with_factors(bindings, fs, canvas)
    for i, b in enumerate(bindings):
        if b.resolution_factor > 1 and b.reliability_from_variance:
            raise ProductError(f"{who(i, b)}: reliability from variance is not available for an expert at a lower "
                               "resolution than the canvas; remove PoEReliabilityFromVariance")
    experts, table, sigma_range = _schedule(bindings)
    check_levels(bindings, *sigma_range, tuple(latent.shape))
    size = max((f.size for f in fs if f.size), default=None)
    h, w = latent.shape[-2:]
    return Product(tuple(bindings), experts, (int(h), int(w)), size, fs[0].space, fs[0].channels, table, sigma_range)

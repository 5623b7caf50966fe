"""A graph fuzz over chains of bindings: seeded graph specs, the graphs built through the pack's own nodes,
every path that samples a product, an independent reference of the documented rule, and an independent
oracle of which graphs the rule refuses.

Hypothesis draws the seeds (:func:`graph_specs`, derandomized in the tests); every choice of a graph comes
from ``random.Random(seed)`` (:func:`graph_spec`), with odds chosen so that each kind of binding, latent and
refusal is common (hypothesis' own integers lean to the ends of their ranges). The seed reproduces the graph:
``graph_spec(seed).describe()`` prints it.

A graph is a chain of 1-4 bindings drawn from every binding node: the shipped tiny experts (``models_tiny``:
PoEBindClass on the 32 px and 16 px digit experts, PoEBindText on the colour expert, PoEBindSegmentation on
the layout expert, the class expert's MODEL through PoEBindModel), analytic Gaussian MODELs of each
parameterisation (``comfy_gaussians``: EPS, V, flow with shift, and an SD1.5-latent one) through PoEBindModel,
with weights, reliabilities, nulls, masks, PoEBandWeights and PoEBindingSchedule (windows, ramps) applied in a
random order at random chain positions; sampled on a latent of the native size, a multiple, a non-multiple
or a smaller size.

Paths (each returns an :class:`Outcome`: predictions at a few sigmas, or the refusal's message):

- ``ksampler``: PoEKSampler, one Euler step of a denoise < 1 refinement of the latent, which returns the
  product's denoised prediction at the step's sigma;
- ``custom``: PoEGuider + PoEScheduler + SamplerCustomAdvanced, with a SAMPLER that evaluates the model at
  chosen sigmas (so the guider's own ``sample`` validates the latent that arrives);
- ``stock``: PoEEncodeCondition on one binding of the chain and ComfyUI's stock KSampler at cfg = its weight,
  against PoEKSampler on that binding alone (``solo``).

The reference (:func:`reference_denoised`) computes each expert's own prediction independently (closed forms
for the Gaussian MODELs; the tiny networks called directly at their own continuous timestep, on the pooled
input at sigma/k for an expert k times smaller) and combines them by the rule as docs/method.md and ``bands.py``
state it, with scipy's DCT: ``D = u + sum_i w_i F_i(D_i - u)``, the pooled null ``u`` mixed per resolution
level from the nulls defined there. The oracle (:func:`oracle`) says which rules a graph breaks, from the
spec alone: one space, the latent's channels, the canvas against each size, an expert of the canvas's size,
a null wherever the null term acts (measured by perturbing ``u`` in the reference), a binding at every level.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import scipy.fft
import torch
from hypothesis import strategies as st

# --- the experts ------------------------------------------------------------------------------------------

NATIVE = {"class": ("tiny_class.safetensors", 32), "class_16": ("tiny_class_16.safetensors", 16),
          "colour": ("tiny_colour.safetensors", 32), "layout": ("tiny_layout.safetensors", 32)}
NATIVE_MODEL = "class_model"          # the 32 px class expert's MODEL output, through PoEBindModel
GAUSSIAN = ("eps", "v", "flow", "sd15")
COLOURS = ("red", "green", "blue", "yellow")
GAUSS_VAR, NULL_MU, NULL_VAR = 0.3, 0.0, 1.0


def space_of(kind: str) -> str:
    return "SD15" if kind == "sd15" else "pixels"


def size_of(kind: str) -> int | None:
    if kind in NATIVE:
        return NATIVE[kind][1]
    return 32 if kind == NATIVE_MODEL else None


@lru_cache(maxsize=None)
def loaded(kind: str):
    """(expert handle, MODEL) of a native expert, loaded once by the pack's loader node."""
    from unite_and_conquer.nodes import loaders

    out = loaders.PoEExpertLoader.execute(expert_name=NATIVE[kind][0], family="auto", dtype="fp32",
                                          schedule="published")
    return out.args[0], out.args[1]


@lru_cache(maxsize=None)
def gaussian(kind: str):
    """An analytic Gaussian MODEL, built once (``comfy_gaussians``)."""
    import comfy.latent_formats

    from support.comfy_gaussians import gaussian_model

    if kind == "sd15":
        return gaussian_model("eps", latent_format=comfy.latent_formats.SD15)
    return gaussian_model(kind, shift=3.0 if kind == "flow" else 1.0)


# --- specs ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BindingSpec:
    """One binding node and what is applied to it.

    Args:
        kind: a key of :data:`NATIVE`, :data:`NATIVE_MODEL`, or one of :data:`GAUSSIAN`.
        value: the class digit, the colour word index, or the Gaussian's mean.
        weight, reliability: the node's inputs.
        null: whether it has a null (class: 'trained' or 'none'; MODEL: a negative or not).
        mask: ``None``, ``"top"`` or ``"left"`` half (1 inside), with ``outside`` the multiplier outside.
        band: ``(mode, cutoff, cutoff_high, transition)`` of PoEBandWeights, or ``None``.
        window: ``(sigma_min, sigma_max)`` of PoEBindingSchedule (1e5 = no limit), or ``None``.
        ramp: ``(at_high_noise, at_low_noise)`` reliability multipliers (between sigma 10 and 0.1), or ``None``.
    """

    kind: str
    value: float
    weight: float
    reliability: float
    null: bool
    mask: str | None = None
    outside: float = 0.0
    band: tuple | None = None
    window: tuple[float, float] | None = None
    ramp: tuple[float, float] | None = None

    @property
    def model(self) -> bool:
        return self.kind == NATIVE_MODEL or self.kind in GAUSSIAN

    def short(self) -> str:
        parts = [f"{self.kind}({self.value:g})", f"w={self.weight:g}", f"a={self.reliability:g}",
                 "null" if self.null else "no null"]
        if self.mask:
            parts.append(f"mask {self.mask} out={self.outside:g}")
        if self.band:
            parts.append("band " + ",".join(map(str, self.band)))
        if self.window:
            parts.append(f"window {self.window}")
        if self.ramp:
            parts.append(f"ramp {self.ramp}")
        return " ".join(parts)


LATENTS = ("native", "multiple", "non-multiple", "smaller", "channels")


def canvas_for(bindings, latent: str) -> tuple[int, int]:
    """(canvas side, channels) of a latent kind: the largest expert's size (8 for MODELs alone), twice it,
    one and a half times it, half of it; 'channels' is the native size with the other space's channels."""
    sizes = [size_of(b.kind) for b in bindings if size_of(b.kind)]
    base = max(sizes) if sizes else 8
    side = {"native": base, "channels": base, "multiple": 2 * base, "non-multiple": base + base // 2,
            "smaller": base // 2}[latent]
    right = 4 if space_of(bindings[0].kind) == "SD15" else 3
    return side, (7 - right) if latent == "channels" else right


@dataclass(frozen=True)
class GraphSpec:
    """A chain (bindings in chain order), the node order that builds it, the latent and the seed.

    ``ops``: ("bind", j) appends binding j; ("band", j, index) and ("schedule", j, index) apply binding j's band
    or window through PoEBandWeights / PoEBindingSchedule with ``index`` as the node's input (counted from the
    front, or negative from the back, of the chain as it is when the node runs). ``stock_index``: the binding
    the stock path samples alone."""

    bindings: tuple[BindingSpec, ...]
    ops: tuple[tuple, ...]
    latent: str
    canvas: int
    channels: int
    batch: int
    seed: int
    stock_index: int

    def describe(self) -> str:
        lines = [f"seed {self.seed}, latent {self.latent} ({self.batch} x {self.channels} x {self.canvas} x "
                 f"{self.canvas}), stock path on binding {self.stock_index}"]
        lines += [f"  {j}. {b.short()}" for j, b in enumerate(self.bindings)]
        lines.append("  node order: " + " -> ".join(":".join(map(str, op)) for op in self.ops))
        return "\n".join(lines)

    def solo(self, j: int) -> "GraphSpec":
        """Binding j alone, built by the same nodes, on the same latent."""
        b = self.bindings[j]
        ops = [("bind", 0)] + ([("band", 0, -1)] if b.band else []) + ([("schedule", 0, 0)] if b.window or b.ramp
                                                                          else [])
        return replace(self, bindings=(b,), ops=tuple(ops), stock_index=0)


BANDS = (None, ("low-pass", 0.25, 0.5, 0.0), ("high-pass", 0.25, 0.5, 0.0), ("low-pass", 0.3, 0.5, 0.1),
         ("high-pass", 0.3, 0.5, 0.1), ("band-pass", 0.2, 0.5, 0.0), ("ramp down", 0.2, 0.4, 0.0))
WINDOWS = (None, (0.0, 2.0), (0.3, 1e5), (1.0, 1e5), (0.5, 20.0))


def pick(rnd: random.Random, weighted: dict):
    """One key of ``weighted`` ({option: weight}), drawn with those odds."""
    return rnd.choices(list(weighted), weights=list(weighted.values()))[0]


PIXEL_KINDS = {"class": 4, "class_16": 3, "colour": 2, "layout": 2, NATIVE_MODEL: 2, "eps": 3, "v": 2, "flow": 2}


def binding_spec(rnd: random.Random, kinds: dict = PIXEL_KINDS) -> BindingSpec:
    kind = pick(rnd, kinds)
    if kind in ("class", "class_16", NATIVE_MODEL):
        value = float(rnd.randint(0, 9))
    elif kind == "colour":
        value = float(rnd.randint(0, len(COLOURS) - 1))
    elif kind == "layout":
        value = float(rnd.randint(0, 2))                 # which box the map draws
    else:
        value = pick(rnd, {-0.5: 1, 0.0: 1, 0.7: 1, 1.2: 1})
    null = kind in ("colour", "layout") or pick(rnd, {True: 4, False: 1})
    weight = pick(rnd, {1.0: 4, 2.0: 2, 3.0: 1, 0.5: 1, 0.0: 1, -1.0: 1})
    reliability = pick(rnd, {1.0: 3, 2.0: 1, 0.0: 1}) if null else 0.0
    mask = pick(rnd, {None: 6, "top": 1, "left": 1})
    outside = pick(rnd, {0.0: 1, 0.5: 1}) if mask else 0.0
    band = pick(rnd, dict(zip(range(len(BANDS)), (10, 1, 1, 1, 1, 1, 1))))
    window = pick(rnd, dict(zip(range(len(WINDOWS)), (8, 1, 1, 1, 1))))
    ramp = pick(rnd, {None: 6, (1.0, 0.5): 1, (0.0, 1.0): 1})
    return BindingSpec(kind, value, weight, reliability, null, mask, outside, BANDS[band], WINDOWS[window], ramp)


def graph_spec(seed: int) -> GraphSpec:
    """The graph of one seed (every choice from ``random.Random(seed)``, so the seed reproduces it)."""
    rnd = random.Random(seed)
    n = rnd.randint(1, 4)
    family = pick(rnd, {"pixels": 15, "split": 3, "sd15": 2, "mixed": 1})
    if family == "pixels":
        bindings = [binding_spec(rnd) for _ in range(n)]
    elif family == "split":                          # complementary bands of weight 1: no null is needed
        low, high = pick(rnd, {(BANDS[1], BANDS[2]): 1, (BANDS[3], BANDS[4]): 1})
        bindings = [replace(binding_spec(rnd), weight=1.0, band=low, mask=None, window=None),
                    replace(binding_spec(rnd), weight=1.0, band=high, mask=None, window=None)]
    elif family == "sd15":
        bindings = [binding_spec(rnd, {"sd15": 1}) for _ in range(n)]
    else:                                            # an SD1.5-latent MODEL among pixel experts: refused
        bindings = [binding_spec(rnd)] + [binding_spec(rnd, {"sd15": 1})] + \
            [binding_spec(rnd) for _ in range(n - 2)]
    bindings = tuple(bindings)
    n = len(bindings)
    # The band and window nodes of binding j run at a random point after j was bound, with the index it has then.
    pending = []
    ops = []
    for j, b in enumerate(bindings):
        ops.append(("bind", j))
        pending += [(what, j) for what, on in (("band", b.band), ("schedule", b.window or b.ramp)) if on]
        while pending and rnd.random() < 0.5:
            what, i = pending.pop(rnd.randint(0, len(pending) - 1))
            ops.append((what, i, i if rnd.random() < 0.5 else i - (j + 1)))
    for what, i in pending:
        ops.append((what, i, i if rnd.random() < 0.5 else i - n))
    latent = pick(rnd, {"native": 8, "multiple": 4, "non-multiple": 3, "smaller": 3, "channels": 2})
    # The stock path samples one binding alone; mostly one that it can (no mask, no band).
    plain = [j for j, b in enumerate(bindings) if not (b.mask or b.band)]
    stock = rnd.choice(plain) if plain and rnd.random() < 0.8 else rnd.randint(0, n - 1)
    return GraphSpec(bindings, tuple(ops), latent, *canvas_for(bindings, latent), pick(rnd, {1: 2, 2: 1}), seed,
                     stock)


def graph_specs() -> st.SearchStrategy[GraphSpec]:
    """Hypothesis draws the seeds (derandomized in the tests, so every run draws the same graphs)."""
    return st.integers(0, 2**32 - 1).map(graph_spec)


# --- building the chain through the nodes ---------------------------------------------------------------------

def _mask(kind: str, size: int) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    if kind == "top":
        m[:, : size // 2] = 1
    else:
        m[:, :, : size // 2] = 1
    return m


def layout_map(value: float) -> torch.Tensor:
    m = torch.zeros(1, 32, 32)
    x0 = 4 + 8 * int(value)
    m[:, 6:26, x0:x0 + 12] = 1
    return m


def model_conditioning(b: BindingSpec):
    """(MODEL, positive, negative or None) of a MODEL binding."""
    from support.comfy_gaussians import conditioning
    from unite_and_conquer.nodes import bindings as bind_nodes
    from unite_and_conquer.nodes import model_bindings

    if b.kind == NATIVE_MODEL:
        handle, model = loaded("class")
        chain = bind_nodes.PoEBindClass.execute(expert=handle, weight=1.0, reliability=1.0 if b.null else 0.0,
                                                null="trained" if b.null else "none", null_k=1, class_index=-1,
                                                **{"class": str(int(b.value))}).args[0]
        _, pos, neg = model_bindings.PoEEncodeCondition.execute(chain, -1).args
        return model, pos, (neg if b.null else None)
    return gaussian(b.kind), conditioning(b.value, GAUSS_VAR), (conditioning(NULL_MU, NULL_VAR) if b.null else None)


def bind(b: BindingSpec, chain, canvas: int):
    """Run binding b's node, appending to ``chain``."""
    from unite_and_conquer.nodes import bindings as bind_nodes
    from unite_and_conquer.nodes import model_bindings

    size = size_of(b.kind) if not b.model else canvas
    mask = {} if b.mask is None else {"mask": _mask(b.mask, size), "mask_outside": b.outside}
    common = dict(weight=b.weight, reliability=b.reliability, experts=chain, **mask)
    if b.model:
        model, pos, neg = model_conditioning(b)
        return model_bindings.PoEBindModel.execute(model, pos, negative=neg, **common).args[0]
    handle = loaded(b.kind)[0]
    if b.kind in ("class", "class_16"):
        return bind_nodes.PoEBindClass.execute(expert=handle, null="trained" if b.null else "none", null_k=1,
                                               class_index=-1, **{"class": str(int(b.value))}, **common).args[0]
    if b.kind == "colour":
        return bind_nodes.PoEBindText.execute(expert=handle, text=COLOURS[int(b.value)], **common).args[0]
    return bind_nodes.PoEBindSegmentation.execute(expert=handle, source="mask", slot="auto",
                                                  map_mask=layout_map(b.value), **common).args[0]


def build_chain(spec: GraphSpec):
    """The chain as the nodes build it, in the spec's node order."""
    from unite_and_conquer.nodes import bands as band_nodes
    from unite_and_conquer.nodes import bindings as bind_nodes

    chain = None
    for op in spec.ops:
        b = spec.bindings[op[1]]
        if op[0] == "bind":
            chain = bind(b, chain, spec.canvas)
        elif op[0] == "band":
            mode, cutoff, high, transition = b.band
            chain = band_nodes.PoEBandWeights.execute(experts=chain, mode=mode, cutoff=cutoff, cutoff_high=high,
                                                      transition=transition, index=op[2]).args[0]
        else:
            lo, hi = b.window or (0.0, 1e5)
            at_high, at_low = b.ramp or (1.0, 1.0)
            chain = bind_nodes.PoEBindingSchedule.execute(
                experts=chain, index=op[2], sigma_min=lo, sigma_max=hi, reliability_at_high_noise=at_high,
                reliability_at_low_noise=at_low, ramp_sigma_high=10.0, ramp_sigma_low=0.1).args[0]
    return chain


def latent_of(spec: GraphSpec) -> torch.Tensor:
    """The latent every path samples from (a non-zero image, so its channels are never 'fixed' as an empty one)."""
    g = torch.Generator().manual_seed(spec.seed)
    return 0.5 * torch.randn(spec.batch, spec.channels, spec.canvas, spec.canvas, generator=g)


# --- outcomes ---------------------------------------------------------------------------------------------------

NAMED = re.compile(r"^(PoE\w+): (?:the sampler's )?input '(\w+)': (.+)$", re.S)


@dataclass
class Outcome:
    """What a path did: predictions ``[(x, sigma, denoised)]`` in the sampler's VE frame, or a refusal."""
    path: str
    predictions: list = field(default_factory=list)
    refusal: str | None = None

    @property
    def body(self) -> str | None:
        m = NAMED.match(self.refusal or "")
        return m.group(3) if m else None


KINDS = [("space", r"works on .* but .* works on"), ("channels", r"^the latent has \d+ channels"),
         ("layout", r"^the latent has shape"), ("canvas", r"makes \d+ x \d+ images(, and the canvas is|, larger than)"),
         ("finest", r"^no expert of the product makes"), ("window", r"no binding is active at sigma"),
         ("null", r"the weights sum to|the weights acting there \(with their bands\)"),
         ("stock", r"but a stock sampler applies one cfg")]


def refusal_kind(body: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, body):
            return kind
    return "other"


def run_path(path: str, fn) -> Outcome:
    """Run one path; a ValueError is its refusal, anything else propagates (an unhandled exception)."""
    try:
        return Outcome(path, predictions=fn())
    except ValueError as err:
        return Outcome(path, refusal=str(err))


def ksampler_path(spec: GraphSpec, denoise: float = 0.5) -> list:
    """PoEKSampler, one Euler step refining the latent with denoise < 1: x = L + s n, the output is D(x, s)."""
    import comfy.sample

    from unite_and_conquer.nodes import sampling
    from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
    from unite_and_conquer.samplers.comfy.guider import ProductGuider, latent_facts

    chain = build_chain(spec)
    latent = latent_of(spec)
    out = sampling.PoEKSampler.execute(chain, spec.seed, 1, "euler", "simple", denoise, 0, 0, spec.batch,
                                       latent_image={"samples": latent}).args[0]["samples"]
    # The step's sigma, as PoEKSampler computed it on the same product (which sigma is not under test here).
    guider = ProductGuider(chain, "PoEKSampler", latent_facts(latent))
    s = float(comfy_sampling.compute_sigmas(guider, "euler", "simple", 1, denoise)[0])
    fmt = guider.model_patcher.model.latent_format
    x = fmt.process_in(latent) + s * comfy.sample.prepare_noise(latent, spec.seed)
    return [(x, s, fmt.process_in(out))]


class Recorder:
    """A SAMPLER function that asks the model for its denoised prediction at each sigma of the schedule, at
    ``x = L + sigma n`` (n the sampler's noise), and records them."""

    def __init__(self):
        self.records = []

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        latent = model.latent_image
        noise = (x - latent) / sigmas[0]
        d = x
        for s in sigmas[:-1]:
            xs = latent + s * noise
            d = model(xs, s * torch.ones(x.shape[0]), **(extra_args or {}))
            self.records.append((xs.detach().clone(), float(s), d.detach().clone()))
        return d


def custom_path(spec: GraphSpec, sigmas: list[float]) -> list:
    """PoEGuider + PoEScheduler + SamplerCustomAdvanced with a recording SAMPLER at ``sigmas``."""
    import comfy.samplers

    from support.comfy_harness import comfy_nodes
    from unite_and_conquer.nodes import sampling

    nodes = comfy_nodes()
    chain = build_chain(spec)
    guider = sampling.PoEGuider.execute(experts=chain).args[0]
    sampling.PoEScheduler.execute(experts=chain, scheduler="simple", steps=4, denoise=1.0)
    recorder = Recorder()
    noise = nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(noise_seed=spec.seed).args[0]
    nodes.NODE_CLASS_MAPPINGS["SamplerCustomAdvanced"].execute(
        noise=noise, guider=guider, sampler=comfy.samplers.KSAMPLER(recorder),
        sigmas=torch.tensor(sigmas + [0.0]), latent_image={"samples": latent_of(spec)})
    return recorder.records


def stock_path(spec: GraphSpec, denoise: float = 0.5) -> list:
    """PoEEncodeCondition on binding ``stock_index`` and the stock KSampler at cfg = its weight, one Euler step."""
    import comfy.sample
    import comfy.samplers

    from support.comfy_harness import comfy_nodes
    from unite_and_conquer.nodes import model_bindings

    nodes = comfy_nodes()
    chain = build_chain(spec)
    model, pos, neg = model_bindings.PoEEncodeCondition.execute(chain, spec.stock_index).args
    latent = latent_of(spec)
    cfg = spec.bindings[spec.stock_index].weight
    out = nodes.KSampler().sample(model, spec.seed, 1, cfg, "euler", "simple", pos, neg, {"samples": latent},
                                  denoise=denoise)[0]["samples"]
    ms = model.get_model_object("model_sampling")
    s = float(comfy.samplers.KSampler(model, steps=1, device="cpu", sampler="euler", scheduler="simple",
                                      denoise=denoise).sigmas[0])
    fmt = model.model.latent_format
    noise = comfy.sample.prepare_noise(latent, spec.seed)
    x = ms.noise_scaling(torch.tensor(s), noise, fmt.process_in(latent))
    d = fmt.process_in(out)
    if _is_flow(ms):                      # the flow frame's point x = (1 - t) L + t n is x / (1 - t) in VE terms
        return [(x / (1 - s), s / (1 - s), d)]
    return [(x, s, d)]


def _is_flow(ms) -> bool:
    import comfy.model_sampling

    return isinstance(ms, comfy.model_sampling.CONST)


# --- the reference rule ------------------------------------------------------------------------------------------

def _t_of(sigma: float, alphas_cumprod: torch.Tensor) -> float:
    """The continuous timestep of a VE level, linear in log sigma between table entries (``noise_levels``)."""
    ac = alphas_cumprod.double().numpy()
    log_sig = np.log(np.sqrt((1 - ac) / ac))
    return float(np.interp(math.log(sigma), log_sig, np.arange(len(ac))))


def _native_denoised(kind: str, condition: dict, x: torch.Tensor, s: float) -> torch.Tensor:
    """The expert's own x0 estimate at VE level s: the network on x / sqrt(1 + s^2) at its own timestep."""
    e = loaded("class" if kind == NATIVE_MODEL else kind)[0].expert
    t = torch.full((x.shape[0],), _t_of(s, e.alphas_cumprod), dtype=torch.float32)
    cond = {k: v.expand(x.shape[0], *v.shape[1:]) if v.shape[0] == 1 else v for k, v in condition.items()}
    with torch.no_grad():
        eps = e.eps(x.float() / math.sqrt(1 + s * s), t, cond).double()
    return x - s * eps


def _gauss_denoised(mu: float, var: float, x: torch.Tensor, s: float) -> torch.Tensor:
    """N(mu, var) per pixel: E[x0 | x0 + s e = x] in closed form."""
    return mu + var / (var + s * s) * (x - mu)


def _pool(x, k):
    if k == 1:
        return x
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))


def _up(x, k):
    return x if k == 1 else x.repeat_interleave(k, -2).repeat_interleave(k, -1)


def _proj(x, k):
    return _up(_pool(x, k), k)


def _response(band: tuple | None, h: int, w: int) -> np.ndarray | None:
    """PoEBandWeights' profile over the DCT coefficients (docs/method.md 'Bands'; one on an edge goes above)."""
    if band is None:
        return None
    mode, c, ch, tr = band
    edges, values = {"low-pass": ((c,), (1, 0)), "high-pass": ((c,), (0, 1)), "band-pass": ((c, ch), (0, 1, 0)),
                     "ramp down": (((c + ch) / 2,), (1, 0)), "ramp up": (((c + ch) / 2,), (0, 1))}[mode]
    if mode.startswith("ramp"):
        tr = ch - c
    rho = np.hypot(np.arange(h)[:, None] / h, np.arange(w)[None, :] / w)
    out = np.full(rho.shape, float(values[0]))
    for e, lo, hi in zip(edges, values, values[1:]):
        step = (0.5 - 0.5 * np.cos(np.pi * np.clip((rho - e) / tr + 0.5, 0, 1))) if tr > 0 else (rho >= e) * 1.0
        out += (hi - lo) * step
    return out


def _filter(v: torch.Tensor, band: tuple | None) -> torch.Tensor:
    r = _response(band, *v.shape[-2:])
    if r is None:
        return v
    c = scipy.fft.dctn(v.numpy(), type=2, norm="ortho", axes=(-2, -1))
    return torch.from_numpy(scipy.fft.idctn(c * r, type=2, norm="ortho", axes=(-2, -1)))


def _ramp(sigma: float, ramp: tuple[float, float] | None) -> float:
    if ramp is None:
        return 1.0
    (a, fa), (b, fb) = (10.0, ramp[0]), (0.1, ramp[1])
    if sigma >= a:
        return fa
    if sigma <= b:
        return fb
    return fa + (math.log(a) - math.log(sigma)) / (math.log(a) - math.log(b)) * (fb - fa)


def active(b: BindingSpec, sigma: float) -> bool:
    lo, hi = b.window or (0.0, 1e5)
    return lo <= sigma and (hi >= 1e5 or sigma <= hi)


@dataclass
class Term:
    """One binding at one sigma: its factor k, weight and reliability maps on the canvas, band, and its
    conditional and null x0 estimates at its own size (``None`` when not defined)."""
    k: int
    weight: torch.Tensor
    reliability: torch.Tensor
    band: tuple | None
    cond: torch.Tensor
    null: torch.Tensor | None


def terms(spec: GraphSpec, x: torch.Tensor, s: float) -> list[Term]:
    """Each binding active at s, with its expert's own predictions (independent of the pack's rule code)."""
    from support.comfy_gaussians import conditioning  # noqa: F401  (the Gaussians' parameters, documented there)

    canvas = x.shape[-1]
    out = []
    for b in spec.bindings:
        if not active(b, s):
            continue
        size = size_of(b.kind)
        k = canvas // size if size else 1
        w, a = _maps(b, canvas, k, s)
        xk, sk = _pool(x.double(), k), s / k
        if b.kind in GAUSSIAN:
            cond = _gauss_denoised(b.value, GAUSS_VAR, xk, sk)
            null = _gauss_denoised(NULL_MU, NULL_VAR, xk, sk) if b.null else None
        else:
            e = loaded("class" if b.kind == NATIVE_MODEL else b.kind)[0].expert
            if b.kind in ("class", "class_16", NATIVE_MODEL):
                c = e.encode("class", int(b.value))
            elif b.kind == "colour":
                c = e.encode("text", COLOURS[int(b.value)])
            else:
                c = e.encode("segmentation", layout_map(b.value)[:, None])
            kind = b.kind
            cond = _native_denoised(kind, c, xk, sk)
            null = _native_denoised(kind, e.null_of(c), xk, sk) if b.null else None
        out.append(Term(k, w, a, b.band, cond, null))
    return out


def _levels(ts: list[Term]) -> list[int]:
    return sorted({1} | {t.k for t in ts})


def pooled_null(ts: list[Term], shape) -> tuple[torch.Tensor, list[bool]]:
    """u = sum_m (P_{K_m} - P_{K_m+1}) ubar_m, ubar_m the reliability mix of the nulls of experts at k <= K_m
    (per pixel, uniform where the reliabilities all vanish); also which levels have a null at all."""
    levels = _levels(ts)
    u = torch.zeros(shape, dtype=torch.float64)
    covered = []
    for m, level in enumerate(levels):
        members = [t for t in ts if t.null is not None and t.k <= level and bool((t.reliability != 0).any())]
        covered.append(bool(members))
        if not members:
            continue
        total = sum(t.reliability for t in members)
        ubar = sum(torch.where(total > 0, t.reliability / torch.where(total > 0, total, 1.0), 1.0 / len(members))
                   * _up(t.null, t.k) for t in members)
        coarser = levels[m + 1] if m + 1 < len(levels) else None
        u = u + _proj(ubar, level) - (_proj(ubar, coarser) if coarser else 0)
    return u, covered


def combine(ts: list[Term], u: torch.Tensor) -> torch.Tensor:
    """D = u + sum_i w_i F_i(D_i - u): F_i the band on the canvas, or U band(. - D u) on an expert's own grid."""
    out = u.clone()
    for t in ts:
        term = _filter(t.cond - u, t.band) if t.k == 1 else _up(_filter(t.cond - _pool(u, t.k), t.band), t.k)
        out = out + t.weight * term
    return out


def null_term_acts(ts: list[Term], shape, seed: int = 0) -> list[bool]:
    """Per level: whether the rule's output moves when u moves on that level's band (C S_m r != 0)."""
    levels = _levels(ts)
    g = torch.Generator().manual_seed(seed)
    acts = []
    for m, level in enumerate(levels):
        r = torch.randn(shape, dtype=torch.float64, generator=g)
        coarser = levels[m + 1] if m + 1 < len(levels) else None
        r = _proj(r, level) - (_proj(r, coarser) if coarser else 0)
        moved = combine(ts, r) - combine(ts, torch.zeros(shape, dtype=torch.float64))
        acts.append(float(moved.norm()) > 1e-7 * float(r.norm()))
    return acts


def reference_denoised(spec: GraphSpec, x: torch.Tensor, s: float) -> torch.Tensor:
    ts = terms(spec, x, s)
    u, _ = pooled_null(ts, x.shape)
    return combine(ts, u)


# --- the oracle -------------------------------------------------------------------------------------------------

def sigma_range(spec: GraphSpec) -> tuple[float, float]:
    """The noise levels every expert serves on this canvas: the intersection of their ranges, an expert k times
    smaller serving k times its own (docs/method.md, 'Bands and resolutions'); a MODEL's own levels in VE terms."""
    from unite_and_conquer.samplers.comfy.model_experts import ModelExpert

    ranges = []
    for b in spec.bindings:
        size = size_of(b.kind)
        k = spec.canvas // size if size else 1
        if b.kind in GAUSSIAN:
            ranges.append(ModelExpert(gaussian(b.kind), b.kind).ve_range())
            continue
        ac = loaded("class" if b.kind == NATIVE_MODEL else b.kind)[0].expert.alphas_cumprod.double()
        sig = ((1 - ac) / ac).sqrt()
        ranges.append((float(sig[0]) * k, float(sig[-1]) * k))
    return max(r[0] for r in ranges), min(r[1] for r in ranges)


def oracle(spec: GraphSpec) -> set[str]:
    """The rules a graph breaks (kinds of :data:`KINDS`), from the spec alone."""
    broken = set()
    bs = spec.bindings
    if len({space_of(b.kind) for b in bs}) > 1:
        return {"space"}
    if spec.channels != (4 if space_of(bs[0].kind) == "SD15" else 3):
        broken.add("channels")
    canvas = spec.canvas
    sizes = [size_of(b.kind) for b in bs if size_of(b.kind)]
    for s in sizes:
        if s > canvas or canvas % s:
            broken.add("canvas")
    if sizes and len(sizes) == len(bs) and canvas != max(sizes):
        broken.add("finest")
    if broken:
        return broken
    lo, hi = sigma_range(spec)
    probes = {lo, hi}
    for b in bs:
        edges = list(b.window or ()) + ([10.0, 0.1] if b.ramp else [])
        for e in edges:
            for p in (e * (1 - 1e-6), e * (1 + 1e-6)):
                if lo <= p <= hi:
                    probes.add(p)
    x = torch.zeros(1, 3 if space_of(bs[0].kind) == "pixels" else 4, canvas, canvas, dtype=torch.float64)
    for p in sorted(probes):
        on = [b for b in bs if active(b, p)]
        if not on:
            broken.add("window")
            continue
        ts = [t for t in _shapes_only(spec, on, canvas, p)]
        _, covered = pooled_null(ts, x.shape)
        if any(a and not c for a, c in zip(null_term_acts(ts, x.shape), covered)):
            broken.add("null")
    return broken


def _shapes_only(spec: GraphSpec, on: list[BindingSpec], canvas: int, s: float) -> list[Term]:
    """Terms with the right factors, weights, reliabilities and bands, and zero predictions (the oracle
    asks only where the null term acts and which levels have a null)."""
    out = []
    for b in on:
        size = size_of(b.kind)
        k = canvas // size if size else 1
        z = torch.zeros(1, 1, canvas // k, canvas // k, dtype=torch.float64)
        out.append(Term(k, *_maps(b, canvas, k, s), b.band, z, z if b.null else None))
    return out


def _maps(b: BindingSpec, canvas: int, k: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The binding's weight and reliability on the canvas: its mask (a MODEL's drawn at the canvas, a native
    expert's at its own size and lifted) times w, and times a and the ramp at s."""
    m = torch.ones(1, 1, canvas, canvas, dtype=torch.float64)
    if b.mask:
        own = canvas if b.model else canvas // k
        m = _up(b.outside + (1 - b.outside) * _mask(b.mask, own)[:, None].double(), 1 if b.model else k)
    return b.weight * m, b.reliability * _ramp(s, b.ramp) * m


# --- the same graphs as API prompts, for a real server ---------------------------------------------------------

def server_ready(spec: GraphSpec) -> bool:
    """Whether the graph can be written with stock and pack nodes alone: no analytic Gaussian MODEL (no node
    makes one), a latent EmptyChromaRadianceLatentImage can make (16 px or more), the right channels."""
    return (not any(b.kind in GAUSSIAN for b in spec.bindings) and spec.canvas >= 16
            and spec.latent != "channels")


def api_prompt(spec: GraphSpec, path: str, prefix: str) -> dict:
    """The graph as an API-format prompt ending in a SaveImage, through ``path``: ``ksampler`` (PoEKSampler),
    ``custom`` (PoEGuider + PoEScheduler + SamplerCustomAdvanced, decoded by the pixel_space VAE) or
    ``stock`` (PoEEncodeCondition on ``spec.stock_index`` and the stock KSampler at cfg = its weight). Every
    path samples 2 Euler steps from an EmptyChromaRadianceLatentImage."""
    p: dict = {}

    def add(cls: str, **inputs) -> list:
        key = str(len(p) + 1)
        p[key] = {"class_type": cls, "inputs": inputs}
        return [key, 0]

    def out(ref: list, i: int) -> list:
        return [ref[0], i]

    experts: dict = {}

    def loader(kind: str) -> list:
        if kind not in experts:
            experts[kind] = add("PoEExpertLoader", expert_name=NATIVE[kind][0], family="auto", dtype="fp32",
                                schedule="published")
        return experts[kind]

    def solid(value: float, w: int, h: int) -> list:
        return add("SolidMask", value=value, width=w, height=h)

    def half(kind: str, size: int) -> list:
        w, h = (size, size // 2) if kind == "top" else (size // 2, size)
        return add("MaskComposite", destination=solid(0.0, size, size), source=solid(1.0, w, h), x=0, y=0,
                   operation="add")

    def layout(value: float) -> list:
        return add("MaskComposite", destination=solid(0.0, 32, 32), source=solid(1.0, 12, 20), x=4 + 8 * int(value),
                   y=6, operation="add")

    chain = None
    for op in spec.ops:
        b = spec.bindings[op[1]]
        if op[0] == "bind":
            common = dict(weight=b.weight, reliability=b.reliability)
            if chain is not None:
                common["experts"] = chain
            if b.mask:
                common.update(mask=half(b.mask, spec.canvas if b.model else size_of(b.kind)),
                              mask_feather=0, mask_invert=False, mask_outside=b.outside)
            if b.kind == NATIVE_MODEL:
                source = add("PoEBindClass", expert=loader("class"), **{"class": str(int(b.value))}, class_index=-1,
                             weight=1.0, reliability=1.0 if b.null else 0.0, null="trained" if b.null else "none",
                             null_k=1)
                enc = add("PoEEncodeCondition", experts=source, index=-1)
                extra = {"negative": out(enc, 2)} if b.null else {}
                chain = add("PoEBindModel", model=out(loader("class"), 1), positive=out(enc, 1), **extra, **common)
            elif b.kind in ("class", "class_16"):
                chain = add("PoEBindClass", expert=loader(b.kind), **{"class": str(int(b.value))}, class_index=-1,
                            null="trained" if b.null else "none", null_k=1, **common)
            elif b.kind == "colour":
                chain = add("PoEBindText", expert=loader("colour"), text=COLOURS[int(b.value)], **common)
            else:
                chain = add("PoEBindSegmentation", expert=loader("layout"), source="mask", slot="auto",
                            map_mask=layout(b.value), **common)
        elif op[0] == "band":
            mode, cutoff, high, transition = b.band
            chain = add("PoEBandWeights", experts=chain, mode=mode, cutoff=cutoff, cutoff_high=high,
                        transition=transition, index=op[2])
        else:
            lo, hi = b.window or (0.0, 1e5)
            at_high, at_low = b.ramp or (1.0, 1.0)
            chain = add("PoEBindingSchedule", experts=chain, index=op[2], sigma_min=lo, sigma_max=hi,
                        reliability_at_high_noise=at_high, reliability_at_low_noise=at_low, ramp_sigma_high=10.0,
                        ramp_sigma_low=0.1)
    latent = add("EmptyChromaRadianceLatentImage", width=spec.canvas, height=spec.canvas, batch_size=spec.batch)
    seed = spec.seed
    if path == "ksampler":
        ks = add("PoEKSampler", experts=chain, seed=seed, steps=2, sampler_name="euler", scheduler="simple",
                 denoise=1.0, width=0, height=0, batch_size=spec.batch, latent_image=latent)
        image = out(ks, 1)
    else:
        if path == "custom":
            samples = add("SamplerCustomAdvanced", noise=add("RandomNoise", noise_seed=seed),
                          guider=add("PoEGuider", experts=chain),
                          sampler=add("KSamplerSelect", sampler_name="euler"),
                          sigmas=add("PoEScheduler", experts=chain, scheduler="simple", steps=2, denoise=1.0),
                          latent_image=latent)
        else:
            enc = add("PoEEncodeCondition", experts=chain, index=spec.stock_index)
            samples = add("KSampler", model=out(enc, 0), seed=seed, steps=2,
                          cfg=spec.bindings[spec.stock_index].weight, sampler_name="euler", scheduler="simple",
                          positive=out(enc, 1), negative=out(enc, 2), latent_image=latent, denoise=1.0)
        image = add("VAEDecode", samples=samples, vae=add("VAELoader", vae_name="pixel_space"))
    add("SaveImage", images=image, filename_prefix=prefix)
    return p

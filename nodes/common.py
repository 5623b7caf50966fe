"""Small helpers shared by the node classes: wire types, image conversions, error wording."""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from comfy_api.v0_0_2 import io

from ..samplers import poe
from ..samplers.comfy import model_experts as comfy_models
from ..samplers.prepare import image_shape

log = logging.getLogger("unite_and_conquer")

CATEGORY = "unite_and_conquer"
Expert = io.Custom("POE_EXPERT")
Experts = io.Custom("POE_EXPERTS")
TextEncoder = io.Custom("POE_TEXT_ENCODER")


@contextlib.contextmanager
def node_input(node: str, name: str, fix: str = ""):
    """Re-raise a library error so that it names the node, the input and the fix."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as err:
        # A KeyError's str() is the repr of its key: unquote it; other messages stay as they are.
        msg = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
        if len(msg) > 600:
            msg = msg[:600] + "..."
        raise ValueError(f"{node}: input '{name}': {msg}{(' ' + fix) if fix else ''}") from None


def check_choice(node: str, name: str, value, options, what: str = "value") -> None:
    """ComfyUI 0.3.75 does not validate V3 combo values, so every node checks its own."""
    options = list(options)
    if value not in options:
        shown = ", ".join(map(str, options[:12])) + (", ..." if len(options) > 12 else "")
        raise ValueError(f"{node}: input '{name}': unknown {what} {str(value)[:80]!r}; pick one of: {shown}")


def check_number(node: str, name: str, value: float) -> None:
    """ComfyUI's min/max checks let NaN through."""
    if not math.isfinite(value):
        raise ValueError(f"{node}: input '{name}' is {value}; use a finite number")


def check_unit_range(node: str, name: str, t: torch.Tensor) -> None:
    check_finite(node, name, t)
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{node}: input '{name}' must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                         "rescale it (a MASK or IMAGE from ComfyUI's own nodes already is)")


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B x H x W x C in [0, 1]) to B x 3 x H x W in [-1, 1]."""
    return image[..., :3].movedim(-1, 1) * 2 - 1


def pixels_to_image(samples: torch.Tensor) -> torch.Tensor:
    """B x C x H x W in [-1, 1] to ComfyUI IMAGE."""
    return ((samples.float() + 1) / 2).clamp(0, 1).movedim(1, -1).contiguous()


def check_finite(node: str, name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{node}: input '{name}' contains NaN or Inf values; fix the node that produced it")


def chain(previous: list[poe.Binding] | None, binding: poe.Binding, node: str) -> list[poe.Binding]:
    """A new list with ``binding`` appended; the upstream list is never mutated (cached outputs)."""
    bindings = list(previous or [])
    new = poe.unwrap(binding.expert)
    # ComfyUI MODELs have no native size: the first binding that has one sets the sizes to check against.
    sized = [e for e in (poe.unwrap(b.expert) for b in bindings) if e.resolution is not None]
    if sized and new.resolution is not None:
        first = sized[0]
        (r1, c1), (r2, c2) = image_shape(first), image_shape(new)
        # A smaller expert may join when its size divides the other's: it then runs on the pooled canvas.
        if c1 != c2 or max(r1, r2) % min(r1, r2):
            raise ValueError(
                f"{node}: input 'expert': {new.name} makes {new.resolution}px images with {new.image_channels} "
                f"channels but the chained experts ({first.name}) make {first.resolution}px with "
                f"{first.image_channels}. Experts of a product share the channels, and their sizes must be integer "
                "multiples of one another (a smaller expert runs on the pooled canvas).")
    bindings.append(binding)
    # A native (pixel) expert after a latent MODEL is refused here, naming both bindings, as PoEBindModel does.
    comfy_models.latent_format_of(bindings, node)
    return bindings


def weight_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input("weight", default=default, min=-100.0, max=100.0, step=0.05, round=0.0001,
                          tooltip="w_i: how strongly this condition pulls the sample. w = 1 for every binding is "
                                  "the paper's plain product; one expert with w = 1 + s is classifier-free guidance. "
                                  "A negative weight is negation ('NOT this'): it pushes away from the pooled null "
                                  "along this condition, so some binding needs a reliability > 0.")


def reliability_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input("reliability", default=default, min=0.0, max=100.0, step=0.05, round=0.0001,
                          tooltip="a_i: this binding's share of the pooled unconditional score (normalised over "
                                  "all bindings). Sliding it blends the experts' styles. Needs a null. When the "
                                  "weights differ, a reliability equal to the weight guides each expert against "
                                  "its own null (README, 'Choosing reliabilities').")


def mask_inputs() -> list[io.Input]:
    return [
        io.Mask.Input("mask", optional=True,
                      tooltip="Optional region: inside it the binding carries its weight and reliability, outside "
                              "they are multiplied by 'outside' (PoE-GAN's spatial product, applied per pixel)."),
        io.Int.Input("mask_feather", default=0, min=0, max=256, optional=True,
                     tooltip="Gaussian feathering of the mask edge, in pixels (kornia)."),
        io.Boolean.Input("mask_invert", default=False, optional=True, tooltip="Use the outside of the mask."),
        io.Float.Input("mask_outside", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="Multiplier of weight and reliability outside the mask; 0 = the binding is absent "
                               "there. Where every reliability is 0 the pooled null falls back to the uniform mean."),
    ]


# Sigma inputs stop at NO_LIMIT, and a sigma_max there means no upper limit.
NO_LIMIT = 1e5


def sigma_window_inputs(sigma_min: float, min_tooltip: str, window: str) -> list[io.Input]:
    """The sigma_min and sigma_max inputs of a noise window; read them with :func:`sigma_window`."""
    return [io.Float.Input("sigma_min", default=sigma_min, min=0.0, max=NO_LIMIT, step=0.01, tooltip=min_tooltip),
            io.Float.Input("sigma_max", default=NO_LIMIT, min=0.0, max=NO_LIMIT, step=0.01,
                           tooltip=f"Upper end of {window} ({NO_LIMIT:g} = no limit).")]


def sigma_window(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    return sigma_min, math.inf if sigma_max >= NO_LIMIT else sigma_max


def index_input() -> io.Input:
    return io.Int.Input("index", default=-1, min=-1000, max=1000,
                        tooltip="Which binding of the chain: 0 is the first, -1 the last.")


def indexed_chain(node: str, experts, index: int) -> list[poe.Binding]:
    """A copy of the chain ``experts``, refused when it is empty or has no binding at ``index``."""
    bindings = list(experts or [])
    if not bindings:
        raise ValueError(f"{node}: input 'experts' is empty: connect a PoEBind* node")
    if not -len(bindings) <= index < len(bindings):
        raise ValueError(f"{node}: input 'index' is {index} but the chain has {len(bindings)} binding(s); use "
                         f"0..{len(bindings) - 1} or -1 for the last")
    return bindings


def experts_input() -> io.Input:
    return Experts.Input("experts", optional=True,
                         tooltip="Bindings to chain: this node appends its binding to them.")

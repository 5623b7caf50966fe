"""One common noise level for models of different parameterisations.

The product samples in k-diffusion's variance-exploding (VE) frame, ``x = x0 + s * eps``
(Karras et al. 2022, eq. 1 with s(t) = 1), and every model is asked about the same point there.

**Discrete VP models (EPS, V_PREDICTION).** A model trained on ``z = sqrt(ab) x0 + sqrt(1 - ab) eps``
sees the VE point as ``z = x / sqrt(1 + s^2)`` at the level where ``s^2 = (1 - ab) / ab`` (Song et
al. 2021, eq. 29). ComfyUI's EPS and V_PREDICTION model samplings already work in the VE frame
(their ``calculate_input`` divides by ``sqrt(1 + s^2)``), so their own level is ``s`` itself:

    EPS:          x0 = x - s * eps
    V_PREDICTION: x0 = x / (1 + s^2) - s / sqrt(1 + s^2) * v,   v = sqrt(ab) eps - sqrt(1 - ab) x0

**Rectified flow (CONST: the Flux family, SD3, Chroma Radiance).** The model's point is
``x_f = (1 - t) x0 + t eps`` with t in [0, 1]. Divide the VE point by ``1 + s``:

    x / (1 + s) = x0 / (1 + s) + s / (1 + s) * eps,

which is a flow point with ``1 - t = 1 / (1 + s)`` and ``t = s / (1 + s)``; conversely
``s = t / (1 - t)``. So the model is evaluated at ``x_f = x / (1 + s)``, level ``t = s / (1 + s)``,
and its denoised prediction ``x0 = x_f - t * v`` (v = eps - x0) is already a VE-frame x0: the data
is the same point in both frames, only the noise is scaled. ComfyUI's ``COSMOS_RFLOW`` model
sampling uses the same map. The shift of a flow model (``t -> shift t / (1 + (shift - 1) t)``)
only reshapes its table of levels; the map above acts on the shifted level the network is fed.

**Combining.** Every model returns x0 at the common VE level; the rule's coefficients sum to one, so
combining x0 equals combining the VE noise ``eps = (x - x0) / s`` (:func:`eps_from_denoised`).

**Range.** A VP model serves ``[s_min, s_max]`` of its table. A flow model's last level t = 1 is
pure noise, ``s = inf``; its usable VE range stops at the largest table level below 1. The product
runs on the intersection of all ranges (:func:`common_range`); an empty one is an error.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

VE = "ve"        # EPS, V_PREDICTION and EDM samplings: the model's own level is the common s
FLOW = "flow"    # CONST: x_f = x / (1 + s) at t = s / (1 + s)
FRAMES = (VE, FLOW)


def _col(level: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A level as a tensor broadcastable against ``x`` (one value per batch row or one for all)."""
    level = torch.as_tensor(level, dtype=x.dtype, device=x.device)
    return level.reshape(-1, *([1] * (x.ndim - 1))) if level.ndim else level


def flow_level(s: torch.Tensor | float) -> torch.Tensor | float:
    """t = s / (1 + s): the flow level of VE level s."""
    return s / (1 + s)


def ve_level(t: torch.Tensor | float) -> torch.Tensor | float:
    """s = t / (1 - t): the VE level of flow level t (``inf`` at t = 1)."""
    if isinstance(t, torch.Tensor):
        return t / (1 - t)
    return math.inf if t >= 1 else t / (1 - t)


def to_model_frame(frame: str, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_model, level_model)``: the common VE point ``x`` at level ``s`` as the model reads it."""
    if frame == VE:
        return x, s
    if frame == FLOW:
        return x / (1 + _col(s, x)), flow_level(s)
    raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")


def vp_input(x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """The VP network input ``x / sqrt(1 + s^2)`` of a VE point."""
    return x / (1 + _col(s, x) ** 2).sqrt()


def denoised_from_output(prediction: str, output: torch.Tensor, x_model: torch.Tensor,
                         level: torch.Tensor | float) -> torch.Tensor:
    """x0 from a network's raw output in its own frame (prediction: ``eps``, ``v`` or ``flow``)."""
    lv = _col(level, x_model)
    if prediction == "eps":
        return x_model - lv * output
    if prediction == "v":
        return x_model / (1 + lv**2) - lv / (1 + lv**2).sqrt() * output
    if prediction == "flow":
        return x_model - lv * output
    raise ValueError(f"unknown prediction {prediction!r}; expected eps, v or flow")


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """The VE noise ``(x - x0) / s`` of a denoised prediction at the common level."""
    return (x - denoised) / _col(s, x)


def ve_range(frame: str, level_min: float, level_max: float, below_one: float | None = None) -> tuple[float, float]:
    """A model's noise range in VE levels. ``below_one``: for a flow model whose table reaches t = 1,
    its largest level below 1, where the usable range stops (t = 1 is s = inf)."""
    if frame == VE:
        return float(level_min), float(level_max)
    if frame == FLOW:
        top = level_max if level_max < 1 else below_one
        if top is None or not top < 1:
            raise ValueError("a flow model's range reaches t = 1 (s = inf) and it has no level below 1 to stop at")
        return float(ve_level(float(level_min))), float(ve_level(float(top)))
    raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")


def common_range(ranges: Sequence[tuple[float, float]], names: Sequence[str] | None = None) -> tuple[float, float]:
    """The intersection of the models' VE ranges; an empty intersection is an error naming them."""
    if not ranges:
        raise ValueError("no models: the common noise range of an empty product is undefined")
    lo = max(r[0] for r in ranges)
    hi = min(r[1] for r in ranges)
    if not lo < hi:
        names = names or [f"model {i}" for i in range(len(ranges))]
        listed = "; ".join(f"{n}: [{a:.4g}, {b:.4g}]" for n, (a, b) in zip(names, ranges))
        raise ValueError(f"the models' noise ranges do not overlap ({listed}), so no sigma is valid for all of them")
    return lo, hi

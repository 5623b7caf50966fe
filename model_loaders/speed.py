"""Speed levers of a loaded expert. None changes what the expert computes beyond float rounding
(``tests/model_loaders/test_speed.py``); ``benchmarks/bench_poe.py`` measures each one on a GPU.

- :func:`set_channels_last`: weights and inputs in channels_last (NHWC), the layout that tensor-core
  convolution kernels read without a transposition.
- attention and norm kernels: :func:`configure` (``unet_layers.set_attention`` and ``set_norm``).
- :func:`compile_expert`: ``torch.compile`` of the network, one specialised graph per input shape.

The weight dtype is the loader's (``load_expert(dtype=...)``, the loader node's ``dtype``); every
norm keeps float32 statistics whatever it is.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from typing import Any

import torch

from .expert import Expert
from .unet_layers import set_attention, set_norm

log = logging.getLogger("unite_and_conquer")

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# Dynamo keeps this many specialised graphs per network class before falling back to eager; every
# (batch x rows, dtype) a server sees is one, so torch's default of 8 is too few.
RECOMPILE_LIMIT = 64


def set_channels_last(expert: Expert, on: bool = True) -> None:
    """Convolution weights in channels_last and :meth:`Expert.eps` inputs converted to it (or back)."""
    fmt = torch.channels_last if on else torch.contiguous_format
    expert.network.to(memory_format=fmt)
    expert.memory_format = fmt if on else torch.preserve_format


def configure(expert: Expert, *, channels_last: bool | None = None, attention: str | None = None,
              norm: str | None = None) -> None:
    """Set the levers that are given (``None`` leaves one as it is)."""
    if channels_last is not None:
        set_channels_last(expert, channels_last)
    if attention is not None:
        set_attention(expert.network, attention)
    if norm is not None:
        set_norm(expert.network, norm)


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why ``torch.compile``'s default backend cannot build kernels for ``device``, or None if it can."""
    kind = torch.device(device).type
    if kind == "cuda":
        return None if importlib.util.find_spec("triton") else "the 'triton' package is not installed"
    if kind == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if any(c and shutil.which(c) for c in compilers):
            return None
        return "no C++ compiler was found (install g++, or set CXX)"
    return f"this pack has not tried torch.compile on {kind} devices"


def _signature(network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, condition: dict) -> tuple:
    param = next(network.parameters(), None)
    weights = (param.dtype, str(param.device)) if param is not None else ()
    cond = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(condition.items()) if isinstance(v, torch.Tensor))
    return (tuple(x.shape), x.dtype, str(x.device), x.is_contiguous(memory_format=torch.channels_last),
            tuple(t.shape), cond, weights)


class CompiledForward:
    """``torch.compile`` of an expert's network, called like the network.

    Each input signature (shapes, dtypes, device, layout) gets its own graph (``dynamic=False``);
    its first call compiles it, and the time that took is kept in :attr:`compile_seconds`. The
    graphs live in torch's own compile cache, which is keyed by the network's class, its
    configuration and the signature, not by the object: a second prompt of the same shape, and a
    network of the same configuration loaded again, reuse them without compiling.

    With CUDA graphs (modes ``reduce-overhead`` and ``max-autotune`` on a GPU) each call marks a new
    step and returns a copy of the output, which the next replay would overwrite.
    """

    def __init__(self, network: torch.nn.Module, mode: str = "default", backend: str | Any = "inductor"):
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        self.network = network
        self.mode = mode
        self._fn = torch.compile(network, mode=None if mode == "default" else mode, backend=backend, dynamic=False)
        self.compile_seconds: dict[tuple, float] = {}

    def _cudagraphs(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.mode in ("reduce-overhead", "max-autotune")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        key = _signature(self.network, x, t, condition)
        first = key not in self.compile_seconds
        cudagraphs = self._cudagraphs(x)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if first:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
        out = self._fn(x, t, **condition)
        if first:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.compile_seconds[key] = time.perf_counter() - start
            log.info("torch.compile (%s) of %s for input %s: first call %.1f s", self.mode,
                     type(self.network).__name__, tuple(x.shape), self.compile_seconds[key])
        return out.clone() if cudagraphs else out


def compile_expert(expert: Expert, mode: str, backend: str | Any = "inductor") -> CompiledForward | None:
    """Make :meth:`Expert.eps` run a compiled network (``mode`` one of :data:`COMPILE_MODES`; ``off``
    goes back to eager). The weights stay the network's own; nothing compiles until the first call."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    expert.compiled = None if mode == "off" else CompiledForward(expert.network, mode, backend)
    return expert.compiled

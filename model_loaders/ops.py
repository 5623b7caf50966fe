"""The layer operations every native network is built from, injectable as ``operations=``.

A network takes a namespace of layer classes (``Linear``, ``Conv1d``, ``Conv2d``, ``GroupNorm``,
``LayerNorm``, ``Embedding``) exactly as ComfyUI's own UNets do. :class:`torch_ops`, the default, is
plain ``torch.nn`` plus the one behaviour the networks rely on: norms and embeddings cast their
weights to their input's dtype and device (ComfyUI's ``manual_cast`` layers do the same). The
ComfyUI glue passes ``comfy.ops`` namespaces instead, so that ComfyUI can cast, stream and
partially load the weights; this package never imports them.

:func:`float32_norm` turns a namespace's ``GroupNorm`` or ``LayerNorm`` into one with float32
statistics whatever the weights' dtype (guided-diffusion's ``GroupNorm32``, GLIDE's LayerNorm).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

NORM_IMPLS = ("upcast", "mixed")


class torch_ops:
    """Plain torch layers; norms and embeddings cast their weights to the input's dtype and device."""

    Linear = nn.Linear
    Conv1d = nn.Conv1d
    Conv2d = nn.Conv2d

    class GroupNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, b = _cast(self.weight, x), _cast(self.bias, x)
            return F.group_norm(x, self.num_groups, w, b, self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w, b = _cast(self.weight, x), _cast(self.bias, x)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    class Embedding(nn.Embedding):
        def reset_parameters(self) -> None:
            # normal_ on the meta device (where loaders build) costs seconds on its first call.
            if not self.weight.is_meta:
                super().reset_parameters()

        def forward(self, tokens: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
            out = F.embedding(tokens, self.weight.to(tokens.device), self.padding_idx, self.max_norm,
                              self.norm_type, self.scale_grad_by_freq, self.sparse)
            return out if out_dtype is None else out.to(out_dtype)


def _cast(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if p is None else p.to(device=x.device, dtype=x.dtype)


@functools.cache
def float32_norm(base: type) -> type:
    """``base`` (a namespace's GroupNorm or LayerNorm) with float32 statistics.

    ``norm_impl`` ``"upcast"`` (default): the input goes through ``base`` in float32 and comes back
    in its own dtype. ``"mixed"``: half-precision inputs go through ``base`` as they are (the
    kernels accumulate their statistics in float32 themselves), with one cast fewer.
    """

    class Float32Norm(base):
        norm_impl = "upcast"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.norm_impl == "mixed" and x.dtype in (torch.float16, torch.bfloat16):
                return super().forward(x)
            x32 = x.float()
            if x32.device.type == "cpu" and x32.ndim == 4:
                # The CPU channels_last group-norm kernel loses precision when a group's mean is
                # large (3e-5 against 5e-7 at mean 30), which the time-embedding offsets make common.
                x32 = x32.contiguous()
            return super().forward(x32).to(x.dtype)

    Float32Norm.__name__ = Float32Norm.__qualname__ = f"Float32{base.__name__}"
    return Float32Norm


def group_norm32(channels: int, operations=torch_ops, groups: int = 32, eps: float = 1e-5) -> nn.Module:
    """A float32-statistics GroupNorm of ``operations`` (guided-diffusion's ``normalization``)."""
    return float32_norm(operations.GroupNorm)(groups, channels, eps=eps)


def layer_norm32(width: int, operations=torch_ops, eps: float = 1e-5) -> nn.Module:
    """A float32-statistics LayerNorm of ``operations``."""
    return float32_norm(operations.LayerNorm)(width, eps=eps)


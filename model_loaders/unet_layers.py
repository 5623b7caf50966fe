"""The layers of ADM's UNet, shared by every family built on its trunk: ADM (guided-diffusion),
GLIDE and the Unite and Conquer face experts.

Module and parameter names are guided-diffusion's, so released checkpoints load unchanged:
``in_layers`` (norm, SiLU, conv), ``emb_layers`` (SiLU, linear), ``cond_emb_layers`` (the face
experts' text FiLM), ``out_layers`` (norm, SiLU, dropout placeholder, conv), ``skip_connection``;
attention ``norm``, ``qkv``, ``encoder_kv`` (GLIDE's text keys and values) and ``proj_out``;
``op`` / ``conv`` for the convolutional down/up-sampling. :func:`infer_trunk` reads the trunk's
levels back from those names and the tensors' shapes; :func:`assign_checkpoint` fills a network with
a checkpoint's tensors.

Speed levers (see :func:`set_attention`, :func:`set_norm`; the memory format and ``torch.compile``
are the expert's, see ``model_loaders.speed``):

- attention ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which
  picks a fused kernel (flash, memory-efficient) where one exists; those keep the softmax's
  accumulation in float32 for half-precision inputs. ``"math"``: the reference's explicit
  ``softmax(q k^T / sqrt(d)) v`` with the softmax in float32, as guided-diffusion's
  ``QKVAttention`` computes it.
- norm ``"upcast"`` (default): group norms cast their input to float32, normalise, and cast back,
  as guided-diffusion's ``GroupNorm32``; ``"mixed"``: one group-norm kernel on the half-precision
  input, which accumulates its statistics in float32 itself (fewer kernels and less memory
  traffic; same float32 statistics).

Every layer with weights comes from the ``operations`` namespace a network is built with
(``model_loaders.ops``; ComfyUI passes its ``comfy.ops``), as ComfyUI's own UNets take them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .ops import NORM_IMPLS, group_norm32, torch_ops

ATTENTION_ORDERS = ("new", "legacy")
ATTENTION_IMPLS = ("sdpa", "math")


# --- functions ------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_i) | sin(t f_i)]``, ``f_i = max_period^(-i / half)``; fractional t is fine."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """Parameter-free 2x resampling of residual up/down blocks: nearest up, average-pool down."""
    if direction == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if direction == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over B x heads x tokens x d tensors."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl != "math":
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    # guided-diffusion scales q and k by d^-1/4 each (more stable in half precision than q by d^-1/2).
    scale = q.shape[-1] ** -0.25
    weight = torch.einsum("bhtd,bhsd->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bhts,bhsd->bhtd", weight, v)


# --- layers ---------------------------------------------------------------------------------------

def GroupNorm32(channels: int, groups: int = 32, operations=torch_ops) -> nn.Module:
    """GroupNorm with 32 groups and float32 statistics whatever the weights' dtype, as
    guided-diffusion's ``GroupNorm32`` (half-precision statistics over large groups lose too much)."""
    return group_norm32(channels, operations, groups)


class ResBlock(nn.Module):
    """Residual block with the time embedding (additive, or scale-shift after the second norm),
    optionally resampling (``direction`` ``"up"`` / ``"down"``), and optionally a second FiLM from a
    condition embedding (``embed_dim`` > 0: the face experts' ``cond_emb_layers``).

    The embedding FiLM follows the time FiLM through ``out_norm`` a second time, as the face
    experts' reference does, and applies only to the samples where ``active`` is true.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool,
                 direction: str | None = None, embed_dim: int = 0, operations=torch_ops):
        super().__init__()
        ops = operations
        film = out_channels * (2 if scale_shift else 1)
        self.scale_shift = scale_shift
        self.direction = direction
        self.in_layers = nn.Sequential(GroupNorm32(channels, operations=ops), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, film))
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(embed_dim, film)) if embed_dim else None
        # Index 2 held dropout in training; kept as a placeholder so that out_layers.3 keeps its name.
        self.out_layers = nn.Sequential(GroupNorm32(out_channels, operations=ops), nn.SiLU(), nn.Identity(),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else ops.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, embed: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        norm, act, conv = self.in_layers
        # Resample between the activation and the convolution, as the reference's h_upd does.
        h = conv(resample(act(norm(x)), self.direction))
        x = resample(x, self.direction)
        emb_out = rearrange(self.emb_layers(emb).to(h.dtype), "b c -> b c 1 1")
        film = None
        if self.cond_emb_layers is not None and embed is not None:
            film = rearrange(self.cond_emb_layers(embed).to(h.dtype), "b c -> b c 1 1")
        out_norm, out_act, _, out_conv = self.out_layers
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            if film is not None:
                # The face experts' reference normalises a second time before the text FiLM.
                scale, shift = film.chunk(2, dim=1)
                h = torch.where(active, out_norm(h) * (1 + scale) + shift, h)
        else:
            h = h + emb_out
            if film is not None:
                h = torch.where(active, h + film, h)
            h = out_norm(h)
        return self.skip_connection(x) + out_conv(out_act(h))


class Downsample(nn.Module):
    """Strided 3x3 convolution (``resblock_updown=False``)."""

    def __init__(self, channels: int, operations=torch_ops):
        super().__init__()
        self.op = operations.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 convolution (``resblock_updown=False``)."""

    def __init__(self, channels: int, operations=torch_ops):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(resample(x, "up"))


POINTWISE = ("qkv", "proj_out")


def _pointwise_from_checkpoint(module, state_dict, prefix, *args) -> None:
    # Checkpoints hold qkv and proj_out as 1-D convolutions (C' x C x 1); they run as 1x1 2-D ones.
    for name in POINTWISE:
        key = f"{prefix}{name}.weight"
        if key in state_dict and state_dict[key].ndim == 3:
            state_dict[key] = state_dict[key][..., None]


def _pointwise_to_checkpoint(module, state_dict, prefix, *args) -> None:
    for name in POINTWISE:
        key = f"{prefix}{name}.weight"
        if key in state_dict and state_dict[key].ndim == 4:
            state_dict[key] = state_dict[key][..., 0]


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection, and GLIDE's text keys and values put
    before the image's own when ``encoder_channels`` is set.

    ``order`` is the layout of ``qkv``'s rows: ``"new"`` (``QKVAttention``: ``[Q | K | V]``, then
    heads) or ``"legacy"`` (``QKVAttentionLegacy``, GLIDE, the face experts: heads, then ``[q, k, v]``
    inside each head); ``encoder_kv`` holds ``[k, v]`` per head. ``qkv`` and ``proj_out`` are 1-D
    convolutions in checkpoints (``C' x C x 1``) but 1x1 2-D convolutions here (state-dict hooks
    convert both ways), so channels_last features reach the attention kernel without a reshuffle.
    """

    def __init__(self, channels: int, heads: int, order: str = "legacy", encoder_channels: int | None = None,
                 operations=torch_ops):
        super().__init__()
        if order not in ATTENTION_ORDERS:
            raise ValueError(f"attention_order must be one of {ATTENTION_ORDERS}, got {order!r}")
        self.heads = heads
        self.attention_impl = "sdpa"
        self.pattern = "b (three h c) x y -> three b h (x y) c" if order == "new" else \
            "b (h three c) x y -> three b h (x y) c"
        self.norm = GroupNorm32(channels, operations=operations)
        self.qkv = operations.Conv2d(channels, 3 * channels, 1)
        if encoder_channels:
            self.encoder_kv = operations.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = operations.Conv2d(channels, channels, 1)
        self._register_load_state_dict_pre_hook(_pointwise_from_checkpoint, with_module=True)
        self._register_state_dict_hook(_pointwise_to_checkpoint)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm(x)), self.pattern, three=3, h=self.heads)
        if encoder_out is not None:
            ek, ev = rearrange(self.encoder_kv(encoder_out), "b (h two c) s -> two b h s c", h=self.heads, two=2)
            k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
        a = rearrange(attention(q, k, v, self.attention_impl), "b h (x y) c -> b (h c) x y", x=x.shape[2])
        return x + self.proj_out(a)


class TimestepSequential(nn.Sequential):
    """One UNet stage (guided-diffusion's ``TimestepEmbedSequential``): residual blocks take the
    time embedding (and the condition embedding), attention blocks the text, the rest only the
    features."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, encoder_out: torch.Tensor | None = None,
                embed: torch.Tensor | None = None, active: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, embed, active)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, encoder_out)
            else:
                x = layer(x)
        return x


# --- the trunk ------------------------------------------------------------------------------------

def heads_for(channels: int, num_head_channels: int, num_heads: int, num_heads_upsample: int = -1,
              decoder: bool = False, family: str = "ADM") -> int:
    """Attention heads of a block of ``channels`` channels, as guided-diffusion counts them:
    ``channels // num_head_channels``, else ``num_heads`` (``num_heads_upsample`` on the way up)."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ValueError(f"{family} checkpoint: attention width {channels} is not divisible by "
                             f"num_head_channels {num_head_channels}; set 'num_head_channels' (or 'num_heads') "
                             f"in the file's safetensors metadata")
        return channels // num_head_channels
    heads = num_heads_upsample if decoder and num_heads_upsample != -1 else num_heads
    if channels % heads:
        raise ValueError(f"{family} checkpoint: attention width {channels} is not divisible by num_heads {heads}")
    return heads


class UNetTrunk(nn.Module):
    """guided-diffusion's UNet trunk with its key names: ``time_embed``, ``input_blocks``,
    ``middle_block``, ``output_blocks`` and ``out``. ADM, GLIDE and the face experts subclass it
    and add their own inputs (class embedding, text transformer, slot mixer).

    Args:
        in_channels, model_channels, out_channels, num_res_blocks, channel_mult, attention_ds:
            guided-diffusion's options (``attention_ds`` are the downsampling rates with attention).
        heads (`Callable[[int, bool], int]`): attention heads for a width, on the way up or not.
        attention_order (`str`): ``qkv`` row layout, ``"new"`` or ``"legacy"``.
        use_scale_shift_norm, resblock_updown (`bool`): guided-diffusion's options.
        encoder_channels (`int`, *optional*): width of text features every attention block attends
            to (GLIDE's ``encoder_kv``).
        embed_dim (`int`): width of a condition embedding every residual block takes as a second
            FiLM (the face experts' ``cond_emb_layers``); 0 for none.
        operations: the layer namespace (``model_loaders.ops``).
    """

    def __init__(self, *, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 channel_mult: tuple, attention_ds: tuple, heads: Callable[[int, bool], int],
                 attention_order: str = "legacy", use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 encoder_channels: int | None = None, embed_dim: int = 0, operations=torch_ops):
        super().__init__()
        ops = operations
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(ops.Linear(model_channels, emb_ch), nn.SiLU(), ops.Linear(emb_ch, emb_ch))

        def res(cin: int, cout: int, direction: str | None = None) -> ResBlock:
            return ResBlock(cin, emb_ch, cout, use_scale_shift_norm, direction, embed_dim, operations=ops)

        def stage(cin: int, cout: int, ds: int, decoder: bool = False) -> TimestepSequential:
            layers = [res(cin, cout)]
            if ds in attention_ds:
                layers.append(AttentionBlock(cout, heads(cout, decoder), attention_order, encoder_channels,
                                             operations=ops))
            return TimestepSequential(*layers)

        widths = [int(m * model_channels) for m in channel_mult]
        ch = widths[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(ops.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.input_blocks.append(stage(ch, width, ds))
                ch = width
                skips.append(ch)
            if level != len(widths) - 1:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch, operations=ops)
                self.input_blocks.append(TimestepSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(
            res(ch, ch), AttentionBlock(ch, heads(ch, False), attention_order, encoder_channels, operations=ops),
            res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                block = stage(ch + skips.pop(), width, ds, decoder=True)
                ch = width
                if level and i == num_res_blocks:
                    block.append(res(ch, ch, "up") if resblock_updown else Upsample(ch, operations=ops))
                    ds //= 2
                self.output_blocks.append(block)
        self.out = nn.Sequential(GroupNorm32(ch, operations=ops), nn.SiLU(),
                                 ops.Conv2d(widths[0], out_channels, 3, padding=1))

    # The dtype the network computes in where it is not its weights' (weights stored in fp8 and cast
    # layer by layer); Expert.predict reads it.
    compute_dtype: torch.dtype | None = None

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``time_embed`` of the sinusoidal embedding of ``t``, in ``dtype``."""
        return self.time_embed(timestep_embedding(t, self.time_embed[0].in_features).to(dtype))

    def trunk(self, h: torch.Tensor, emb: torch.Tensor, encoder_out: torch.Tensor | None = None,
              embed: torch.Tensor | None = None, active: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet from its first convolution's input ``h`` to ``out``."""
        cond = {"encoder_out": encoder_out, "embed": embed, "active": active}
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, **cond)
            skips.append(h)
        h = self.middle_block(h, emb, **cond)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, **cond)
        return self.out(h)


# --- levers ---------------------------------------------------------------------------------------

def _set_lever(network: nn.Module, attribute: str, impl: str, choices: tuple, what: str) -> None:
    if impl not in choices:
        raise ValueError(f"{what} implementation must be one of {choices}, got {impl!r}")
    for m in network.modules():
        if hasattr(m, attribute):
            setattr(m, attribute, impl)


def set_attention(network: nn.Module, impl: str) -> None:
    """Every attention of ``network`` (image and text) through ``impl``: ``"sdpa"`` or ``"math"``."""
    _set_lever(network, "attention_impl", impl, ATTENTION_IMPLS, "attention")


def set_norm(network: nn.Module, impl: str) -> None:
    """Every float32-statistics norm of ``network`` (``ops.float32_norm``: group norms, text layer
    norms) through ``impl``: ``"upcast"`` or ``"mixed"`` (module docstring)."""
    _set_lever(network, "norm_impl", impl, NORM_IMPLS, "norm")


# --- from a state dict ---------------------------------------------------------------------------

def block_indices(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """The distinct ``i`` of the keys ``{prefix}.{i}.*``, in order."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len(block_indices(sd, prefix))


class Trunk(NamedTuple):
    """The level structure of an ADM-style trunk, as :func:`infer_trunk` reads it."""

    num_res_blocks: int
    levels: int
    channel_mult: tuple
    attention_ds: tuple
    first_upsampler: int | None  # the first output block that ends in an upsampler, if any


def infer_trunk(sd: dict[str, torch.Tensor], family: str, ends_in_upsampler: Callable[[dict, int], bool], *,
                unet: str = "an ADM UNet", width_layer: str = "in_layers.2",
                count: Callable[[dict, str], int] = count_blocks) -> Trunk:
    """Levels, residual blocks per level, channel multipliers and attention levels of the trunk.

    The first output block that ends in an upsampler (``ends_in_upsampler(sd, j)``: each family
    knows its own upsampling layers) sits at index ``num_res_blocks``, and every level has
    ``num_res_blocks + 1`` input and as many output blocks (``count(sd, prefix)`` counts them). A
    level's multiplier is the out channels of its first residual block (read from its
    ``width_layer``) over ``model_channels``; its downsampling rate is an attention level when that
    block is followed by ``.1.qkv``. Errors name the ``family``'s checkpoint and the ``unet`` that
    the blocks do not form."""
    mc = int(sd["time_embed.0.weight"].shape[1])
    n_in, n_out = count(sd, "input_blocks"), count(sd, "output_blocks")
    first_up = next((j for j in range(n_out) if ends_in_upsampler(sd, j)), None)
    num_res_blocks = first_up if first_up is not None else n_out - 1
    levels = n_out // (num_res_blocks + 1) if num_res_blocks >= 1 else 0
    if num_res_blocks < 1 or levels * (num_res_blocks + 1) != n_out or n_in != n_out:
        raise ValueError(f"{family} checkpoint: {n_in} input and {n_out} output blocks do not form {unet} "
                         f"(expected levels x (num_res_blocks + 1) of each)")
    channel_mult, attention_ds = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        key = f"input_blocks.{first}.0.{width_layer}.weight"
        if key not in sd:
            raise ValueError(f"{family} checkpoint: missing {key} (the first residual block of level {level})")
        mult = int(sd[key].shape[0]) / mc
        channel_mult.append(int(mult) if mult.is_integer() else mult)
        if f"input_blocks.{first}.1.qkv.weight" in sd:
            attention_ds.append(2 ** level)
    return Trunk(num_res_blocks, levels, tuple(channel_mult), tuple(attention_ds), first_up)


def assign_checkpoint(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], family: str,
                      description: str) -> nn.Module:
    """The network ``make()`` builds, holding the checkpoint's tensors, which must match it exactly
    (``description`` says what was inferred, for the error)."""
    with torch.device("meta"):
        network = make()
    try:
        # assign=True adopts the checkpoint's tensors instead of initialising and copying them (550M weights in
        # the largest ADM).
        network.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{family} checkpoint does not match the inferred architecture ({description}): "
                         f"{detail[:800]}") from err
    return network

"""diffusers ``UNet2DModel`` pixel experts (google/ddpm-* and their class-conditional kin).

Our own implementation of the architecture, with diffusers' key names, so that a model folder or a
single weights file loads unchanged; diffusers itself is only used by the tests.

Supported: ``DownBlock2D`` / ``AttnDownBlock2D`` / ``UpBlock2D`` / ``AttnUpBlock2D`` with convolution
resampling, ``UNetMidBlock2D`` (with or without attention), ``ResnetBlock2D`` with additive or
scale-shift time conditioning, positional (sinusoidal) time embedding, and a class embedding
(``num_class_embeds``). Old checkpoints' attention names (``query``, ``key``, ``value``,
``proj_attn``) are renamed to ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` on load. eps- and
v-prediction (the scheduler's ``prediction_type``; v is turned into eps by ``Expert.eps``).

Refused with a message: consistency models (openai/diffusers-cd_*, ct_*: a
``CMStochasticIterativeScheduler``, or residual up/down-sampling blocks), sample prediction, and
layouts outside the list above (Fourier or learned time embeddings, other blocks).

Where the config comes from
---------------------------
- A folder (:func:`build_from_folder`): ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (or ``.bin``) in the folder, or in its ``unet/`` subfolder for a pipeline folder. The schedule
  comes from ``scheduler_config.json`` in the folder, else from ``scheduler/`` next to it:
  ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``), ``beta_start``,
  ``beta_end``, ``num_train_timesteps``, ``trained_betas``, ``prediction_type``. With no scheduler
  config, DDPM's linear 1e-4..0.02 over 1000 steps.
- A single file (:func:`build`): the safetensors metadata ``config`` (the text of a config.json)
  and ``scheduler_config`` when present; otherwise the structure is read from the keys:
  ``block_out_channels`` (each down block's first ``resnets.0.conv1``), ``layers_per_block``
  (resnets per down block), attention blocks (``attentions.*`` keys), ``in_channels`` /
  ``out_channels`` (``conv_in`` / ``conv_out``), ``num_class_embeds`` (``class_embedding``),
  ``resnet_time_scale_shift`` (``time_emb_proj`` twice the channels) and the mid block's attention.
  What shapes cannot tell takes google/ddpm-*'s values (``norm_num_groups`` 32, ``norm_eps`` 1e-6,
  ``flip_sin_to_cos`` False, ``freq_shift`` 1, ``downsample_padding`` 0, one attention head) only
  for their published structures (:data:`GOOGLE_DDPM`); any other single file must carry its
  ``config`` in the metadata, and is refused, naming that key, without it (loaders never guess).
  ``sample_size`` must come from the metadata (``sample_size`` or ``resolution``).
- ``schedule`` (``linear`` / ``cosine``) overrides the schedule in every case.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .expert import Condition, Expert, load_state_dict
from .ops import group_norm32, torch_ops
from .unet_layers import Upsample
from .schedules import alphas_cumprod_for, alphas_cumprod_from_betas, cosine_betas

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
CONSISTENCY_HINT = ("consistency models (openai/diffusers-cd_*, ct_*) map noise to images in one step; they are "
                    "not eps predictors, so they cannot join a product of experts")


# --- configuration --------------------------------------------------------------------------------

@dataclass
class UNet2DConfig:
    """The subset of diffusers' ``UNet2DModel`` config that this loader builds.

    Args:
        sample_size (`int`): side of the training images.
        in_channels (`int`), out_channels (`int`): image channels in and out (3 and 3).
        block_out_channels (`tuple[int]`): width of each level.
        layers_per_block (`int`): resnets per down block (up blocks have one more).
        down_block_types (`tuple[str]`), up_block_types (`tuple[str]`): ``DownBlock2D`` /
            ``AttnDownBlock2D`` and ``UpBlock2D`` / ``AttnUpBlock2D``, one per level.
        mid_block_type (`str` or `None`): ``UNetMidBlock2D``, or ``None`` for no mid block.
        add_attention (`bool`): whether the mid block has attention.
        attention_head_dim (`int` or `None`): channels per head; ``None`` means one head.
        norm_num_groups (`int`), norm_eps (`float`): GroupNorm settings of every block.
        attn_norm_num_groups (`int` or `None`): GroupNorm groups of the mid block's attention;
            ``None`` means ``norm_num_groups`` with additive time conditioning and no norm with
            scale-shift (diffusers' rule).
        flip_sin_to_cos (`bool`), freq_shift (`float`): the sinusoidal time embedding's layout
            (``[cos | sin]`` when flipped) and the shift of its frequency denominator.
        time_embedding_dim (`int` or `None`): defaults to 4 x ``block_out_channels[0]``.
        downsample_padding (`int`): 0 pads right/bottom by one before the strided conv.
        mid_block_scale_factor (`float`): output divisor of the mid block's resnets and attention.
        resnet_time_scale_shift (`str`): ``"default"`` (add) or ``"scale_shift"``.
        num_class_embeds (`int` or `None`): classes of the label embedding.
        center_input_sample (`bool`): map inputs from [0, 1] to [-1, 1] first.
    """

    sample_size: int
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 256, 256)
    layers_per_block: int = 2
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    add_attention: bool = True
    attention_head_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attn_norm_num_groups: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: float = 1
    time_embedding_dim: int | None = None
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    resnet_time_scale_shift: str = "default"
    num_class_embeds: int | None = None
    center_input_sample: bool = False


def config_from_json(raw: dict, where: str) -> UNet2DConfig:
    """Validate a config.json dict and keep the fields this loader builds."""
    if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{where}: a {raw['_class_name']}, not a UNet2DModel (pixel-space UNet)")
    checks = [
        (raw.get("time_embedding_type", "positional") == "positional",
         f"time_embedding_type {raw.get('time_embedding_type')!r} (only 'positional' is supported)"),
        (raw.get("class_embed_type") is None, f"class_embed_type {raw.get('class_embed_type')!r} (only a plain "
                                              "num_class_embeds embedding is supported)"),
        (raw.get("act_fn", "silu") in ("silu", "swish"), f"act_fn {raw.get('act_fn')!r}"),
        (raw.get("resnet_time_scale_shift", "default") in ("default", "scale_shift"),
         f"resnet_time_scale_shift {raw.get('resnet_time_scale_shift')!r}"),
        (raw.get("mid_block_type", "UNetMidBlock2D") in ("UNetMidBlock2D", None),
         f"mid_block_type {raw.get('mid_block_type')!r}"),
    ]
    resnet_resample = raw.get("downsample_type", "conv") != "conv" or raw.get("upsample_type", "conv") != "conv" or \
        any("Resnet" in b for b in list(raw.get("down_block_types", [])) + list(raw.get("up_block_types", [])))
    if resnet_resample:
        raise ValueError(f"{where}: residual up/down-sampling blocks, the layout of OpenAI's consistency-model UNets; "
                         f"{CONSISTENCY_HINT}")
    bad_blocks = [b for b in raw.get("down_block_types", []) if b not in DOWN_TYPES] + \
                 [b for b in raw.get("up_block_types", []) if b not in UP_TYPES]
    checks.append((not bad_blocks, f"block types {bad_blocks} (supported: {DOWN_TYPES + UP_TYPES})"))
    unsupported = [why for ok, why in checks if not ok]
    if unsupported:
        raise ValueError(f"{where}: unsupported UNet2DModel config: {'; '.join(unsupported)}")
    names = {f.name for f in fields(UNet2DConfig)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    if isinstance(kept.get("sample_size"), tuple):
        kept["sample_size"] = kept["sample_size"][0]
    if kept.get("sample_size") is None:
        raise ValueError(f"{where}: the config has no sample_size")
    # Fields that config.json leaves out take UNet2DModel's own defaults, not google/ddpm's.
    defaults = {"norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
                "attention_head_dim": 8, "block_out_channels": (224, 448, 672, 896),
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")}
    for key, value in defaults.items():
        kept.setdefault(key, value)
    return UNet2DConfig(**kept)


# --- layers ---------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding``: ``[sin | cos]`` (``[cos | sin]`` flipped) of
    ``t * max_period^(-i / (half - freq_shift))``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResnetBlock2D(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, temb: int, cfg: UNet2DConfig, output_scale: float = 1.0,
                 operations=torch_ops):
        super().__init__()
        ops = operations
        self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        self.output_scale = output_scale
        self.norm1 = group_norm32(ch_in, ops, cfg.norm_num_groups, cfg.norm_eps)
        self.conv1 = ops.Conv2d(ch_in, ch_out, 3, padding=1)
        self.time_emb_proj = ops.Linear(temb, ch_out * (2 if self.scale_shift else 1))
        self.norm2 = group_norm32(ch_out, ops, cfg.norm_num_groups, cfg.norm_eps)
        self.conv2 = ops.Conv2d(ch_out, ch_out, 3, padding=1)
        self.conv_shortcut = ops.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = rearrange(self.time_emb_proj(F.silu(temb)), "b c -> b c 1 1").to(h.dtype)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(F.silu(h))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale


class Attention(nn.Module):
    """diffusers' spatial self-attention block: optional GroupNorm, linear q/k/v, residual, rescale."""

    def __init__(self, channels: int, head_dim: int | None, groups: int | None, eps: float, output_scale: float = 1.0,
                 operations=torch_ops):
        super().__init__()
        ops = operations
        self.heads = channels // head_dim if head_dim else 1
        self.output_scale = output_scale
        self.group_norm = group_norm32(channels, ops, groups, eps) if groups else None
        self.to_q = ops.Linear(channels, channels)
        self.to_k = ops.Linear(channels, channels)
        self.to_v = ops.Linear(channels, channels)
        self.to_out = nn.ModuleList([ops.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group_norm(x) if self.group_norm is not None else x
        tokens = rearrange(h, "b c x y -> b (x y) c")
        q, k, v = (rearrange(proj(tokens), "b n (h d) -> b h n d", h=self.heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        a = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        a = rearrange(self.to_out[0](a), "b (x y) c -> b c x y", x=x.shape[2])
        return (a + x) / self.output_scale


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int, operations=torch_ops):
        super().__init__()
        self.padding = padding
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # the TF-style asymmetric padding of the original DDPM
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: resnets (each followed by attention) and a downsampler."""

    def __init__(self, ch_in: int, ch_out: int, temb: int, cfg: UNet2DConfig, attention: bool, last: bool,
                 operations=torch_ops):
        super().__init__()
        ops = operations
        self.resnets = nn.ModuleList(ResnetBlock2D(ch_in if i == 0 else ch_out, ch_out, temb, cfg, operations=ops)
                                     for i in range(cfg.layers_per_block))
        if attention:
            self.attentions = nn.ModuleList(Attention(ch_out, cfg.attention_head_dim, cfg.norm_num_groups, cfg.norm_eps,
                                                      operations=ops)
                                            for _ in range(cfg.layers_per_block))
        if not last:
            self.downsamplers = nn.ModuleList([Downsample2D(ch_out, cfg.downsample_padding, ops)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: resnets over [features | skip] (each followed by attention) and an upsampler."""

    def __init__(self, ch_in: int, ch_prev: int, ch_out: int, temb: int, cfg: UNet2DConfig, attention: bool,
                 last: bool, operations=torch_ops):
        super().__init__()
        ops = operations
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((ch_prev if i == 0 else ch_out) + (ch_in if i == n - 1 else ch_out), ch_out, temb, cfg,
                          operations=ops)
            for i in range(n))
        if attention:
            self.attentions = nn.ModuleList(Attention(ch_out, cfg.attention_head_dim, cfg.norm_num_groups, cfg.norm_eps,
                                                      operations=ops)
                                            for _ in range(n))
        if not last:
            self.upsamplers = nn.ModuleList([Upsample(ch_out, ops)])  # nearest 2x, then conv

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: resnet, (attention), resnet."""

    def __init__(self, ch: int, temb: int, cfg: UNet2DConfig, operations=torch_ops):
        super().__init__()
        scale = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, cfg, scale, operations) for _ in range(2))
        if cfg.add_attention:
            groups = cfg.attn_norm_num_groups
            if groups is None and cfg.resnet_time_scale_shift == "default":
                groups = cfg.norm_num_groups
            self.attentions = nn.ModuleList([Attention(ch, cfg.attention_head_dim, groups, cfg.norm_eps, scale,
                                                       operations)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        if hasattr(self, "attentions"):
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, operations=torch_ops):
        super().__init__()
        self.linear_1 = operations.Linear(ch_in, ch_out)
        self.linear_2 = operations.Linear(ch_out, ch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet2D(nn.Module):
    """diffusers' ``UNet2DModel``; ``forward(x, t, y=None)`` returns the ``sample`` tensor.
    ``operations``: the layer namespace (``model_loaders.ops``)."""

    compute_dtype: torch.dtype | None = None  # as unet_layers.UNetTrunk's

    def __init__(self, config: UNet2DConfig, operations=torch_ops):
        super().__init__()
        self.config = c = config
        ops = operations
        widths = list(c.block_out_channels)
        temb = c.time_embedding_dim or 4 * widths[0]
        self.conv_in = ops.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb, ops)
        if c.num_class_embeds is not None:
            self.class_embedding = ops.Embedding(c.num_class_embeds, temb)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], w, temb, c, c.down_block_types[i] == "AttnDownBlock2D", i == last, ops)
            for i, w in enumerate(widths))
        self.mid_block = MidBlock(widths[-1], temb, c, ops) if c.mid_block_type else None
        rev = widths[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[min(i + 1, last)], rev[max(i - 1, 0)], w, temb, c, c.up_block_types[i] == "AttnUpBlock2D",
                    i == last, ops)
            for i, w in enumerate(rev))
        self.conv_norm_out = group_norm32(widths[0], ops, c.norm_num_groups, c.norm_eps)
        self.conv_out = ops.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c, batch = self.config, x.shape[0]
        if c.center_input_sample:
            x = 2 * x - 1.0
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(batch) if t.numel() == 1 else t
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype))
        if c.num_class_embeds is not None:
            if y is None:
                raise ValueError(f"this UNet2DModel is class-conditional ({c.num_class_embeds} classes): pass 'y'")
            label = self.class_embedding(y.long().reshape(-1), out_dtype=x.dtype)
            emb = emb + (label.expand(batch, -1) if label.shape[0] == 1 else label)
        elif y is not None:
            raise ValueError("this UNet2DModel is unconditional: it takes no 'y'")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# --- state dicts and config inference -------------------------------------------------------------

def rename_old_attention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old attention names (diffusers < 0.14 checkpoints) to the current ones."""
    pattern = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

    def rename(key: str) -> str:
        m = pattern.match(key)
        return f"{m.group(1)}.{OLD_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}" if m else key
    return {rename(k): v for k, v in sd.items()}


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_config(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> UNet2DConfig:
    """The config of a single weights file (see the module docstring)."""
    if "config" in meta:
        try:
            return config_from_json(json.loads(meta["config"]), "diffusers checkpoint")
        except json.JSONDecodeError as err:
            raise ValueError(f"diffusers checkpoint: metadata 'config' is not JSON ({err})") from err
    if any(".downsamplers.0.norm1." in k or ".upsamplers.0.norm1." in k for k in sd):
        raise ValueError(f"diffusers checkpoint: residual up/down-sampling blocks, the layout of OpenAI's "
                         f"consistency-model UNets; {CONSISTENCY_HINT}")
    levels = _count(sd, "down_blocks")
    widths = tuple(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels))
    temb = int(sd["time_embedding.linear_1.weight"].shape[0])
    found = {
        "block_out_channels": widths,
        "layers_per_block": _count(sd, "down_blocks.0.resnets"),
        "down_block_types": tuple("AttnDownBlock2D" if f"down_blocks.{i}.attentions.0.to_q.weight" in sd
                                  else "DownBlock2D" for i in range(levels)),
        "up_block_types": tuple("AttnUpBlock2D" if f"up_blocks.{i}.attentions.0.to_q.weight" in sd
                                else "UpBlock2D" for i in range(levels)),
        "in_channels": int(sd["conv_in.weight"].shape[1]),
        "out_channels": int(sd["conv_out.weight"].shape[0]),
        "num_class_embeds": int(sd["class_embedding.weight"].shape[0]) if "class_embedding.weight" in sd else None,
        "resnet_time_scale_shift": "scale_shift" if int(sd["down_blocks.0.resnets.0.time_emb_proj.weight"].shape[0])
        == 2 * widths[0] else "default",
        "mid_block_type": "UNetMidBlock2D" if "mid_block.resnets.0.conv1.weight" in sd else None,
        "add_attention": "mid_block.attentions.0.to_q.weight" in sd,
        "time_embedding_dim": temb if temb != 4 * widths[0] else None,
    }
    if "mid_block.attentions.0.group_norm.weight" in sd:
        found["attn_norm_num_groups"] = 32
    published = GOOGLE_DDPM.get((widths, found["layers_per_block"]))
    if published is None:
        raise ValueError(f"diffusers checkpoint: a single file without config ({', '.join(f'{k}={v}' for k, v in found.items())}) "
                         "that matches none of google/ddpm-*'s published models, so its group-norm groups and eps, "
                         "attention heads, time-embedding layout and downsampling padding cannot be read from the "
                         "weights: put the model's config.json next to it (load the folder), or set 'config' (the "
                         "text of its config.json) in the safetensors metadata")
    size = meta.get("sample_size", meta.get("resolution"))
    if size is None:
        raise ValueError(f"diffusers checkpoint: a single file without config ({', '.join(f'{k}={v}' for k, v in found.items())}); "
                         "its image size cannot be read from the weights: put the model's config.json next to it "
                         "(load the folder), or set 'sample_size' (or the whole 'config') in the safetensors metadata")
    return UNet2DConfig(sample_size=int(size), **found)


# google/ddpm-*'s published structures (block_out_channels, layers_per_block) and names: the only
# single files whose other options (UNet2DConfig's defaults, google/ddpm's values) are known.
GOOGLE_DDPM = {
    ((128, 256, 256, 256), 2): "google/ddpm-cifar10-32",
    ((128, 128, 256, 256, 512, 512), 2): "google/ddpm-{celebahq,church,bedroom,cat}-256 (and ddpm-ema-*)",
}


# --- schedules ------------------------------------------------------------------------------------

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}


def scheduler_prediction(sc: dict | None, where: str) -> str:
    """The Expert prediction of a scheduler config's ``prediction_type`` (eps when there is none)."""
    prediction = (sc or {}).get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type {prediction!r}; only eps- and v-prediction (prediction_type "
                         "'epsilon' or 'v_prediction') experts can join the product")
    return PREDICTION_TYPES[prediction]


def scheduler_alphas_cumprod(sc: dict, where: str) -> tuple[torch.Tensor, str]:
    """The training schedule of a diffusers scheduler config, and its name for the info."""
    if sc.get("_class_name") == "CMStochasticIterativeScheduler":
        raise ValueError(f"{where}: a CMStochasticIterativeScheduler, so this is a consistency model; {CONSISTENCY_HINT}")
    scheduler_prediction(sc, where)
    steps = int(sc.get("num_train_timesteps", 1000))
    if sc.get("trained_betas") is not None:
        return alphas_cumprod_from_betas(torch.tensor(sc["trained_betas"], dtype=torch.float64)), "trained_betas"
    kind = sc.get("beta_schedule", "linear")
    start, end = float(sc.get("beta_start", 1e-4)), float(sc.get("beta_end", 0.02))
    if kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(steps)
    else:
        raise ValueError(f"{where}: beta_schedule {kind!r} (supported: linear, scaled_linear, squaredcos_cap_v2)")
    name = kind if kind == "squaredcos_cap_v2" else f"{kind} {start:g}..{end:g}"
    return alphas_cumprod_from_betas(betas), name


def _schedule(sc: dict | None, schedule: str | None, where: str) -> tuple[torch.Tensor, str]:
    if sc is not None:
        # Read it even when overridden, so that consistency and sample-prediction models are refused.
        acp, name = scheduler_alphas_cumprod(sc, where)
        if schedule is None:
            return acp, name
    if schedule is not None:
        return alphas_cumprod_for(schedule), schedule
    return alphas_cumprod_for("linear"), "linear 0.0001..0.02 (DDPM default: no scheduler config)"


# --- the expert -----------------------------------------------------------------------------------

def detect(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str) -> bool:
    keys = ("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
            "up_blocks.0.resnets.0.conv1.weight", "conv_out.weight")
    return family == "diffusers" and all(k in sd for k in keys) and \
        not any(".transformer_blocks." in k or "add_embedding" in k for k in sd)


def build_network(sd: dict[str, torch.Tensor], config: UNet2DConfig, where: str, operations=torch_ops) -> UNet2D:
    with torch.device("meta"):
        network = UNet2D(config, operations)
    try:
        network.load_state_dict(rename_old_attention(sd), strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{where} does not match its config ({describe(config)}): {detail[:800]}") from err
    return network


def describe(config: UNet2DConfig) -> str:
    attn = [i for i, b in enumerate(config.down_block_types) if b.startswith("Attn")]
    parts = [f"{config.sample_size}px", f"channels {tuple(config.block_out_channels)}",
             f"{config.layers_per_block} resnets per block", f"attention at levels {tuple(attn)}"]
    if config.num_class_embeds:
        parts.append(f"{config.num_class_embeds} classes")
    return ", ".join(parts)


def _class_encoder(name: str, n: int):
    def encode(index: int) -> Condition:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise ValueError(f"{name}: class index {index!r} is out of range; it takes 0..{n - 1}")
        return {"y": torch.tensor([index], dtype=torch.long)}
    return encode


def class_names_for(config: UNet2DConfig) -> list[str] | None:
    """The indices as names (the hub's UNet2DModel configs name no classes); None when unconditional."""
    n = config.num_class_embeds
    return [str(i) for i in range(n)] if n else None


def make_expert(network: UNet2D, name: str, alphas_cumprod: torch.Tensor, schedule_name: str, info: dict,
                prediction: str = "eps") -> Expert:
    c = network.config
    if c.out_channels != c.in_channels:
        raise ValueError(f"{name}: {c.in_channels} input and {c.out_channels} output channels; only eps- and "
                         "v-prediction models (output channels = input channels) are supported")
    n = c.num_class_embeds
    return Expert(
        network=network, name=name, family="diffusers", resolution=c.sample_size, alphas_cumprod=alphas_cumprod,
        prediction=prediction, image_channels=c.in_channels,
        encoders={"class": _class_encoder(name, n)} if n else {},
        # Class embeddings without a documented dropout label: no trained null (the binding forms it).
        null_condition=None if n else {},
        class_names=class_names_for(c),
        info={"config": asdict(c), "architecture": describe(c), "schedule": schedule_name,
              "params": sum(p.numel() for p in network.parameters()), **info},
    )


def build(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str, schedule: str | None = None,
          operations=torch_ops) -> Expert:
    """The expert of a single diffusers weights file; ``schedule`` overrides the training schedule."""
    sd = rename_old_attention(sd)
    config = infer_config(sd, meta)
    sc = None
    if "scheduler_config" in meta:
        try:
            sc = json.loads(meta["scheduler_config"])
        except json.JSONDecodeError as err:
            raise ValueError(f"diffusers checkpoint: metadata 'scheduler_config' is not JSON ({err})") from err
    acp, schedule_name = _schedule(sc, schedule, "diffusers checkpoint")
    network = build_network(sd, config, "diffusers checkpoint", operations)
    return make_expert(network, f"UNet2D-{config.sample_size}", acp, schedule_name,
                       {"config_from": "metadata" if "config" in meta else "keys (google/ddpm defaults)"},
                       scheduler_prediction(sc, "diffusers checkpoint"))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({err})") from err


def build_from_folder(path: str, schedule: str | None = None, operations=torch_ops,
                      read: Callable[[str], dict[str, torch.Tensor]] = load_state_dict) -> Expert:
    """The expert of a diffusers model folder (or a pipeline folder with ``unet/``), see the module
    docstring; ``read`` reads the weights file (safely)."""
    folder = path.rstrip(os.sep)
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(folder, "unet", "config.json")):
        folder = os.path.join(folder, "unet")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: a folder without config.json; a diffusers model folder holds config.json and "
                         f"{' or '.join(WEIGHT_FILES)}")
    raw = _read_json(config_path)
    sc_paths = [os.path.join(folder, "scheduler_config.json"),
                os.path.join(os.path.dirname(folder), "scheduler", "scheduler_config.json")]
    sc_path = next((p for p in sc_paths if os.path.isfile(p)), None)
    sc = _read_json(sc_path) if sc_path else None
    # The scheduler is checked first: a consistency model's message beats a block-type complaint.
    acp, schedule_name = _schedule(sc, schedule, sc_path or path)
    config = config_from_json(raw, config_path)
    weights = next((os.path.join(folder, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(folder, w))), None)
    if weights is None:
        raise ValueError(f"{path}: no weights in the folder (expected {' or '.join(WEIGHT_FILES)})")
    network = build_network(read(weights), config, weights, operations)
    name = os.path.basename(os.path.dirname(folder) if os.path.basename(folder) == "unet" else folder)
    return make_expert(network, name, acp, schedule_name,
                       {"config_from": config_path, "scheduler_config": sc_path, "weights": weights},
                       scheduler_prediction(sc, sc_path or path))

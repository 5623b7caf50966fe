"""GLIDE's text-conditional experts (Nichol et al. 2022, openai/glide-text2im).

Four published checkpoints load unchanged, with their original key names:

=========================  ================================  ======  ======================================
file                       class in glide-text2im            pixels  input channels, in this order
=========================  ================================  ======  ======================================
``base.pt``                ``Text2ImUNet``                   64      ``x``
``upsample.pt``            ``SuperResText2ImUNet``           256     ``x, up(low_res)``
``base_inpaint.pt``        ``InpaintText2ImUNet``            64      ``x, image * mask, mask``
``upsample_inpaint.pt``    ``SuperResInpaintText2ImUnet``    256     ``x, image * mask, mask, up(low_res)``
=========================  ================================  ======  ======================================

``up`` is a bilinear resize to the size of ``x`` (``align_corners=False``); ``image`` and ``mask``
are the ``inpaint_image`` and ``inpaint_mask`` inputs. The mask is 1 where the pixels are known
(kept) and 0 where they are to be generated; a missing inpaint image or mask means zeros, that
is plain text-to-image. Every variant returns 6 channels: eps, then the learned-variance
interpolation ``v``.

The network is GLIDE's ADM-style UNet (scale-shift norm, residual up/down-sampling, legacy
``[q, k, v]``-per-head attention layout) plus a text transformer: token, positional and
(optionally) padding embeddings, pre-LayerNorm residual blocks and a final LayerNorm. The last
token's feature (position ``text_ctx - 1``, padding or not) goes through ``transformer_proj`` and is
added to the time embedding; all token features feed every attention block through
``encoder_kv``, whose per-head keys and values are put before the image's own.

Config inference
----------------
:func:`infer_config` reads the architecture from the state dict; what shapes cannot tell comes
from the safetensors metadata (GLIDE's own option names) or from GLIDE's published defaults.

- ``model_channels``: ``time_embed.0.weight`` (time_embed_dim x model_channels).
- ``in_channels``, hence the variant: ``input_blocks.0.0.weight``; 3 base, 6 super-res,
  7 inpaint, 10 super-res inpaint (metadata ``super_res`` / ``inpaint`` must agree).
- ``num_res_blocks``: the first output block that ends in an upsampler sits at index
  ``num_res_blocks``; the number of levels is then ``len(output_blocks) / (num_res_blocks + 1)``.
- ``channel_mult``: out channels of each level's first residual block over ``model_channels``.
- attention downsample rates: the levels whose residual blocks carry ``.1.qkv``.
- ``use_scale_shift_norm``: ``emb_layers.1`` has twice the block's channels.
- ``resblock_updown``: up/down-sampling by residual blocks, or by convolutions (``op`` / ``conv``).
- ``text_ctx``, ``xf_width``: ``positional_embedding``; ``xf_layers``: ``transformer.resblocks.*``;
  ``xf_final_ln``: ``final_ln.weight``; ``xf_padding``: ``padding_embedding``; vocabulary size:
  ``token_embedding.weight``.

Loaders never guess. What the shapes cannot tell comes from the metadata, else from what GLIDE's
``model_creation.py`` fixes for the published checkpoints, else the file is refused with a
message naming the metadata keys to set:

======================================  ===================================================
not in the shapes                       without metadata
======================================  ===================================================
``num_head_channels`` / ``num_heads``   64-channel heads for a 192-channel trunk of a preset
                                        ``channel_mult``; else refused
``num_heads_upsample``                  -1 (the decoder as ``num_heads``; only used with
                                        ``num_heads``), GLIDE's default in every release
``xf_heads``                            8 for the 512-wide, 16-layer text transformer; else
                                        refused (``xf_width // 64`` would be a guess)
``image_size``                          the size whose ``channel_mult`` preset the trunk has
                                        (64: 1,2,3,4; 128: 1,1,2,3,4; 256: 1,1,2,2,4,4); else
                                        refused
schedule, ``diffusion_steps``           see below
======================================  ===================================================

- schedule: the ``schedule`` argument, else metadata ``noise_schedule``, else GLIDE's defaults
  (base: ``squaredcos_cap_v2`` = ``cosine``; upsampler: ``linear``); ``diffusion_steps``, else 1000.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import glide_tokenizer
from .expert import Condition, Expert, check_image
from .ops import layer_norm32, torch_ops
from .schedules import alphas_cumprod_for
from .text_encoders import PreNormBlock
from .unet_layers import (
    UNetTrunk,
    assign_checkpoint,
    attention,
    count_blocks,
    heads_for,
    infer_trunk,
)

IMAGE_CHANNELS = 3
# Input channels of the first convolution for each (super_res, inpaint) variant.
VARIANT_IN_CHANNELS = {(False, False): 3, (True, False): 6, (False, True): 7, (True, True): 10}
# GLIDE's channel_mult preset for each image size (model_creation.py): the size a trunk of that
# multiplier was made for.
SIZE_FOR_MULT = {(1, 2, 3, 4): 64, (1, 1, 2, 3, 4): 128, (1, 1, 2, 2, 4, 4): 256}
# What model_creation.py fixes and shapes cannot tell: 64-channel image heads for the published
# trunks (192 channels), 8 heads for the published text transformer (512 wide, 16 layers).
PUBLISHED_MODEL_CHANNELS = 192
PUBLISHED_HEAD_CHANNELS = 64
PUBLISHED_TEXT = {(512, 16): 8}
REQUIRED_KEYS = ("token_embedding.weight", "positional_embedding", "transformer_proj.weight",
                 "time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


# --- text transformer -----------------------------------------------------------------------------

class TextAttention(nn.Module):
    """Unmasked multi-head self-attention; ``c_qkv`` holds per head ``[q, k, v]``."""

    def __init__(self, width: int, heads: int, operations=torch_ops):
        super().__init__()
        self.heads = heads
        self.attention_impl = "sdpa"
        self.c_qkv = operations.Linear(width, 3 * width)
        self.c_proj = operations.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.c_qkv(x), "b t (n three d) -> three b n t d", n=self.heads, three=3)
        a = attention(q, k, v, self.attention_impl)
        return self.c_proj(rearrange(a, "b n t d -> b t (n d)"))


class TextMLP(nn.Module):
    def __init__(self, width: int, operations=torch_ops):
        super().__init__()
        self.c_fc = operations.Linear(width, 4 * width)
        self.c_proj = operations.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


def text_block(width: int, heads: int, operations=torch_ops) -> PreNormBlock:
    """GLIDE's pre-LayerNorm text block (CLIP's, unmasked, GELU, float32 norms)."""
    return PreNormBlock(TextAttention(width, heads, operations), layer_norm32(width, operations),
                        TextMLP(width, operations), layer_norm32(width, operations))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, operations=torch_ops):
        super().__init__()
        self.resblocks = nn.ModuleList(text_block(width, heads, operations) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


# --- the network ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlideConfig:
    """Architecture of a GLIDE network (GLIDE's ``create_model`` options, resolved).

    Args:
        image_size (`int`): side of the images it denoises: 64 (base) or 256 (upsampler).
        super_res (`bool`): takes ``low_res``, bilinearly upsampled and concatenated after ``x``.
        inpaint (`bool`): takes ``inpaint_image`` and ``inpaint_mask`` (see the module docstring).
        model_channels (`int`): channels of the first level (``num_channels``; 192 published).
        out_channels (`int`): output channels; 6 = eps and the learned variance.
        num_res_blocks (`int`): residual blocks per level going down (one more going up).
        channel_mult (`tuple[float, ...]`): channel multiplier of each level.
        attention_ds (`tuple[int, ...]`): downsample rates with attention (``image_size // res`` for
            GLIDE's ``attention_resolutions`` ``"32,16,8"``); the middle block always has one.
        num_head_channels (`int`): channels per attention head; -1 means use ``num_heads``.
        num_heads (`int`): heads of the down and middle attention when ``num_head_channels`` is -1.
        num_heads_upsample (`int`): heads of the up path in that case; -1 means ``num_heads``.
        use_scale_shift_norm (`bool`): FiLM-style ``norm(h) * (1 + scale) + shift`` in residual blocks.
        resblock_updown (`bool`): resample with residual blocks rather than convolutions.
        text_ctx (`int`): number of text tokens (128).
        xf_width (`int`): width of the text transformer (512).
        xf_layers (`int`): its depth (16).
        xf_heads (`int`): its heads (8).
        xf_final_ln (`bool`): a LayerNorm after the last transformer block.
        xf_padding (`bool`): padded positions take a learned ``padding_embedding`` (needs ``mask``).
        n_vocab (`int`): rows of ``token_embedding`` (GPT-2's 50257).
    """

    image_size: int
    super_res: bool
    inpaint: bool
    model_channels: int
    out_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    attention_ds: tuple[int, ...]
    num_head_channels: int
    num_heads: int
    num_heads_upsample: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    text_ctx: int
    xf_width: int
    xf_layers: int
    xf_heads: int
    xf_final_ln: bool
    xf_padding: bool
    n_vocab: int = glide_tokenizer.VOCAB_SIZE

    @property
    def in_channels(self) -> int:
        return VARIANT_IN_CHANNELS[(self.super_res, self.inpaint)]


class GlideUNet(UNetTrunk):
    """GLIDE's ``Text2ImUNet`` and its super-res / inpaint variants, with GLIDE's key names;
    ``operations``: the layer namespace (``model_loaders.ops``)."""

    def __init__(self, config: GlideConfig, operations=torch_ops):
        cfg = config

        def heads(ch: int, decoder: bool) -> int:
            return heads_for(ch, cfg.num_head_channels, cfg.num_heads, cfg.num_heads_upsample, decoder, "GLIDE")

        super().__init__(in_channels=cfg.in_channels, model_channels=cfg.model_channels,
                         out_channels=cfg.out_channels, num_res_blocks=cfg.num_res_blocks,
                         channel_mult=cfg.channel_mult, attention_ds=cfg.attention_ds, heads=heads,
                         attention_order="legacy", use_scale_shift_norm=cfg.use_scale_shift_norm,
                         resblock_updown=cfg.resblock_updown, encoder_channels=cfg.xf_width, operations=operations)
        self.config = cfg
        self.transformer = TextTransformer(cfg.xf_width, cfg.xf_layers, cfg.xf_heads, operations)
        self.final_ln = layer_norm32(cfg.xf_width, operations) if cfg.xf_final_ln else None
        self.token_embedding = operations.Embedding(cfg.n_vocab, cfg.xf_width)
        self.positional_embedding = nn.Parameter(_init_normal(torch.empty(cfg.text_ctx, cfg.xf_width), 0.01))
        if cfg.xf_padding:
            self.padding_embedding = nn.Parameter(_init_normal(torch.empty(cfg.text_ctx, cfg.xf_width), 0.01))
        self.transformer_proj = operations.Linear(cfg.xf_width, 4 * cfg.model_channels)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's pooled projection (B x 4 model_channels) and token features (B x xf_width x ctx),
        in ``dtype``."""
        xf = self.token_embedding(tokens.long(), out_dtype=dtype)
        # The embeddings are bare parameters, not layers: they follow the features' dtype and device.
        xf = xf + self.positional_embedding.to(xf)[None]
        if self.config.xf_padding:
            if mask is None:
                raise ValueError("GLIDE needs the token 'mask' with its 'tokens' (padded positions take "
                                 "the padding embedding); build both with glide_tokenizer.tokenize")
            xf = torch.where(rearrange(mask.bool().to(xf.device), "b t -> b t 1"), xf,
                             self.padding_embedding.to(xf)[None])
        xf = self.transformer(xf)
        if self.final_ln is not None:
            xf = self.final_ln(xf)
        # GLIDE pools by taking the last position, which is padding for short prompts.
        return self.transformer_proj(xf[:, -1]), rearrange(xf, "b t c -> b c t")

    def _network_input(self, x: torch.Tensor, low_res: torch.Tensor | None, inpaint_image: torch.Tensor | None,
                       inpaint_mask: torch.Tensor | None) -> torch.Tensor:
        parts = [x]
        if self.config.inpaint:
            mask = torch.zeros_like(x[:, :1]) if inpaint_mask is None else inpaint_mask.to(x)
            image = torch.zeros_like(x) if inpaint_image is None else inpaint_image.to(x)
            parts += [image * mask, mask]
        if self.config.super_res:
            if low_res is None:
                raise ValueError("this GLIDE upsampler needs 'low_res', the low-resolution image (B x 3 x h x w "
                                 "in [-1, 1])")
            # Interpolate in float32: half-precision bilinear is missing on some devices.
            up = F.interpolate(low_res.float(), x.shape[-2:], mode="bilinear", align_corners=False)
            parts.append(up.to(x))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
                inpaint_image: torch.Tensor | None = None, inpaint_mask: torch.Tensor | None = None) -> torch.Tensor:
        """GLIDE's output (B x 6 x H x W) for ``x`` at timesteps ``t``.

        ``tokens`` (B x text_ctx) and ``mask`` (B x text_ctx, True on real tokens) come from
        :func:`glide_tokenizer.tokenize`; without ``tokens`` the prompt is empty (GLIDE's null).
        """
        if tokens is None:
            tokens, mask = (v.to(x.device).expand(x.shape[0], -1) for v in glide_tokenizer.empty_tokens(
                self.config.text_ctx))
        # GLIDE computes in its weights' dtype whatever the input's (its files mix fp16 and fp32).
        dtype = self.compute_dtype or self.time_embed[0].weight.dtype
        h = self._network_input(x.to(dtype), low_res, inpaint_image, inpaint_mask)
        emb = self.time_embedding(t.to(x.device), dtype)
        xf_proj, xf_out = self.encode_text(tokens, mask, dtype)
        return self.trunk(h, emb + xf_proj.to(emb.dtype), xf_out).to(x.dtype)


def _init_normal(weight: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    # Checkpoints overwrite these; the init only matters for networks built from a config. It is
    # skipped on the meta device, where normal_ pulls in torch's slow reference ops (seconds).
    return weight if weight.is_meta else nn.init.normal_(weight, std=std)


# --- config inference -----------------------------------------------------------------------------

def _meta_bool(meta: dict[str, str], key: str) -> bool | None:
    if key not in meta:
        return None
    value = str(meta[key]).strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ValueError(f"GLIDE checkpoint: metadata {key!r} must be True or False, got {meta[key]!r}")
    return value in ("true", "1")


def _meta_int(meta: dict[str, str], key: str, default: int) -> int:
    if key not in meta or str(meta[key]).strip() == "":
        return default
    try:
        return int(meta[key])
    except ValueError as err:
        raise ValueError(f"GLIDE checkpoint: metadata {key!r} must be an integer, got {meta[key]!r}") from err


def _has_upsampler(sd: dict[str, torch.Tensor], j: int) -> bool:
    """Whether output block ``j`` ends in an upsampler (a second residual block, or a conv)."""
    return any(f"output_blocks.{j}.{i}.in_layers.0.weight" in sd or f"output_blocks.{j}.{i}.conv.weight" in sd
               for i in (1, 2))


def _variant(in_channels: int, meta: dict[str, str]) -> tuple[bool, bool]:
    by_shape = {c: v for v, c in VARIANT_IN_CHANNELS.items()}
    if in_channels not in by_shape:
        raise ValueError(f"GLIDE checkpoint: the first convolution takes {in_channels} channels; GLIDE's variants "
                         f"take {sorted(by_shape)} (base, super-res, inpaint, super-res inpaint)")
    super_res, inpaint = by_shape[in_channels]
    for key, value in (("super_res", super_res), ("inpaint", inpaint)):
        stated = _meta_bool(meta, key)
        if stated is not None and stated != value:
            raise ValueError(f"GLIDE checkpoint: metadata says {key}={stated} but the first convolution takes "
                             f"{in_channels} input channels, which means {key}={value}")
    return super_res, inpaint


def infer_config(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> GlideConfig:
    """The :class:`GlideConfig` of a GLIDE state dict (see the module docstring for the sources)."""
    meta = meta or {}
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ValueError(f"GLIDE checkpoint: missing {', '.join(missing)}")
    mc = int(sd["time_embed.0.weight"].shape[1])
    super_res, inpaint = _variant(int(sd["input_blocks.0.0.weight"].shape[1]), meta)

    trunk = infer_trunk(sd, "GLIDE", _has_upsampler, unet="a GLIDE UNet")

    mid_ch = int(sd["middle_block.0.in_layers.2.weight"].shape[0])
    scale_shift = int(sd["middle_block.0.emb_layers.1.weight"].shape[0]) == 2 * mid_ch
    resblock_updown = trunk.levels == 1 or any(f"output_blocks.{trunk.first_upsampler}.{i}.in_layers.0.weight" in sd
                                               for i in (1, 2))

    text_ctx, xf_width = (int(s) for s in sd["positional_embedding"].shape)
    xf_layers = count_blocks(sd, "transformer.resblocks")
    published_trunk = mc == PUBLISHED_MODEL_CHANNELS and tuple(trunk.channel_mult) in SIZE_FOR_MULT
    lacking = []
    xf_heads = _meta_int(meta, "xf_heads", PUBLISHED_TEXT.get((xf_width, xf_layers), 0))
    if not xf_heads:
        lacking.append(f"'xf_heads' (the text transformer is {xf_width} wide and {xf_layers} deep; the published "
                       f"one, 512 x 16, has 8 heads)")
    elif xf_width % xf_heads:
        raise ValueError(f"GLIDE checkpoint: xf_width {xf_width} is not divisible by xf_heads {xf_heads}")
    image_size = _meta_int(meta, "image_size", SIZE_FOR_MULT.get(tuple(trunk.channel_mult), 0))
    if not image_size:
        lacking.append(f"'image_size' (channel_mult {trunk.channel_mult} is none of GLIDE's presets)")
    if "num_head_channels" in meta or "num_heads" in meta:
        head_channels = _meta_int(meta, "num_head_channels", -1)
    elif published_trunk:
        head_channels = PUBLISHED_HEAD_CHANNELS
    else:
        head_channels = None
        lacking.append(f"'num_head_channels' or 'num_heads' (a {mc}-channel trunk is not a published one, whose "
                       f"heads have {PUBLISHED_HEAD_CHANNELS} channels)")
    if lacking:
        raise ValueError("GLIDE checkpoint: what the shapes cannot tell is neither in the file's safetensors "
                         "metadata nor fixed by a published GLIDE configuration; set " + "; ".join(lacking)
                         + " in the metadata")

    return GlideConfig(
        image_size=image_size, super_res=super_res, inpaint=inpaint, model_channels=mc,
        out_channels=int(sd["out.2.weight"].shape[0]), num_res_blocks=trunk.num_res_blocks,
        channel_mult=trunk.channel_mult, attention_ds=trunk.attention_ds,
        num_head_channels=head_channels, num_heads=_meta_int(meta, "num_heads", 1),
        num_heads_upsample=_meta_int(meta, "num_heads_upsample", -1), use_scale_shift_norm=scale_shift,
        resblock_updown=resblock_updown, text_ctx=text_ctx, xf_width=xf_width,
        xf_layers=xf_layers, xf_heads=xf_heads,
        xf_final_ln="final_ln.weight" in sd, xf_padding="padding_embedding" in sd,
        n_vocab=int(sd["token_embedding.weight"].shape[0]),
    )


def schedule_for(config: GlideConfig, meta: dict[str, str], schedule: str | None = None) -> str:
    """``schedule`` if given, else the metadata's ``noise_schedule``, else GLIDE's default."""
    name = schedule or meta.get("noise_schedule") or ("linear" if config.super_res else "cosine")
    return "cosine" if name == "squaredcos_cap_v2" else name


def build_network(sd: dict[str, torch.Tensor], config: GlideConfig, operations=torch_ops) -> GlideUNet:
    """The network with the checkpoint's tensors, which must match the config exactly."""
    network = assign_checkpoint(lambda: GlideUNet(config, operations), sd, "GLIDE", describe(config))
    # Files saved after GLIDE's convert_to_fp16 mix fp16 and fp32 tensors; the forward wants one dtype.
    return network.to(sd["input_blocks.0.0.weight"].dtype)


# --- the expert -----------------------------------------------------------------------------------

def is_glide(sd: dict[str, torch.Tensor]) -> bool:
    return all(k in sd for k in REQUIRED_KEYS) and "transformer.resblocks.0.attn.c_qkv.weight" in sd


def detect(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str) -> bool:
    """``glide`` takes every GLIDE file (the expert's family then says which kind it is);
    ``glide_upsample`` only the super-resolution ones."""
    if not is_glide(sd):
        return False
    if family == "glide_upsample":
        return int(sd["input_blocks.0.0.weight"].shape[1]) in (VARIANT_IN_CHANNELS[(True, False)],
                                                                VARIANT_IN_CHANNELS[(True, True)])
    return True


def expert_name(config: GlideConfig) -> str:
    kind = {(False, False): "base", (True, False): "upsample", (False, True): "inpaint",
            (True, True): "upsample-inpaint"}[(config.super_res, config.inpaint)]
    return f"GLIDE-{kind}-{config.image_size}"


def describe(config: GlideConfig) -> str:
    return (f"{expert_name(config)}: {config.model_channels} channels x {config.channel_mult}, "
            f"{config.num_res_blocks} res blocks, attention at ds {config.attention_ds}, "
            f"text {config.xf_layers} x {config.xf_width} ({config.xf_heads} heads), ctx {config.text_ctx}")


def tokenize_with_warning(text: str, text_ctx: int = glide_tokenizer.DEFAULT_TEXT_CTX
                          ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Tokens, mask and the truncation warning (``None`` when the prompt fits) for display."""
    return glide_tokenizer.tokenize(text, text_ctx)


def build(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str, schedule: str | None = None,
          operations=torch_ops) -> Expert:
    """The expert of a GLIDE checkpoint; ``schedule`` overrides the training noise schedule."""
    config = infer_config(sd, meta)
    network = build_network(sd, config, operations)
    schedule = schedule_for(config, meta, schedule)
    name = expert_name(config)
    encoders, null = _conditioning(config, name)
    steps = _meta_int(meta, "diffusion_steps", 1000)
    return Expert(
        network=network, name=name, family="glide_upsample" if config.super_res else "glide",
        resolution=config.image_size, alphas_cumprod=alphas_cumprod_for(schedule, steps),
        prediction="eps_learned_sigma" if config.out_channels == 2 * IMAGE_CHANNELS else "eps",
        encoders=encoders, null_condition=null, null_for=blank_text, warners=_warners(config),
        info={"config": asdict(config), "schedule": schedule, "architecture": describe(config),
              "xf_heads_from": "metadata" if "xf_heads" in meta else "published configuration",
              "params": sum(p.numel() for p in network.parameters())},
    )


def _warners(config: GlideConfig) -> dict:
    """The prompt truncation warning, for every modality that takes a prompt."""
    def text_warning(text: str = "", *args, **kwargs) -> str | None:
        return tokenize_with_warning(text, config.text_ctx)[2]

    def with_text(*args, text: str = "", **kwargs) -> str | None:
        return tokenize_with_warning(text, config.text_ctx)[2]

    return {"text": text_warning, "image": with_text, "inpaint": with_text}


# --- conditions -----------------------------------------------------------------------------------

def blank_text(condition: Condition) -> Condition:
    """GLIDE's null paired with ``condition``: the same image inputs, an empty prompt."""
    tokens = condition["tokens"]
    return {**condition, "tokens": torch.full_like(tokens, glide_tokenizer.PAD_TOKEN),
            "mask": torch.zeros_like(condition["mask"], dtype=torch.bool)}


def _text(text: str, config: GlideConfig) -> Condition:
    if not isinstance(text, str):
        raise TypeError(f"GLIDE's text condition must be a string, got {type(text).__name__}")
    tokens, mask, _ = glide_tokenizer.tokenize(text, config.text_ctx)
    return {"tokens": tokens, "mask": mask}


def _no_inpaint(config: GlideConfig) -> Condition:
    size = config.image_size
    return {"inpaint_image": torch.zeros(1, IMAGE_CHANNELS, size, size), "inpaint_mask": torch.zeros(1, 1, size, size)}


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-2:] == (size, size):
        return image
    import kornia

    return kornia.geometry.transform.resize(image, (size, size), interpolation="bilinear", antialias=True)


def fit_low_res(low_res: torch.Tensor, config: GlideConfig, name: str) -> torch.Tensor:
    """A low-resolution image at the size the upsampler was trained on (``image_size / 4``).

    It is resized (antialiased) if needed and rounded to 8 bits, as GLIDE's sampling code does
    with the base model's samples before upsampling them.
    """
    low_res = _resize(check_image(low_res, "low-resolution image", IMAGE_CHANNELS, -1.0, 1.0, name),
                      config.image_size // 4)
    return ((low_res + 1) * 127.5).round() / 127.5 - 1


def fit_inpaint(image: torch.Tensor, mask: torch.Tensor, config: GlideConfig, name: str) -> Condition:
    """The known image and its mask (1 = keep, 0 = generate) at the expert's resolution."""
    image = _resize(check_image(image, "inpaint image", IMAGE_CHANNELS, -1.0, 1.0, name), config.image_size)
    if isinstance(mask, torch.Tensor) and mask.ndim == 3:
        mask = mask[:, None]
    mask = check_image(mask, "inpaint mask", 1, 0.0, 1.0, name)
    # GLIDE trains on boolean masks: resize, then binarise.
    mask = (_resize(mask, config.image_size) > 0.5).float()
    return {"inpaint_image": image, "inpaint_mask": mask}


def _conditioning(config: GlideConfig, name: str):
    """The encoders and the unconditional null of one GLIDE variant."""
    def text(text: str) -> Condition:
        if config.super_res:
            raise ValueError(f"{name} is an upsampler: it needs a low-resolution image. Bind it with "
                             "PoEBindImage and put the prompt in that node's 'text' input.")
        return {**_text(text, config), **(_no_inpaint(config) if config.inpaint else {})}

    def image(low_res: torch.Tensor, text: str = "") -> Condition:
        cond = {"low_res": fit_low_res(low_res, config, name), **_text(text, config)}
        return {**cond, **(_no_inpaint(config) if config.inpaint else {})}

    def inpaint(image: torch.Tensor, mask: torch.Tensor, text: str = "", low_res: torch.Tensor | None = None
                ) -> Condition:
        cond = {**_text(text, config), **fit_inpaint(image, mask, config, name)}
        if config.super_res:
            if low_res is None:
                raise ValueError(f"{name} inpaints while upsampling: pass 'low_res', the low-resolution image "
                                 "(usually the base inpainting model's sample)")
            cond["low_res"] = fit_low_res(low_res, config, name)
        return cond

    encoders = {"text": text}
    if config.super_res:
        encoders["image"] = image
    if config.inpaint:
        encoders["inpaint"] = inpaint
    # An upsampler's null still needs its low-res image, so only null_for (blank_text) can form it.
    null = None if config.super_res else {**blank_text(_text("", config)),
                                          **(_no_inpaint(config) if config.inpaint else {})}
    return encoders, null

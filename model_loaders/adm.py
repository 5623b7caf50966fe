"""OpenAI's ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", openai/guided-diffusion).

Every released diffusion checkpoint loads unchanged, ``.pt`` or ``.safetensors``, with its original
key names (``time_embed.*``, ``label_emb.*``, ``input_blocks.*``, ``middle_block.*``,
``output_blocks.*``, ``out.*``):

=================================  ==============  =======  =====================  ======  ========
file                               expert name     classes  heads                  qkv     schedule
=================================  ==============  =======  =====================  ======  ========
``64x64_diffusion.pt``             ADM-64          1000     64 channels per head   new     cosine
``128x128_diffusion.pt``           ADM-128         1000     4 heads                legacy  linear
``256x256_diffusion.pt``           ADM-256         1000     64 channels per head   legacy  linear
``256x256_diffusion_uncond.pt``    ADM-256-uncond  none     64 channels per head   legacy  linear
``lsun_{bedroom,cat,horse}.pt``    ADM-256-uncond  none     64 channels per head   legacy  linear
``512x512_diffusion.pt``           ADM-512         1000     64 channels per head   legacy  linear
``64_256_upsampler.pt``            ADM-64→256      1000     4 heads                legacy  linear
``128_512_upsampler.pt``           ADM-128→512     1000     64 channels per head   legacy  linear
=================================  ==============  =======  =====================  ======  ========

The LSUN models (and ``lsun_horse_nodropout.pt``) have exactly the 256 unconditional model's
architecture: nothing in the file tells them apart, so they share its name (``info["published"]``
lists the candidates).

Every one has learned sigmas (6 output channels: eps, then the variance interpolation ``v``),
scale-shift norm and residual up/down-sampling, T = 1000. The upsamplers take 6 input channels:
``x`` concatenated with ``low_res`` resized bilinearly (``align_corners=False``) to the size of
``x``; both released upsamplers are class-conditional too.

Config inference
----------------
:func:`infer_structure` reads what the weights' shapes tell:

- ``model_channels``: ``time_embed.0.weight`` (4 model_channels x model_channels).
- ``in_channels``: ``input_blocks.0.0.weight``; 3 for a base model, 6 for an upsampler.
- ``out_channels``, hence ``learn_sigma``: ``out.2.weight`` (6 with learned sigmas, else 3).
- ``num_classes``: rows of ``label_emb.weight``; absent for unconditional models.
- ``num_res_blocks``: the first output block that ends in an upsampling layer sits at index
  ``num_res_blocks``; the number of levels is ``len(output_blocks) / (num_res_blocks + 1)``, which
  must equal ``len(input_blocks) / (num_res_blocks + 1)``.
- ``channel_mult``: out channels of each level's first residual block over ``model_channels``
  (0.5 happens: the 512 model).
- ``attention_ds``: the downsampling rates (1, 2, 4...) of the levels whose blocks carry ``.1.qkv``.
- ``use_scale_shift_norm``: ``emb_layers.1`` gives twice the block's channels.
- ``resblock_updown``: up/down-sampling by residual blocks (``in_layers``), else by convolutions
  (``op`` / ``conv``).

Three facts are not in the shapes: the image ``resolution`` (and an upsampler's ``small_size``),
the attention heads and the qkv order (the new order splits ``[Q | K | V]`` then heads; the legacy
order interleaves ``[q, k, v]`` per head: both are ``3C x C`` matrices). Neither is the training
noise schedule. They come, in this order of precedence, from

1. the ``schedule`` argument (schedule only),
2. the safetensors metadata: ``resolution``, ``small_size``, ``attention_order`` (``"new"`` or
   ``"legacy"``), ``num_head_channels`` or ``num_heads`` (and ``num_heads_upsample``),
   ``schedule`` (``linear`` / ``cosine``), ``diffusion_steps``;
3. the published configuration that the shapes match (the table above, :data:`PUBLISHED`).

A file that matches no published configuration and lacks the metadata for what the table would
give is refused with a ``ValueError`` that lists what was read and names the keys to set: loaders
never guess. Two options keep guided-diffusion's script defaults, which every released model uses:
``num_heads_upsample`` -1 (the decoder has ``num_heads``; it matters only with ``num_heads``) and
``diffusion_steps`` 1000.

Conditions
----------
- Class-conditional base models: ``encoders["class"](index)`` gives ``{"y": LongTensor[1]}``
  (0 <= index < num_classes). They were never trained with label dropout, so ``null_condition`` is
  ``None`` and the binding forms the null (class 0 in the paper's code, or a class average).
- Unconditional models: no encoders, ``null_condition = {}``.
- Upsamplers: ``encoders["image"](low_res, class_index=None)`` gives ``{"low_res", "y"}``. The
  image (B x 3 x h x w in [-1, 1]) is resized with kornia (bilinear, antialiased) to the
  ``small_size`` the model was trained on when it has another size; the network then resizes it
  bilinearly to the sample's size, as the reference does. Both released upsamplers are
  class-conditional, so ``y`` is always there, as class probabilities: one-hot for
  ``class_index``, else uniform (the mean label embedding, a class-agnostic stand-in the model
  never saw). The null keeps the low-res image (``null_for`` returns the condition itself).
- ImageNet class names (1000-class models) come from ``imagenet_classes.txt``, torchvision's
  ``ResNet50_Weights.IMAGENET1K_V1.meta["categories"]`` written once, so the runtime needs no torchvision.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .expert import Condition, Expert
from .ops import torch_ops
from .schedules import SCHEDULES, alphas_cumprod_for
from .unet_layers import (
    ATTENTION_ORDERS,
    UNetTrunk,
    assign_checkpoint,
    heads_for,
    infer_trunk,
)

IMAGE_CHANNELS = 3
REQUIRED_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                 "middle_block.0.in_layers.0.weight", "middle_block.1.qkv.weight",
                 "output_blocks.0.0.in_layers.0.weight", "out.2.weight")
# Keys of other families built on the same trunk: GLIDE's text transformer and the Unite and
# Conquer face experts' input mixer and FiLM layers.
FOREIGN_MARKERS = ("transformer.", "token_embedding", "encoder_kv", "input_blocks_convert", "cond_emb_layers")
CLASS_NAMES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")


# --- configuration --------------------------------------------------------------------------------

@dataclass
class ADMConfig:
    """The ADM UNet's hyper-parameters (guided-diffusion's ``UNetModel`` / ``SuperResModel``).

    Args:
        resolution (`int`): side of the (square) training images.
        in_channels (`int`): input channels of the first convolution; 3, or 6 for an upsampler
            (``x`` and the upsampled ``low_res``).
        model_channels (`int`): base width; the time embedding is 4 x wider.
        out_channels (`int`): 3 (eps), or 6 with learned sigmas (eps, then ``v``).
        num_res_blocks (`int`): residual blocks per level on the way down (one more on the way up).
        channel_mult (`tuple`): width of each level over ``model_channels``.
        attention_ds (`tuple[int]`): downsampling rates at which blocks have self-attention
            (guided-diffusion's ``attention_resolutions`` after ``image_size // res``).
        num_classes (`int`, *optional*): classes of the label embedding; ``None`` if unconditional.
        num_heads (`int`): heads where ``num_head_channels`` is -1.
        num_head_channels (`int`): channels per head, or -1 to use ``num_heads``.
        num_heads_upsample (`int`): heads of the decoder's attention where ``num_head_channels``
            is -1; -1 means ``num_heads``.
        use_scale_shift_norm (`bool`): FiLM-like ``norm(h) * (1 + scale) + shift`` in residual blocks.
        resblock_updown (`bool`): residual blocks do the up/down-sampling, instead of convolutions.
        attention_order (`str`): ``"new"`` (``QKVAttention``) or ``"legacy"`` (``QKVAttentionLegacy``).
        small_size (`int`, *optional*): the low-resolution side an upsampler expects.
    """

    resolution: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    channel_mult: tuple
    attention_ds: tuple
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    attention_order: str = "legacy"
    small_size: int | None = None

    @property
    def is_upsampler(self) -> bool:
        return self.in_channels == 2 * IMAGE_CHANNELS

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * IMAGE_CHANNELS

    def heads(self, channels: int, decoder: bool = False) -> int:
        """Attention heads of a block of ``channels`` channels, as guided-diffusion counts them."""
        return heads_for(channels, self.num_head_channels, self.num_heads, self.num_heads_upsample, decoder, "ADM")


@dataclass(frozen=True)
class Published:
    """What guided-diffusion's README says about a released checkpoint, beyond its shapes."""

    name: str
    files: str
    resolution: int
    attention_order: str
    schedule: str
    num_heads: int = 1
    num_head_channels: int = -1
    small_size: int | None = None


def _structure_key(model_channels, num_res_blocks, channel_mult, attention_ds, in_channels, num_classes,
                   out_channels=6, use_scale_shift_norm=True, resblock_updown=True) -> tuple:
    return (model_channels, num_res_blocks, tuple(float(m) for m in channel_mult), tuple(attention_ds),
            in_channels, num_classes, out_channels, use_scale_shift_norm, resblock_updown)


# Keyed by the structure read from shapes; attention_ds is image_size // attention_resolutions.
PUBLISHED: dict[tuple, Published] = {
    _structure_key(192, 3, (1, 2, 3, 4), (2, 4, 8), 3, 1000):
        Published("ADM-64", "64x64_diffusion.pt", 64, "new", "cosine", num_head_channels=64),
    _structure_key(256, 2, (1, 1, 2, 3, 4), (4, 8, 16), 3, 1000):
        Published("ADM-128", "128x128_diffusion.pt", 128, "legacy", "linear", num_heads=4),
    _structure_key(256, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 3, 1000):
        Published("ADM-256", "256x256_diffusion.pt", 256, "legacy", "linear", num_head_channels=64),
    _structure_key(256, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 3, None):
        Published("ADM-256-uncond", "256x256_diffusion_uncond.pt or lsun_bedroom/cat/horse(_nodropout).pt",
                  256, "legacy", "linear", num_head_channels=64),
    _structure_key(256, 2, (0.5, 1, 1, 2, 2, 4, 4), (16, 32, 64), 3, 1000):
        Published("ADM-512", "512x512_diffusion.pt", 512, "legacy", "linear", num_head_channels=64),
    _structure_key(192, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 6, 1000):
        Published("ADM-64→256", "64_256_upsampler.pt", 256, "legacy", "linear", num_heads=4, small_size=64),
    _structure_key(192, 2, (1, 1, 2, 2, 4, 4), (16, 32), 6, 1000):
        Published("ADM-128→512", "128_512_upsampler.pt", 512, "legacy", "linear", num_head_channels=64,
                  small_size=128),
}


# --- the UNet -------------------------------------------------------------------------------------

class ADMUNet(UNetTrunk):
    """guided-diffusion's ``UNetModel`` (and ``SuperResModel`` when ``in_channels`` is 6).

    ``forward(x, t, y=None, low_res=None)`` returns exactly what the reference returns. ``t`` may be
    fractional. ``y`` is a LongTensor of class indices (B or 1 rows) or a float tensor of class
    probabilities (B or 1 x num_classes), which mixes the label embeddings (one-hot rows give the
    index's embedding exactly). ``low_res`` (B or 1 x 3 x h x w, in [-1, 1]) is an upsampler's input.
    ``operations``: the layer namespace (``model_loaders.ops``).
    """

    def __init__(self, config: ADMConfig, operations=torch_ops):
        c = config
        super().__init__(in_channels=c.in_channels, model_channels=c.model_channels, out_channels=c.out_channels,
                         num_res_blocks=c.num_res_blocks, channel_mult=c.channel_mult, attention_ds=c.attention_ds,
                         heads=c.heads, attention_order=c.attention_order,
                         use_scale_shift_norm=c.use_scale_shift_norm, resblock_updown=c.resblock_updown,
                         operations=operations)
        self.config = c
        if c.num_classes is not None:
            self.label_emb = operations.Embedding(c.num_classes, 4 * c.model_channels)

    def _label_embedding(self, y: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
        if y is None:
            raise ValueError(f"this ADM model is class-conditional ({self.config.num_classes} classes): pass 'y'")
        if y.is_floating_point():
            # Every class's embedding through the layer (which may cast or fetch its weights), then the mix.
            table = self.label_emb(torch.arange(self.config.num_classes, device=y.device), out_dtype=dtype)
            emb = y.to(device=table.device, dtype=dtype) @ table
        else:
            emb = self.label_emb(y.long().reshape(-1), out_dtype=dtype)
        return emb.expand(batch, -1) if emb.shape[0] == 1 else emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                low_res: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(batch)
        emb = self.time_embedding(t, x.dtype)
        if self.config.num_classes is not None:
            emb = emb + self._label_embedding(y, batch, x.dtype)
        elif y is not None:
            raise ValueError("this ADM model is unconditional: it takes no 'y'")
        h = x
        if self.config.is_upsampler:
            if low_res is None:
                raise ValueError("this ADM upsampler needs 'low_res', the low-resolution image (B x 3 x h x w in [-1, 1])")
            # Interpolate in float32: half-precision bilinear is missing on some devices.
            up = F.interpolate(low_res.float(), x.shape[-2:], mode="bilinear", align_corners=False).to(x.dtype)
            h = torch.cat([x, up.expand(batch, -1, -1, -1)], dim=1)
        return self.trunk(h, emb)


# --- config inference -----------------------------------------------------------------------------

def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _upsampling_layer(sd: dict[str, torch.Tensor], block: int) -> str | None:
    """``"resblock"`` or ``"conv"`` if output block ``block`` ends in an upsampling layer."""
    for j in (1, 2):
        if f"output_blocks.{block}.{j}.in_layers.0.weight" in sd:
            return "resblock"
        if f"output_blocks.{block}.{j}.conv.weight" in sd:
            return "conv"
    return None


def infer_structure(sd: dict[str, torch.Tensor]) -> dict:
    """What the shapes tell (see the module docstring); raises ValueError on a layout that is not ADM's."""
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ValueError(f"ADM checkpoint: missing {', '.join(missing)}")
    mc = int(sd["time_embed.0.weight"].shape[1])
    in_channels = int(sd["input_blocks.0.0.weight"].shape[1])
    out_channels = int(sd["out.2.weight"].shape[0])
    if in_channels not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS) or out_channels not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
        raise ValueError(f"ADM checkpoint: {in_channels} input and {out_channels} output channels; ADM models take "
                         f"3 (6 for upsamplers) and return 3 (6 with learned sigmas)")
    trunk = infer_trunk(sd, "ADM", lambda d, j: _upsampling_layer(d, j) is not None, width_layer="out_layers.3",
                        count=_count_blocks)
    emb_rows = int(sd["input_blocks.1.0.emb_layers.1.weight"].shape[0])
    return {
        "model_channels": mc, "in_channels": in_channels, "out_channels": out_channels,
        "num_res_blocks": trunk.num_res_blocks, "channel_mult": trunk.channel_mult,
        "attention_ds": trunk.attention_ds,
        "num_classes": int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None,
        "use_scale_shift_norm": emb_rows == 2 * int(sd["input_blocks.1.0.out_layers.3.weight"].shape[0]),
        "resblock_updown": (_upsampling_layer(sd, trunk.num_res_blocks) != "conv"
                            if trunk.first_upsampler is not None else True),
    }


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    if key not in meta:
        return None
    try:
        return int(meta[key])
    except ValueError as err:
        raise ValueError(f"ADM checkpoint: metadata {key!r} must be an integer, got {meta[key]!r}") from err


def _meta_choice(meta: dict[str, str], key: str, choices: tuple) -> str | None:
    if key not in meta:
        return None
    value = meta[key].strip().lower()
    if value not in choices:
        raise ValueError(f"ADM checkpoint: metadata {key!r} is {meta[key]!r}; expected one of {choices}")
    return value


def _describe_structure(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def infer_config(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[ADMConfig, Published | None, dict]:
    """The config, the published model it matches (or ``None``), and where each unread fact came from."""
    s = infer_structure(sd)
    published = PUBLISHED.get(_structure_key(**s))
    sources: dict[str, str] = {}

    def pick(key: str, from_meta, from_table):
        if from_meta is not None:
            sources[key] = "metadata"
            return from_meta
        if published is not None:
            sources[key] = f"published config of {published.files}"
            return from_table
        return None

    resolution = pick("resolution", _meta_int(meta, "resolution"), published and published.resolution)
    order = pick("attention_order", _meta_choice(meta, "attention_order", ATTENTION_ORDERS),
                 published and published.attention_order)
    meta_heads = (_meta_int(meta, "num_head_channels"), _meta_int(meta, "num_heads"))
    heads = pick("heads", meta_heads if any(v is not None for v in meta_heads) else None,
                 published and (published.num_head_channels, published.num_heads))
    lacking = [name for name, value in (("resolution", resolution), ("attention_order", order),
                                        ("num_head_channels or num_heads", heads)) if value is None]
    if lacking:
        raise ValueError(
            f"ADM checkpoint: unrecognised configuration ({_describe_structure(s)}); it matches none of "
            f"guided-diffusion's published models, whose table gives what shapes cannot tell. Set "
            f"{', '.join(lacking)} in the safetensors metadata (attention_order is 'new' or 'legacy').")
    head_channels, num_heads = heads
    small_size = None
    if s["in_channels"] == 2 * IMAGE_CHANNELS:
        small_size = _meta_int(meta, "small_size")
        if small_size is None and published is not None and resolution == published.resolution:
            small_size = published.small_size
        if small_size is None:
            raise ValueError(f"ADM checkpoint: an upsampler to {resolution}px that is not a published one; the "
                             f"low-resolution size it was trained on cannot be read from the weights. Set "
                             f"small_size in the safetensors metadata.")
    levels = len(s["channel_mult"])
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"ADM checkpoint: resolution {resolution} is not divisible by 2^{levels - 1} "
                         f"({levels} levels)")
    config = ADMConfig(
        resolution=resolution, attention_order=order, small_size=small_size,
        num_head_channels=head_channels if head_channels is not None else -1,
        num_heads=num_heads if num_heads is not None else 1,
        num_heads_upsample=_meta_int(meta, "num_heads_upsample") or -1, **s)
    return config, published, sources


def schedule_for(published: Published | None, meta: dict[str, str], schedule: str | None) -> tuple[str, str]:
    """The training schedule and where it came from: argument, metadata, or the published config."""
    if schedule is not None:
        return schedule, "argument"
    from_meta = _meta_choice(meta, "schedule", SCHEDULES)
    if from_meta is not None:
        return from_meta, "metadata"
    if published is not None:
        return published.schedule, f"published config of {published.files}"
    raise ValueError("ADM checkpoint: the training noise schedule cannot be read from the weights and this "
                     "configuration is not a published one; pass schedule='linear' or 'cosine' (or set "
                     "metadata 'schedule')")


def describe(config: ADMConfig) -> str:
    heads = f"{config.num_head_channels} ch/head" if config.num_head_channels != -1 else f"{config.num_heads} heads"
    parts = [f"{config.resolution}px", f"{config.model_channels}ch x {config.channel_mult}",
             f"{config.num_res_blocks} res blocks", f"attention at ds {config.attention_ds} ({heads}, "
             f"{config.attention_order} qkv)"]
    if config.num_classes:
        parts.append(f"{config.num_classes} classes")
    if config.is_upsampler:
        parts.append(f"upsampler from {config.small_size}px")
    return ", ".join(parts)


def expert_name(config: ADMConfig, published: Published | None) -> str:
    if published is not None and config.resolution == published.resolution and config.small_size == published.small_size:
        return published.name
    if config.is_upsampler:
        return f"ADM-{config.small_size}→{config.resolution}"
    return f"ADM-{config.resolution}" + ("" if config.num_classes else "-uncond")


# --- the expert -----------------------------------------------------------------------------------

def detect(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str) -> bool:
    """ADM layouts only: GLIDE files (text transformer, ``encoder_kv``) and the face experts
    (``input_blocks_convert``, ``cond_emb_layers``) share the trunk's names but are not ADM."""
    if family != "adm" or not all(k in sd for k in REQUIRED_KEYS):
        return False
    return not any(marker in k for k in sd for marker in FOREIGN_MARKERS)


def load_class_names() -> list[str]:
    """ImageNet's 1000 class names in index order (torchvision's ``IMAGENET1K_V1`` categories)."""
    with open(CLASS_NAMES_FILE, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def class_names_for(config: ADMConfig) -> list[str] | None:
    """ImageNet's names for 1000 classes, the indices for any other count; None when unconditional."""
    if config.num_classes is None:
        return None
    return load_class_names() if config.num_classes == 1000 else [str(i) for i in range(config.num_classes)]


def build_network(sd: dict[str, torch.Tensor], config: ADMConfig, operations=torch_ops) -> ADMUNet:
    """The network holding the checkpoint's tensors, which must match the config exactly."""
    return assign_checkpoint(lambda: ADMUNet(config, operations), sd, "ADM", describe(config))


def _class_encoder(name: str, num_classes: int) -> Callable[[int], Condition]:
    def encode(index: int) -> Condition:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_classes:
            raise ValueError(f"{name}: class index {index!r} is out of range; it takes 0..{num_classes - 1}")
        return {"y": torch.tensor([index], dtype=torch.long)}
    return encode


def _image_encoder(name: str, config: ADMConfig) -> Callable[..., Condition]:
    """``fn(low_res, class_index=None)``: the low-res image resized (kornia, bilinear, antialiased)
    to the ``small_size`` the upsampler was trained on, when it is another size.

    The released upsamplers are class-conditional too, so their condition also holds ``y`` as class
    probabilities: one-hot for ``class_index``, else uniform, that is the mean label embedding, a
    class-agnostic stand-in the model never saw in training (pass a class for a trained condition).
    """
    n, size = config.num_classes, config.small_size

    def encode(low_res: torch.Tensor, class_index: int | None = None, text: str | None = None) -> Condition:
        if text:
            raise ValueError(f"{name} takes no text; bind the prompt to a text expert")
        if not isinstance(low_res, torch.Tensor) or low_res.ndim != 4 or low_res.shape[1] != IMAGE_CHANNELS:
            shape = tuple(low_res.shape) if isinstance(low_res, torch.Tensor) else type(low_res).__name__
            raise ValueError(f"{name}: the low-res image must be B x 3 x h x w in [-1, 1], got {shape}")
        low_res = low_res.float()
        if tuple(low_res.shape[-2:]) != (size, size):
            import kornia

            low_res = kornia.geometry.transform.resize(low_res, (size, size), interpolation="bilinear",
                                                       antialias=True)
        condition = {"low_res": low_res}
        if n is not None:
            if class_index is None:
                y = torch.full((1, n), 1.0 / n)
            else:
                _class_encoder(name, n)(class_index)
                y = F.one_hot(torch.tensor([class_index]), n).float()
            condition["y"] = y
        elif class_index is not None:
            raise ValueError(f"{name} is not class-conditional; leave class_index out")
        return condition
    return encode


def build(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str, schedule: str | None = None,
          operations=torch_ops) -> Expert:
    """The expert of a guided-diffusion checkpoint; ``schedule`` overrides the training noise schedule."""
    config, published, sources = infer_config(sd, meta)
    schedule, sources["schedule"] = schedule_for(published, meta, schedule)
    network = build_network(sd, config, operations)
    name = expert_name(config, published)
    class_names = class_names_for(config)
    if config.is_upsampler:
        encoders = {"image": _image_encoder(name, config)}
        null, null_for = None, (lambda c: dict(c))  # the low-res image stays: it was never dropped in training
    elif config.num_classes is not None:
        encoders = {"class": _class_encoder(name, config.num_classes)}
        null, null_for = None, None  # never trained with label dropout: the binding forms the null
    else:
        encoders, null, null_for = {}, {}, None
    return Expert(
        network=network, name=name, family="adm", resolution=config.resolution,
        alphas_cumprod=alphas_cumprod_for(schedule, _meta_int(meta, "diffusion_steps") or 1000),
        prediction="eps_learned_sigma" if config.learn_sigma else "eps",
        encoders=encoders, null_condition=null, null_for=null_for, class_names=class_names,
        info={"config": asdict(config), "architecture": describe(config), "schedule": schedule,
              "published": published.files if published else None, "sources": sources,
              "params": sum(p.numel() for p in network.parameters())},
    )

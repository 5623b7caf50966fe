"""The face experts of Unite and Conquer (Nair et al., CVPR 2023; Nithin-GK/UniteandConquer, face_utils/).

Two released checkpoints load unchanged, with their original key names. Both are 256 px ADM-style
UNets (scale-shift norm, residual up/down-sampling, legacy ``[q, k, v]``-per-head attention),
trained with the linear schedule, T = 1000, and a learned variance (6 output channels: eps, then
the variance interpolation ``v``). The released sampler calls them with integer timestep indices
(``rescale_timesteps`` multiplies by 1000 / 1000); continuous ones embed the same way.

``model_latest.pt``: segmentation slots and FaRL text (``Face-256 (masks+text)``)
    Input ``[z, slot A, slot B]`` (9 channels). A convolution ``input_blocks_convert`` maps the 6
    slot channels to 3, and the trunk's first convolution sees ``cat([z, convert(slots)])``
    (z first; ``face_utils/unet.py``, ``UNetModel.forward``). Each residual block also has
    ``cond_emb_layers`` (SiLU, Linear 512 -> 2 x channels), a FiLM from the 512-d FaRL embedding
    applied *after* the time FiLM, through ``out_norm`` a second time::

        h = out_norm(h) * (1 + scale_t) + shift_t
        h = out_norm(h) * (1 + scale_e) + shift_e      # only where the embedding is not zero

    The reference skips the second line when ``sum(embedding)`` over the *whole batch* is 0, so
    one sample's output depends on the others. Here the rule is per sample: a sample whose
    embedding is all zeros gets no embedding FiLM, whatever else is in the batch. (See
    ``film_zero_embedding`` below for the other reading.)

``model_sketch.pt``: Canny sketches (``Face-256 sketch``)
    Input ``[z, sketch]`` (6 channels), no embedding. There is no trained null: the model never
    saw a blank sketch, so ``null_condition`` is ``None``.

Conditions
----------
Segmentation slots hold face-parser maps scaled to [-1, 1] (``2 m - 1``), the same map on all 3
channels of the slot (the training masks are grey images read as RGB), and zeros in the unused
slot. The null is zero slots and a zero embedding (training: 1/8 of the samples). Text is a
FaRL/CLIP text embedding, L2-normalised (``model_loaders.text_encoders``); training used FaRL
*image* embeddings of the target, which live in the same joint space. (The released sampler,
``diffusion_test``, resets its prompt to ``''`` for every keyword after ``Text``, so it always
encodes the empty prompt; reproductions of its figures should not expect the prompt to matter.)

Which slot holds which part. The released sampler (``face_utils/diff_test.py``) builds
``face_input = cat([face_map, 0])`` and ``hair_input = cat([0, hair_map])``, with ``face_map``
a white skin/face region (``data/face_map``) and ``hair_map`` the hair region: **slot A is
skin/face, slot B is hair**. The training code released later (``train_code/.../image_datasets.py``)
says the opposite (``cat((hair_image, skin_image * 0))``), and ``test_multimodal_face.py`` swaps its
``--face_map`` / ``--hair_map`` flags when calling its data loader. We follow the sampler that made
the paper's figures, and the slot is always named explicitly: ``encode("segmentation", map, slot="A")``.
:data:`SLOT_PARTS` gives the UI names.

Sketches are ``cv2.Canny(rgb_uint8, 100, 200, L2gradient=True)`` on the 256 px RGB image, repeated
on 3 channels and read as ``x / 127.5 - 1``: edges are +1, the rest -1
(:func:`conditions.edges.canny_edges` makes them with kornia).

Config inference
----------------
:func:`infer_config` reads the architecture from the state dict; what shapes cannot tell comes from
the safetensors metadata (guided-diffusion's option names) or the released models' values.

- ``kind``: ``latest`` when ``input_blocks_convert.weight`` is present, else ``sketch``.
- ``model_channels``: ``time_embed.0.weight`` (time_embed_dim x model_channels).
- ``in_channels``: ``input_blocks.0.0.weight`` (6 for both: ``[z, convert(slots)]`` or ``[z, sketch]``).
- ``slot_channels``: ``input_blocks_convert.weight`` (3 x 6), latest only.
- ``embed_dim``: ``cond_emb_layers.1.weight`` (2 x channels x 512), latest only.
- ``out_channels``: ``out.2.weight`` (6: learned sigma).
- ``num_res_blocks``: the index of the first output block that ends in an upsampler.
- ``channel_mult``: out channels of each level's first residual block over ``model_channels``.
- attention downsample rates: the levels whose residual blocks carry ``.1.qkv``.
- ``use_scale_shift_norm``: ``emb_layers.1`` has twice the block's channels.
- ``resblock_updown``: up/down-sampling by residual blocks, or by convolutions (``op`` / ``conv``).
- ``num_head_channels`` / ``num_heads``: metadata; else 64-channel heads for the released trunk
  (192 channels x (1, 1, 2, 2, 4, 4), 2 res blocks, attention at ds 8, 16, 32); else the file is
  refused, naming the key (loaders never guess). ``num_heads_upsample``: metadata, else -1
  (guided-diffusion's default; it matters only with ``num_heads``).
- ``image_size``: metadata ``large_size`` or ``image_size``, else 256, the only size the
  reference code (``face_utils``) builds.
- schedule: the ``schedule`` argument, else metadata ``noise_schedule``, else ``linear``;
  metadata ``diffusion_steps``, else 1000.

Detection
---------
:func:`detect` claims a file whose metadata says ``uac_family`` (or ``family``) ``face``; it never
claims one whose metadata names another family. Otherwise it claims a state dict with
``input_blocks_convert`` or ``cond_emb_layers`` keys, or the sketch layout: a bare ADM trunk (only
``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks`` and ``out`` keys, no
``encoder_kv``) with 6 input and 6 output channels. The released ADM upsamplers (64->256,
128->512) also take 6 input channels but are class-conditional, so they carry ``label_emb.weight``
and are not claimed; GLIDE's upsampler carries its text transformer. An *unconditional* ADM-format
upsampler (none was released) is indistinguishable from the sketch model by shapes: auto
detection takes it as ``face``, and the loader's family ``adm`` loads it as an upsampler.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .expert import Condition, Expert, check_image
from .ops import torch_ops
from .schedules import alphas_cumprod_for
from .unet_layers import UNetTrunk, assign_checkpoint, heads_for, infer_trunk

IMAGE_CHANNELS = 3
EMBED_DIM = 512
SLOTS = ("A", "B")
SLOT_PARTS = {"A": "skin/face", "B": "hair"}  # face_utils/diff_test.py; see the module docstring
NAMES = {"latest": "Face-{size} (masks+text)", "sketch": "Face-{size} sketch"}
TRUNK_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.")
# The released models' trunk (model_channels, num_res_blocks, channel_mult, attention_ds) and heads.
RELEASED_TRUNK = (192, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32))
RELEASED_HEAD_CHANNELS = 64
REQUIRED_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.0.in_layers.2.weight",
                 "out.2.weight")


@dataclass
class FaceConfig:
    """Architecture of a face expert.

    Args:
        kind (`str`): ``latest`` (segmentation slots and text embedding) or ``sketch``.
        image_size (`int`): side of the training images, 256.
        in_channels (`int`): channels of the trunk's first convolution (6).
        slot_channels (`int`): channels of the two segmentation slots together (6; 0 for sketch).
        embed_dim (`int`): size of the text embedding fed to ``cond_emb_layers`` (512; 0 for sketch).
        model_channels (`int`): base width (192 in the released models).
        out_channels (`int`): 6 with a learned variance, else 3.
        num_res_blocks (`int`): residual blocks per level on the way down (2 released).
        channel_mult (`tuple`): width multiplier per level, (1, 1, 2, 2, 4, 4) at 256 px.
        attention_ds (`tuple[int]`): downsample rates with self-attention (8, 16, 32 at 256 px).
        num_head_channels (`int`): channels per attention head; -1 means use ``num_heads``.
        num_heads (`int`): heads on the way down when ``num_head_channels`` is -1.
        num_heads_upsample (`int`): heads on the way up when ``num_head_channels`` is -1
            (-1: ``num_heads``).
        use_scale_shift_norm (`bool`): time (and text) embeddings as FiLM after ``out_norm``.
        resblock_updown (`bool`): residual blocks, rather than convolutions, resample.
        film_zero_embedding (`bool`, defaults to `False`): apply the text FiLM to samples whose
            embedding is zero too (``cond_emb_layers`` then contributes only its bias). The
            reference does this to every sample whenever *some* sample of the batch has text,
            which was the case in most training batches and in the released sampler whenever a
            prompt is used; ``False`` is the per-sample rule of the module docstring, which is the
            reference's output for a batch without text. It can be changed after loading
            (``expert.network.config.film_zero_embedding = True``); either way the output of a
            sample no longer depends on the rest of the batch.
    """

    kind: str
    image_size: int
    in_channels: int
    slot_channels: int
    embed_dim: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    channel_mult: tuple
    attention_ds: tuple
    num_head_channels: int = 64
    num_heads: int = 4
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    film_zero_embedding: bool = False


# --- the UNet -------------------------------------------------------------------------------------

class FaceUNet(UNetTrunk):
    """The trunk shared by both face experts, with the checkpoints' key names.

    :meth:`reference_forward` takes the reference's full input; the experts' networks are the
    subclasses :class:`FaceMasksTextNet` and :class:`FaceSketchNet`, which take the 3-channel ``z``
    and the conditions as keywords. ``operations``: the layer namespace (``model_loaders.ops``).
    """

    def __init__(self, config: FaceConfig, operations=torch_ops):
        c = config

        def heads(ch: int, decoder: bool) -> int:
            return heads_for(ch, c.num_head_channels, c.num_heads, c.num_heads_upsample, decoder, "face")

        super().__init__(in_channels=c.in_channels, model_channels=c.model_channels, out_channels=c.out_channels,
                         num_res_blocks=c.num_res_blocks, channel_mult=c.channel_mult, attention_ds=c.attention_ds,
                         heads=heads, attention_order="legacy", use_scale_shift_norm=c.use_scale_shift_norm,
                         resblock_updown=c.resblock_updown, embed_dim=c.embed_dim, operations=operations)
        self.config = c
        if c.slot_channels:
            self.input_blocks_convert = operations.Conv2d(c.slot_channels, IMAGE_CHANNELS, 3, padding=1)

    def reference_forward(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the reference's input, ``[z, slot A, slot B]`` (9 channels) or ``[z, sketch]`` (6);
        ``embed``: B x 512 text embeddings (masks+text expert; zero rows or ``None`` for none)."""
        emb = self.time_embedding(t, x.dtype)
        if self.config.slot_channels:
            z, slots = x[:, :IMAGE_CHANNELS], x[:, IMAGE_CHANNELS:]
            h = torch.cat([z, self.input_blocks_convert(slots)], dim=1)
        else:
            h = x
        active = None
        if self.config.embed_dim:
            if embed is None:
                embed = x.new_zeros(x.shape[0], self.config.embed_dim)
            embed = embed.to(x.dtype)
            # Per sample: an all-zero embedding is "no text" whatever the rest of the batch holds.
            active = (embed != 0).any(dim=1) | self.config.film_zero_embedding
            # One host sync per forward (not one per block) decides whether any sample takes the FiLM.
            if bool(active.any()):
                active = rearrange(active, "b -> b 1 1 1")
            else:
                embed = active = None
        return self.trunk(h, emb, embed=embed, active=active)


def _batch(tensor: torch.Tensor, b: int) -> torch.Tensor:
    """A condition of batch 1 (shared) expanded to the sample batch."""
    return tensor.expand(b, *tensor.shape[1:]) if tensor.shape[0] == 1 and b != 1 else tensor


class FaceMasksTextNet(FaceUNet):
    """``network(z, t, slots=B x 6 x H x W, embed=B x 512)`` of the masks+text expert; missing
    conditions are zeros (the null)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, slots: torch.Tensor | None = None,
                embed: torch.Tensor | None = None) -> torch.Tensor:
        b, _, hgt, wid = x.shape
        slots = x.new_zeros(b, self.config.slot_channels, hgt, wid) if slots is None else _batch(slots, b)
        embed = None if embed is None else _batch(embed, b)
        return self.reference_forward(torch.cat([x, slots.to(x.dtype)], dim=1), t, embed)


class FaceSketchNet(FaceUNet):
    """``network(z, t, sketch=B x 3 x H x W in [-1, 1])`` of the sketch expert."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, sketch: torch.Tensor | None = None) -> torch.Tensor:
        if sketch is None:
            raise ValueError("the face sketch expert needs a sketch (it was never trained without one)")
        return self.reference_forward(torch.cat([x, _batch(sketch, x.shape[0]).to(x.dtype)], dim=1), t)


# --- config inference -----------------------------------------------------------------------------

def _meta_int(meta: dict[str, str], key: str, default: int) -> int:
    value = meta.get(key)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError as err:
        raise ValueError(f"face checkpoint: metadata {key}={value!r} is not an integer") from err


def _has_upsampler(sd: dict[str, torch.Tensor], j: int) -> bool:
    """Output block ``j`` ends in an upsampler: a third ResBlock/conv, or a second layer that is
    not attention."""
    for i in (1, 2):
        prefix = f"output_blocks.{j}.{i}."
        keys = [k for k in sd if k.startswith(prefix)]
        if keys and not any(k.startswith(prefix + "qkv") for k in keys):
            return True
    return False


def infer_config(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> FaceConfig:
    """The :class:`FaceConfig` of a face state dict (see the module docstring for the sources)."""
    meta = meta or {}
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ValueError(f"face checkpoint: missing {', '.join(missing)}")
    kind = "latest" if "input_blocks_convert.weight" in sd else "sketch"
    cond_key = "middle_block.0.cond_emb_layers.1.weight"
    if kind == "latest" and cond_key not in sd:
        raise ValueError(f"face checkpoint: has input_blocks_convert but no {cond_key} (the text FiLM)")
    if kind == "sketch" and cond_key in sd:
        raise ValueError("face checkpoint: has cond_emb_layers (the text FiLM) but no input_blocks_convert")
    mc = int(sd["time_embed.0.weight"].shape[1])
    in_channels = int(sd["input_blocks.0.0.weight"].shape[1])
    slot_channels = int(sd["input_blocks_convert.weight"].shape[1]) if kind == "latest" else 0
    embed_dim = int(sd[cond_key].shape[1]) if kind == "latest" else 0
    expected_in = 2 * IMAGE_CHANNELS
    if in_channels != expected_in:
        raise ValueError(f"face checkpoint: the first convolution takes {in_channels} channels; the face experts "
                         f"take {expected_in} ([z, converted slots] or [z, sketch])")

    trunk = infer_trunk(sd, "face", _has_upsampler)
    released = (mc, trunk.num_res_blocks, tuple(trunk.channel_mult), trunk.attention_ds) == RELEASED_TRUNK
    if "num_head_channels" in meta or "num_heads" in meta:
        head_channels = _meta_int(meta, "num_head_channels", -1)
    elif released:
        head_channels = RELEASED_HEAD_CHANNELS
    else:
        raise ValueError(f"face checkpoint: a {mc}-channel trunk with channel_mult {trunk.channel_mult} is not the "
                         f"released one, whose heads have {RELEASED_HEAD_CHANNELS} channels, and the attention heads "
                         f"cannot be read from the weights; set 'num_head_channels' (or 'num_heads') in the file's "
                         f"safetensors metadata")
    mid_ch = int(sd["middle_block.0.in_layers.2.weight"].shape[0])
    scale_shift = int(sd["middle_block.0.emb_layers.1.weight"].shape[0]) == 2 * mid_ch
    resblock_updown = trunk.levels == 1 or f"input_blocks.{trunk.num_res_blocks + 1}.0.in_layers.0.weight" in sd
    return FaceConfig(
        kind=kind, image_size=_meta_int(meta, "large_size", _meta_int(meta, "image_size", 256)),
        in_channels=in_channels, slot_channels=slot_channels, embed_dim=embed_dim, model_channels=mc,
        out_channels=int(sd["out.2.weight"].shape[0]), num_res_blocks=trunk.num_res_blocks,
        channel_mult=trunk.channel_mult, attention_ds=trunk.attention_ds,
        num_head_channels=head_channels, num_heads=_meta_int(meta, "num_heads", 4),
        num_heads_upsample=_meta_int(meta, "num_heads_upsample", -1), use_scale_shift_norm=scale_shift,
        resblock_updown=resblock_updown,
    )


def describe(config: FaceConfig) -> str:
    name = NAMES[config.kind].format(size=config.image_size)
    return (f"{name}: {config.model_channels} channels x {config.channel_mult}, {config.num_res_blocks} res "
            f"blocks, attention at ds {config.attention_ds} ({config.num_head_channels} channels per head)")


def build_network(sd: dict[str, torch.Tensor], config: FaceConfig, operations=torch_ops) -> FaceUNet:
    """The expert's network with the checkpoint's tensors, which must match the config exactly."""
    if config.num_head_channels != -1:
        widths = {int(m * config.model_channels) for m in config.channel_mult}
        odd = sorted(w for w in widths if w % config.num_head_channels)
        if odd:
            raise ValueError(f"face checkpoint: num_head_channels {config.num_head_channels} does not divide the "
                             f"widths {odd}; set num_head_channels in the safetensors metadata")
    network_class = FaceMasksTextNet if config.kind == "latest" else FaceSketchNet
    return assign_checkpoint(lambda: network_class(config, operations), sd, "face", describe(config))


# --- detection ------------------------------------------------------------------------------------

def _declared_family(meta: dict[str, str]) -> str | None:
    return meta.get("uac_family") or meta.get("family") or None


def is_sketch_layout(sd: dict[str, torch.Tensor]) -> bool:
    """A bare ADM trunk with 6 input and 6 output channels and nothing else: no class embedding
    (the released ADM upsamplers have one), no text transformer or ``encoder_kv`` (GLIDE)."""
    first, out = sd.get("input_blocks.0.0.weight"), sd.get("out.2.weight")
    if first is None or out is None or "time_embed.0.weight" not in sd or first.ndim != 4:
        return False
    if not all(k.startswith(TRUNK_PREFIXES) and "encoder_kv" not in k for k in sd):
        return False
    return int(first.shape[1]) == 2 * IMAGE_CHANNELS and int(out.shape[0]) == 2 * IMAGE_CHANNELS


def detect(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str) -> bool:
    """Whether this is a face expert (see "Detection" in the module docstring)."""
    declared = _declared_family(meta)
    if declared is not None:
        return declared == "face" and "input_blocks.0.0.weight" in sd
    if "input_blocks_convert.weight" in sd or any(".cond_emb_layers." in k for k in sd):
        return True
    return is_sketch_layout(sd)


# --- conditions -----------------------------------------------------------------------------------

def _segmentation_encoder(config: FaceConfig, name: str):
    size = config.image_size

    def encode(seg_map: torch.Tensor, slot: str = "A") -> Condition:
        """Slots for a B x 1 x H x W map in [0, 1] (resized to the expert's size) in slot ``A``
        (skin/face) or ``B`` (hair): the map as ``2 m - 1`` on the slot's 3 channels, the other
        slot zero, and a zero embedding."""
        if slot not in SLOTS:
            raise ValueError(f"{name}: slot must be one of {SLOTS} (A: {SLOT_PARTS['A']}, B: {SLOT_PARTS['B']}), "
                             f"got {slot!r}")
        seg_map = check_image(seg_map, "segmentation map", 1, 0.0, 1.0, name)
        if seg_map.shape[-2:] != (size, size):
            seg_map = F.interpolate(seg_map, size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=True).clamp(0, 1)
        filled = repeat(2 * seg_map - 1, "b 1 h w -> b c h w", c=config.slot_channels // 2)
        empty = torch.zeros_like(filled)
        slots = torch.cat([filled, empty] if slot == "A" else [empty, filled], dim=1)
        return {"slots": slots, "embed": torch.zeros(slots.shape[0], config.embed_dim)}

    return encode


def _text_encoder(config: FaceConfig, name: str):
    size = config.image_size

    def encode(embedding: torch.Tensor) -> Condition:
        """Zero slots and a B x 512 text embedding (L2-normalised, from ``text_encoders``)."""
        if isinstance(embedding, str):
            raise ValueError(f"{name} takes a FaRL text embedding (B x {config.embed_dim}), not a string: encode "
                             f"the prompt with a FaRL text encoder first (model_loaders.text_encoders)")
        if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or embedding.shape[1] != config.embed_dim:
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"{name}: the text embedding must be B x {config.embed_dim}, got {shape}")
        embedding = embedding.detach().float().cpu()
        if not torch.isfinite(embedding).all():
            raise ValueError(f"{name}: the text embedding has NaN or infinite values")
        return {"slots": torch.zeros(1, config.slot_channels, size, size), "embed": embedding}

    return encode


def _sketch_encoder(config: FaceConfig, name: str):
    size = config.image_size

    def encode(edges: torch.Tensor) -> Condition:
        """A B x 3 x H x W sketch in [-1, 1], edges +1 on -1 (``conditions.edges.canny_edges``), at the
        expert's size: resizing would blur the binary edges the model was trained on."""
        edges = check_image(edges, "sketch", IMAGE_CHANNELS, -1.0, 1.0, name)
        if edges.shape[-2:] != (size, size):
            raise ValueError(f"{name}: the sketch must be {size} x {size}, got {edges.shape[-2]} x "
                             f"{edges.shape[-1]}; resize the image before edge detection")
        return {"sketch": edges}

    return encode


# --- the expert -----------------------------------------------------------------------------------

def build(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str, schedule: str | None = None,
          operations=torch_ops) -> Expert:
    """The expert of a face checkpoint; ``schedule`` overrides the training noise schedule."""
    config = infer_config(sd, meta)
    network = build_network(sd, config, operations)
    schedule = schedule or meta.get("noise_schedule") or "linear"
    name = NAMES[config.kind].format(size=config.image_size)
    size = config.image_size
    if config.kind == "latest":
        encoders = {"segmentation": _segmentation_encoder(config, name), "text": _text_encoder(config, name)}
        null = {"slots": torch.zeros(1, config.slot_channels, size, size), "embed": torch.zeros(1, config.embed_dim)}
    else:
        encoders, null = {"sketch": _sketch_encoder(config, name)}, None
    return Expert(
        network=network, name=name, family="face", resolution=size,
        alphas_cumprod=alphas_cumprod_for(schedule, _meta_int(meta, "diffusion_steps", 1000)),
        prediction="eps_learned_sigma" if config.out_channels == 2 * IMAGE_CHANNELS else "eps",
        encoders=encoders, null_condition=null,
        info={"config": asdict(config), "schedule": schedule, "architecture": describe(config),
              "slots": dict(SLOT_PARTS) if config.kind == "latest" else None,
              "num_head_channels_from": "metadata" if "num_head_channels" in meta or "num_heads" in meta
              else "released configuration (64)",
              "params": sum(p.numel() for p in network.parameters())},
    )

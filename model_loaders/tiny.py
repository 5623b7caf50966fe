"""Tiny digit experts: small eps-prediction UNets trained on real MNIST digits (``tools/train_tiny.py``).

They are the pack's embedded default, small enough to ship in git (``models_tiny/``) and to
sample on a CPU. Three experts see one 32 x 32 RGB canvas through three modalities, each trained
on its own digits (``tools/digits.py``), with condition dropout so each has a trained null:

- ``class``: the digit, 0..9 (a class embedding, index 10 is the null);
- ``colour``: a colour word (a colour embedding, index ``len(vocabulary)`` is the null); the
  word is also accepted through ``text``;
- ``layout``: a map of where the digit sits, concatenated to the input as two channels
  ``[map, flag]``; the null is an all-zero map with flag 0.

Checkpoint format
-----------------
A safetensors file whose metadata holds ``uac_family = "tiny"`` and ``uac_config``, a JSON
object with these fields:

    modality (`str`): ``class``, ``colour`` or ``layout``.
    widths (`list[int]`): channels of the three levels, e.g. ``[32, 64, 64]``.
    res_blocks (`int`): residual blocks per level on the way down (one more on the way up).
    attention (`bool`): one self-attention block at the lowest resolution.
    vocabulary (`list[str]`): the colour words, index order (colour expert only).
    schedule (`str`): the training noise schedule, ``linear`` or ``cosine`` (T = 1000).
    prediction (`str`, default ``eps``): what the network predicts, ``eps`` or ``v``. The expert
        always hands the sampler eps (``Expert.eps`` converts v at the input's timestep).
    resolution (`int`): canvas side, 32.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .expert import Condition, Expert
from .schedules import alphas_cumprod_for

MODALITIES = ("class", "colour", "layout")
NAMES = {"class": "Tiny digits · class", "colour": "Tiny digits · colour", "layout": "Tiny digits · layout"}
NUM_CLASSES = 10


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous timesteps (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time and condition embedding added in between."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Linear(emb, cout)
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a small feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b (h w) c", n=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b (h w) c -> b c h w", h=h, w=w))


class TinyUNet(nn.Module):
    """A three-level UNet over 32 x 32 canvases with one condition path.

    Args:
        modality (`str`): which condition the network takes (see the module docstring).
        widths (`tuple[int, int, int]`): channels of the three levels (32 / patch pixels and halvings).
        res_blocks (`int`): residual blocks per level going down; going up each level has one more.
        attention (`bool`): self-attention after each block of the lowest level.
        vocabulary_size (`int`): number of colour words (colour modality).
        patch (`int`): side of the pixel patches folded into channels before the first conv
            (space-to-depth), so the levels run at 32 / patch pixels and below; 2 makes the
            network four times cheaper, which is what lets it train and sample on a CPU.
    """

    def __init__(self, modality: str, widths=(32, 64, 64), res_blocks: int = 1, attention: bool = True,
                 vocabulary_size: int = 6, patch: int = 1):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"unknown tiny modality {modality!r}; expected one of {MODALITIES}")
        self.modality = modality
        c0 = widths[0]
        emb = 4 * c0
        self.time_dim = c0
        self.time_embed = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        if modality == "class":
            self.cond_embed = nn.Embedding(NUM_CLASSES + 1, emb)
        elif modality == "colour":
            self.cond_embed = nn.Embedding(vocabulary_size + 1, emb)
        extra = 2 if modality == "layout" else 0
        self.patch = patch
        self.conv_in = nn.Conv2d((3 + extra) * patch**2, c0, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch = [c0], c0
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                self.down.append(ResBlock(ch, width, emb))
                ch = width
                skips.append(ch)
                if attention and level == len(widths) - 1:
                    self.down.append(Attention(ch))
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb)] + ([Attention(ch)] if attention else []))
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), width, emb))
                ch = width
                if attention and level == len(widths) - 1:
                    self.up.append(Attention(ch))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, 3 * patch**2, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                colour: torch.Tensor | None = None, layout: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.modality == "class":
            emb = emb + self.cond_embed(_required(y, "y"))
        elif self.modality == "colour":
            emb = emb + self.cond_embed(_required(colour, "colour"))
        else:
            layout = _required(layout, "layout").to(x.dtype)
            # A batch-1 map is shared by every image, as embeddings of batch-1 labels are.
            x = torch.cat([x, layout.expand(x.shape[0], *layout.shape[1:])], dim=1)
        p = self.patch
        h = self.conv_in(rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p))
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb)
            if not isinstance(layer, Attention):
                hs.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layer, h, emb)
        return rearrange(self.out(h), "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)

    @staticmethod
    def _run(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)


def _required(v: torch.Tensor | None, name: str) -> torch.Tensor:
    if v is None:
        raise ValueError(f"the tiny expert needs its {name!r} condition (pass the null condition for none)")
    return v


# --- config and loading --------------------------------------------------------------------------

def default_config(modality: str) -> dict[str, Any]:
    """The shipped experts' config; the schedules differ on purpose, to exercise the bridge."""
    return {
        "modality": modality,
        "widths": [16, 32, 64],
        "res_blocks": 1,
        "attention": True,
        "patch": 2,
        "vocabulary": ["red", "green", "blue", "yellow", "magenta", "cyan"] if modality == "colour" else [],
        "schedule": {"class": "cosine", "colour": "linear", "layout": "cosine"}[modality],
        # v rather than eps: an eps network must carry the input's noise through to its output at
        # low noise, which a 16-channel top level cannot spare; v keeps every level's target at unit scale.
        "prediction": "v",
        "resolution": 32,
    }


def network_from_config(config: dict[str, Any]) -> TinyUNet:
    return TinyUNet(config["modality"], tuple(config["widths"]), int(config["res_blocks"]),
                    bool(config["attention"]), len(config.get("vocabulary") or []) or 6, int(config.get("patch", 1)))


def metadata_for(config: dict[str, Any]) -> dict[str, str]:
    return {"uac_family": "tiny", "uac_config": json.dumps(config)}


def detect(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str) -> bool:
    return meta.get("uac_family") == "tiny"


def read_config(meta: dict[str, str]) -> dict[str, Any]:
    try:
        config = json.loads(meta["uac_config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"tiny checkpoint: its metadata has no readable 'uac_config' JSON ({err})") from err
    missing = [k for k in ("modality", "widths", "res_blocks", "attention", "schedule") if k not in config]
    if missing:
        raise ValueError(f"tiny checkpoint: 'uac_config' lacks {', '.join(missing)}")
    if config.get("prediction", "eps") not in ("eps", "v"):
        raise ValueError(f"tiny checkpoint: 'uac_config' prediction must be 'eps' or 'v', got {config['prediction']!r}")
    return config


def build(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str, schedule: str | None = None) -> Expert:
    """The expert of a tiny checkpoint; ``schedule`` overrides the one in its metadata."""
    config = read_config(meta)
    network = network_from_config(config)
    try:
        missing, unexpected = network.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"tiny {config['modality']} checkpoint does not match its config "
                         f"{config['widths']}: {str(err).splitlines()[-1].strip()}") from err
    if missing or unexpected:
        raise ValueError(f"tiny {config['modality']} checkpoint does not match its config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    name = NAMES[config["modality"]]
    encoders, null, class_names = _modality(config, name)
    schedule = schedule or config["schedule"]
    return Expert(network=network, name=name, family="tiny", resolution=int(config.get("resolution", 32)),
                  alphas_cumprod=alphas_cumprod_for(schedule), prediction=config.get("prediction", "eps"),
                  encoders=encoders,
                  null_condition=null, class_names=class_names,
                  info={"config": config, "schedule": schedule, "params": sum(p.numel() for p in network.parameters())})


def _modality(config: dict[str, Any], name: str):
    modality = config["modality"]
    if modality == "class":
        return {"class": lambda k: encode_class(k, name)}, {"y": torch.tensor([NUM_CLASSES])}, [str(k) for k in range(10)]
    if modality == "colour":
        vocab = list(config["vocabulary"])
        enc = lambda word: encode_colour(word, vocab, name)  # noqa: E731
        return {"colour": enc, "text": enc}, {"colour": torch.tensor([len(vocab)])}, vocab
    size = int(config.get("resolution", 32))
    return ({"segmentation": lambda m, slot=None: encode_layout(m, size, name)},
            {"layout": torch.zeros(1, 2, size, size)}, None)


def encode_class(k: Any, name: str = NAMES["class"]) -> Condition:
    if isinstance(k, torch.Tensor) and k.numel() == 1:
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < NUM_CLASSES:
        raise ValueError(f"{name}: the class must be an integer digit 0..9, got {k!r}")
    return {"y": torch.tensor([k])}


def encode_colour(word: Any, vocabulary: list[str], name: str = NAMES["colour"]) -> Condition:
    key = word.strip().lower() if isinstance(word, str) else word
    if key not in vocabulary:
        raise ValueError(f"{name}: unknown colour {word!r}; the vocabulary is: {', '.join(vocabulary)}")
    return {"colour": torch.tensor([vocabulary.index(key)])}


def encode_layout(layout: torch.Tensor, size: int = 32, name: str = NAMES["layout"]) -> Condition:
    """A B x 1 x H x W map in [0, 1] (or B x H x W) as the ``[map, flag]`` input channels."""
    if not isinstance(layout, torch.Tensor):
        raise ValueError(f"{name}: the layout map must be a tensor, got {type(layout).__name__}")
    if layout.ndim == 3:
        layout = layout[:, None]
    if layout.ndim != 4 or layout.shape[1] != 1:
        raise ValueError(f"{name}: the layout map must be B x 1 x H x W, got shape {tuple(layout.shape)}")
    layout = layout.float()
    if layout.min() < 0 or layout.max() > 1:
        raise ValueError(f"{name}: the layout map must lie in [0, 1], got [{float(layout.min()):.3g}, "
                         f"{float(layout.max()):.3g}]")
    if layout.shape[-2:] != (size, size):
        import kornia

        layout = kornia.geometry.transform.resize(layout, (size, size), interpolation="bilinear", antialias=True)
    return {"layout": torch.cat([layout, torch.ones_like(layout)], dim=1)}

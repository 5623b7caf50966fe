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
    widths (`list[int]`): channels per level, the first at 32 / patch pixels and each next one at half
        that, e.g. ``[16, 32, 64]`` (the shipped three levels).
    res_blocks (`int`): residual blocks per level on the way down (one more on the way up).
    attention (`bool`): one self-attention block at the lowest resolution.
    vocabulary (`list[str]`): the colour words, index order (colour expert only).
    schedule (`str`): the training noise schedule, ``linear`` or ``cosine`` (T = 1000).
    prediction (`str`, default ``eps``): what the network predicts, ``eps`` or ``v``. The expert
        always hands the sampler eps (``Expert.eps`` converts v at the input's timestep).
    learned_sigma (`bool`, default false): the network also has a variance head (``variance.*``
        weights, :class:`VarianceHead`) and returns ``[prediction | variance values]``, IDDPM's
        learned-sigma output (Nichol & Dhariwal 2021, eq. 15); the expert's prediction is then
        ``v_learned_sigma`` or ``eps_learned_sigma``. The shipped heads were trained on the frozen
        networks' features (``tools/train_tiny.py --variance-head``), so the first half is exactly
        the plain expert's output.
    resolution (`int`): canvas side, 32; 16 for an expert trained on 2 x 2-pooled canvases
        (``tools/train_tiny.py --resolution 16``), which a 32 px product runs on its pooled canvas.
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
from .ops import torch_ops
from .schedules import alphas_cumprod_at, alphas_cumprod_for

MODALITIES = ("class", "colour", "layout")
NAMES = {"class": "Tiny digits · class", "colour": "Tiny digits · colour", "layout": "Tiny digits · layout"}
NUM_CLASSES = 10


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous timesteps (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(channels: int, operations=torch_ops) -> nn.GroupNorm:
    return operations.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time and condition embedding added in between."""

    def __init__(self, cin: int, cout: int, emb: int, operations=torch_ops):
        super().__init__()
        ops = operations
        self.in_layers = nn.Sequential(norm(cin, ops), nn.SiLU(), ops.Conv2d(cin, cout, 3, padding=1))
        self.emb = ops.Linear(emb, cout)
        self.out_layers = nn.Sequential(norm(cout, ops), nn.SiLU(), ops.Conv2d(cout, cout, 3, padding=1))
        self.skip = ops.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a small feature map."""

    def __init__(self, channels: int, operations=torch_ops):
        super().__init__()
        self.norm = norm(channels, operations)
        self.qkv = operations.Conv2d(channels, 3 * channels, 1)
        self.proj = operations.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b (h w) c", n=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b (h w) c -> b c h w", h=h, w=w))


class VarianceHead(nn.Module):
    """The learned-sigma head: one residual block on the last features, then a conv to
    ``log Var[x0 | x_t]`` per pixel.

    It predicts the clean image's log variance, where its loss is convex and every noise level is
    on one scale, and :func:`iddpm_values` turns that into IDDPM's variance values, the output
    that ADM and GLIDE give and ``samplers.variance_reliability`` reads. Learning IDDPM's values
    directly failed: the x0 variance they stand for is ``(Sigma - beta~) / c0^2``, so a variance
    that spans decades sits in the last thousandths of [-1, 1] and the loss had no usable slope.
    """

    def __init__(self, channels: int, out_channels: int, emb: int, operations=torch_ops):
        super().__init__()
        self.block = ResBlock(channels, channels, emb, operations)
        self.out = nn.Sequential(norm(channels, operations), nn.SiLU(),
                                 operations.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(h, emb))


def iddpm_values(log_x0_variance: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """IDDPM's variance values (Nichol & Dhariwal 2021, eq. 15) for a predicted ``log Var[x0 | x_t]``.

    The reverse step t-1 <- t (t >= 1) has the variance ``Sigma = beta~ + c0^2 Var[x0 | x_t]`` (law of
    total variance over DDPM's posterior, eq. 7), and the values place ``log Sigma`` between
    ``log beta~`` (-1) and ``log beta`` (1). This is the inverse of
    ``samplers.variance_reliability.x0_variance(learned_log_variance(...))``; it is computed in float64.
    """
    t = t.to(torch.float64).clamp_min(1.0)
    ab_t, ab_prev = alphas_cumprod_at(t, alphas_cumprod), alphas_cumprod_at(t - 1, alphas_cumprod)
    beta = 1 - ab_t / ab_prev
    beta_tilde = beta * (1 - ab_prev) / (1 - ab_t)
    c0 = ab_prev.sqrt() * beta / (1 - ab_t)
    shape = (-1,) + (1,) * (log_x0_variance.ndim - 1)
    beta, beta_tilde, c0 = (v.reshape(shape).to(log_x0_variance.device) for v in (beta, beta_tilde, c0))
    log_sigma = (beta_tilde + c0**2 * log_x0_variance.double().exp()).log()
    return 2 * (log_sigma - beta_tilde.log()) / (beta.log() - beta_tilde.log()) - 1


class TinyUNet(nn.Module):
    """A small UNet (three levels in the shipped experts) over 32 x 32 canvases with one condition path.

    Args:
        modality (`str`): which condition the network takes (see the module docstring).
        widths (`tuple[int, ...]`): channels per level (32 / patch pixels and halvings; three in the
            shipped experts).
        res_blocks (`int`): residual blocks per level going down; going up each level has one more.
        attention (`bool`): self-attention after each block of the lowest level.
        vocabulary_size (`int`): number of colour words (colour modality).
        patch (`int`): side of the pixel patches folded into channels before the first conv
            (space-to-depth), so the levels run at 32 / patch pixels and below; 2 makes the
            network four times cheaper, which is what lets it train and sample on a CPU.
        alphas_cumprod (`torch.Tensor`, *optional*): the schedule, needed with a variance head:
            the output is then ``[prediction | IDDPM variance values]`` (6 channels).
        operations: the layer namespace (``model_loaders.ops``).
    """

    def __init__(self, modality: str, widths=(32, 64, 64), res_blocks: int = 1, attention: bool = True,
                 vocabulary_size: int = 6, patch: int = 1, alphas_cumprod: torch.Tensor | None = None,
                 operations=torch_ops):
        super().__init__()
        ops = operations
        if modality not in MODALITIES:
            raise ValueError(f"unknown tiny modality {modality!r}; expected one of {MODALITIES}")
        self.modality = modality
        c0 = widths[0]
        emb = 4 * c0
        self.time_dim = c0
        self.time_embed = nn.Sequential(ops.Linear(c0, emb), nn.SiLU(), ops.Linear(emb, emb))
        if modality == "class":
            self.cond_embed = ops.Embedding(NUM_CLASSES + 1, emb)
        elif modality == "colour":
            self.cond_embed = ops.Embedding(vocabulary_size + 1, emb)
        extra = 2 if modality == "layout" else 0
        self.patch = patch
        self.conv_in = ops.Conv2d((3 + extra) * patch**2, c0, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch = [c0], c0
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                self.down.append(ResBlock(ch, width, emb, ops))
                ch = width
                skips.append(ch)
                if attention and level == len(widths) - 1:
                    self.down.append(Attention(ch, ops))
            if level < len(widths) - 1:
                self.down.append(ops.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, ops)] + ([Attention(ch, ops)] if attention else []))
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), width, emb, ops))
                ch = width
                if attention and level == len(widths) - 1:
                    self.up.append(Attention(ch, ops))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(norm(ch, ops), nn.SiLU(), ops.Conv2d(ch, 3 * patch**2, 3, padding=1))
        # A head of its own, not more channels of ``out``: it can be trained on frozen features and
        # added to a finished expert without changing its predictions. It sees the time and
        # condition embedding again, because the variance it stands for spans decades over t.
        self.variance = VarianceHead(ch, 3 * patch**2, emb, ops) if alphas_cumprod is not None else None
        # A plain float64 attribute, not a buffer: casting the network to fp16 must not round the schedule.
        self.alphas_cumprod = alphas_cumprod.to(torch.float64) if alphas_cumprod is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                colour: torch.Tensor | None = None, layout: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.modality == "class":
            emb = emb + self.cond_embed(_required(y, "y"), out_dtype=emb.dtype)
        elif self.modality == "colour":
            emb = emb + self.cond_embed(_required(colour, "colour"), out_dtype=emb.dtype)
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
        out = rearrange(self.out(h), "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)
        if self.variance is None:
            return out
        log_var = rearrange(self.variance(h, emb), "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)
        # float32 even for an fp16 network: small variances sit within 1e-4 of -1 in these values,
        # finer than fp16 resolves there.
        return torch.cat([out.float(), iddpm_values(log_var, t, self.alphas_cumprod).float()], dim=1)

    @staticmethod
    def _run(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)


def _required(v: torch.Tensor | None, name: str) -> torch.Tensor:
    if v is None:
        raise ValueError(f"the tiny expert needs its {name!r} condition (pass the null condition for none)")
    return v


# --- config and loading --------------------------------------------------------------------------

def default_config(modality: str) -> dict[str, Any]:
    """The shipped experts' config; the schedules differ on purpose, to exercise the noise-level mapping."""
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


def network_from_config(config: dict[str, Any], operations=torch_ops) -> TinyUNet:
    table = alphas_cumprod_for(config["schedule"]) if config.get("learned_sigma") else None
    return TinyUNet(config["modality"], tuple(config["widths"]), int(config["res_blocks"]),
                    bool(config["attention"]), len(config.get("vocabulary") or []) or 6, int(config.get("patch", 1)),
                    table, operations)


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


def build(sd: dict[str, torch.Tensor], meta: dict[str, str], family: str, schedule: str | None = None,
          operations=torch_ops) -> Expert:
    """The expert of a tiny checkpoint; ``schedule`` overrides the one in its metadata; ``operations``:
    the layer namespace (``model_loaders.ops``)."""
    config = read_config(meta)
    schedule = schedule or config["schedule"]
    network = network_from_config({**config, "schedule": schedule}, operations)
    try:
        missing, unexpected = network.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"tiny {config['modality']} checkpoint does not match its config "
                         f"{config['widths']}: {str(err).splitlines()[-1].strip()}") from err
    if missing or unexpected:
        raise ValueError(f"tiny {config['modality']} checkpoint does not match its config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    name = NAMES[config["modality"]]
    if int(config.get("resolution", 32)) != 32:
        # A coarser expert of the same modality must be told apart in the rule text.
        name += f" · {int(config['resolution'])}px"
    encoders, null, class_names = _modality(config, name)
    prediction = config.get("prediction", "eps") + ("_learned_sigma" if config.get("learned_sigma") else "")
    return Expert(network=network, name=name, family="tiny", resolution=int(config.get("resolution", 32)),
                  alphas_cumprod=alphas_cumprod_for(schedule), prediction=prediction,
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

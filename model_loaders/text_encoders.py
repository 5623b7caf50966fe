"""FaRL text embeddings for the face expert's text condition (Zheng et al. 2022, FacePerceiver/FaRL).

FaRL's text tower is CLIP ViT-B/16's (Radford et al. 2021): width 512, 12 layers, 8 heads, a
77-token causal transformer whose feature at the end-of-text token goes through
``text_projection``. Unite and Conquer loads FaRL's ``state_dict`` into OpenAI's CLIP and
L2-normalises ``encode_text`` (``face_utils/farl_text.py``); :class:`TextEncoder` does the same
from the checkpoint's own keys, so a plain OpenAI CLIP state dict of that layout loads too.

The tower is written here in plain torch rather than through ComfyUI's ``comfy.clip_model``: the
checkpoint then loads with its own key names (no conversion), a projection wider than the
transformer (the test fixtures) needs no patching of ComfyUI's square ``text_projection``, and
this package keeps working without ComfyUI and across its versions. ComfyUI's tokenizer is not
``clip.tokenize`` either (it parses ``(word:1.2)`` weights and pads with end-of-text), so only its
vocabulary is reused: :class:`ClipTokenizer` is OpenAI's byte-level BPE reading the vocabulary
that ComfyUI bundles (``comfy/sd1_tokenizer/vocab.json`` and ``merges.txt``).

Checkpoint format
-----------------
Keys in OpenAI's layout, optionally under one prefix (``state_dict`` is unwrapped by the
loader; visual-tower keys are ignored): ``token_embedding.weight`` (vocab x width),
``positional_embedding`` (context x width), ``transformer.resblocks.{i}.`` ``ln_1``, ``attn``
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``;
``ln_final`` and ``text_projection`` (width x embed_dim). Read from the shapes: width, context,
vocabulary, layers, embed_dim. Heads: safetensors metadata ``heads`` (or ``transformer_heads``),
else ``width // 64`` (OpenAI's rule: 8 for ViT-B/16).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .ops import torch_ops

CONTEXT = 77
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
ANCHOR = "token_embedding.weight"
VOCAB_ENV = "UAC_CLIP_VOCAB"


# --- tokenizer ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters, which BPE works on.

    The order matters: the first 256 vocabulary entries are its values, printable bytes first."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _clean(text: str) -> str:
    """OpenAI's ``basic_clean`` + ``whitespace_clean``, then lower case. ftfy repairs broken
    unicode when it is installed, as in OpenAI's code; without it ordinary text is unchanged."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's tokenizer: byte-level BPE on lower-cased words, ``[SOT] ids [EOT]`` zero-padded to 77.

    Args:
        vocab: where the vocabulary is (see :func:`find_vocab`).
    """

    def __init__(self, vocab: str | os.PathLike | None = None):
        self.source = find_vocab(vocab)
        self.encoder, merges = _read_vocab(self.source)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self._cache: dict[str, tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}
        import regex

        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    def bpe(self, token: str) -> tuple[str, ...]:
        """Merge the characters of one word by rank until no known pair is left (the special
        tokens stay whole)."""
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        if len(self._cache) < 100_000:
            self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start and end tokens."""
        ids = []
        for token in self.pattern.findall(_clean(text)):
            chars = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(chars))
        return ids

    def tokenize(self, texts: list[str] | str, context: int = CONTEXT) -> tuple[torch.Tensor, list[str]]:
        """B x ``context`` token ids as ``clip.tokenize(texts, truncate=True)``, and one warning per
        text that did not fit (its tail is cut and the last token is end-of-text)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context, dtype=torch.long)
        warnings = []
        for row, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context:
                warnings.append(f"text truncated to {context} tokens ({len(ids)} with start and end): "
                                f"{text[:60]!r}{'...' if len(text) > 60 else ''}")
                ids = ids[:context - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out, warnings


def find_vocab(vocab: str | os.PathLike | None = None) -> Path:
    """The CLIP vocabulary: ``vocab`` if given, else ``$UAC_CLIP_VOCAB``, else ComfyUI's
    ``comfy/sd1_tokenizer`` folder, else open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    A folder must hold ``vocab.json`` and ``merges.txt`` (Hugging Face layout); a ``.txt.gz`` file
    is OpenAI's merge list, from which the vocabulary is built as OpenAI's tokenizer builds it.
    The packages are located without importing them.
    """
    candidates = [Path(vocab)] if vocab else []
    if not vocab and os.environ.get(VOCAB_ENV):
        candidates.append(Path(os.environ[VOCAB_ENV]))
    if not vocab:
        for package, relative in (("comfy", "sd1_tokenizer"), ("open_clip", "bpe_simple_vocab_16e6.txt.gz")):
            try:
                spec = importlib.util.find_spec(package)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                candidates += [Path(location) / relative for location in spec.submodule_search_locations]
    for path in candidates:
        if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return path
        if path.is_file() and path.name.endswith(".txt.gz"):
            return path
    searched = ", ".join(str(p) for p in candidates) or "nothing"
    raise FileNotFoundError(
        f"CLIP tokenizer vocabulary not found (searched: {searched}). Run inside ComfyUI (its "
        f"comfy/sd1_tokenizer is used), install open_clip_torch, or set {VOCAB_ENV} to a folder with "
        "vocab.json and merges.txt or to bpe_simple_vocab_16e6.txt.gz")


def _read_vocab(source: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if source.is_dir():
        encoder = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
        lines = (source / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#version")]
        return encoder, merges
    lines = gzip.open(source).read().decode("utf-8").split("\n")
    # OpenAI keeps the first 49152 - 256 - 2 merges: 256 bytes, 256 word ends, merges, 2 specials.
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(vocab)}, merges


# --- the text tower -------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.MultiheadAttention``'s packed parameters."""

    def __init__(self, width: int, heads: int, operations=torch_ops):
        super().__init__()
        self.heads = heads
        # Bare parameters in OpenAI's layout (nn.MultiheadAttention's), so they follow the features.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = operations.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight.to(x), self.in_proj_bias.to(x))
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(a, "b h t d -> b t (h d)"))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PreNormBlock(nn.Module):
    """Pre-LayerNorm transformer block (CLIP's ``ResidualAttentionBlock``, GLIDE's text blocks):
    ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, attn: nn.Module, ln_1: nn.Module, mlp: nn.Module, ln_2: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def residual_attention_block(width: int, heads: int, operations=torch_ops) -> PreNormBlock:
    """CLIP's block: causal attention, and an MLP with QuickGELU named ``c_fc`` / ``c_proj``."""
    mlp = nn.Sequential()
    mlp.add_module("c_fc", operations.Linear(width, 4 * width))
    mlp.add_module("gelu", QuickGELU())
    mlp.add_module("c_proj", operations.Linear(4 * width, width))
    return PreNormBlock(CausalSelfAttention(width, heads, operations), operations.LayerNorm(width), mlp,
                        operations.LayerNorm(width))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, operations=torch_ops):
        super().__init__()
        self.resblocks = nn.Sequential(*[residual_attention_block(width, heads, operations) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class ClipTextTower(nn.Module):
    """CLIP's ``encode_text``, with OpenAI's parameter names.

    Args:
        vocab_size (`int`): token embeddings, 49408.
        context (`int`): positions, 77.
        width (`int`): transformer width, 512 for ViT-B/16.
        layers (`int`): transformer blocks, 12.
        heads (`int`): attention heads, 8.
        embed_dim (`int`): size of the projected embedding, 512.
        operations: the layer namespace (``model_loaders.ops``).
    """

    def __init__(self, vocab_size: int, context: int, width: int, layers: int, heads: int, embed_dim: int,
                 operations=torch_ops):
        super().__init__()
        self.token_embedding = operations.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = Transformer(width, layers, heads, operations)
        self.ln_final = operations.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding.to(x)
        x = self.ln_final(self.transformer(x))
        # The end-of-text token has the largest id, so argmax finds it (OpenAI's pooling).
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return pooled @ self.text_projection.to(pooled)


def _text_state(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The text-tower tensors of a CLIP/FaRL state dict, prefix removed, visual tower dropped."""
    anchors = [k for k in sd if k.endswith(ANCHOR) and "visual" not in k]
    if not anchors:
        sample = ", ".join(list(sd)[:6])
        raise ValueError(f"{name}: not a CLIP/FaRL text tower: no {ANCHOR} (first keys: {sample})")
    prefix = min(anchors, key=len)[: -len(ANCHOR)]
    wanted = ("token_embedding.", "positional_embedding", "transformer.resblocks.", "ln_final.", "text_projection")
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix) and key[len(prefix):].startswith(wanted):
            out[key[len(prefix):]] = value
    missing = [k for k in ("positional_embedding", "ln_final.weight", "text_projection") if k not in out]
    if missing:
        raise ValueError(f"{name}: CLIP text tower lacks {', '.join(prefix + k for k in missing)}")
    return out


def build_tower(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None, name: str = "text encoder",
                heads: int | None = None, operations=torch_ops) -> ClipTextTower:
    """The text tower of a CLIP/FaRL state dict (see the module docstring for what is read where;
    ``heads`` overrides the metadata and the ``width // 64`` rule; ``operations``: the layer namespace)."""
    meta = meta or {}
    sd = _text_state(sd, name)
    vocab_size, width = (int(s) for s in sd["token_embedding.weight"].shape)
    context = int(sd["positional_embedding"].shape[0])
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    heads = int(heads or meta.get("heads") or meta.get("transformer_heads") or max(1, width // 64))
    if width % heads:
        raise ValueError(f"{name}: width {width} is not divisible by {heads} heads")
    tower = ClipTextTower(vocab_size, context, width, layers, heads, int(sd["text_projection"].shape[1]), operations)
    try:
        tower.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{name}: CLIP text tower ({layers} layers x {width}, {heads} heads) does not load: "
                         f"{detail[:600]}") from err
    return tower.eval().requires_grad_(False)


class TextEncoder:
    """Prompts to L2-normalised FaRL/CLIP text embeddings.

    Args:
        tower: the text transformer.
        tokenizer: CLIP's tokenizer.
        info: what the loader read (source file, sizes).
    """

    def __init__(self, tower: ClipTextTower, tokenizer: ClipTokenizer, info: dict | None = None):
        self.tower = tower
        self.tokenizer = tokenizer
        self.info = info or {}
        self.last_warnings: list[str] = []

    @property
    def context(self) -> int:
        return int(self.tower.positional_embedding.shape[0])

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.tower.to(device)
        return self

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """B x 77 token ids; truncation warnings are left in ``last_warnings`` for the node."""
        tokens, self.last_warnings = self.tokenizer.tokenize(texts, self.context)
        return tokens

    @torch.no_grad()
    def encode(self, texts: list[str] | str) -> torch.Tensor:
        """B x embed_dim float32 embeddings of unit L2 norm (``encode_text`` / its norm)."""
        param = self.tower.positional_embedding
        tokens = self.tokenize(texts).to(param.device)
        embedding = self.tower(tokens).float()
        return (embedding / embedding.norm(dim=-1, keepdim=True)).cpu()


def load_text_encoder(path: str, vocab: str | os.PathLike | None = None, heads: int | None = None) -> TextEncoder:
    """A :class:`TextEncoder` from a FaRL ``.pth`` or an OpenAI-layout CLIP checkpoint.

    Args:
        path: ``.safetensors`` or ``.pt``/``.pth`` (read with ``weights_only=True``).
        vocab: the tokenizer's vocabulary, when not ComfyUI's (see :func:`find_vocab`).
        heads: attention heads, for a reduced-width file without metadata (shapes cannot tell).
    """
    from . import read_checkpoint

    sd, meta = read_checkpoint(path)
    name = os.path.basename(path)
    tower = build_tower(sd, meta, name, heads)
    tokenizer = ClipTokenizer(vocab)
    vocab_size = int(tower.token_embedding.weight.shape[0])
    if vocab_size != len(tokenizer.encoder):
        raise ValueError(f"{name}: {vocab_size} token embeddings, but the CLIP vocabulary at {tokenizer.source} "
                         f"has {len(tokenizer.encoder)} tokens")
    info = {"path": path, "width": int(tower.positional_embedding.shape[1]), "context": int(tower.positional_embedding.shape[0]),
            "layers": len(tower.transformer.resblocks), "heads": tower.transformer.resblocks[0].attn.heads,
            "embed_dim": int(tower.text_projection.shape[1]), "vocab": str(tokenizer.source)}
    return TextEncoder(tower, tokenizer, info)

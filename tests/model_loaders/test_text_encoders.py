"""FaRL/CLIP text embeddings against the reference (../shared/fixtures/clip_text_small.safetensors).

The fixture is an OpenAI-CLIP-format text tower (the layout FaRL's checkpoint uses) at width 64,
2 layers and 2 heads, projecting to 512, with CLIP's tokenizer output and the L2-normalised
embeddings of the prompts in its metadata.
"""
from __future__ import annotations

import gzip

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unite_and_conquer.model_loaders.text_encoders import ClipTokenizer, load_text_encoder

TOL = 1e-4
SOT, EOT = 49406, 49407

# OpenAI's clip/simple_tokenizer.py encode() of these prompts (without ftfy, which only repairs
# broken unicode): accents, CJK, emoji, html entities, contractions, digits, the end-of-text marker.
REFERENCE_IDS = {
    "Ünïcödé café — naïve façade 日本語 😀": [6522, 77, 35689, 66, 7255, 67, 4166, 15304, 2005, 1097, 35689, 563,
                                        778, 10067, 1928, 39121, 44353, 34002, 508, 7334],
    "This person's wearing eyeglasses; she's 25!!": [589, 2533, 568, 3309, 5034, 6116, 282, 1043, 568, 273, 276, 748],
    "&amp; e-mail@x.com 3.14 <|endoftext|>": [261, 324, 268, 2614, 287, 343, 269, 2464, 274, 269, 272, 275, 49407],
}


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    path = fixtures_dir / "clip_text_small.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


@pytest.fixture(scope="module")
def encoder(fixture, tmp_path_factory):
    """The weights, prefix stripped and metadata (heads) kept, in a file of their own."""
    _, data, meta = fixture
    out = tmp_path_factory.mktemp("clip") / "clip_text_small.safetensors"
    save_file({k[len("model."):]: v for k, v in data.items() if k.startswith("model.")}, str(out), metadata=meta)
    return load_text_encoder(str(out))


def test_the_tokenizer_reproduces_clip_tokenize(fixture, encoder):
    _, data, meta = fixture
    prompts = meta["prompts"].split("\n")
    assert len(prompts) == 3 and prompts[1] == ""
    tokens = encoder.tokenize(prompts)
    assert tokens.dtype == torch.long and torch.equal(tokens, data["input.tokens"])
    assert encoder.last_warnings == []


@pytest.mark.parametrize("prompt", list(REFERENCE_IDS))
def test_the_tokenizer_matches_openai_on_hard_text(encoder, prompt):
    assert encoder.tokenizer.encode(prompt) == REFERENCE_IDS[prompt]
    row = encoder.tokenize([prompt])[0]
    n = len(REFERENCE_IDS[prompt])
    assert row[0] == SOT and row[1: n + 1].tolist() == REFERENCE_IDS[prompt] and row[n + 1] == EOT
    assert not row[n + 2:].any()


def test_the_embeddings_match_the_reference(fixture, encoder):
    _, data, meta = fixture
    embedding = encoder.encode(meta["prompts"].split("\n"))
    assert embedding.dtype == torch.float32 and embedding.shape == (3, 512)
    err = (embedding - data["output.embed_l2"]).abs().max().item()
    assert err < TOL, err
    assert (embedding.norm(dim=-1) - 1).abs().max().item() < 1e-6
    assert encoder.info["width"] == 64 and encoder.info["layers"] == 2 and encoder.info["heads"] == 2


def test_a_farl_style_pth_with_the_visual_tower_loads(fixture, tmp_path):
    """FaRL's .pth: ``{"state_dict": ...}`` with the visual tower alongside; no metadata, so the
    heads are given."""
    _, data, meta = fixture
    state = {k[len("model."):]: v for k, v in data.items() if k.startswith("model.")}
    state["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(12, 4)
    state["visual.proj"] = torch.randn(4, 512)
    path = tmp_path / "FaRL-like.pth"
    torch.save({"state_dict": state}, path)
    embedding = load_text_encoder(str(path), heads=2).encode(meta["prompts"].split("\n"))
    assert (embedding - data["output.embed_l2"]).abs().max().item() < TOL


def test_a_prefixed_checkpoint_loads(fixture):
    """The fixture file itself: tower keys under ``model.``, other tensors beside them."""
    path, data, meta = fixture
    embedding = load_text_encoder(str(path)).encode(meta["prompts"].split("\n"))
    assert (embedding - data["output.embed_l2"]).abs().max().item() < TOL


def test_long_text_is_truncated_with_a_warning(encoder):
    text = "a woman with long wavy red hair " * 20
    tokens = encoder.tokenize([text, "short"])
    ids = encoder.tokenizer.encode(text)
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == SOT and tokens[0, 1:76].tolist() == ids[:75] and tokens[0, 76] == EOT
    assert len(encoder.last_warnings) == 1
    assert encoder.last_warnings[0].startswith(f"text truncated to 77 tokens ({len(ids) + 2} with start and end): "
                                               "'a woman with long wavy red hair a woman")
    encoder.tokenize(["short"])
    assert encoder.last_warnings == []


def test_openai_merge_list_gives_the_same_vocabulary(tmp_path):
    """The ``bpe_simple_vocab_16e6.txt.gz`` route (open_clip, OpenAI) builds the vocabulary that
    ComfyUI's vocab.json spells out."""
    comfy = ClipTokenizer()
    merges = (comfy.source / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges))
    openai = ClipTokenizer(gz)
    assert openai.encoder == comfy.encoder and len(openai.encoder) == 49408
    assert openai.encode(next(iter(REFERENCE_IDS))) == next(iter(REFERENCE_IDS.values()))


def test_missing_vocabulary_and_wrong_files_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^CLIP tokenizer vocabulary not found \(searched: .*nowhere\)"):
        ClipTokenizer(tmp_path / "nowhere")
    path = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError, match=r"^unet\.safetensors: not a CLIP/FaRL text tower: no token_embedding\.weight"):
        load_text_encoder(str(path))

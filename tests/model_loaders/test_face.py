"""The Unite-and-Conquer face experts against outputs of the reference code (../shared/fixtures).

The fixtures are the released layouts at reduced width (32 channels, 1 res block, 256 px), with
random fp16 weights and fp32 reference outputs. The weights are written, prefix stripped and
metadata kept, to a temporary safetensors file and loaded through ``model_loaders.load_expert``.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders import face
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for

TOL = 1e-4          # parity with the reference, fp32
SAME = 1e-5         # one sample alone versus inside a batch


def _write_weights(fixtures_dir, name: str, tmp_path_factory):
    path = fixtures_dir / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    data = load_file(str(path))
    weights = {k[len("model."):]: v for k, v in data.items() if k.startswith("model.")}
    out = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
    save_file(weights, str(out), metadata=meta)
    return out, data, weights, meta


@pytest.fixture(scope="module")
def latest(fixtures_dir, tmp_path_factory):
    path, data, weights, meta = _write_weights(fixtures_dir, "face_latest_small", tmp_path_factory)
    return model_loaders.load_expert(str(path), family="auto"), data, weights, meta


@pytest.fixture(scope="module")
def sketch(fixtures_dir, tmp_path_factory):
    path, data, weights, meta = _write_weights(fixtures_dir, "face_sketch_small", tmp_path_factory)
    return model_loaders.load_expert(str(path), family="auto"), data, weights, meta


@pytest.fixture(scope="module")
def mixed_batch(latest):
    """One forward of a batch of 4 that mixes text and zero embeddings: both fixture samples with
    their embeddings, then both with zero embeddings (the reference would FiLM all four)."""
    expert, data, _, _ = latest
    x, t, embed = data["input.x"], data["input.t"].float(), data["input.embed"]
    z, slots = x[:, :3], x[:, 3:]
    with torch.no_grad():
        out = expert.network(torch.cat([z, z]), torch.cat([t, t]), slots=torch.cat([slots, slots]),
                             embed=torch.cat([embed, torch.zeros_like(embed)]))
    return out


def _alone(expert, data, i: int, embed: torch.Tensor) -> torch.Tensor:
    x, t = data["input.x"][i: i + 1], data["input.t"][i: i + 1].float()
    with torch.no_grad():
        return expert.network(x[:, :3], t, slots=x[:, 3:], embed=embed[None])[0]


# --- masks + text ---------------------------------------------------------------------------------

def test_latest_is_detected_and_declared(latest):
    expert, _, weights, meta = latest
    assert expert.family == "face" and expert.name == "Face-256 (masks+text)"
    assert expert.resolution == 256 and expert.prediction == "eps_learned_sigma"
    assert torch.equal(expert.alphas_cumprod, alphas_cumprod_for("linear", 1000))
    assert expert.modalities == ["segmentation", "text"]
    config = expert.info["config"]
    assert (config["kind"], config["model_channels"], config["num_res_blocks"]) == ("latest", 32, 1)
    assert config["channel_mult"] == (1, 1, 2, 2, 4, 4) and config["attention_ds"] == (8, 16, 32)
    assert (config["slot_channels"], config["embed_dim"], config["num_head_channels"]) == (6, 512, 16)
    assert expert.info["slots"] == {"A": "skin/face", "B": "hair"}
    # Original key names: the network's state dict is the checkpoint's.
    assert set(expert.network.state_dict()) == set(weights)
    assert face.detect(weights, meta, "face")


def test_latest_matches_the_reference_with_text(latest, mixed_batch):
    _, data, _, _ = latest
    err = (mixed_batch[:2] - data["output.with_embed"]).abs().max().item()
    assert err < TOL, err


def test_latest_matches_the_reference_with_zero_embeddings(latest, mixed_batch):
    """Zero embeddings skip the text FiLM (the reference does so for a batch without text)."""
    _, data, _, _ = latest
    err = (mixed_batch[2:] - data["output.null_embed"]).abs().max().item()
    assert err < TOL, err


def test_text_film_is_per_sample(latest, mixed_batch):
    """Inside a batch that mixes text and zero embeddings, each sample gets its output alone."""
    expert, data, _, _ = latest
    with_text = _alone(expert, data, 1, data["input.embed"][1])
    without = _alone(expert, data, 0, torch.zeros(512))
    assert (mixed_batch[1] - with_text).abs().max().item() < SAME
    assert (mixed_batch[2] - without).abs().max().item() < SAME
    # Alone, a zero embedding is the reference's all-zero batch.
    assert (without - data["output.null_embed"][0]).abs().max().item() < TOL


def test_film_zero_embedding_applies_the_film_of_a_zero_input(latest):
    """The reference's in-batch behaviour for zero embeddings, made per sample: the FiLM of
    ``cond_emb_layers(0)``, which a tiny non-zero embedding approaches."""
    expert, data, _, _ = latest
    tiny = torch.zeros(512)
    tiny[0] = 1e-7
    default = _alone(expert, data, 0, tiny)
    expert.network.config.film_zero_embedding = True
    try:
        zero = _alone(expert, data, 0, torch.zeros(512))
    finally:
        expert.network.config.film_zero_embedding = False
    assert (zero - default).abs().max().item() < TOL
    assert (zero - data["output.null_embed"][0]).abs().max().item() > 1e-2


def test_missing_conditions_are_the_null(latest):
    """``network(z, t)`` without conditions equals the null condition (zero slots, zero embedding)."""
    expert, data, _, _ = latest
    z, t = data["input.x"][:1, :3], data["input.t"][:1].float()
    null = expert.null_condition
    assert set(null) == {"slots", "embed"}
    assert null["slots"].shape == (1, 6, 256, 256) and null["embed"].shape == (1, 512)
    assert not null["slots"].any() and not null["embed"].any()
    with torch.no_grad():
        assert torch.equal(expert.network(z, t), expert.network(z, t, **null))


def test_segmentation_fills_one_slot_with_the_scaled_map(latest):
    expert, _, _, _ = latest
    seg = torch.rand(2, 1, 256, 256)
    for slot, filled, empty in (("A", slice(0, 3), slice(3, 6)), ("B", slice(3, 6), slice(0, 3))):
        cond = expert.encode("segmentation", seg, slot=slot)
        assert cond["slots"].shape == (2, 6, 256, 256) and cond["embed"].shape == (2, 512)
        assert torch.equal(cond["slots"][:, filled], (2 * seg - 1).expand(2, 3, 256, 256))
        assert not cond["slots"][:, empty].any() and not cond["embed"].any()
    small = expert.encode("segmentation", torch.ones(1, 1, 64, 64), slot="A")["slots"]
    assert small.shape == (1, 6, 256, 256) and torch.equal(small[:, :3], torch.ones(1, 3, 256, 256))


def test_segmentation_refuses_bad_slots_and_maps(latest):
    expert, _, _, _ = latest
    with pytest.raises(ValueError, match=r"^Face-256 \(masks\+text\): slot must be one of \('A', 'B'\) "
                                         r"\(A: skin/face, B: hair\), got 'hair'$"):
        expert.encode("segmentation", torch.zeros(1, 1, 256, 256), slot="hair")
    with pytest.raises(ValueError, match=r"segmentation map must lie in \[0, 1\], got \[-1, -1\]"):
        expert.encode("segmentation", -torch.ones(1, 1, 256, 256), slot="A")
    with pytest.raises(ValueError, match=r"segmentation map must be a B x 1 x H x W tensor, got \(1, 3, 256, 256\)"):
        expert.encode("segmentation", torch.zeros(1, 3, 256, 256), slot="A")


def test_text_takes_an_embedding(latest):
    expert, _, _, _ = latest
    embedding = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    cond = expert.encode("text", embedding)
    assert torch.equal(cond["embed"], embedding)
    assert cond["slots"].shape == (1, 6, 256, 256) and not cond["slots"].any()
    with pytest.raises(ValueError, match=r"takes a FaRL text embedding \(B x 512\), not a string"):
        expert.encode("text", "a smiling woman")
    with pytest.raises(ValueError, match=r"the text embedding must be B x 512, got \(512,\)"):
        expert.encode("text", torch.zeros(512))


# --- sketch ---------------------------------------------------------------------------------------

def test_sketch_is_detected_and_declared(sketch):
    expert, _, weights, _ = sketch
    assert expert.family == "face" and expert.name == "Face-256 sketch"
    assert expert.prediction == "eps_learned_sigma" and expert.resolution == 256
    assert torch.equal(expert.alphas_cumprod, alphas_cumprod_for("linear", 1000))
    assert expert.modalities == ["sketch"] and expert.null_condition is None
    assert set(expert.network.state_dict()) == set(weights)


def test_sketch_matches_the_reference(sketch):
    expert, data, _, _ = sketch
    x, t = data["input.x"], data["input.t"].float()
    with torch.no_grad():
        out = expert.network(x[:, :3], t, sketch=x[:, 3:])
    err = (out - data["output"]).abs().max().item()
    assert err < TOL, err


def test_sketch_needs_a_sketch_at_its_size(sketch):
    expert, data, _, _ = sketch
    with pytest.raises(ValueError, match="the face sketch expert needs a sketch"):
        expert.network(data["input.x"][:1, :3], data["input.t"][:1].float())
    with pytest.raises(ValueError, match=r"^Face-256 sketch: the sketch must be 256 x 256, got 128 x 128; "):
        expert.encode("sketch", torch.zeros(1, 3, 128, 128))
    edges = torch.where(torch.rand(2, 1, 256, 256) > 0.9, 1.0, -1.0).expand(2, 3, 256, 256)
    assert torch.equal(expert.encode("sketch", edges)["sketch"], edges)
    with pytest.raises(ValueError, match=r"^Face-256 sketch: the sketch must lie in \[-1, 1\], got \[0, 2\]$"):
        expert.encode("sketch", edges + 1)


# --- detection ------------------------------------------------------------------------------------

def test_detection_tells_the_sketch_model_from_adm_and_glide_upsamplers(sketch):
    _, _, weights, _ = sketch
    assert face.detect(weights, {}, "face")
    # guided-diffusion's released 64->256 and 128->512 upsamplers are class-conditional.
    adm_upsampler = {**weights, "label_emb.weight": torch.zeros(1000, 128)}
    assert not face.detect(adm_upsampler, {}, "face")
    glide_upsampler = {**weights, "token_embedding.weight": torch.zeros(10, 8)}
    assert not face.detect(glide_upsampler, {}, "face")
    adm_base = {**weights, "input_blocks.0.0.weight": torch.zeros(32, 3, 3, 3)}
    assert not face.detect(adm_base, {}, "face")
    # Metadata decides when present.
    assert not face.detect(weights, {"uac_family": "adm"}, "face")
    assert face.detect(adm_base, {"family": "face"}, "face")


def test_forcing_face_on_an_adm_upsampler_is_refused(sketch, tmp_path):
    _, _, weights, _ = sketch
    path = tmp_path / "upsampler.safetensors"
    save_file({**weights, "label_emb.weight": torch.zeros(1000, 128, dtype=torch.float16)}, str(path))
    with pytest.raises(ValueError, match=r"^upsampler\.safetensors: this file is not a 'face' checkpoint"):
        model_loaders.load_expert(str(path), family="face")


def test_a_mismatched_checkpoint_names_the_architecture(latest):
    _, _, weights, meta = latest
    broken = {**weights, "out.2.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"^face checkpoint does not match the inferred architecture "
                                         r"\(Face-256 \(masks\+text\): 32 channels .*out\.2\.bias"):
        face.build(broken, meta, "face")

"""GLIDE experts: parity with the reference code's outputs (``../shared/fixtures``), config
inference, detection, conditions, the inpaint variants' channel order, and reduced precision."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders import glide, glide_tokenizer
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for

TOL = 1e-4
CORGI = "a corgi wearing a red hat"


def read_fixture(fixtures_dir, name: str):
    path = fixtures_dir / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open cannot be iterated)
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    return sd, meta, inputs, tensors["output"]


def write_checkpoint(path, sd, meta=None) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    else:
        torch.save(sd, str(path))
    return str(path)


def run(expert, inputs) -> torch.Tensor:
    inputs = dict(inputs)
    x, t = inputs.pop("x"), inputs.pop("t")
    with torch.no_grad():
        return expert(x, t, **inputs)


@pytest.fixture(scope="module")
def base(fixtures_dir):
    return read_fixture(fixtures_dir, "glide_base_small.safetensors")


@pytest.fixture(scope="module")
def upsample(fixtures_dir):
    return read_fixture(fixtures_dir, "glide_upsample_small.safetensors")


@pytest.fixture(scope="module")
def base_file(base, tmp_path_factory):
    sd, meta, _, _ = base
    return write_checkpoint(tmp_path_factory.mktemp("glide") / "base.safetensors", sd, meta)


@pytest.fixture(scope="module")
def upsample_file(upsample, tmp_path_factory):
    sd, meta, _, _ = upsample
    return write_checkpoint(tmp_path_factory.mktemp("glide") / "upsample.safetensors", sd, meta)


@pytest.fixture(scope="module")
def base_expert(base_file):
    return model_loaders.load_expert(base_file, family="auto")


@pytest.fixture(scope="module")
def upsample_expert(upsample_file):
    return model_loaders.load_expert(upsample_file, family="auto")


def small_input(seed: int, size: int = 16, batch: int = 1):
    """A cheap input: the networks are fully convolutional, so parity is checked once at full size
    and everything else runs at a few pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.tensor([417.0] * batch)


# --- parity with the reference ------------------------------------------------------------------

def test_base_matches_reference_output(base, base_expert):
    _, _, inputs, reference = base
    out = run(base_expert, inputs)
    assert out.shape == reference.shape == (2, 6, 64, 64)
    assert (out - reference).abs().max().item() < TOL


def test_upsample_matches_reference_output(upsample, upsample_expert):
    _, _, inputs, reference = upsample
    out = run(upsample_expert, inputs)
    assert out.shape == reference.shape == (1, 6, 256, 256)
    assert (out - reference).abs().max().item() < TOL


@pytest.mark.parametrize("which", ["base", "upsample"])
def test_schedule_matches_reference(which, request):
    _, meta, _, _ = request.getfixturevalue(which)
    ac = request.getfixturevalue(f"{which}_expert").alphas_cumprod
    first, last = (float(v) for v in meta["betas_first_last"].split(","))
    assert ac.shape == (int(meta["diffusion_steps"]),)
    assert ac[500].item() == pytest.approx(float(meta["alphas_cumprod_500"]), rel=1e-8)
    assert (1 - ac[0]).item() == pytest.approx(first, rel=1e-8)
    assert (1 - ac[-1] / ac[-2]).item() == pytest.approx(last, rel=1e-8)


def test_schedule_argument_overrides(base_file):
    expert = model_loaders.load_expert(base_file, schedule="linear")
    assert expert.info["schedule"] == "linear"
    assert torch.equal(expert.alphas_cumprod, alphas_cumprod_for("linear"))


# --- config inference ---------------------------------------------------------------------------

def test_config_read_from_fixtures(base, upsample):
    cfg = glide.infer_config(base[0], base[1])
    assert (cfg.image_size, cfg.super_res, cfg.inpaint) == (64, False, False)
    assert (cfg.model_channels, cfg.out_channels) == (32, 6)
    assert (cfg.num_res_blocks, cfg.channel_mult, cfg.attention_ds) == (1, (1, 2, 3, 4), (2, 4, 8))
    assert (cfg.num_head_channels, cfg.use_scale_shift_norm, cfg.resblock_updown) == (16, True, True)
    assert (cfg.text_ctx, cfg.xf_width, cfg.xf_layers, cfg.xf_heads) == (128, 32, 2, 2)
    assert cfg.xf_final_ln and cfg.xf_padding and cfg.n_vocab == 50257
    cfg = glide.infer_config(upsample[0], upsample[1])
    assert (cfg.image_size, cfg.super_res, cfg.inpaint, cfg.in_channels) == (256, True, False, 6)
    assert (cfg.channel_mult, cfg.attention_ds) == ((1, 1, 2, 2, 4, 4), (8, 16, 32))
    assert glide.schedule_for(cfg, {}) == "linear" and glide.schedule_for(cfg, upsample[1]) == "linear"
    assert glide.schedule_for(glide.infer_config(base[0], base[1]), {}) == "cosine"


PUBLISHED = {"model_channels": 192, "out_channels": 6, "num_head_channels": 64, "num_heads": 1,
             "num_heads_upsample": -1, "use_scale_shift_norm": True, "resblock_updown": True, "text_ctx": 128,
             "xf_width": 512, "xf_layers": 16, "xf_heads": 8, "xf_final_ln": True, "xf_padding": True}


@pytest.mark.parametrize("super_res,inpaint,name", [
    (False, False, "GLIDE-base-64"), (True, False, "GLIDE-upsample-256"),
    (False, True, "GLIDE-inpaint-64"), (True, True, "GLIDE-upsample-inpaint-256")])
def test_published_layouts_are_inferred_without_metadata(super_res, inpaint, name):
    """GLIDE's four published configs (model_creation.py defaults) round-trip through the shapes alone."""
    size = 256 if super_res else 64
    config = glide.GlideConfig(image_size=size, super_res=super_res, inpaint=inpaint,
                               num_res_blocks=2 if super_res else 3,
                               channel_mult=(1, 1, 2, 2, 4, 4) if super_res else (1, 2, 3, 4),
                               attention_ds=tuple(size // r for r in (32, 16, 8)), **PUBLISHED)
    with torch.device("meta"):
        sd = glide.GlideUNet(config).state_dict()
    assert sd["input_blocks.0.0.weight"].shape == (192, {(0, 0): 3, (1, 0): 6, (0, 1): 7, (1, 1): 10}[
        (super_res, inpaint)], 3, 3)
    assert glide.infer_config(sd, {}) == config
    assert glide.expert_name(config) == name
    assert glide.schedule_for(config, {}) == ("linear" if super_res else "cosine")
    assert glide.detect(sd, {}, "glide") and glide.detect(sd, {}, "glide_upsample") == super_res


def test_inpaint_layout_matches_the_reference_keys(base):
    """An inpaint network has exactly the base network's keys; only the first conv takes 7 channels."""
    sd, meta = base[0], base[1]
    config = dataclasses.replace(glide.infer_config(sd, meta), inpaint=True)
    with torch.device("meta"):
        inpaint_sd = glide.GlideUNet(config).state_dict()
    assert inpaint_sd.keys() == sd.keys()
    changed = {k for k in sd if inpaint_sd[k].shape != sd[k].shape}
    assert changed == {"input_blocks.0.0.weight"}
    assert inpaint_sd["input_blocks.0.0.weight"].shape == (32, 7, 3, 3)


def test_mismatched_metadata_is_explained(base):
    sd, meta = base[0], base[1]
    with pytest.raises(ValueError, match=r"metadata says super_res=True but the first convolution takes 3 input "
                                         r"channels, which means super_res=False"):
        glide.infer_config(sd, {**meta, "super_res": "True"})
    with pytest.raises(ValueError, match=r"attention width 96 is not divisible by num_head_channels 64"):
        glide.build(sd, {**meta, "num_head_channels": "64"}, "glide")
    with pytest.raises(ValueError, match=r"xf_width 32 is not divisible by xf_heads 3"):
        glide.infer_config(sd, {**meta, "xf_heads": "3"})
    broken = {k: v for k, v in sd.items() if k != "middle_block.1.proj_out.bias"}
    with pytest.raises(ValueError, match=r"does not match the inferred architecture .*middle_block.1.proj_out.bias"):
        glide.build(broken, meta, "glide")


def test_pt_file_uses_glide_defaults(tmp_path):
    """Without metadata, heads come from GLIDE's defaults: 64-channel heads, xf_width // 64 text heads."""
    config = glide.GlideConfig(image_size=64, super_res=False, inpaint=False, model_channels=64, out_channels=6,
                               num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,), num_head_channels=64,
                               num_heads=1, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
                               text_ctx=16, xf_width=64, xf_layers=1, xf_heads=1, xf_final_ln=True, xf_padding=True)
    torch.manual_seed(0)
    sd = glide.GlideUNet(config).state_dict()
    pt = model_loaders.load_expert(write_checkpoint(tmp_path / "m.pt", sd))
    assert pt.info["config"] == dataclasses.asdict(config) and pt.info["xf_heads_from"] == "xf_width // 64"
    assert pt.resolution == 64 and pt.info["schedule"] == "cosine"
    x, t = small_input(0, size=8)
    tokens, mask, _ = glide_tokenizer.tokenize(CORGI, 16)
    with torch.no_grad():
        out = pt(x, t, tokens=tokens, mask=mask)
        # The network honours its heads: two text heads or 32-channel image heads give other outputs.
        for other in (dataclasses.replace(config, xf_heads=2), dataclasses.replace(config, num_head_channels=32)):
            assert (glide.build_network(sd, other)(x, t, tokens=tokens, mask=mask) - out).abs().max() > 1e-4


# --- detection ----------------------------------------------------------------------------------

def test_detection(base, upsample, base_file, upsample_file, fixtures_dir):
    assert model_loaders.detect_family(base[0], base[1]) == "glide"
    assert glide.detect(upsample[0], upsample[1], "glide_upsample")
    assert not glide.detect(base[0], base[1], "glide_upsample")
    expert = model_loaders.load_expert(upsample_file, family="glide_upsample")
    assert (expert.name, expert.family, expert.resolution) == ("GLIDE-upsample-256", "glide_upsample", 256)
    with pytest.raises(ValueError, match=r"base.safetensors: this file is not a 'glide_upsample' checkpoint"):
        model_loaders.load_expert(base_file, family="glide_upsample")

    # A guided-diffusion (ADM) UNet has GLIDE's trunk without the text transformer.
    text_keys = ("token_embedding", "positional_embedding", "padding_embedding", "transformer", "final_ln")
    adm = {k: v for k, v in base[0].items() if not k.startswith(text_keys) and ".encoder_kv." not in k}
    adm["label_emb.weight"] = torch.zeros(1000, 128)
    assert not glide.detect(adm, {}, "glide") and not glide.detect(adm, {}, "glide_upsample")
    # The face experts and a CLIP text tower (which has token and positional embeddings) are not GLIDE.
    for name in ("face_latest_small.safetensors", "face_sketch_small.safetensors", "clip_text_small.safetensors"):
        if (fixtures_dir / name).is_file():
            with safe_open(str(fixtures_dir / name), framework="pt") as f:
                sd = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}  # noqa: SIM118
            assert not glide.detect(sd, {}, "glide") and not glide.detect(sd, {}, "glide_upsample"), name


# --- conditions ---------------------------------------------------------------------------------

def test_base_expert_fields_and_conditions(base, base_expert):
    """The encoded prompt and null are exactly the fixture's inputs, so parity carries over to them."""
    _, _, inputs, _ = base
    e = base_expert
    assert (e.name, e.family, e.resolution, e.prediction) == ("GLIDE-base-64", "glide", 64, "eps_learned_sigma")
    assert e.modalities == ["text"]
    cond = e.encode("text", CORGI)
    assert cond.keys() == {"tokens", "mask"}
    # The fixture's first row is this prompt, its second row GLIDE's unconditional (empty) prompt.
    assert torch.equal(cond["tokens"], inputs["tokens"][:1]) and torch.equal(cond["mask"], inputs["mask"][:1].bool())
    null = e.null_of(cond)
    assert torch.equal(null["tokens"], inputs["tokens"][1:]) and torch.equal(null["mask"], inputs["mask"][1:].bool())
    assert torch.equal(e.null_condition["tokens"], null["tokens"])
    assert torch.equal(e.null_condition["mask"], null["mask"])
    assert e.warning("text", CORGI) is None
    assert e.warning("text", "word " * 200) == ("prompt is 201 tokens long; GLIDE reads only the first 128, the "
                                                "last 73 were dropped")
    _, mask, warning = glide.tokenize_with_warning("word " * 200, 128)
    assert mask.all() and warning.startswith("prompt is 201 tokens long")


def test_upsample_expert_conditions(upsample, upsample_expert):
    e = upsample_expert
    assert e.modalities == ["image", "text"] and e.null_condition is None
    with pytest.raises(ValueError, match=r"GLIDE-upsample-256 is an upsampler: it needs a low-resolution image\. "
                                         r"Bind it with PoEBindImage"):
        e.encode("text", CORGI)
    ramp = torch.linspace(-0.9, 0.9, 128)
    big = torch.stack([ramp.expand(3, 128, 128), -ramp.expand(3, 128, 128)])
    cond = e.encode("image", big, text=CORGI)
    assert cond.keys() == {"low_res", "tokens", "mask"}
    assert cond["low_res"].shape == (2, 3, 64, 64)  # image_size / 4, resized with antialiasing
    steps = (cond["low_res"] + 1) * 127.5
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # rounded to 8 bits, as GLIDE's sampler does
    half = F.avg_pool2d(big, 2)
    assert (cond["low_res"] - half)[..., 2:-2].abs().max() < 0.01
    assert int(cond["mask"].sum()) == 7
    null = e.null_of(cond)
    assert null["low_res"] is cond["low_res"] and not null["mask"].any()
    assert (null["tokens"] == 50256).all()
    with pytest.raises(ValueError, match=r"the low-resolution image must lie in \[-1, 1\], got \[0, 255\]"):
        e.encode("image", torch.full((1, 3, 64, 64), 255.0).index_fill_(1, torch.tensor([0]), 0.0))
    # The expert runs on its own condition (low_res is resized inside the network to x's size).
    x, t = small_input(6, size=64)
    _, _, inputs, _ = upsample
    eps = e.eps(x, t, e.encode("image", inputs["low_res"].clamp(-1, 1), text=CORGI))
    assert eps.shape == (1, 3, 64, 64) and torch.isfinite(eps).all()


# --- inpaint variants ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inpaint_file(base, tmp_path_factory):
    """The base fixture with a 7-channel first conv, as GLIDE's base_inpaint.pt is shaped."""
    sd, meta, _, _ = base
    torch.manual_seed(2)
    w = sd["input_blocks.0.0.weight"]
    sd = {**sd, "input_blocks.0.0.weight": torch.cat([w, torch.randn(32, 4, 3, 3).to(w) * 0.1], dim=1)}
    return write_checkpoint(tmp_path_factory.mktemp("glide") / "base_inpaint.safetensors", sd,
                            {**meta, "inpaint": "True"})


def test_base_inpaint_loads_and_reduces_to_base_without_a_mask(base, inpaint_file):
    _, _, inputs, reference = base
    e = model_loaders.load_expert(inpaint_file)
    assert (e.name, e.family, e.resolution, e.modalities) == ("GLIDE-inpaint-64", "glide", 64, ["inpaint", "text"])
    text = e.encode("text", CORGI)
    assert text.keys() == {"tokens", "mask", "inpaint_image", "inpaint_mask"}
    assert not text["inpaint_mask"].any() and text["inpaint_image"].shape == (1, 3, 64, 64)
    # An all-zero mask feeds zeros to the extra channels: exactly the base network's output.
    row = {k: v[:1] for k, v in inputs.items()}
    assert (run(e, row) - reference[:1]).abs().max().item() < TOL
    torch.manual_seed(3)
    image = torch.rand(1, 3, 128, 128) * 2 - 1
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., :, :64] = 1
    cond = e.encode("inpaint", image, mask, text=CORGI)
    assert cond["inpaint_image"].shape == (1, 3, 64, 64) and cond["inpaint_mask"].shape == (1, 1, 64, 64)
    assert cond["inpaint_mask"][..., :32].all() and not cond["inpaint_mask"][..., 32:].any()
    null = e.null_of(cond)
    assert null["inpaint_image"] is cond["inpaint_image"] and not null["mask"].any()
    assert e.null_condition.keys() == cond.keys()


def small_config(**kw) -> glide.GlideConfig:
    options = {"image_size": 32, "super_res": True, "inpaint": True, "model_channels": 32, "out_channels": 6,
               "num_res_blocks": 1, "channel_mult": (1, 1), "attention_ds": (2,), "num_head_channels": 32,
               "num_heads": 1, "num_heads_upsample": -1, "use_scale_shift_norm": True, "resblock_updown": True,
               "text_ctx": 8, "xf_width": 32, "xf_layers": 1, "xf_heads": 1, "xf_final_ln": True, "xf_padding": True}
    return glide.GlideConfig(**{**options, **kw})


def test_input_channel_order_matches_glide():
    """GLIDE concatenates [x, inpaint_image * inpaint_mask, inpaint_mask, bilinear(low_res)]
    (SuperResInpaintText2ImUnet), [x, image * mask, mask] (InpaintText2ImUNet), [x, bilinear(low_res)]."""
    torch.manual_seed(4)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 900.0])
    image, low_res = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    up = F.interpolate(low_res, (32, 32), mode="bilinear", align_corners=False)
    expected = {(True, True): torch.cat([x, image * mask, mask, up], 1),
                (False, True): torch.cat([x, image * mask, mask], 1),
                (True, False): torch.cat([x, up], 1),
                (False, False): x}
    tokens, tmask, _ = glide_tokenizer.tokenize(CORGI, 8)
    for (super_res, inpaint), want in expected.items():
        net = glide.GlideUNet(small_config(super_res=super_res, inpaint=inpaint))
        seen = []
        net.input_blocks[0][0].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        kwargs = {"tokens": tokens.expand(2, -1), "mask": tmask.expand(2, -1)}
        if super_res:
            kwargs["low_res"] = low_res
        if inpaint:
            kwargs.update(inpaint_image=image, inpaint_mask=mask)
        with torch.no_grad():
            assert net(x, t, **kwargs).shape == (2, 6, 32, 32)
        assert torch.equal(seen[0], want), (super_res, inpaint)


def test_mixed_precision_file_gets_one_dtype():
    """GLIDE's convert_to_fp16 leaves time_embed and the norms in fp32: the network is unified."""
    torch.manual_seed(9)
    sd = glide.GlideUNet(small_config(super_res=False, inpaint=False)).state_dict()
    mixed = {k: v if k.startswith("time_embed") or "norm" in k else v.half() for k, v in sd.items()}
    net = glide.build_network(mixed, glide.infer_config(mixed, {"num_head_channels": "32", "xf_heads": "1"}))
    assert {p.dtype for p in net.parameters()} == {torch.float16}
    x, t = small_input(9, size=8)
    assert torch.isfinite(net(x, t)).all()


def test_missing_tokens_mean_the_empty_prompt():
    torch.manual_seed(8)
    net = glide.GlideUNet(small_config(super_res=False, inpaint=False))
    x, t = small_input(8, size=8, batch=2)
    tokens, mask = glide_tokenizer.empty_tokens(8)
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, tokens=tokens.expand(2, -1), mask=mask.expand(2, -1)))
    with pytest.raises(ValueError, match=r"GLIDE needs the token 'mask' with its 'tokens'"):
        net(x, t, tokens=tokens.expand(2, -1))
    with pytest.raises(ValueError, match=r"this GLIDE upsampler needs 'low_res'"):
        glide.GlideUNet(small_config(inpaint=False))(x, t)


def test_upsample_inpaint_file_loads(tmp_path):
    torch.manual_seed(5)
    config = small_config()
    sd = glide.GlideUNet(config).state_dict()
    path = write_checkpoint(tmp_path / "upsample_inpaint.safetensors", sd,
                            {"image_size": "32", "num_head_channels": "32"})
    e = model_loaders.load_expert(path)
    assert (e.name, e.family) == ("GLIDE-upsample-inpaint-32", "glide_upsample")
    assert e.modalities == ["image", "inpaint", "text"]
    assert e.info["config"] == dataclasses.asdict(dataclasses.replace(config, xf_heads=1))
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, torch.ones(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"inpaints while upsampling: pass 'low_res'"):
        e.encode("inpaint", image, mask, text=CORGI)
    cond = e.encode("inpaint", image, mask, text=CORGI, low_res=torch.zeros(1, 3, 16, 16))
    assert cond["low_res"].shape == (1, 3, 8, 8)
    plain = e.encode("image", torch.zeros(1, 3, 8, 8))
    assert plain.keys() == cond.keys() and not plain["inpaint_mask"].any()
    assert e.eps(torch.randn(1, 3, 32, 32), torch.tensor([5.0]), cond).shape == (1, 3, 32, 32)


# --- reduced precision --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,torch_dtype,tol", [("fp16", torch.float16, 0.02), ("bf16", torch.bfloat16, 0.1)])
def test_reduced_precision_load_runs(base, base_file, base_expert, dtype, torch_dtype, tol):
    _, _, inputs, _ = base
    e = model_loaders.load_expert(base_file, dtype=dtype)
    assert {p.dtype for p in e.network.parameters()} == {torch_dtype}
    cond = {"tokens": inputs["tokens"][:1], "mask": inputs["mask"][:1].bool()}
    x, t = small_input(7)
    eps = e.eps(x, t, cond)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    reference = base_expert.eps(x, t, cond)
    assert (eps - reference).abs().max().item() < tol * reference.abs().max().item()

"""ADM (guided-diffusion) loader: parity with guided-diffusion-sdk's UNetModel / SuperResModel.

Each released configuration is rebuilt at reduced width (and reduced resolution, keeping its
channel_mult, residual-block count, attention levels, head rule, qkv order, class conditioning and
upsampler input), given random non-zero weights everywhere (the zero-initialised output layers
included), saved, loaded through ``model_loaders.load_expert`` and compared in fp32. The reduced
structures match no published shapes, so the facts the table would give come from safetensors
metadata; for ``.pt`` files the reduced structures are registered in ``adm.PUBLISHED``, which also
exercises recognition by shapes. The real published shapes are checked on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from unite_and_conquer import model_loaders
from unite_and_conquer.model_loaders import adm
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from support import small_models
from support.small_models import one_thread  # noqa: F401  (autouse)

gd_unet = pytest.importorskip("guided_diffusion.unet")
gd_script = pytest.importorskip("guided_diffusion.script_util")

TOL = 1e-4


@dataclass(frozen=True)
class Case:
    """A reduced copy of a released model: same structure and flags, smaller width and size."""

    name: str            # the published model it stands for
    expected_name: str   # the expert name the reduced copy gets (resolution and small size differ)
    resolution: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple
    attention_ds: tuple
    num_classes: int | None
    order: str
    schedule: str
    num_heads: int = 1
    num_head_channels: int = -1
    small_size: int | None = None

    def reference(self) -> torch.nn.Module:
        kwargs = dict(image_size=self.resolution, in_channels=3, model_channels=self.model_channels,
                      out_channels=6, num_res_blocks=self.num_res_blocks, attention_resolutions=self.attention_ds,
                      channel_mult=self.channel_mult, num_classes=self.num_classes, num_heads=self.num_heads,
                      num_head_channels=self.num_head_channels, use_scale_shift_norm=True, resblock_updown=True,
                      use_new_attention_order=self.order == "new")
        cls = gd_unet.SuperResModel if self.small_size else gd_unet.UNetModel
        return cls(**kwargs).eval()

    def metadata(self) -> dict[str, str]:
        meta = {"resolution": str(self.resolution), "attention_order": self.order, "schedule": self.schedule}
        if self.num_head_channels != -1:
            meta["num_head_channels"] = str(self.num_head_channels)
        else:
            meta["num_heads"] = str(self.num_heads)
        if self.small_size:
            meta["small_size"] = str(self.small_size)
        return meta

    def published(self) -> adm.Published:
        return adm.Published(self.expected_name, f"reduced {self.name}", self.resolution, self.order, self.schedule,
                             num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                             small_size=self.small_size)

    def structure_key(self) -> tuple:
        return adm._structure_key(self.model_channels, self.num_res_blocks, self.channel_mult, self.attention_ds,
                                  6 if self.small_size else 3, self.num_classes)


# Resolutions leave a 1x1 or 2x2 bottom level (CPU time); head widths shrink with the width (64 -> 32
# channels per head).
CASES = [
    Case("64x64_diffusion", "ADM-16", 16, 32, 3, (1, 2, 3, 4), (2, 4, 8), 1000, "new", "cosine",
         num_head_channels=32),
    Case("128x128_diffusion", "ADM-16", 16, 32, 2, (1, 1, 2, 3, 4), (4, 8, 16), 1000, "legacy", "linear",
         num_heads=4),
    Case("256x256_diffusion", "ADM-32", 32, 32, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 1000, "legacy", "linear",
         num_head_channels=32),
    Case("256x256_diffusion_uncond", "ADM-32-uncond", 32, 32, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), None, "legacy",
         "linear", num_head_channels=32),
    Case("512x512_diffusion", "ADM-64", 64, 64, 2, (0.5, 1, 1, 2, 2, 4, 4), (16, 32, 64), 1000, "legacy", "linear",
         num_head_channels=32),
    Case("lsun_bedroom (LSUN, unconditional)", "ADM-32-uncond", 32, 32, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), None,
         "legacy", "linear", num_head_channels=64),
    Case("64_256_upsampler", "ADM-8→32", 32, 32, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 1000, "legacy", "linear",
         num_heads=4, small_size=8),
    Case("128_512_upsampler", "ADM-8→32", 32, 32, 2, (1, 1, 2, 2, 4, 4), (16, 32), 1000, "legacy", "linear",
         num_head_channels=32, small_size=8),
]
PT_CASES = (0, 3, 6)  # the cases also saved as .pt
IDS = [c.name.split(" ")[0] for c in CASES]


def randomise(module: torch.nn.Module, seed: int) -> None:
    small_models.randomise(module, seed, unit_fan_in=lambda name: "label_emb" in name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per case: the randomised reference and its weights saved as .safetensors (with metadata) and .pt."""
    folder = tmp_path_factory.mktemp("adm")
    out = {}
    for i, case in enumerate(CASES):
        torch.manual_seed(i)
        ref = case.reference()
        randomise(ref, seed=100 + i)
        sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
        st, pt = folder / f"case{i}.safetensors", folder / f"case{i}.pt"
        save_file(sd, str(st), metadata=case.metadata())
        if i in PT_CASES:
            torch.save(sd, pt)
        out[case.name] = (ref, st, pt)
    return out


def inputs(case: Case, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, case.resolution, case.resolution, generator=g)
    t = torch.tensor([3.0, 917.0][:batch])
    kwargs = {}
    if case.num_classes:
        kwargs["y"] = torch.tensor([292, 7][:batch])
    if case.small_size:
        kwargs["low_res"] = torch.rand(batch, 3, case.small_size, case.small_size, generator=g) * 2 - 1
    return x, t, kwargs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity_with_guided_diffusion(case, built):
    ref, st, _ = built[case.name]
    expert = model_loaders.load_expert(str(st), family="auto")
    assert expert.family == "adm" and expert.name == case.expected_name
    assert expert.resolution == case.resolution and expert.prediction == "eps_learned_sigma"
    x, t, kwargs = inputs(case)
    with torch.no_grad():
        want = ref(x, t, **kwargs)
        got = expert(x, t, **kwargs)
    assert got.shape == want.shape == (2, 6, case.resolution, case.resolution)
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{case.name}: max abs error {err:.2e}"
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero outputs
    cfg = expert.info["config"]
    assert (cfg["model_channels"], cfg["num_res_blocks"], cfg["attention_ds"], cfg["num_classes"]) == \
        (case.model_channels, case.num_res_blocks, case.attention_ds, case.num_classes)
    assert tuple(float(m) for m in cfg["channel_mult"]) == tuple(float(m) for m in case.channel_mult)
    assert cfg["attention_order"] == case.order and cfg["small_size"] == case.small_size
    assert expert.info["schedule"] == case.schedule and expert.info["sources"]["schedule"] == "metadata"
    assert torch.equal(expert.alphas_cumprod, alphas_cumprod_for(case.schedule))


def test_conv_resampling_and_additive_time_conditioning(tmp_path):
    """improved-diffusion-style flags that no release uses: convolution up/down-sampling, additive
    time embedding, 2 legacy heads, no learned sigma."""
    ref = gd_unet.UNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                            attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
                            use_scale_shift_norm=False, resblock_updown=False).eval()
    randomise(ref, seed=7)
    path = tmp_path / "conv.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path),
              metadata={"resolution": "16", "attention_order": "legacy", "num_heads": "2", "schedule": "linear"})
    expert = model_loaders.load_expert(str(path))
    cfg = expert.info["config"]
    assert (cfg["resblock_updown"], cfg["use_scale_shift_norm"], cfg["num_heads"], cfg["attention_ds"]) == \
        (False, False, 2, (2,))
    assert expert.prediction == "eps" and expert.name == "ADM-16-uncond"
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 600.5])
    with torch.no_grad():
        assert (expert(x, t) - ref(x, t)).abs().max() <= TOL


def test_qkv_orders_differ(built):
    """Loading the new-order model with the legacy order changes the output: the override is real."""
    case = CASES[0]
    ref, st, _ = built[case.name]
    from unite_and_conquer.model_loaders import read_checkpoint

    sd, meta = read_checkpoint(str(st))
    right = adm.build(sd, meta, "adm")
    wrong = adm.build(sd, {**meta, "attention_order": "legacy"}, "adm")
    x, t, kwargs = inputs(case)
    with torch.no_grad():
        want = ref(x, t, **kwargs)
        assert (right.network(x, t, **kwargs) - want).abs().max() <= TOL
        assert (wrong.network(x, t, **kwargs) - want).abs().max() > 1e-2


@pytest.mark.parametrize("index", [0, 6], ids=["64-new-order", "64to256-upsampler"])
def test_pt_and_safetensors_load_identically(index, built, monkeypatch):
    """A .pt has no metadata: registering the reduced structure as published makes it recognisable by shapes."""
    case = CASES[index]
    ref, st, pt = built[case.name]
    monkeypatch.setitem(adm.PUBLISHED, case.structure_key(), case.published())
    a = model_loaders.load_expert(str(st))
    b = model_loaders.load_expert(str(pt))
    assert b.info["sources"]["attention_order"].startswith("published config of reduced")
    assert a.name == b.name and a.info["config"] == b.info["config"]
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod)
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, t, kwargs = inputs(case, seed=3)
    with torch.no_grad():
        out = b(x, t, **kwargs)
        # Equal tensors, one graph; CPU kernels may still choose other algorithms for other buffers
        # (safetensors' vs torch.load's memory), so float32 rounding differs a little.
        assert (a(x, t, **kwargs) - out).abs().max() <= 1e-5
        assert (out - ref(x, t, **kwargs)).abs().max() <= TOL


def test_continuous_timesteps_channels_last_and_half_precision(built):
    case = CASES[0]
    ref, st, _ = built[case.name]
    expert = model_loaders.load_expert(str(st))
    x, _, kwargs = inputs(case)
    t = torch.tensor([3.7, 512.25])
    with torch.no_grad():
        want = ref(x, t, **kwargs)
        assert (expert(x, t, **kwargs) - want).abs().max() <= TOL
        # A scalar timestep broadcasts over the batch.
        assert (expert(x, torch.tensor(512.25), **kwargs) - ref(x, torch.tensor([512.25, 512.25]), **kwargs)
                ).abs().max() <= TOL
        expert.network.to(memory_format=torch.channels_last)
        got = expert(x.to(memory_format=torch.channels_last), t, **kwargs)
        assert (got - want).abs().max() <= TOL
        half = model_loaders.load_expert(str(st), dtype="bf16")
        eps = half.eps(x, t, kwargs)
        assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
        rel = ((eps - want[:, :3]).norm() / want[:, :3].norm()).item()
        assert rel < 0.05, f"bf16 relative error {rel:.3f}"


def test_class_encoder_and_nulls(built):
    cond = model_loaders.load_expert(str(built[CASES[0].name][1]))
    assert cond.modalities == ["class"] and cond.null_condition is None
    assert len(cond.class_names) == 1000 and cond.class_names[292] == "tiger" and cond.class_names[0] == "tench"
    assert torch.equal(cond.encode("class", 999)["y"], torch.tensor([999]))
    with pytest.raises(ValueError) as err:
        cond.encode("class", 1000)
    assert str(err.value) == "ADM-16: class index 1000 is out of range; it takes 0..999"
    with pytest.raises(ValueError, match=r"^ADM-16: class index -1 is out of range"):
        cond.encode("class", -1)
    uncond = model_loaders.load_expert(str(built[CASES[3].name][1]))
    assert uncond.modalities == [] and uncond.null_condition == {} and uncond.class_names is None
    # A batch-1 label broadcasts over the batch.
    x, t, _ = inputs(CASES[0])
    ref = built[CASES[0].name][0]
    with torch.no_grad():
        got = cond(x, t, **cond.encode("class", 5))
        assert (got - ref(x, t, y=torch.tensor([5, 5]))).abs().max() <= TOL


def test_upsampler_image_encoder(built):
    case = CASES[6]
    ref, st, _ = built[case.name]
    up = model_loaders.load_expert(str(st))
    assert up.modalities == ["image"] and up.null_condition is None
    g = torch.Generator().manual_seed(1)
    low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    c = up.encode("image", low, class_index=292)
    assert torch.equal(c["low_res"], low) and torch.equal(c["y"].argmax(-1), torch.tensor([292]))
    assert up.null_of(c) is not c and all(torch.equal(up.null_of(c)[k], c[k]) for k in c)
    x, t, _ = inputs(case)
    with torch.no_grad():
        want = ref(x, t, y=torch.tensor([292, 292]), low_res=low.expand(2, -1, -1, -1))
        assert (up(x, t, **c) - want).abs().max() <= TOL
        # Without a class: the mean label embedding.
        free = up.encode("image", low)
        assert torch.allclose(free["y"].sum(), torch.tensor(1.0)) and free["y"].shape == (1, 1000)
        emb = ref.label_emb.weight.mean(0)
        assert torch.allclose(free["y"] @ up.network.label_emb.weight, emb[None], atol=1e-6)
    big = up.encode("image", torch.rand(1, 3, 24, 24) * 2 - 1)
    assert big["low_res"].shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^ADM-8→32: the low-res image must be B x 3 x h x w in \[-1, 1\], "
                                         r"got \(1, 1, 8, 8\)$"):
        up.encode("image", torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"^ADM-8→32 takes no text"):
        up.encode("image", low, text="a tiger")


# --- recognition of the real published shapes (meta device: no memory, no time) ------------------

PUBLISHED_FLAGS = {
    "ADM-64": dict(image_size=64, num_channels=192, num_res_blocks=3, num_head_channels=64, class_cond=True,
                   use_new_attention_order=True),
    "ADM-128": dict(image_size=128, num_channels=256, num_res_blocks=2, num_heads=4, class_cond=True),
    "ADM-256": dict(image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64, class_cond=True),
    "ADM-256-uncond": dict(image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64,
                           class_cond=False),
    "ADM-512": dict(image_size=512, num_channels=256, num_res_blocks=2, num_head_channels=64, class_cond=True),
}
SR_FLAGS = {
    "ADM-64→256": dict(large_size=256, small_size=64, num_channels=192, num_heads=4, attention_resolutions="32,16,8"),
    "ADM-128→512": dict(large_size=512, small_size=128, num_channels=192, num_head_channels=64,
                        attention_resolutions="32,16"),
}


def published_state(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        if name in PUBLISHED_FLAGS:
            flags = dict(attention_resolutions="32,16,8", learn_sigma=True, use_scale_shift_norm=True,
                         resblock_updown=True)
            flags.update(PUBLISHED_FLAGS[name])
            model = gd_script.create_model(**flags)
        else:
            flags = dict(num_res_blocks=2, learn_sigma=True, class_cond=True, use_checkpoint=False, num_heads=1,
                         num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
                         resblock_updown=True, use_fp16=False)
            flags.update(SR_FLAGS[name])
            model = gd_script.sr_create_model(**flags)
    return model.state_dict()


@pytest.mark.parametrize("name", list(PUBLISHED_FLAGS) + list(SR_FLAGS))
def test_published_configs_are_recognised_from_shapes(name):
    sd = published_state(name)
    assert adm.detect(sd, {}, "adm") and not adm.detect(sd, {}, "diffusers")
    config, published, sources = adm.infer_config(sd, {})
    assert published is not None and adm.expert_name(config, published) == name
    assert config.attention_order == ("new" if name == "ADM-64" else "legacy")
    assert adm.schedule_for(published, {}, None)[0] == ("cosine" if name == "ADM-64" else "linear")
    flags = {**PUBLISHED_FLAGS, **SR_FLAGS}[name]
    assert config.resolution == flags.get("image_size", flags.get("large_size"))
    assert config.small_size == flags.get("small_size")
    assert config.num_head_channels == flags.get("num_head_channels", -1)
    assert config.num_heads == flags.get("num_heads", 1)
    assert config.num_classes == (1000 if flags.get("class_cond", True) else None)
    assert sources["resolution"] == f"published config of {published.files}"
    # The network builds (on the meta device) with exactly these keys and shapes.
    with torch.device("meta"):
        net = adm.ADMUNet(config)
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert mine == {k: tuple(v.shape) for k, v in sd.items()}


def test_metadata_overrides_the_table():
    sd = published_state("ADM-256-uncond")
    config, published, sources = adm.infer_config(sd, {"resolution": "128", "attention_order": "new"})
    assert config.resolution == 128 and config.attention_order == "new" and sources["resolution"] == "metadata"
    assert adm.expert_name(config, published) == "ADM-128-uncond"
    assert adm.schedule_for(published, {"schedule": "cosine"}, None) == ("cosine", "metadata")
    assert adm.schedule_for(published, {"schedule": "cosine"}, "linear") == ("linear", "argument")


# --- refusals -------------------------------------------------------------------------------------

def test_unrecognised_file_lists_what_was_found(built, tmp_path):
    _, _, pt = built[CASES[3].name]
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(pt), family="auto")
    assert str(err.value).endswith(
        "ADM checkpoint: unrecognised configuration (model_channels=32, in_channels=3, out_channels=6, "
        "num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4), attention_ds=(8, 16, 32), num_classes=None, "
        "use_scale_shift_norm=True, resblock_updown=True); it matches none of guided-diffusion's published models, "
        "whose table gives what shapes cannot tell. Set resolution, attention_order, num_head_channels or "
        "num_heads in the safetensors metadata (attention_order is 'new' or 'legacy').")
    sd = torch.load(pt, weights_only=True)
    path = tmp_path / "no_schedule.safetensors"
    save_file(sd, str(path), metadata={"resolution": "32", "attention_order": "legacy", "num_head_channels": "32"})
    with pytest.raises(ValueError, match="the training noise schedule cannot be read from the weights"):
        model_loaders.load_expert(str(path))
    assert model_loaders.load_expert(str(path), schedule="linear").info["sources"]["schedule"] == "argument"
    path = tmp_path / "bad_order.safetensors"
    save_file(sd, str(path), metadata={"resolution": "32", "attention_order": "sideways", "num_heads": "4",
                                       "schedule": "linear"})
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path))
    assert str(err.value) == ("bad_order.safetensors: ADM checkpoint: metadata 'attention_order' is 'sideways'; "
                              "expected one of ('new', 'legacy')")


def test_truncated_and_damaged_files(built, tmp_path):
    _, st, pt = built[CASES[0].name]
    for src in (st, pt):
        cut = tmp_path / f"cut{src.suffix}"
        data = src.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError) as err:
            model_loaders.load_expert(str(cut))
        assert str(err.value).startswith(f"{cut.name}: ")
    sd = torch.load(pt, weights_only=True)
    del sd["output_blocks.3.0.skip_connection.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(sd, str(path), metadata=CASES[0].metadata())
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(path))
    assert "ADM checkpoint does not match the inferred architecture (16px, 32ch x (1, 2, 3, 4), 3 res blocks" in \
        str(err.value)
    assert 'Missing key(s) in state_dict: "output_blocks.3.0.skip_connection.weight"' in str(err.value)


def test_wrong_family_and_foreign_layouts(built, tmp_path):
    _, st, pt = built[CASES[0].name]
    sd = torch.load(pt, weights_only=True)
    assert adm.detect(sd, {}, "adm")
    for marker in ("transformer.resblocks.0.attn.c_qkv.weight", "token_embedding.weight",
                   "input_blocks_convert.weight", "input_blocks.1.0.cond_emb_layers.1.weight"):
        assert not adm.detect({**sd, marker: torch.zeros(1)}, {}, "adm"), marker
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(st), family="diffusers")
    assert str(err.value).startswith(f"{st.name}: this file is not a 'diffusers' checkpoint")
    other = tmp_path / "other.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 3, 3, 3), "time_embedding.linear_1.weight": torch.zeros(8, 4)}, str(other))
    with pytest.raises(ValueError) as err:
        model_loaders.load_expert(str(other), family="adm")
    assert str(err.value).startswith("other.safetensors: this file is not a 'adm' checkpoint")

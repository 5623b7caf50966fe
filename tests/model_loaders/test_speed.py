"""The speed levers (``model_loaders/unet_layers.py``, ``model_loaders/speed.py``) keep what the experts compute.

Reduced ADM (new qkv order), GLIDE (legacy order, text keys and values, text transformer) and face
(legacy order, text FiLM) networks with random O(1) weights: SDPA against the reference's explicit
attention, channels_last against contiguous, the mixed-precision norm kernels against the float32
round trip, and torch.compile's per-shape caching (with a counting backend on the CPU; the
inductor and CUDA-graph paths in the GPU tests at the end, which skip without a GPU).
"""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.model_loaders import Expert, adm, face, glide, speed, unet_layers
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from support import small_models
from support.small_models import one_thread  # noqa: F401  (autouse)

TOL = 1e-4
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run "
                         "'python3 -m pytest -q -c tests/pytest.ini --rootdir=tests tests/model_loaders/test_speed.py' "
                         "on a GPU machine")


def build(kind: str, seed: int = 0):
    """(network, inputs) of a reduced network of one family, fp32, eval mode."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([3.5, 801.0])
    if kind == "adm":
        config = adm.ADMConfig(resolution=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                               channel_mult=(1, 2), attention_ds=(1, 2), num_classes=10, num_head_channels=16,
                               attention_order="new")
        net, cond = adm.ADMUNet(config), {"y": torch.tensor([3, 7])}
    elif kind == "glide":
        config = glide.GlideConfig(image_size=16, super_res=False, inpaint=False, model_channels=32, out_channels=6,
                                   num_res_blocks=1, channel_mult=(1, 2), attention_ds=(1, 2), num_head_channels=16,
                                   num_heads=1, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
                                   text_ctx=8, xf_width=32, xf_layers=2, xf_heads=2, xf_final_ln=True,
                                   xf_padding=True, n_vocab=64)
        tokens = torch.randint(0, 64, (2, 8), generator=g)
        net, cond = glide.GlideUNet(config), {"tokens": tokens, "mask": torch.arange(8).expand(2, 8) < 5}
    else:
        config = face.FaceConfig(kind="latest", image_size=16, in_channels=6, slot_channels=6, embed_dim=8,
                                 model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 2),
                                 attention_ds=(1, 2), num_head_channels=16)
        embed = torch.randn(2, 8, generator=g)
        embed[1] = 0  # one sample with text, one without
        net = face.FaceMasksTextNet(config)
        cond = {"slots": torch.rand(2, 6, 16, 16, generator=g) * 2 - 1, "embed": embed}
    small_models.randomise(net, seed, unit_fan_in=lambda name: "emb" in name and "layers" not in name)
    return net.eval().requires_grad_(False), x, t, cond


def expert_of(net: torch.nn.Module) -> Expert:
    return Expert(net, "E", "test", 16, alphas_cumprod_for("linear"), prediction="eps_learned_sigma")


@pytest.mark.parametrize("kind", ["adm", "glide", "face"])
def test_sdpa_equals_the_reference_attention(kind):
    net, x, t, cond = build(kind)
    with torch.no_grad():
        want = net(x, t, **cond)
        unet_layers.set_attention(net, "math")
        got = net(x, t, **cond)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= TOL
    impls = {m.attention_impl for m in net.modules() if hasattr(m, "attention_impl")}
    assert impls == {"math"}


def test_the_reference_attention_is_guided_diffusions_formula():
    """The explicit path is softmax(q k^T / sqrt(d)) v written out, not SDPA again."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    assert (unet_layers.attention(q, k, v, "math") - want).abs().max() <= 1e-6
    assert (unet_layers.attention(q, k, v, "sdpa") - want).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        unet_layers.set_attention(torch.nn.Linear(1, 1), "flash")


@pytest.mark.parametrize("kind", ["adm", "glide", "face"])
def test_channels_last_equals_contiguous(kind):
    net, x, t, cond = build(kind)
    expert = expert_of(net)
    with torch.no_grad():
        want = expert.eps(x, t, cond)
        speed.set_channels_last(expert)
        assert net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        got = expert.eps(x, t, cond)
        assert (got - want).abs().max().item() <= TOL
        speed.set_channels_last(expert, False)
        assert net.input_blocks[0][0].weight.is_contiguous()
        assert (expert.eps(x, t, cond) - want).abs().max().item() <= TOL


def test_channels_last_input_reaches_the_network_in_that_layout():
    net, x, t, cond = build("adm")
    expert = expert_of(net)
    seen = []
    net.input_blocks[0][0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    speed.set_channels_last(expert)
    with torch.no_grad():
        expert.eps(x, t, cond)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_norm_keeps_float32_statistics(dtype):
    """Large group means (the time embedding's offsets) ruin half-precision statistics; the mixed
    kernel must give the float32 round trip's result to one rounding of the output."""
    g = torch.Generator().manual_seed(0)
    norm = unet_layers.GroupNorm32(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
        norm.bias.copy_(0.2 * torch.randn(64, generator=g))
    x = (torch.randn(2, 64, 8, 8, generator=g) * 0.5 + 30).to(dtype)
    upcast = norm(x)
    norm.norm_impl = "mixed"
    mixed = norm(x)
    assert mixed.dtype == upcast.dtype == dtype
    ulp = torch.finfo(dtype).eps * 4  # outputs are O(1): a few units in the last place
    assert (mixed.float() - upcast.float()).abs().max().item() <= ulp
    exact = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double())
    assert (mixed.double() - exact).abs().max().item() <= ulp


@pytest.mark.parametrize("kind", ["adm", "glide"])
def test_mixed_norm_network_matches_the_upcast_one(kind):
    net, x, t, cond = build(kind)
    net.to(torch.bfloat16)
    expert = expert_of(net)
    with torch.no_grad():
        want = expert.eps(x, t, cond)
        speed.configure(expert, norm="mixed")
        got = expert.eps(x, t, cond)
    # bf16 networks round every layer; the two norm paths differ by that rounding only.
    assert ((got - want).norm() / want.norm()).item() < 1e-2


class CountingBackend:
    """A torch.compile backend that runs the traced graph eagerly and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_expert_matches_and_compiles_once_per_shape():
    backend = CountingBackend()
    net, x, t, cond = build("adm")
    expert = expert_of(net)
    with torch.no_grad():
        want = expert.eps(x, t, cond)
        compiled = speed.compile_expert(expert, "default", backend=backend)
        assert expert.compiled is compiled
        got = expert.eps(x, t, cond)
        assert (got - want).abs().max().item() <= 1e-5
        assert backend.graphs == 1 and len(compiled.compile_seconds) == 1
        expert.eps(x + 1, t, cond)                   # a second prompt of the same shape
        assert backend.graphs == 1
        x4, t4, y4 = x.repeat(2, 1, 1, 1), t.repeat(2), {"y": cond["y"].repeat(2)}
        expert.eps(x4, t4, y4)                       # another batch: one more graph
        assert backend.graphs == 2 and len(compiled.compile_seconds) == 2
        # The same configuration loaded again (a new network, other weights) reuses the graphs.
        again, *_ = build("adm", seed=5)
        other = expert_of(again)
        speed.compile_expert(other, "default", backend=backend)
        assert (other.eps(x, t, cond) - expert_of(again).eps(x, t, cond)).abs().max() == 0
        assert backend.graphs == 2
        speed.compile_expert(expert, "off")
        assert expert.compiled is None and (expert.eps(x, t, cond) - want).abs().max() == 0


def test_compile_modes_and_availability(monkeypatch):
    net, *_ = build("adm")
    with pytest.raises(ValueError, match="compile mode must be one of"):
        speed.compile_expert(expert_of(net), "fast")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    assert speed.compile_unavailable("cpu") == "no C++ compiler was found (install g++, or set CXX)"
    assert "has not tried" in speed.compile_unavailable("meta")


# --- on a GPU -------------------------------------------------------------------------------------

@GPU
@pytest.mark.parametrize("kind", ["adm", "glide", "face"])
def test_gpu_levers_match_fp32_eager(kind):
    """fp32 on the GPU: SDPA (fused kernels), channels_last and the mixed norm equal the plain path."""
    net, x, t, cond = build(kind)
    expert = expert_of(net.cuda())
    x, t, cond = x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()}
    with torch.no_grad():
        unet_layers.set_attention(net, "math")
        want = expert.eps(x, t, cond)
        speed.configure(expert, attention="sdpa", channels_last=True, norm="mixed")
        assert (expert.eps(x, t, cond) - want).abs().max().item() <= TOL


@GPU
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_gpu_half_precision_levers(dtype, tol):
    """Half-precision weights with every lever stay within the documented relative error of fp32."""
    net, x, t, cond = build("glide")
    expert = expert_of(net.cuda())
    x, t, cond = x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()}
    with torch.no_grad():
        want = expert.eps(x, t, cond)
        net.to(dtype)
        speed.configure(expert, channels_last=True, norm="mixed")
        got = expert.eps(x, t, cond)
    assert ((got - want).norm() / want.norm()).item() < tol


@GPU
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compile_matches_eager_and_reuses_its_graphs(mode):
    net, x, t, cond = build("adm")
    expert = expert_of(net.cuda())
    x, t, cond = x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()}
    with torch.no_grad():
        want = expert.eps(x, t, cond)
        compiled = speed.compile_expert(expert, mode)
        first = expert.eps(x, t, cond)
        second = expert.eps(x, t, cond)
        third = expert.eps(x * 0, t, cond)
    assert (first - want).abs().max().item() <= 1e-3
    assert (second - first).abs().max().item() == 0   # the copy survived the next replay
    assert not torch.equal(third, second)
    assert len(compiled.compile_seconds) == 1

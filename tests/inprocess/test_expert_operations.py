"""Native experts on ComfyUI's layers (``comfy.ops``), through ``samplers/comfy/loading.py``.

- ``comfy.ops.manual_cast`` with fp16 / bf16 / fp8_e4m3fn weights computed in fp32 equals the fp32
  network holding the same (rounded) weights: casting is exact, so the bound is the parity one.
- Computing in fp16 / bf16 stays within twice the plain torch network's own rounding error in that
  dtype (measured here against fp32, as ``tests/model_loaders/test_speed.py`` does).
- A ModelPatcher with a small memory budget loads part of an expert (ComfyUI's lowvram path) and
  the expert still predicts what the fully loaded one does.
- The loader node runs an fp8 weight dtype on the CPU and says so.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import comfy.model_management
import comfy.ops
import folder_paths

from unite_and_conquer import model_loaders
from unite_and_conquer.nodes import loaders
from unite_and_conquer.samplers.comfy import loading as comfy_loading
from unite_and_conquer.samplers.comfy import models as comfy_models
from support.checkpoints import from_fixture, small_adm
from support.small_models import one_thread  # noqa: F401  (autouse)

TOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixtures_dir):
    folder = tmp_path_factory.mktemp("experts_ops")
    folder_paths.add_model_folder_path("experts", str(folder))
    return {"adm": small_adm(folder / "adm_ops_test.safetensors", resolution=32, num_classes=10),
            "glide": from_fixture(fixtures_dir / "glide_base_small.safetensors", folder / "glide_ops_test.safetensors")}


def inputs(kind: str, expert, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([30.0, 700.0])
    if kind == "adm":
        return x, t, {"y": torch.tensor([3, 7])}
    cond = expert.encode("text", "a corgi wearing a red bowtie")
    return x, t, {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}


def load(path, weight_dtype):
    """The expert on ComfyUI's layers, weights in ``weight_dtype``, on the CPU."""
    expert, notes = comfy_loading.load_expert(str(path), "auto", None, lambda n: weight_dtype, CPU)
    return expert, notes


def reference(path, weight_dtype):
    """The plain-torch expert in fp32 holding the weights rounded to ``weight_dtype``."""
    expert = model_loaders.load_expert(str(path))
    with torch.no_grad():
        for p in expert.network.parameters():
            p.copy_(p.to(weight_dtype).float())
    return expert


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("kind", ["adm", "glide"])
def test_default_dtype_builds_on_comfy_layers_and_matches(kind, files):
    expert, notes = load(files[kind], torch.float32)
    layers = {type(m).__module__ for m in expert.network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert layers == {"comfy.ops"} and notes == []
    x, t, cond = inputs(kind, expert)
    with torch.no_grad():
        want = model_loaders.load_expert(str(files[kind])).eps(x, t, cond)
        assert (expert.eps(x, t, cond) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["adm", "glide"])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_manual_cast_to_fp32_equals_the_rounded_fp32_network(kind, weight_dtype, files):
    """Stored weights cast to fp32 layer by layer: exactly the fp32 network of the rounded weights."""
    net = model_loaders.load_expert(str(files[kind])).network
    cast = type(net)(net.config, operations=comfy.ops.manual_cast)
    cast.load_state_dict({k: v.to(weight_dtype) for k, v in net.state_dict().items()}, assign=True)
    cast.compute_dtype = torch.float32
    ref = reference(files[kind], weight_dtype)
    expert = dataclasses.replace(ref, network=cast)
    assert {p.dtype for p in cast.parameters()} == {weight_dtype}
    x, t, cond = inputs(kind, ref)
    with torch.no_grad():
        want = ref.eps(x, t, cond)
        assert want.abs().max() > 0.05
        # Casting is exact and the arithmetic is the same fp32: rounding-level agreement only.
        assert (expert.eps(x, t, cond) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["adm", "glide"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_compute_on_comfy_layers_is_within_its_rounding(kind, dtype, files):
    """Weights and compute in ``dtype`` on ComfyUI's layers: within twice the plain torch network's
    own rounding error in that dtype, both measured against fp32 here."""
    exact = model_loaders.load_expert(str(files[kind]))
    plain = model_loaders.load_expert(str(files[kind]), dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
    expert, notes = load(files[kind], dtype)
    x, t, cond = inputs(kind, exact)
    with torch.no_grad():
        want = exact.eps(x, t, cond)
        rounding = relative_error(plain.eps(x, t, cond), want)
        got = expert.eps(x, t, cond)
    assert torch.finfo(dtype).eps / 2 <= rounding < 0.1
    assert relative_error(got, want) <= 2 * rounding
    # ComfyUI computes half-precision weights in fp32 on a CPU: the summary says so.
    compute = expert.network.compute_dtype
    assert compute in (None, torch.float32)
    assert notes == ([] if compute is None else [f"{str(dtype)[6:]} weights computed in float32"])


def test_fp8_weights_run_on_the_cpu_through_the_loader_node(files, monkeypatch):
    """ComfyUI's --fp8_e4m3fn-unet gives the loader fp8 weights; they are cast to fp32 on the CPU."""
    monkeypatch.setattr(comfy.model_management.args, "fp8_e4m3fn_unet", True)
    out = loaders.PoEExpertLoader.execute(expert_name=files["adm"].name, family="auto", dtype="auto",
                                          schedule="published", device="cpu")
    handle, summary = out.args[0], out.ui["text"][0]
    net = handle.expert.network
    assert {p.dtype for p in net.parameters()} == {torch.float8_e4m3fn}
    assert net.compute_dtype == torch.float32 and handle.model.manual_cast_dtype == torch.float32
    assert summary.endswith(" · float8_e4m3fn weights computed in float32")
    ref = reference(files["adm"], torch.float8_e4m3fn)
    x, t, cond = inputs("adm", ref)
    with torch.no_grad():
        assert (handle.expert.eps(x, t, cond) - ref.eps(x, t, cond)).abs().max().item() <= TOL


def test_a_weight_dtype_that_cannot_be_cast_falls_back_and_says_so(monkeypatch):
    real = torch.Tensor.to

    def no_fp8(self, *args, **kwargs):
        if torch.float8_e4m3fn in args or kwargs.get("dtype") == torch.float8_e4m3fn:
            raise RuntimeError("float8 is not supported here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", no_fp8)
    dtype, note = comfy_loading.runnable_weight_dtype(torch.float8_e4m3fn, torch.float32, CPU)
    assert dtype == torch.float32
    assert note == "weights kept in float32: float8_e4m3fn cannot be cast on cpu (float8 is not supported here)"


@pytest.mark.parametrize("kind", ["adm", "glide"])
def test_lowvram_partial_loading_loads_part_and_predicts_the_same(kind, files):
    expert, _ = load(files[kind], torch.float32)
    handle = comfy_models.wrap_expert(expert, "cpu")
    x, t, cond = inputs(kind, expert)
    with torch.no_grad():
        want = expert.eps(x, t, cond)
    patcher = handle.patcher
    size = patcher.model_size()
    patcher.load(CPU, lowvram_model_memory=size // 3)
    try:
        layers = [m for m in patcher.model.modules() if hasattr(m, "comfy_cast_weights")]
        # The patcher marks each layer it leaves offloaded (its weights then travel at every forward).
        streamed = [m for m in layers if hasattr(m, "prev_comfy_cast_weights")]
        assert patcher.model.model_lowvram and 0 < len(streamed) < len(layers)
        kept = sum(comfy.model_management.module_size(m) for m in layers if not hasattr(m, "prev_comfy_cast_weights"))
        assert 0 < kept < size // 3
        with torch.no_grad():
            got = handle.model.apply_model(x * (1 + 80.0**2) ** 0.5, torch.full((2,), 80.0), **cond)
            assert (expert.eps(x, t, cond) - want).abs().max().item() <= 1e-6
        assert torch.isfinite(got).all()
    finally:
        patcher.detach()

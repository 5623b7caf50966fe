"""The loader's device option: experts of one product on different devices.

On a CPU-only machine every device is the CPU, so the tests here check the option, the patcher it
builds, the per-expert device the guider hands the product rule, and that sampling is unchanged.
The moves between devices themselves are checked without a GPU in
``tests/samplers/test_poe.py::test_experts_on_other_devices_get_x_and_conditions_there`` (fake
CUDA tensors), and here for a product built by the nodes: with two fake GPUs, each expert's patcher,
ComfyUI's loading and each forward use the device its loader names. The two ``skipif`` tests at the
end sample on real GPUs; they run on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
import comfy.sampler_helpers
import folder_paths

from unite_and_conquer.nodes import bindings, loaders, sampling
from unite_and_conquer.samplers import poe
from unite_and_conquer.samplers.comfy import guider
from unite_and_conquer.samplers.comfy.models import device_choices
from support.fuzz import write_tiny


CPU_AUTO = comfy.model_management.get_torch_device().type == "cpu"


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts_device")
    folder_paths.add_model_folder_path("experts", str(folder))
    return {m: write_tiny(folder / f"uac_device_{m}.safetensors", m).name for m in ("class", "colour", "layout")}


def load(name, device=None, dtype="fp32"):
    options = {} if device is None else {"device": device}
    out = loaders.PoEExpertLoader.execute(expert_name=name, family="auto", dtype=dtype, schedule="published",
                                          **options)
    return out.args[0], out.ui["text"][0]


def product(class_handle, colour_handle):
    chain = bindings.PoEBindClass.execute(expert=class_handle, weight=2.0, reliability=1.0, null="trained", null_k=4,
                                          class_index=-1, experts=None, **{"class": "3"}).args[0]
    return bindings.PoEBindText.execute(expert=colour_handle, text="red", weight=1.0, reliability=1.0,
                                        experts=chain).args[0]


def sample(chain, steps=3):
    out = sampling.PoEKSampler.execute(experts=chain, seed=7, steps=steps, sampler_name="euler", scheduler="karras",
                                       denoise=1.0, width=0, height=0, batch_size=2, latent_image=None)
    return out.args[0]["samples"]


def record_forwards(monkeypatch):
    """Each expert forward as (expert, its device, x's device, its conditions' devices, its weights' device)."""
    seen = []
    original = guider.forward_in_chunks

    def spy(handle, x, sigma, condition, options, chunks=1):
        weights = next(handle.expert.network.parameters()).device
        seen.append((handle.name, handle.device, x.device, {v.device for v in condition.values()}, weights))
        return original(handle, x, sigma, condition, options, chunks)
    monkeypatch.setattr(guider, "forward_in_chunks", spy)
    return seen


def test_device_choices_are_auto_cpu_and_each_cuda_device():
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert device_choices() == ["auto", "cpu", *cuda]
    if not torch.cuda.is_available():
        assert device_choices() == ["auto", "cpu"]
    schema = loaders.PoEExpertLoader.define_schema()
    option = next(i for i in schema.inputs if i.id == "device")
    assert option.options == device_choices() and option.default == "auto" and option.optional


def test_cpu_device_gives_a_patcher_that_loads_on_the_cpu(experts):
    handle, summary = load(experts["class"], device="cpu", dtype="auto")
    assert handle.patcher.load_device == torch.device("cpu") and handle.patcher.offload_device == torch.device("cpu")
    assert handle.device == torch.device("cpu")
    # dtype 'auto' is asked for the expert's own device: fp32 on the CPU, even beside a GPU.
    assert next(handle.expert.network.parameters()).dtype == torch.float32
    assert summary.endswith(" · on cpu")


def test_auto_is_comfyuis_device_as_before(experts):
    handle, summary = load(experts["class"])
    assert handle.patcher.load_device == comfy.model_management.get_torch_device()
    assert handle.patcher.offload_device == comfy.model_management.unet_offload_device()
    assert " · on " not in summary


@pytest.mark.skipif(not CPU_AUTO, reason="'auto' is a GPU here; test_an_expert_on_the_cpu_beside_one_on_the_gpu "
                                         "covers an expert on the CPU beside it")
def test_auto_and_cpu_experts_sample_what_two_auto_experts_sample(experts, monkeypatch):
    want = sample(product(load(experts["class"])[0], load(experts["colour"])[0]))
    on_cpu, _ = load(experts["colour"], device="cpu")
    on_auto, _ = load(experts["class"], device="auto")
    # The guider must hand the rule each expert's own device, not the sampler's.
    handed = []
    original = poe.run_plan

    def spy(plan, x, sigma, eps_fn, staged=None, device_of=None, variances=None):
        handed.extend((call.expert.name, device_of(call.expert)) for call in plan.calls)
        return original(plan, x, sigma, eps_fn, staged, device_of, variances)
    monkeypatch.setattr(poe, "run_plan", spy)
    seen = record_forwards(monkeypatch)
    got = sample(product(on_auto, on_cpu))
    assert (got - want).abs().max().item() <= 1e-6 and want.abs().max() > 0.1
    assert set(handed) == {(on_auto.name, on_auto.patcher.load_device), (on_cpu.name, torch.device("cpu"))}
    assert len(seen) == 2 * 3  # two experts, three steps
    assert_each_forward_on_its_device(seen)


def test_a_device_this_machine_lacks_is_refused_by_name(experts):
    choices = ", ".join(device_choices())
    with pytest.raises(ValueError) as err:
        load(experts["class"], device="cuda:99")
    assert str(err.value) == f"PoEExpertLoader: input 'device': unknown device 'cuda:99'; pick one of: {choices}"
    if not torch.cuda.is_available():
        assert str(err.value) == "PoEExpertLoader: input 'device': unknown device 'cuda:99'; pick one of: auto, cpu"


# --- on real GPUs (run these in a GPU session) ---------------------------------------------------

def exact_fp32(monkeypatch):
    """TF32 convolutions round to 10 mantissa bits; devices are compared in full fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def assert_each_forward_on_its_device(seen):
    for name, device, x_device, cond_devices, weights in seen:
        assert x_device == device and cond_devices == {device} and weights == device, name


def sample_split(experts, monkeypatch, class_device, colour_device, rel_tol):
    """Sample with the class expert on ``class_device`` and the colour expert on ``colour_device``,
    and check it against both on cuda:0 and every forward against its own device. Returns the colour
    expert's handle and loader summary."""
    exact_fp32(monkeypatch)
    want = sample(product(load(experts["class"], device="cuda:0")[0], load(experts["colour"], device="cuda:0")[0]))
    first, _ = load(experts["class"], device=class_device)
    second, summary = load(experts["colour"], device=colour_device)
    seen = record_forwards(monkeypatch)
    got = sample(product(first, second))
    assert (got - want).abs().max().item() <= rel_tol * want.abs().max().item()
    assert {(name, device) for name, device, *_ in seen} == {(first.name, torch.device(class_device)),
                                                             (second.name, torch.device(colour_device))}
    assert_each_forward_on_its_device(seen)
    return second, summary


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices: experts on cuda:0 and cuda:1")
def test_experts_on_two_gpus_sample_what_one_gpu_samples(experts, monkeypatch):
    # Same kernels on two GPUs of one kind; a relative bound leaves room for two different models.
    second, summary = sample_split(experts, monkeypatch, "cuda:0", "cuda:1", rel_tol=1e-5)
    assert second.patcher.load_device == torch.device("cuda:1") and summary.endswith(" · on cuda:1")


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device beside the CPU")
def test_an_expert_on_the_cpu_beside_one_on_the_gpu(experts, monkeypatch):
    # The CPU's and the GPU's fp32 kernels round differently; three steps keep that near 1e-6.
    sample_split(experts, monkeypatch, "cuda:0", "cpu", rel_tol=1e-4)


# --- two fake GPUs: a product's experts where their loaders put them -----------------------------

PLACES = {"class": "cuda:1", "colour": "cuda:0", "layout": "cpu"}


def fake_gpus(monkeypatch, count: int = 2):
    """torch reports ``count`` CUDA devices, so the loader offers cuda:0..; the experts load in fp32,
    so nothing asks the absent GPUs what dtypes they run."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def placed_product(experts, places=PLACES):
    """Class 3 + red + a layout box, each expert loaded on its device in ``places``."""
    handles = {m: load(experts[m], device=d)[0] for m, d in places.items()}
    chain = product(handles["class"], handles["colour"])
    box = torch.zeros(1, 32, 32)
    box[:, 8:24, 10:22] = 1.0
    chain = bindings.PoEBindSegmentation.execute(expert=handles["layout"], source="mask", slot="auto", weight=1.0,
                                                 reliability=1.0, map_mask=box, experts=chain).args[0]
    return handles, guider.ProductGuider(chain)


def test_with_two_gpus_comfyui_loads_each_expert_of_a_product_where_its_loader_says(experts, monkeypatch):
    fake_gpus(monkeypatch)
    assert device_choices() == ["auto", "cpu", "cuda:0", "cuda:1"]
    handles, g = placed_product(experts)
    assert {m: h.device for m, h in handles.items()} == {m: torch.device(d) for m, d in PLACES.items()}
    # Between prompts the weights wait on the CPU (ComfyUI's offload device without --highvram).
    assert {h.patcher.offload_device for h in handles.values()} == {torch.device("cpu")}
    assert load(experts["class"], device="cuda:1")[1].endswith(" · on cuda:1")
    # The guider hands the rule each expert's own device.
    assert [h.device for h in g.handles] == [torch.device(PLACES[m]) for m in ("class", "colour", "layout")]
    # ComfyUI's own loading: prepare_sampling asks load_models_gpu for the product and every expert
    # with it; each patcher's load_device is where load_models_gpu puts its weights.
    asked = []
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda models, *a, **k: asked.extend(models))
    comfy.sampler_helpers.prepare_sampling(g.model_patcher, (2, 3, 32, 32), {}, g.model_options)
    loads = {id(m.model): m.load_device for m in asked}
    assert {m: loads[id(h.model)] for m, h in handles.items()} == {m: torch.device(d) for m, d in PLACES.items()}


def test_with_two_gpus_each_expert_runs_on_its_device_and_its_prediction_comes_back(experts, monkeypatch):
    """Fake tensors (torch's FakeTensorMode) carry devices and refuse any op that mixes two. Each
    expert's model is moved to its device, as ComfyUI's load does; then one step's forwards run
    through the guider's own expert calls, with the sampler's x on cuda:0."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_gpus(monkeypatch)
    _, g = placed_product(experts)
    seen = record_forwards(monkeypatch)
    plan = poe.plan_forwards(g.bindings)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for h in g.handles:
            h.model.to(h.device)
        x = torch.randn(2, 3, 32, 32).to("cuda:0")
        sigma = torch.full((2,), 1.5).to("cuda:0")
        outs = poe.run_plan(plan, x, sigma, g._eps_fn({}), {}, device_of=lambda h: h.device)
    assert {p.device for preds in outs for p in preds} == {torch.device("cuda:0")}
    assert [(name, device) for name, device, *_ in seen] == [(h.name, h.device) for h in g.handles]
    assert_each_forward_on_its_device(seen)

    # The fake devices catch a misplaced expert: weights on cuda:1 where the patcher says cuda:0.
    _, g = placed_product(experts)
    plan = poe.plan_forwards(g.bindings)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for h, device in zip(g.handles, ("cuda:1", "cuda:1", "cpu")):
            h.model.to(device)
        x = torch.randn(2, 3, 32, 32).to("cuda:0")
        with pytest.raises(RuntimeError, match="cuda:0.*cuda:1|cuda:1.*cuda:0"):
            poe.run_plan(plan, x, torch.full((2,), 1.5).to("cuda:0"), g._eps_fn({}), {},
                         device_of=lambda h: h.device)

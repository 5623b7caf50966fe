"""The loader node's speed options: channels_last and torch.compile, on a small random ADM checkpoint.

The compilation itself (minutes for inductor on a CPU) is not run here: tests/model_loaders/test_speed.py
checks the compiled forward and its per-shape cache; here the node must wire the options, refuse what
cannot work with a message naming the input, and sample the same images in channels_last.
"""
from __future__ import annotations

import pytest
import torch

import folder_paths

from unite_and_conquer.model_loaders import speed
from unite_and_conquer.nodes import bindings, loaders, sampling
from support.checkpoints import small_adm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts_speed")
    folder_paths.add_model_folder_path("experts", str(folder))
    return small_adm(folder / "adm_speed_test.safetensors", resolution=32, num_classes=10).name


def load(name, **options):
    out = loaders.PoEExpertLoader.execute(expert_name=name, family="auto", dtype="fp32", schedule="published",
                                          **options)
    return out.args[0], out.ui["text"][0]


def sample(handle):
    chain = bindings.PoEBindClass.execute(expert=handle, weight=3.0, reliability=1.0, null="class0 (paper)", null_k=4,
                                          class_index=3, experts=None, **{"class": "292: tiger"}).args[0]
    out = sampling.PoEKSampler.execute(experts=chain, seed=0, steps=3, sampler_name="euler", scheduler="karras",
                                       denoise=1.0, width=0, height=0, batch_size=2, latent_image=None)
    return out.args[0]["samples"]


def test_defaults_leave_the_expert_as_it_was(checkpoint):
    handle, summary = load(checkpoint)
    assert handle.expert.compiled is None and handle.expert.memory_format == torch.preserve_format
    assert "torch.compile" not in summary


def test_channels_last_samples_the_same_images(checkpoint):
    plain, _ = load(checkpoint)
    fast, _ = load(checkpoint, channels_last=True)
    assert fast.expert.memory_format == torch.channels_last
    assert fast.expert.network.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = sample(plain), sample(fast)
    # Random weights and a guided product leave samples far outside [-1, 1]: compare relatively.
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item() and a.abs().max() > 0.1


def test_compile_option_is_wired_and_compiles_on_first_use(checkpoint):
    handle, summary = load(checkpoint, compile="reduce-overhead")
    assert isinstance(handle.expert.compiled, speed.CompiledForward)
    assert handle.expert.compiled.mode == "reduce-overhead" and handle.expert.compiled.compile_seconds == {}
    assert summary.endswith("torch.compile reduce-overhead (compiles on its first prompt)")


def test_compile_errors_name_the_input(checkpoint, monkeypatch):
    with pytest.raises(ValueError, match=r"^PoEExpertLoader: input 'compile': unknown compile mode 'fast'; pick one "
                                         r"of: off, default, reduce-overhead, max-autotune$"):
        load(checkpoint, compile="fast")
    why = "no C++ compiler was found (install g++, or set CXX)"
    monkeypatch.setattr(speed, "compile_unavailable", lambda device: why)
    with pytest.raises(ValueError) as err:
        load(checkpoint, compile="default")
    assert str(err.value) == ("PoEExpertLoader: input 'compile': torch.compile cannot build kernels here: no C++ "
                              "compiler was found (install g++, or set CXX); set compile to off")

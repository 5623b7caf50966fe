"""A native expert as a ComfyUI MODEL: the stock KSampler at cfg w with the binding's trained null as
the negative equals PoEKSampler with that one binding at weight w, for every sampler and scheduler."""
from __future__ import annotations

import pytest
import torch

import comfy.samplers

from unite_and_conquer.nodes import bindings, loaders, model_bindings, sampling
from support.comfy_harness import comfy_nodes

nodes = comfy_nodes()

W = 3.0


@pytest.fixture(scope="module")
def digit():
    out = loaders.PoEExpertLoader.execute(expert_name="tiny_class.safetensors", family="auto", dtype="fp32",
                                          schedule="published")
    handle, model = out.args[0], out.args[1]
    assert model is handle.patcher
    chain = bindings.PoEBindClass.execute(expert=handle, weight=W, reliability=1.0, null="trained", null_k=1,
                                          class_index=-1, experts=None, **{"class": "7"}).args[0]
    _, positive, negative = model_bindings.PoEEncodeCondition.execute(chain, -1).args
    return handle, chain, model, positive, negative


def _both(digit, sampler, scheduler, steps=3, batch=2, seed=5):
    handle, chain, model, positive, negative = digit
    res = handle.expert.resolution
    latent = {"samples": torch.zeros(batch, 3, res, res)}
    stock = nodes.KSampler().sample(model, seed, steps, W, sampler, scheduler, positive, negative, latent)[0]["samples"]
    ours = sampling.PoEKSampler.execute(chain, seed, steps, sampler, scheduler, 1.0, 0, 0, batch,
                                        latent_image=None).args[0]["samples"]
    return stock, ours


@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_stock_ksampler_equals_poe_ksampler_for_every_sampler(digit, sampler):
    stock, ours = _both(digit, sampler, "karras")
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheduler", comfy.samplers.KSampler.SCHEDULERS)
def test_stock_ksampler_equals_poe_ksampler_for_every_scheduler(digit, scheduler):
    stock, ours = _both(digit, "euler", scheduler)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_the_expert_model_enters_a_product_through_bind_model(digit):
    """The loader's MODEL with the encoded conditions, bound by PoEBindModel, is the same product."""
    handle, chain, model, positive, negative = digit
    via_model = model_bindings.PoEBindModel.execute(model, positive, W, 1.0, negative=negative).args[0]
    a = sampling.PoEKSampler.execute(chain, 1, 3, "euler", "karras", 1.0, 0, 0, 2).args[0]["samples"]
    res = handle.expert.resolution   # a product of MODELs only is told its size
    b = sampling.PoEKSampler.execute(via_model, 1, 3, "euler", "karras", 1.0, res, res, 2).args[0]["samples"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

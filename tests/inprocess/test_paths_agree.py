"""Tier (b): the cases of issue 29, each through every path that samples a product. A product that cannot be
sampled as the rule says is refused by PoEKSampler, by PoEGuider when SamplerCustomAdvanced hands it the latent,
and by the stock KSampler on PoEEncodeCondition's MODEL, in the same words; chains of any order of binding
kinds build; and a null multiplied by zero never runs (counted in rows)."""
from __future__ import annotations

import pytest
import torch

from support.comfy_gaussians import conditioning, gaussian_model
from support.comfy_harness import comfy_nodes
from support.graph_fuzz import NAMED, loaded
from unite_and_conquer.nodes import bands as band_nodes
from unite_and_conquer.nodes import bindings, model_bindings, sampling

nodes = comfy_nodes()


def stock(node_id):
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def bind_class(kind, digit="7", weight=1.0, reliability=1.0, null="trained", experts=None):
    return bindings.PoEBindClass.execute(expert=loaded(kind)[0], weight=weight, reliability=reliability, null=null,
                                         null_k=1, class_index=-1, experts=experts, **{"class": digit}).args[0]


def pixel_latent(side, batch=1):
    return stock("EmptyChromaRadianceLatentImage").execute(width=side, height=side, batch_size=batch).args[0]


def refusal(call) -> tuple[str, str, str]:
    """(node, input, words) of a refusal."""
    with pytest.raises(ValueError) as err:
        call()
    m = NAMED.match(str(err.value))
    assert m, str(err.value)
    return m.groups()


def poe_ksampler(chain, side):
    return sampling.PoEKSampler.execute(chain, 0, 2, "euler", "simple", 1.0, 0, 0, 1,
                                        latent_image=pixel_latent(side)).args


def custom_advanced(chain, side):
    guider = sampling.PoEGuider.execute(experts=chain).args[0]
    sigmas = sampling.PoEScheduler.execute(experts=chain, scheduler="simple", steps=2, denoise=1.0).args[0]
    return stock("SamplerCustomAdvanced").execute(
        noise=stock("RandomNoise").execute(noise_seed=0).args[0], guider=guider,
        sampler=stock("KSamplerSelect").execute(sampler_name="euler").args[0], sigmas=sigmas,
        latent_image=pixel_latent(side)).args


def stock_ksampler(chain, side, cfg):
    model, pos, neg = model_bindings.PoEEncodeCondition.execute(chain, -1).args
    return nodes.KSampler().sample(model, 0, 2, cfg, "euler", "simple", pos, neg, pixel_latent(side))


@pytest.mark.parametrize("side", [32, 48])
def test_a_lone_16px_expert_on_a_larger_latent_is_refused_on_every_path(side):
    """Before: SamplerCustomAdvanced ran tiny_class_16 unpooled on a 32 px latent, with no word of it."""
    chain = bind_class("class_16", weight=3.0)
    k, c, s = (refusal(lambda: poe_ksampler(chain, side)), refusal(lambda: custom_advanced(chain, side)),
               refusal(lambda: stock_ksampler(chain, side, 3.0)))
    assert (k[:2], c[:2], s[:2]) == (("PoEKSampler", "latent_image"), ("PoEGuider", "latent_image"),
                                     ("PoEEncodeCondition", "latent_image"))
    assert k[2] == c[2] == s[2]
    if side == 32:
        assert k[2].startswith("no expert of the product makes 32 x 32 images: the largest, binding 0 (Tiny digits · "
                               "class · 16px · class 7), makes 16 x 16, so nothing models the detail finer than its "
                               "2 x 2 blocks; sample at 16 x 16")
    else:
        assert "makes 16 x 16 images" in k[2] or "no expert of the product makes 48 x 48" in k[2]


@pytest.mark.parametrize("side", [48, 40])
def test_a_32_and_16px_product_on_a_latent_neither_divides_is_refused_alike(side):
    chain = bind_class("class_16", weight=2.0, experts=bind_class("class", weight=2.0))
    k, c = refusal(lambda: poe_ksampler(chain, side)), refusal(lambda: custom_advanced(chain, side))
    assert k[2] == c[2] == (
        f"binding 0 (Tiny digits · class · class 7) makes 32 x 32 images, and the canvas is {side} x {side}: an expert "
        "smaller than the canvas runs on its k x k pooled image, so the canvas must be the same integer multiple of "
        "its size on both sides; sample at 32 x 32, the largest expert's size")
    latent, image, rule = poe_ksampler(chain, 32)        # on the 32 px canvas it samples, the 16 px expert pooled
    assert latent["samples"].shape == (1, 3, 32, 32) and "at 16px, 1/2 of the canvas" in rule


def test_the_stock_sampler_on_a_binding_without_a_null_at_cfg_above_one_is_refused_like_poe_ksampler():
    """The stock KSampler would take an empty negative as a zero prediction: the product needs a null."""
    chain = bind_class("class", weight=3.0, reliability=0.0, null="none")
    k, s = refusal(lambda: poe_ksampler(chain, 32)), refusal(lambda: stock_ksampler(chain, 32, 3.0))
    assert s[:2] == ("PoEEncodeCondition", "experts") and k[2] == s[2] == (
        "the weights sum to 3, not 1, so the rule needs a pooled null, but every reliability is 0: give at least one "
        "binding with a null a reliability > 0")
    out = stock_ksampler(chain, 32, 1.0)[0]["samples"]              # at cfg 1 the binding alone is the expert
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_encode_condition_refuses_what_one_cfg_cannot_apply():
    masked = bindings.PoEBindClass.execute(expert=loaded("class")[0], weight=2.0, reliability=1.0, null="trained",
                                           null_k=1, class_index=-1, mask=torch.ones(1, 32, 32), **{"class": "3"}).args[0]
    node, name, words = refusal(lambda: model_bindings.PoEEncodeCondition.execute(masked, 0))
    assert (node, name) == ("PoEEncodeCondition", "experts")
    assert words.startswith("binding 0 (Tiny digits · class · class 3 · masked) has a mask, but a stock sampler")
    banded = band_nodes.PoEBandWeights.execute(experts=bind_class("class"), mode="low-pass", cutoff=0.25,
                                               cutoff_high=0.5, transition=0.0).args[0]
    assert "has a band (low-pass < 0.25)" in refusal(lambda: model_bindings.PoEEncodeCondition.execute(banded, 0))[2]


def test_bind_model_then_bind_class_chains_in_either_order():
    """Before: PoEBindModel followed by PoEBindClass raised AttributeError ('ModelSource' has no 'resolution')."""
    m = gaussian_model("eps")
    first = model_bindings.PoEBindModel.execute(m, conditioning(0.5, 0.3), 1.0, 1.0,
                                                negative=conditioning(0.0, 1.0)).args[0]
    chain = bind_class("class", weight=1.0, experts=first)
    assert len(chain) == 2
    latent, _, rule = poe_ksampler(chain, 32)
    assert latent["samples"].shape == (1, 3, 32, 32) and torch.isfinite(latent["samples"]).all()
    # The MODEL takes any size, so on a 64 px latent the 32 px expert runs pooled (before: unpooled, silently).
    latent, _, rule = poe_ksampler(chain, 64)
    assert "at 32px, 1/2 of the canvas" in rule
    sd15 = gaussian_model("eps", latent_format=__import__("comfy.latent_formats").latent_formats.SD15)
    latent_first = model_bindings.PoEBindModel.execute(sd15, conditioning(0.5, 0.3), 1.0, 0.0).args[0]
    node, name, words = refusal(lambda: bind_class("class", experts=latent_first))
    assert (node, name) == ("PoEBindClass", "expert") and "works on SD15 latents (4 channels) but binding 1" in words


def test_complementary_bands_of_weight_one_need_no_negative_and_run_no_null():
    """Before: refused for lacking a negative CONDITIONING, and with one connected each MODEL ran two rows per step."""
    a, b = gaussian_model("eps"), gaussian_model("eps")

    def split(negative):
        kw = {"negative": conditioning(0.0, 1.0)} if negative else {}
        chain = model_bindings.PoEBindModel.execute(a, conditioning(0.5, 0.3), 1.0, 1.0 if negative else 0.0,
                                                    **kw).args[0]
        chain = band_nodes.PoEBandWeights.execute(experts=chain, mode="low-pass", cutoff=0.25, cutoff_high=0.5,
                                                  transition=0.0).args[0]
        chain = model_bindings.PoEBindModel.execute(b, conditioning(-0.5, 0.3), 1.0, 1.0 if negative else 0.0,
                                                    experts=chain, **kw).args[0]
        return band_nodes.PoEBandWeights.execute(experts=chain, mode="high-pass", cutoff=0.25, cutoff_high=0.5,
                                                 transition=0.0).args[0]

    rows = {}
    for negative in (False, True):
        na, nb = a.model.diffusion_model, b.model.diffusion_model
        na.rows = nb.rows = na.calls = nb.calls = 0
        latent, _, rule = sampling.PoEKSampler.execute(split(negative), 0, 3, "euler", "simple", 1.0, 16, 16, 1).args
        rows[negative] = (na.rows, nb.rows, na.calls)
        assert "the weights sum to 1 in every band: the null term is zero and no null forward runs" in rule
    # Three steps, one row per step and model (the conditional one), with or without a negative connected.
    assert rows == {False: (3, 3, 3), True: (3, 3, 3)}

"""Tier (b): PoEBandWeights and lower-resolution experts through the nodes and ComfyUI's guider."""
from __future__ import annotations

import pytest
import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.nodes import bands as bands_nodes
from unite_and_conquer.nodes import bindings as bindings_mod
from unite_and_conquer.nodes import sampling
from unite_and_conquer.samplers import bands, poe
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.models import wrap_expert
from support.analytic import gaussian, gaussian_expert


def analytic(name="gauss", resolution=8, schedule="linear"):
    e = gaussian_expert(alphas_cumprod_for(schedule), name, resolution)
    e.encoders["class"] = lambda k: gaussian(float(k) - 1.0, 0.25)
    e.class_names = ["a", "b", "c"]
    return wrap_expert(e)


def bind_class(expert, k, weight=1.0, reliability=1.0, experts=None):
    out = bindings_mod.PoEBindClass.execute(expert=expert, weight=weight, reliability=reliability, null="trained",
                                            null_k=4, class_index=-1, experts=experts, **{"class": f"{k}: {'abc'[k]}"})
    return out.args[0]


def band(experts, mode="low-pass", cutoff=0.25, cutoff_high=0.5, transition=0.0, **kw):
    out = bands_nodes.PoEBandWeights.execute(experts=experts, mode=mode, cutoff=cutoff, cutoff_high=cutoff_high,
                                             transition=transition, **kw)
    return out.args[0], out.ui["text"][0]


def ksample(experts, steps=12, batch=4, width=0):
    out = sampling.PoEKSampler.execute(experts=experts, seed=0, steps=steps, sampler_name="dpmpp_2m",
                                       scheduler="simple", denoise=1.0, width=width, height=width,
                                       batch_size=batch, latent_image=None)
    return out.args


def test_band_node_sets_the_last_binding_and_describes_it():
    e1, e2 = analytic("A"), analytic("B")
    chain = bind_class(e2, 1, experts=bind_class(e1, 2))
    out, text = band(chain, "high-pass", 0.3)
    assert out[0] is chain[0] and out[1].band == bands.high_pass(0.3)
    assert text == "B · class 1: b · w=1 · a=1 · high-pass >= 0.3"
    out, _ = band(chain, "bands", index=0, band_edges="0.2, 0.6", band_weights="1, 2, 0.5")
    assert out[0].band.edges == (0.2, 0.6) and out[0].band.values == (1.0, 2.0, 0.5)
    with pytest.raises(ValueError) as err:
        band(chain, "bands", band_edges="0.2", band_weights="1")
    assert str(err.value) == "PoEBandWeights: input 'band_edges': a band profile with 1 edge(s) needs 2 values, got 1"
    with pytest.raises(ValueError) as err:
        band(chain, "band-pass", cutoff=0.5, cutoff_high=0.2)
    assert str(err.value) == ("PoEBandWeights: input 'cutoff_high': a band-pass needs cutoff_high above cutoff, "
                              "got 0.2 <= 0.5")
    with pytest.raises(ValueError) as err:
        band([], "low-pass")
    assert str(err.value) == "PoEBandWeights: input 'experts' is empty: connect a PoEBind* node"


def test_low_and_high_pass_of_one_expert_sample_like_it():
    # The same binding split into complementary bands is the binding itself: same seed, same image.
    e = analytic()
    whole = bind_class(e, 2)
    lo, _ = band(bind_class(e, 2), "low-pass", 0.3)
    split, _ = band(bind_class(e, 2, experts=lo), "high-pass", 0.3)
    a, _, _ = ksample(whole)
    b, _, rule = ksample(split)
    torch.testing.assert_close(a["samples"], b["samples"], atol=1e-4, rtol=0)
    assert "low-pass < 0.3" in rule and "high-pass >= 0.3" in rule and "eps = u + sum_i w_i F_i(eps_i - u)" in rule


def test_lower_resolution_expert_joins_a_larger_canvas():
    small, big = analytic("Small", 4, "cosine"), analytic("Big", 8)
    chain = bind_class(small, 2, weight=2.0, reliability=0.0, experts=bind_class(big, 2, reliability=1.0))
    guider = ProductGuider(chain)
    assert [b.resolution_factor for b in guider.bindings] == [1, 2]
    # Small serves sigma where sigma / 2 is inside its own range.
    small_hi = float(((1 - small.expert.alphas_cumprod) / small.expert.alphas_cumprod).sqrt().max())
    assert guider.sigma_range[1] <= 2 * small_hi * (1 + 1e-6)
    latent, image, rule = ksample(chain)
    assert latent["samples"].shape == (4, 3, 8, 8)
    assert "Small · class 2: c · w=2 · a=0 · at 4px, 1/2 of the canvas (sigma/2, lifted into P)" in rule
    assert "cost: Small runs on 1/4 of the canvas's pixels (its own size)" in rule
    assert torch.isfinite(latent["samples"]).all()


def test_lower_resolution_expert_through_the_guider_matches_the_closed_form():
    # Big: pixels N(1, 0.25); Small: 2 x 2 block means N(1, 0.25) at sigma / 2; null N(0, 1) from Big only.
    small, big = analytic("Small", 4, "cosine"), analytic("Big", 8)
    chain = bind_class(small, 2, weight=2.0, reliability=0.0, experts=bind_class(big, 2, reliability=1.0))
    guider = ProductGuider(chain)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 1
    for s in (0.05, 0.5, 3.0):
        den = guider.predict_noise(x, torch.full((2,), s), {"transformer_options": {}})
        # On P, per block: t = 2 c (c the block mean) has Big N(2, 0.25 + s^2), Small N(2, 1 + s^2) at weight 2,
        # and the null N(0, 1 + s^2) at weight -(1 + 2 - 1); on I - P only Big acts, at weight 1.
        t = 2 * bands.pool(x, 2)
        score = -(t - 2) / (0.25 + s**2) - 2 * (t - 2) / (1 + s**2) + 2 * t / (1 + s**2)
        on_p = bands.upsample((t + s**2 * score) / 2, 2)
        off_p = (x - bands.project(x, 2)) * (1 - s**2 / (0.25 + s**2))
        torch.testing.assert_close(den, on_p + off_p, atol=1e-4, rtol=1e-4)


def test_canvas_that_is_not_a_multiple_is_refused():
    a, b = analytic("A", 8), analytic("B", 6)
    chain = [poe.Binding(a, gaussian(0, 1), 1.0), poe.Binding(b, gaussian(0, 1), 1.0)]
    with pytest.raises(ValueError) as err:
        ProductGuider(chain)
    assert str(err.value) == ("binding 0 (A) makes 8px images and binding 1 (B) 6px: a smaller expert runs on the "
                              "pooled canvas, so each expert's size must divide the larger ones (their blocks must "
                              "nest); sample them at one size, or use an upsampler stage (PoEBindImage) to change the "
                              "size")



def test_shipped_16px_class_expert_composes_with_the_32px_experts():
    from pathlib import Path

    from unite_and_conquer.model_loaders import load_expert

    models = Path(__file__).resolve().parents[2] / "models_tiny"
    e = {m: load_expert(str(models / f"tiny_{m}.safetensors"), family="auto")
         for m in ("class_16", "colour", "layout")}
    assert e["class_16"].resolution == 16 and e["colour"].resolution == 32
    layout = torch.zeros(1, 1, 32, 32)
    layout[..., 8:26, 10:22] = 1
    conds = {"class_16": e["class_16"].encode("class", 3), "colour": e["colour"].encode("colour", "red"),
             "layout": e["layout"].encode("segmentation", layout)}
    chain = [poe.Binding(wrap_expert(e[m]), conds[m], w, 1 / 3, null=(e[m].null_condition,), label=m)
             for m, w in (("colour", 2.0), ("layout", 2.0), ("class_16", 4.0))]
    latent, image, rule = ksample(chain, steps=6, batch=2)
    assert latent["samples"].shape == (2, 3, 32, 32) and torch.isfinite(latent["samples"]).all()
    assert "Tiny digits · class · 16px · class_16 · w=4 · a=0.333 · at 16px, 1/2 of the canvas" in rule

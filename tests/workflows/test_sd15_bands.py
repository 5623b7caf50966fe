"""Tier (b): the sd15_bands workflow's graph (two SD1.5 fine-tunes split by frequency) on two tiny random-weight
SD1.5-architecture UNets, with random CONDITIONINGs in place of the checkpoints' CLIP. The graph's own nodes
build the chain; one Euler step from sigma to 0 gives the product's denoised prediction, which must equal the
band rule written out with scipy's DCT and each model's own prediction through the stock CFGGuider."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

import comfy.samplers
from support.comfy_harness import api_workflow, comfy_nodes
from support.tiny_comfy_models import stock_denoised, text_conditioning, tiny_sd15

LOADER_SEEDS = {"1": 0, "2": 1}        # layout model, texture model
PROMPT_SEEDS = {"3": 3, "4": 4, "5": 5, "6": 6}


def run_graph(wf: dict, target: str, models: dict, conds: dict) -> tuple:
    """The outputs of node ``target``: the workflow's nodes run in order, the loaders and text encoders replaced."""
    nodes = comfy_nodes()
    out: dict[str, tuple] = {}

    def evaluate(nid: str) -> tuple:
        if nid not in out:
            node = wf[nid]
            if node["class_type"] == "CheckpointLoaderSimple":
                out[nid] = (models[nid], None, None)
            elif node["class_type"] == "CLIPTextEncode":
                out[nid] = (conds[nid],)
            else:
                inputs = {k: evaluate(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
                out[nid] = nodes.NODE_CLASS_MAPPINGS[node["class_type"]].execute(**inputs).args
        return out[nid]

    return evaluate(target)


def response(h: int, w: int, cutoff: float, transition: float) -> np.ndarray:
    """The low-pass profile: 1 below the cutoff, a raised-cosine step ``transition`` wide, 0 above (1 = Nyquist)."""
    rho = np.hypot(np.arange(h)[:, None] / h, np.arange(w)[None, :] / w)
    s = np.clip((rho - cutoff) / transition + 0.5, 0, 1)
    return 1 - (0.5 - 0.5 * np.cos(np.pi * s))


def dct(a):
    return scipy.fft.dctn(a, type=2, norm="ortho", axes=(-2, -1))


def idct(a):
    return scipy.fft.idctn(a, type=2, norm="ortho", axes=(-2, -1))


@pytest.fixture(scope="module")
def graph():
    wf = api_workflow("sd15_bands.json")
    models = {nid: tiny_sd15(seed) for nid, seed in LOADER_SEEDS.items()}
    conds = {nid: text_conditioning(seed) for nid, seed in PROMPT_SEEDS.items()}
    return wf, models, conds


def test_the_shipped_split_is_complementary_low_then_high(graph):
    wf, _, _ = graph
    low, high = wf["8"]["inputs"], wf["10"]["inputs"]
    assert (low["mode"], high["mode"]) == ("low-pass", "high-pass")
    assert low["cutoff"] == high["cutoff"] and low["transition"] == high["transition"]
    assert wf["8"]["inputs"]["experts"] == ["7", 0] and wf["7"]["inputs"]["model"] == ["1", 0]
    assert wf["10"]["inputs"]["experts"] == ["9", 0] and wf["9"]["inputs"]["model"] == ["2", 0]
    # 512 px on SD1 latents (1/8): the cutoff's wavelength, 2 / cutoff latent px, is 64 image px.
    assert wf["11"]["inputs"]["width"] == wf["11"]["inputs"]["height"] == 512
    assert 8 * 2 / low["cutoff"] == 64


def test_the_band_product_equals_the_per_frequency_rule(graph):
    from unite_and_conquer.samplers.comfy.guider import ProductGuider

    wf, models, conds = graph
    chain, = run_graph(wf, "10", models, conds)
    assert [b.band.describe() for b in chain] == ["low-pass < 0.25 (transition 0.1)", "high-pass >= 0.25 (transition 0.1)"]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    lo = wf["8"]["inputs"]
    profile = response(16, 16, lo["cutoff"], lo["transition"])
    w_a, w_b = wf["7"]["inputs"]["weight"], wf["9"]["inputs"]["weight"]
    a_a, a_b = wf["7"]["inputs"]["reliability"], wf["9"]["inputs"]["reliability"]
    ma, mb = models["1"], models["2"]
    for sigma in (0.5, 3.0):
        got = ProductGuider(chain).sample(x, torch.zeros_like(x), comfy.samplers.sampler_object("euler"),
                                          torch.tensor([sigma, 0.0]), disable_pbar=True, seed=0)
        c_a, c_b = (stock_denoised(m, conds[p], x, sigma).double().numpy() for m, p in ((ma, "3"), (mb, "5")))
        u_a, u_b = (stock_denoised(m, conds[p], x, sigma).double().numpy() for m, p in ((ma, "4"), (mb, "6")))
        u = (a_a * u_a + a_b * u_b) / (a_a + a_b)
        want = u + idct(w_a * profile * dct(c_a - u)) + idct(w_b * (1 - profile) * dct(c_b - u))
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-4, rtol=1e-4)
        # Below the transition the product's DCT coefficients are the layout model's guided prediction alone.
        below = profile == 1
        layout_only = dct(u + w_a * (c_a - u))[..., below]
        np.testing.assert_allclose(dct(got.double().numpy())[..., below], layout_only, atol=1e-4, rtol=1e-4)
        # ... and above it the texture model's: the split changes the result against the unbanded product.
        above = profile == 0
        np.testing.assert_allclose(dct(got.double().numpy())[..., above], dct(u + w_b * (c_b - u))[..., above],
                                   atol=1e-4, rtol=1e-4)
        unbanded = u + w_a * (c_a - u) + w_b * (c_b - u)
        assert np.abs(want - unbanded).max() > 0.1
    assert below.sum() > 0 and above.sum() > 0


def test_the_graph_samples_and_reports_each_bindings_band(graph):
    wf, models, conds = graph
    wf = {k: {**v, "inputs": dict(v["inputs"])} for k, v in wf.items()}
    wf["11"]["inputs"].update(width=128, height=128, steps=3)
    latent, _, rule = run_graph(wf, "11", models, conds)
    assert latent["samples"].shape == (1, 4, 16, 16) and torch.isfinite(latent["samples"]).all()
    lines = rule.splitlines()
    # The band form opens the text. Complementary profiles: the total the null term balances is 5 at every
    # frequency (the plain sum of weights, 10, is not shown).
    assert lines[0] == ("product of 2 binding(s) over 2 expert(s): eps = u + sum_i w_i F_i(eps_i - u),  "
                        "u = sum_j a_j eps_j(x, null_j) per band")
    assert lines[1:4] == [
        "  per frequency, sum_i w_i F_i(f) = 5 (the weight the null term balances in each band)",
        "  1. SD15 MODEL · MODEL + conditioning · w=5 · a=0.5 · low-pass < 0.25 (transition 0.1)",
        "  2. SD15 MODEL · MODEL + conditioning · w=5 · a=0.5 · high-pass >= 0.25 (transition 0.1)"]
    assert lines[4].startswith("  bands: F_i is each binding's band (DCT)")

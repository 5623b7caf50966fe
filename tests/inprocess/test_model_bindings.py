"""ComfyUI MODELs as experts: analytic Gaussian MODELs of each parameterisation, mixed with each
other and with native analytic experts, sampled by ComfyUI's samplers through the PoE guider."""
from __future__ import annotations

import math

import pytest
import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import poe
from unite_and_conquer.samplers.comfy import model_experts as cm
from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.models import wrap_expert
from support.analytic import gaussian, gaussian_expert, product_gaussian
from unite_and_conquer.nodes import bindings as native_nodes
from unite_and_conquer.nodes import model_bindings as bind_nodes
import comfy.latent_formats
import comfy.samplers
import comfy.sample
from support.comfy_gaussians import conditioning, gaussian_model


NULL = conditioning(0.0, 1.0)


def model_binding(patcher, mu, var, weight=1.0, reliability=0.0, null=True, name=None):
    src = cm.ModelSource(patcher, name or type(patcher.model.diffusion_model).__name__)
    return poe.Binding(src, {"conditioning": conditioning(mu, var)}, weight, reliability,
                       ({"conditioning": NULL},) if null else (), label=f"N({mu}, {var})")


def run(bindings, n=4096 * 3, sampler="dpmpp_2m", scheduler="simple", steps=50, seed=0, res=4):
    guider = ProductGuider(bindings)
    sigmas = comfy_sampling.compute_sigmas(guider, sampler, scheduler, steps, 1.0)
    latent = torch.zeros(max(1, math.ceil(n / (3 * res * res))), 3, res, res)
    return comfy_sampling.sample(guider, latent, seed, sampler, sigmas, preview=False)


@pytest.mark.parametrize("kind,shift", [("eps", 1.0), ("v", 1.0), ("flow", 1.0), ("flow", 3.0)])
def test_one_model_of_each_parameterisation_samples_its_own_law(kind, shift):
    """The common VE level mapped to each model's own (flow: x/(1+s) at t = s/(1+s)) reproduces
    the model's data law."""
    b = [model_binding(gaussian_model(kind, shift), 0.7, 0.3)]
    out = run(b)
    # The probability-flow ODE of a Gaussian is affine: started from N(0, 1 + s^2) at the product's
    # s_max instead of the true N(mu, var + s^2), it ends at these moments.
    s = ProductGuider(b).sigma_range[1]
    r = math.sqrt(0.3 / (0.3 + s**2))
    assert out.mean().item() == pytest.approx(0.7 * (1 - r), abs=0.01)
    assert out.var().item() == pytest.approx((1 + s**2) * r**2, abs=0.02)


def test_mixed_parameterisations_match_the_native_product():
    """eps x v x flow(shift 3) MODELs against three native analytic experts with the same
    Gaussians: the same rule on the same levels gives the same statistics, and both sit within
    the summed-score bias of the closed form."""
    parts = [(1.0, 0.5, 1.0), (-0.5, 0.8, 1.5), (0.3, 0.6, 0.5)]
    models = [gaussian_model("eps"), gaussian_model("v"), gaussian_model("flow", 3.0)]
    mb = [model_binding(m, mu, v, w, 1.0) for m, (mu, v, w) in zip(models, parts)]
    ac = alphas_cumprod_for("linear")
    natives = [wrap_expert(gaussian_expert(ac, f"g{i}")) for i in range(3)]
    nb = [poe.Binding(h, gaussian(mu, v), w, 1.0, (gaussian(0.0, 1.0),)) for h, (mu, v, w) in zip(natives, parts)]
    got, ref = run(mb), run(nb)
    assert got.mean().item() == pytest.approx(ref.mean().item(), abs=0.02)
    assert got.var().item() == pytest.approx(ref.var().item(), abs=0.02)
    mean, var = product_gaussian(parts)
    assert abs(got.mean().item() - mean) < 0.12 and abs(got.var().item() - var) < 0.12


def test_models_mix_with_native_pixel_experts():
    """A flow MODEL and a native expert share one product: their calls happen on one x."""
    ac = alphas_cumprod_for("cosine")
    h = wrap_expert(gaussian_expert(ac, "native"))
    flow = gaussian_model("flow", 2.0)
    b = [model_binding(flow, 1.0, 0.5, 1.0, 0.5), poe.Binding(h, gaussian(-0.5, 0.8), 1.0, 0.5, (gaussian(0.0, 1.0),))]
    got = run(b)
    ref_h = wrap_expert(gaussian_expert(ac, "native2"))
    ref = run([poe.Binding(wrap_expert(gaussian_expert(ac, "n1")), gaussian(1.0, 0.5), 1.0, 0.5, (gaussian(0.0, 1.0),)),
               poe.Binding(ref_h, gaussian(-0.5, 0.8), 1.0, 0.5, (gaussian(0.0, 1.0),))])
    assert got.mean().item() == pytest.approx(ref.mean().item(), abs=0.02)
    assert got.var().item() == pytest.approx(ref.var().item(), abs=0.02)
    assert flow.model.diffusion_model.calls > 0


def test_two_bindings_of_one_model_share_one_forward_per_step():
    m = gaussian_model("eps")
    run([model_binding(m, 1.0, 0.5, 2.0, 1.0), model_binding(m, -0.5, 0.8, 1.0, 1.0)], n=48, steps=5,
        sampler="euler")
    net = m.model.diffusion_model
    assert net.calls == 5 and net.rows == 5 * 3 * 1   # cond, cond, one shared null: 3 rows of batch 1


def _stock(patcher, pos, neg, cfg, sampler, scheduler, steps, latent, seed):
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.KSampler(patcher, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler).sigmas
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=seed,
                         disable_pbar=True)


@pytest.mark.parametrize("sampler", comfy.samplers.SAMPLER_NAMES)
def test_one_model_binding_equals_the_stock_cfg_guider_for_every_sampler(sampler):
    _parity(sampler, "karras")


@pytest.mark.parametrize("scheduler", comfy.samplers.SCHEDULER_NAMES)
def test_one_model_binding_equals_the_stock_cfg_guider_for_every_scheduler(scheduler):
    _parity("euler", scheduler)


def _parity(sampler, scheduler, w=3.0, steps=4):
    m = gaussian_model("eps")
    latent = torch.zeros(2, 3, 4, 4)
    pos = conditioning(0.7, 0.3)
    ref = _stock(m, pos, NULL, w, sampler, scheduler, steps, latent, 3)
    guider = ProductGuider([model_binding(m, 0.7, 0.3, w, 1.0)])
    sigmas = comfy_sampling.compute_sigmas(guider, sampler, scheduler, steps, 1.0)
    got = comfy_sampling.sample(guider, latent, 3, sampler, sigmas, preview=False)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_a_patched_model_changes_its_bindings_prediction():
    base = gaussian_model("eps")
    patched = base.clone()
    patched.add_patches({"diffusion_model.dummy": (torch.full((1,), 0.05),)}, 1.0)
    a = run([model_binding(base, 0.7, 0.3)], n=96, steps=6)
    b = run([model_binding(patched, 0.7, 0.3)], n=96, steps=6)
    assert (a - b).abs().max().item() > 1e-2
    c = run([model_binding(base, 0.7, 0.3)], n=96, steps=6)
    assert torch.equal(a, c)   # the patch is undone after sampling


def test_mixed_latent_formats_are_refused_naming_both_bindings():
    sd15 = gaussian_model("eps", latent_format=comfy.latent_formats.SD15)
    sdxl = gaussian_model("eps", latent_format=comfy.latent_formats.SDXL)
    with pytest.raises(ValueError, match=r"binding 0 \(sd15 · N\(1, 0.5\)\) works on SD15 latents \(4 channels\) but "
                                         r"binding 1 \(sdxl · N\(0, 1\)\) works on SDXL latents \(4 channels\)"):
        ProductGuider([model_binding(sd15, 1, 0.5, name="sd15"), model_binding(sdxl, 0, 1, name="sdxl")])
    h = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "native"))
    with pytest.raises(ValueError, match=r"binding 1 \(native\) works on pixels \(3 channels\)"):
        ProductGuider([model_binding(sd15, 1, 0.5, name="sd15"), poe.Binding(h, gaussian(0, 1), 1.0)])


def test_node_refuses_reliability_without_negative_and_chains():
    node = bind_nodes.PoEBindModel
    m = gaussian_model("eps")
    with pytest.raises(ValueError, match="PoEBindModel: input 'reliability': GaussianConfig MODEL has no null"):
        node.execute(m, conditioning(1, 0.5), 1.0, 0.5)
    out = node.execute(m, conditioning(1, 0.5), 2.0, 1.0, negative=NULL).result[0]
    out = node.execute(gaussian_model("flow", 3.0), conditioning(0, 1), 1.0, 0.0, experts=out).result[0]
    assert len(out) == 2
    sd15 = gaussian_model("eps", latent_format=comfy.latent_formats.SD15)
    with pytest.raises(ValueError, match=r"^PoEBindModel: input 'model': binding 0 \(GaussianConfig MODEL · MODEL \+ "
                                         r"conditioning\) works on pixels \(3 channels\) but binding 2"):
        node.execute(sd15, conditioning(0, 1), 1.0, 0.0, experts=out)



def test_native_binding_nodes_chain_after_a_model_binding():
    """A native binding after a PoEBindModel: a pixel-space MODEL joins (a MODEL has no size of its own, so
    the natives' sizes are checked among themselves), a latent MODEL is refused naming both bindings."""
    ac = alphas_cumprod_for("linear")
    native8, native6 = (wrap_expert(gaussian_expert(ac, f"native{r}", resolution=r)) for r in (8, 6))
    flow = bind_nodes.PoEBindModel.execute(gaussian_model("flow", 3.0), conditioning(0, 1), 1.0, 0.0).result[0]
    out = native_nodes.PoEBindPrior.execute(native8, 1.0, 0.0, experts=flow).result[0]
    assert [type(b.expert).__name__ for b in out] == ["ModelSource", "ExpertHandle"]
    with pytest.raises(ValueError, match=r"^PoEBindPrior: input 'expert': binding 1 \(native8 · prior \(unconditional\)\) "
                                         r"makes 8px images and binding 2 \(native6 · prior \(unconditional\)\) 6px: "):
        native_nodes.PoEBindPrior.execute(native6, 1.0, 0.0, experts=out)
    sd15 = bind_nodes.PoEBindModel.execute(gaussian_model("eps", latent_format=comfy.latent_formats.SD15),
                                           conditioning(0, 1), 1.0, 0.0).result[0]
    with pytest.raises(ValueError, match=r"^PoEBindPrior: input 'expert': binding 0 \(GaussianConfig MODEL · MODEL "
                                         r"\+ conditioning\) works on SD15 latents \(4 channels\) but binding 1 "
                                         r"\(native8 · prior \(unconditional\)\) works on pixels"):
        native_nodes.PoEBindPrior.execute(native8, 1.0, 0.0, experts=sd15)


def test_the_conditioning_rows_are_read_once_per_staged_index_tensor():
    e = cm.ModelExpert(patcher=None, name="m")
    staged = torch.tensor([[0], [0], [2], [2], [1], [1]])
    assert e.conditioning_rows(staged, 2) == [0, 2, 1]
    staged[2, 0] = 5                     # never done to a staged tensor: shows the rows are not read again
    assert e.conditioning_rows(staged, 2) == [0, 2, 1]
    assert e.conditioning_rows(torch.tensor([[1], [0]]), 1) == [1, 0]   # another tensor is read

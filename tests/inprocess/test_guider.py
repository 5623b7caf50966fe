"""Tier (b): the product sampled by ComfyUI's own samplers, in process, on analytic experts."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.samplers

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import noise_levels, poe
from unite_and_conquer.samplers.comfy import sampling as comfy_sampling
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.models import wrap_expert
from unite_and_conquer.samplers.comfy.sampling import compute_sigmas
from support.analytic import gaussian, gaussian_expert, product_gaussian


PARTS = [(1.0, 0.5), (-0.5, 0.8)]  # (mean, variance) of the two experts' conditionals; nulls are N(0, 1)


def two_expert_product(weights=(1.0, 1.0), reliabilities=(0.5, 0.5), resolution=4):
    lin = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "gauss-linear", resolution))
    cos = wrap_expert(gaussian_expert(alphas_cumprod_for("cosine"), "gauss-cosine", resolution))
    null = gaussian(0.0, 1.0)
    return [poe.Binding(h, gaussian(m, v), w, a, (null,), label=f"N({m}, {v})")
            for h, (m, v), w, a in zip((lin, cos), PARTS, weights, reliabilities)]


def sample(bindings, n=4096, sampler="euler", scheduler="karras", steps=30, seed=0, resolution=4):
    guider = ProductGuider(bindings)
    sigmas = compute_sigmas(guider, sampler, scheduler, steps, 1.0)
    pixels = resolution * resolution * 3
    batch = max(1, math.ceil(n / pixels))
    latent = torch.zeros(batch, 3, resolution, resolution)
    return comfy_sampling.sample(guider, latent, seed, sampler, sigmas, preview=False)


def test_common_range_is_the_intersection_of_linear_and_cosine():
    guider = ProductGuider(two_expert_product())
    lo, hi = guider.sigma_range
    (l0, l1), (c0, c1) = (noise_levels.sigma_range(alphas_cumprod_for(s)) for s in ("linear", "cosine"))
    assert c0 < l0 and l1 < c1   # linear is the narrower at both ends: 0.01 .. 157 versus cosine's ~0.006 .. 2e4
    assert lo == pytest.approx(l0, rel=1e-5) and hi == pytest.approx(l1, rel=1e-5)


def test_analytic_product_statistics_match_the_closed_form():
    """Plain sampling of two Gaussian experts with different schedules (4096 samples per pixel
    statistic). The remaining gap is the known bias of summing diffused scores (the MCMC
    correctors exist to lower it); its size is reported in BENCHMARKS.md."""
    out = sample(two_expert_product(), n=4096 * 48, sampler="dpmpp_2m", scheduler="simple", steps=50)
    mean, var = product_gaussian([(m, v, 1.0) for m, v in PARTS])
    got_mean, got_var = out.mean().item(), out.var().item()
    # Measured: mean 0.533 vs 0.611, variance 0.401 vs 0.444 (W2 0.085); heun and euler with
    # 400 steps converge to the same values, so this is the rule's bias, not the solver's.
    assert abs(got_mean - mean) < 0.1, (got_mean, mean)
    assert abs(got_var - var) < 0.07, (got_var, var)
    assert got_var < var and got_mean < mean  # the summed-score bias has this sign here


def test_single_gaussian_expert_is_sampled_exactly():
    """With one binding the product is that expert, and the sampler must reproduce its data law."""
    h = wrap_expert(gaussian_expert(alphas_cumprod_for("cosine"), "gauss", 4))
    out = sample([poe.Binding(h, gaussian(0.7, 0.3), 1.0, 0.0)], n=4096 * 48, sampler="dpmpp_2m", scheduler="simple", steps=50)
    assert out.mean().item() == pytest.approx(0.7, abs=0.01)
    assert out.var().item() == pytest.approx(0.3, abs=0.01)


def test_same_seed_same_samples_and_another_seed_differs():
    a = sample(two_expert_product(), n=256, seed=7)
    b = sample(two_expert_product(), n=256, seed=7)
    c = sample(two_expert_product(), n=256, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", comfy.samplers.SAMPLER_NAMES)
def test_every_comfy_sampler_runs_the_product(sampler):
    """Enumerated at run time, so samplers added to ComfyUI are covered automatically. CFG++
    samplers step along the pooled null; they behave like guidance of strength sum(w) - 1."""
    out = sample(two_expert_product(), n=64, sampler=sampler, steps=8)
    assert torch.isfinite(out).all()
    assert out.std() > 0.05


@pytest.mark.parametrize("scheduler", comfy.samplers.SCHEDULER_NAMES)
def test_every_comfy_scheduler_stays_inside_the_common_range(scheduler):
    guider = ProductGuider(two_expert_product())
    sigmas = compute_sigmas(guider, "euler", scheduler, 12, 1.0)
    lo, hi = guider.sigma_range
    positive = sigmas[sigmas > 0]
    assert positive.max() <= hi * (1 + 1e-4) and positive.min() >= lo * (1 - 1e-4)
    out = sample(two_expert_product(), n=64, scheduler=scheduler, steps=12)
    # linear_quadratic (made for flow models) spends most steps at high noise: valid but blurry.
    assert torch.isfinite(out).all() and out.std() > 1e-3


def test_cfg_pp_samplers_receive_the_pooled_null():
    bindings = two_expert_product(weights=(1.0, 1.0), reliabilities=(1.0, 0.0))
    guider = ProductGuider(bindings)
    seen = {}

    def post(args):
        seen["uncond"] = args["uncond_denoised"]
        return args["denoised"]

    x = torch.randn(2, 3, 4, 4)
    sigma = torch.tensor([3.0, 3.0])
    guider.inner_model = guider.model_patcher.model
    out = guider.predict_noise(x, sigma, {"sampler_post_cfg_function": [post]})
    lin = bindings[0].expert
    expected_null = lin.model.apply_model(x, sigma, **gaussian(0.0, 1.0))
    torch.testing.assert_close(seen["uncond"], expected_null, atol=1e-6, rtol=0)
    assert out.shape == x.shape


def test_nan_mid_sampling_names_the_expert_and_step():
    class NaNAfter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, mu, var):
            out = self.inner(x, t, mu, var)
            return out if t.min() > 500 else out * float("nan")

    e = gaussian_expert(alphas_cumprod_for("linear"), "Broken", 4)
    e.network = NaNAfter(e.network)
    h = wrap_expert(e)
    with pytest.raises(FloatingPointError, match=r"^Broken returned NaN or Inf at sigma=[0-9.]+; .* at step \d+ of 20$"):
        sample([poe.Binding(h, gaussian(0.0, 1.0), 1.0, 0.0)], n=16, steps=20)


def test_out_of_memory_retries_in_smaller_chunks_then_says_what_to_change():
    class OOMAbove(torch.nn.Module):
        """Runs out of 'memory' above ``limit`` rows, like a GPU would."""

        def __init__(self, inner, limit):
            super().__init__()
            self.inner, self.limit = inner, limit

        def forward(self, x, t, mu, var):
            if x.shape[0] > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x, t, mu, var)

    e = gaussian_expert(alphas_cumprod_for("linear"), "Big", 4)
    reference = sample([poe.Binding(wrap_expert(e), gaussian(0.5, 0.5), 2.0, 1.0, (gaussian(0.0, 1.0),))],
                       n=48 * 16, steps=6)
    e.network = OOMAbove(e.network, limit=5)
    chunked = sample([poe.Binding(wrap_expert(e), gaussian(0.5, 0.5), 2.0, 1.0, (gaussian(0.0, 1.0),))],
                     n=48 * 16, steps=6)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    e.network.limit = 0
    with pytest.raises(MemoryError, match=r"^Big ran out of memory even one image at a time; load it with dtype "
                                          r"fp16 or bf16, start ComfyUI with --lowvram"):
        sample([poe.Binding(wrap_expert(e), gaussian(0.5, 0.5), 1.0, 0.0)], n=48, steps=2)

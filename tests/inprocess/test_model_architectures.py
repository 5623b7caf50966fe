"""Tiny random-weight models of ComfyUI's own architectures as experts: two SD1.5 UNets composed,
and a Chroma Radiance model with a native pixel expert. One Euler step from sigma to 0 returns the
denoised prediction, so the product's step must equal the rule applied to each model's own
prediction through the stock CFGGuider."""
from __future__ import annotations

import torch

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import poe
from unite_and_conquer.samplers.comfy import model_experts as cm
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.models import wrap_expert
from support.analytic import gaussian, gaussian_expert
import comfy.sample
import comfy.samplers
from support.tiny_comfy_models import stock_denoised, text_conditioning, tiny_chroma_radiance, tiny_sd15



def product_step(bindings, x, sigma):
    return ProductGuider(bindings).sample(x, torch.zeros_like(x), comfy.samplers.sampler_object("euler"),
                                         torch.tensor([sigma, 0.0]), disable_pbar=True, seed=0)


def bind(patcher, pos, neg, w, a, name):
    return poe.Binding(cm.ModelSource(patcher, name), {"conditioning": pos}, w, a,
                       ({"conditioning": neg},) if neg is not None else (), label=name)


def test_two_sd15_fine_tunes_compose_by_the_rule():
    m1, m2 = tiny_sd15(0), tiny_sd15(1)
    p1, p2, null = text_conditioning(1), text_conditioning(2), text_conditioning(3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = 3.0
    w, a = (2.0, 1.5), (0.7, 0.3)
    got = product_step([bind(m1, p1, null, w[0], a[0], "sd15-a"), bind(m2, p2, null, w[1], a[1], "sd15-b")], x, sigma)
    c1, c2 = stock_denoised(m1, p1, x, sigma), stock_denoised(m2, p2, x, sigma)
    u1, u2 = stock_denoised(m1, null, x, sigma), stock_denoised(m2, null, x, sigma)
    want = w[0] * c1 + w[1] * c2 - (sum(w) - 1) * (a[0] * u1 + a[1] * u2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (c1 - c2).abs().max() > 1e-3   # the two seeds are different models


def test_sd15_latent_out_follows_its_latent_format():
    m = tiny_sd15(0)
    guider = ProductGuider([bind(m, text_conditioning(1), None, 1.0, 0.0, "sd15")])
    assert type(guider.model_patcher.model.latent_format).__name__ == "SD15"


def test_chroma_radiance_mixes_with_a_native_pixel_expert():
    cr = tiny_chroma_radiance(0)
    native = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "native", resolution=32))
    pos, neg = text_conditioning(1, width=32, pooled=True), text_conditioning(2, width=32, pooled=True)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = 2.0
    nb = poe.Binding(native, gaussian(0.5, 0.3), 1.5, 0.5, (gaussian(0.0, 1.0),))
    got = product_step([bind(cr, pos, neg, 1.0, 0.5, "radiance"), nb], x, sigma)
    # The stock flow sampler starts at t * noise; the product's VE start s * x is that point for t = s / (1 + s).
    t = sigma / (1 + sigma)
    c, u = stock_denoised(cr, pos, x, t), stock_denoised(cr, neg, x, t)
    nc = ProductGuider([poe.Binding(native, gaussian(0.5, 0.3), 1.0, 0.0)]).sample(x, torch.zeros_like(x), comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
                     disable_pbar=True, seed=0)
    nu = ProductGuider([poe.Binding(native, gaussian(0.0, 1.0), 1.0, 0.0)]).sample(
        x, torch.zeros_like(x), comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
        disable_pbar=True, seed=0)
    want = 1.0 * c + 1.5 * nc - 1.5 * (0.5 * u + 0.5 * nu)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

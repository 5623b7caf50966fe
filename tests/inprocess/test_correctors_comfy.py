"""Tier (b): the MCMC-corrected sampler inside ComfyUI's own samplers, on the analytic product."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.model_management
import comfy.samplers

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for
from unite_and_conquer.samplers import correctors, poe
from unite_and_conquer.samplers.comfy.correctors import with_corrector
from unite_and_conquer.samplers.comfy.guider import ProductGuider
from unite_and_conquer.samplers.comfy.intervals import UNSPLITTABLE
from unite_and_conquer.samplers.comfy.models import wrap_expert
from unite_and_conquer.samplers.comfy.sampling import compute_sigmas
from unite_and_conquer.samplers.correctors import CorrectorConfig
from support.analytic import gaussian, gaussian_expert, product_gaussian


Config = CorrectorConfig

PARTS = [(1.0, 0.5), (-0.5, 0.8)]  # as in test_guider.py: nulls N(0, 1), w = (1, 1), a = (0.5, 0.5)
TARGET = product_gaussian([(m, v, 1.0) for m, v in PARTS])


def two_expert_product(resolution=4):
    lin = wrap_expert(gaussian_expert(alphas_cumprod_for("linear"), "gauss-linear", resolution))
    cos = wrap_expert(gaussian_expert(alphas_cumprod_for("cosine"), "gauss-cosine", resolution))
    null = gaussian(0.0, 1.0)
    return [poe.Binding(h, gaussian(m, v), 1.0, 0.5, (null,)) for h, (m, v) in zip((lin, cos), PARTS)]


def sample(config, sampler="euler", steps=30, n=4096, seed=0, callback=None, denoise_mask=None, latent=None):
    """Returns (samples, product evaluations, sigmas)."""
    bindings = two_expert_product()
    guider = ProductGuider(bindings)
    sigmas = compute_sigmas(guider, sampler, "karras", steps, 1.0)
    if latent is None:
        latent = torch.zeros(max(1, math.ceil(n / 48)), 3, 4, 4)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    chosen = comfy.samplers.sampler_object(sampler) if config is None else with_corrector(sampler, config)
    out = guider.sample(noise, latent, chosen, sigmas, denoise_mask=denoise_mask, callback=callback,
                        disable_pbar=True, seed=seed)
    return out, poe.unwrap(bindings[0].expert).network.calls, sigmas


def w2(out):
    m, v = TARGET
    return math.sqrt((out.mean().item() - m) ** 2 + (out.std().item() - math.sqrt(v)) ** 2)


def levels_in_window(sigmas, config):
    return sum(correctors.in_window(float(s), config) for s in sigmas[1:])


@pytest.mark.parametrize("method", ["ula", "uhmc", "mala"])
def test_correction_moves_samples_closer_to_the_closed_form(method):
    """Measured at n = 16384 (seed 0, euler, 30 karras steps): plain W2 0.124; corrected with
    k = 2: ULA 0.034, U-HMC 0.055, MALA (c = 1) 0.049. The bench compares at equal evaluations."""
    plain, _, _ = sample(None, n=16384)
    config = Config(method=method, steps=2, step_scale=1.0 if method == "mala" else 0.5, step_rule="sigma2")
    corrected, _, _ = sample(config, n=16384)
    assert w2(plain) > 0.1
    assert w2(corrected) < 0.6 * w2(plain), (w2(corrected), w2(plain))
    assert abs(corrected.mean().item() - TARGET[0]) < abs(plain.mean().item() - TARGET[0])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "euler_cfg_pp"])
@pytest.mark.parametrize("config", [Config(method="uhmc", steps=2), Config(method="ula", steps=3, sigma_window=(0.5, 20.0)),
                                    Config(method="mala", steps=2, sigma_window=(0.1, math.inf))])
def test_evaluations_are_steps_plus_corrector_evaluations_in_window(sampler, config):
    out, calls, sigmas = sample(config, sampler=sampler, steps=10, n=96)
    steps = len(sigmas) - 1
    levels = levels_in_window(sigmas, config)
    assert 0 < levels < steps
    assert calls == steps + levels * correctors.evaluations_per_level(config)
    assert torch.isfinite(out).all() and out.std() > 0.1


@pytest.mark.parametrize("sampler", [s for s in comfy.samplers.SAMPLER_NAMES if s not in UNSPLITTABLE])
def test_every_splittable_comfy_sampler_runs_corrected(sampler):
    """Each interval costs the sampler at least one evaluation, each level in the window one more."""
    out, calls, sigmas = sample(Config(steps=1), sampler=sampler, steps=6, n=64)
    assert torch.isfinite(out).all() and out.std() > 0.05
    assert calls >= len(sigmas) - 1 + levels_in_window(sigmas, Config(steps=1)) > len(sigmas) - 1


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_samplers_that_pick_their_own_steps_are_refused(sampler):
    with pytest.raises(ValueError, match=rf"^{sampler} chooses its own steps and cannot run one interval at a time"):
        with_corrector(sampler, Config())


def test_none_returns_the_plain_sampler_and_its_samples():
    plain, _, _ = sample(None, n=96, seed=3)
    same, _, _ = sample(Config(method="none"), n=96, seed=3)
    assert torch.equal(plain, same)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_sde"])
def test_same_seed_same_samples_and_another_seed_differs(sampler):
    a, _, _ = sample(Config(), sampler=sampler, steps=8, n=96, seed=7)
    b, _, _ = sample(Config(), sampler=sampler, steps=8, n=96, seed=7)
    c, _, _ = sample(Config(), sampler=sampler, steps=8, n=96, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_callbacks_carry_global_step_indices():
    seen = []
    _, _, sigmas = sample(Config(), steps=9, n=48, callback=lambda i, den, x, total: seen.append((i, total)))
    assert seen == [(i, 9) for i in range(9)] and len(sigmas) == 10


def test_known_pixels_stay_known_under_correction():
    """The corrector uses ComfyUI's inpainting model wrapper, so a denoise mask still holds."""
    latent = torch.full((4, 3, 4, 4), 0.25)
    mask = torch.zeros(4, 1, 4, 4)
    mask[..., :2] = 1.0  # left half sampled, right half known
    out, _, _ = sample(Config(method="ula"), steps=10, latent=latent, denoise_mask=mask)
    torch.testing.assert_close(out[..., 2:], latent[..., 2:], atol=1e-5, rtol=0)
    assert out[..., :2].std() > 0.2


def test_interrupt_stops_the_corrected_run():
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(Config(), steps=5, n=48)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_steps_between_corrected_levels_are_one_sampler_call():
    """Stops at every level in the window and at the end; no level in the window is one call."""
    from unite_and_conquer.samplers.comfy.correctors import corrected_stops
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.1, 0.0])
    assert corrected_stops(sigmas, Config(sigma_window=(1.0, math.inf))) == [1, 2, 5]
    assert corrected_stops(sigmas, Config(sigma_window=(0.05, math.inf))) == [1, 2, 3, 4, 5]
    assert corrected_stops(sigmas, Config(sigma_window=(20.0, math.inf))) == [5]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "uni_pc", "lms"])
def test_multistep_samplers_keep_their_history_outside_the_window(sampler):
    """With no level in the corrector's window the corrected sampler is ComfyUI's own, bit for bit,
    history included (run one interval at a time, these samplers give other numbers)."""
    plain, plain_calls, _ = sample(None, sampler=sampler, steps=10, n=96, seed=2)
    same, same_calls, _ = sample(Config(sigma_window=(1e4, math.inf)), sampler=sampler, steps=10, n=96, seed=2)
    assert torch.equal(plain, same) and same_calls == plain_calls

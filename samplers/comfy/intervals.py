"""Running a ComfyUI sampler one interval of its schedule at a time, which the MCMC corrector
(``correctors``) and RePaint resampling (``resampling``) both need: the ``KSAMPLER`` base class,
the refusal of samplers that cannot be split, seeded noise streams, and the flow-model view.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

import comfy.k_diffusion.sampling
import comfy.model_sampling
import comfy.samplers

from .. import parameterization

# Samplers that choose their own steps, so no interval of a schedule can be run alone.
UNSPLITTABLE = ("dpm_fast", "dpm_adaptive")

# derived_seed streams of one run's seed: the corrector's draws, the sampler's Brownian noise,
# RePaint's re-noising, and (TREE_STREAM + r) the Brownian tree of resampling pass r.
CORRECTOR_STREAM, SAMPLER_NOISE_STREAM, RENOISE_STREAM, TREE_STREAM = 0, 1, 2, 3


def check_splittable(sampler, needs: str, refusal: str) -> None:
    """Refuse a ``SAMPLER`` that cannot run one interval at a time. ``needs`` names what asks (for
    the message), ``refusal`` says what that means and what to do instead."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise TypeError(f"{type(sampler).__name__} is not a k-diffusion sampler (KSAMPLER), so it cannot be run "
                        f"one interval at a time; {needs} needs a sampler from KSamplerSelect")
    name = getattr(sampler.sampler_function, "__name__", "").removesuffix("_function")
    if name in UNSPLITTABLE:
        raise ValueError(f"{name} chooses its own steps and cannot run one interval at a time, so {refusal}")


def derived_seed(seed: int | None, stream: int) -> int | None:
    """An independent seed for one use of the run's seed (one of the ``*_STREAM`` numbers), so no
    two runs with neighbouring seeds share a stream."""
    if seed is None:
        return None
    g = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return int(torch.randint(0, 2**62, (stream + 1,), generator=g)[stream])


def stream_generator(seed: int | None, stream: int) -> torch.Generator | None:
    """A CPU generator on ``derived_seed(seed, stream)``; ``None`` (the global RNG) without a seed."""
    return torch.Generator().manual_seed(derived_seed(seed, stream)) if seed is not None else None


class ClampedNoiseSampler:
    """A Brownian-tree noise sampler over the whole schedule; queries reaching sigma = 0 (the
    final step) are clamped to the tree's range, which leaves their law N(0, I)."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None):
        positive = sigmas[sigmas > 0]
        self.lo, self.hi = positive.min(), sigmas.max()
        self.tree = comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(x, self.lo, self.hi, seed=seed, cpu=True)

    def __call__(self, sigma, sigma_next):
        a = torch.as_tensor(sigma).clamp(self.lo, self.hi)
        b = torch.as_tensor(sigma_next).clamp(self.lo, self.hi)
        if a == b:
            b = self.lo if a > self.lo else self.hi
        return self.tree(a, b)


def takes_noise_sampler(fn: Callable) -> bool:
    try:
        return "noise_sampler" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def ve_view(model_sampling, sigma: float) -> tuple[float, float]:
    """(scale, VE sigma): the sampler's ``x`` at ``sigma`` is ``scale`` times a variance-exploding
    point at that VE sigma. Flow models (``CONST``, ``x = (1 - sigma) x0 + sigma eps``) map to
    ``x / (1 - sigma)`` at ``sigma / (1 - sigma)``; their top level (sigma 1) is pure noise."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return 1.0 - sigma, parameterization.ve_level(sigma)
    return 1.0, sigma


class IntervalKSampler(comfy.samplers.KSAMPLER):
    """A ``KSAMPLER`` whose subclasses run the sampler function themselves, interval by interval,
    in ``walk``; the set-up around it is ComfyUI's own."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        # KSAMPLER.sample up to the sampler function call, unchanged, so inpainting and noise scaling are ComfyUI's.
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        if self.inpaint_options.get("random", False):
            generator = torch.manual_seed(extra_args.get("seed", 41) + 1)
            model_k.noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(noise.device)
        else:
            model_k.noise = noise
        model_sampling = model_wrap.inner_model.model_sampling
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        x = self.walk(model_k, model_sampling, x, sigmas, extra_args, callback, disable_pbar)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)

    def walk(self, model_k, model_sampling, x, sigmas, extra_args, callback, disable_pbar):
        raise NotImplementedError

    @staticmethod
    def run_interval(fn, model_k, x, sigmas, extra_args, callback, done: int, total: int, options: dict):
        """The sampler function over ``sigmas`` (one stretch of the schedule), its callbacks
        renumbered to the global step ``done + i`` of ``total``."""
        step_callback = None
        if callback is not None:
            step_callback = (lambda d: callback(done + d["i"], d["denoised"], d["x"], total))
        # A copy: CFG++ samplers add their post-CFG hook to extra_args in place, once per call.
        return fn(model_k, x, sigmas, extra_args=dict(extra_args), callback=step_callback, disable=True, **options)

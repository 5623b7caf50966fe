"""MCMC correction inside every noise level of any ComfyUI sampler (RRR Alg. 1, "sampler +
MCMC at each intermediate distribution"; Du et al. 2023).

A guider only predicts; it cannot move the sampler's ``x``. So the sampler is wrapped instead:
:class:`CorrectedKSampler` walks the sigma schedule, runs the base sampler function over one
interval at a time (``sigmas[i:i + 2]``) and, between intervals, runs the corrector of
``samplers.correctors`` at the level reached, when it lies in the corrector's sigma window.

- The corrector calls the same model wrapper the sampler function gets (ComfyUI's
  ``KSamplerX0Inpaint``), with the same ``extra_args``, so denoise masks (inpainting), model
  options and the product guider apply to the corrector's evaluations too.
- Callbacks carry the global step index and the total number of steps, so the progress bar and
  the previews cover the whole run; one console progress bar spans all intervals.
- Noise: the corrector draws from a CPU ``torch.Generator`` seeded from ``extra_args["seed"]``, and
  samplers that take a ``noise_sampler`` get one Brownian-tree noise sampler over the whole
  schedule (the one SDE samplers build for themselves), so each interval draws fresh noise, same
  seed gives the same image, and stochastic samplers keep their noise law.
- Multistep samplers (dpmpp_2m, dpmpp_3m_sde, uni_pc, lms, ipndm, deis, res_multistep,
  sa_solver, ...) restart their history at each interval when correction is on: the corrector
  moves ``x``, which invalidates the stored derivatives, so each interval is a first-order step
  of that sampler. ``dpm_fast`` and ``dpm_adaptive`` choose their own steps and cannot be split
  into intervals; they are refused.
- Flow models (``CONST`` model sampling, ``x = (1 - sigma) x0 + sigma eps``) are corrected in
  the equivalent variance-exploding coordinates ``x / (1 - sigma)`` at level ``sigma / (1 - sigma)``.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from tqdm.auto import tqdm

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.model_sampling
import comfy.samplers

from . import correctors
from .correctors import CorrectorConfig

UNSPLITTABLE = ("dpm_fast", "dpm_adaptive")


def corrected_sampler(sampler_name: str, config: CorrectorConfig) -> comfy.samplers.KSAMPLER:
    """ComfyUI's sampler ``sampler_name`` (any of ``comfy.samplers.SAMPLER_NAMES`` but dpm_fast
    and dpm_adaptive) with ``config``'s corrector at every level in its window. With
    ``config.method == "none"`` it returns the plain sampler."""
    if sampler_name in UNSPLITTABLE:
        raise ValueError(f"{sampler_name} chooses its own steps and cannot run one interval at a time, so it "
                         "cannot be corrected; choose another sampler or set the corrector to none")
    return correct_sampler(comfy.samplers.sampler_object(sampler_name), config)


def correct_sampler(sampler, config: CorrectorConfig) -> comfy.samplers.KSAMPLER:
    """Wrap an existing ``SAMPLER`` object (as made by ``KSamplerSelect`` or a custom sampler
    node, with its extra options) so that it runs ``config``'s corrector between intervals."""
    if config.method == "none":
        return sampler
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise TypeError(f"{type(sampler).__name__} is not a k-diffusion sampler (KSAMPLER), so it cannot be run "
                        "one interval at a time; the MCMC corrector needs a sampler from KSamplerSelect")
    name = getattr(sampler.sampler_function, "__name__", "")
    if name in ("dpm_fast_function", "dpm_adaptive_function"):
        raise ValueError(f"{name.removesuffix('_function')} chooses its own steps and cannot run one interval at a "
                         "time, so it cannot be corrected; choose another sampler or set the corrector to none")
    return CorrectedKSampler(sampler, config)


def derived_seed(seed: int | None, stream: int) -> int | None:
    """An independent seed for one use of the run's seed (0: corrector, 1: sampler noise), so no
    two runs with neighbouring seeds share a stream."""
    if seed is None:
        return None
    g = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return int(torch.randint(0, 2**62, (stream + 1,), generator=g)[stream])


class _ClampedNoiseSampler:
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


def _takes_noise_sampler(fn: Callable) -> bool:
    try:
        return "noise_sampler" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _ve_view(model_sampling, x: torch.Tensor, sigma: float) -> tuple[float, float]:
    """(scale, VE sigma): the sampler's ``x`` is ``scale`` times a VE point at that sigma. The
    sigma window is read in the sampler's own sigma."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return 1.0 - sigma, sigma / (1.0 - sigma)
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


class CorrectedKSampler(IntervalKSampler):
    """A ``KSAMPLER`` that runs its sampler function one interval at a time with an MCMC
    corrector between intervals. Construct it with :func:`corrected_sampler` or
    :func:`correct_sampler`.

    Args:
        base (`comfy.samplers.KSAMPLER`): the sampler to correct (function and options are reused).
        config (`CorrectorConfig`): the corrector and the sigma window it runs in.
    """

    def __init__(self, base: comfy.samplers.KSAMPLER, config: CorrectorConfig):
        super().__init__(base.sampler_function, base.extra_options, base.inpaint_options)
        self.config = config
        # What the corrector did in the latest run (correctors.CorrectorReport), for the node's summary.
        self.last_report = correctors.CorrectorReport()

    def walk(self, model_k, model_sampling, x, sigmas, extra_args, callback, disable_pbar):
        """Sampler intervals with corrector levels between them; returns the final ``x``."""
        total = len(sigmas) - 1
        seed = extra_args.get("seed")
        generator = torch.Generator().manual_seed(derived_seed(seed, 0)) if seed is not None else None
        options = dict(self.extra_options)
        if total > 0 and "noise_sampler" not in options and _takes_noise_sampler(self.sampler_function):
            options["noise_sampler"] = _ClampedNoiseSampler(x, sigmas, derived_seed(seed, 1))
        state: dict = {"report": correctors.CorrectorReport()}
        self.last_report = state["report"]
        for i in tqdm(range(total), disable=disable_pbar):
            comfy.model_management.throw_exception_if_processing_interrupted()
            step_callback = None
            if callback is not None:
                step_callback = (lambda d, i=i: callback(i + d["i"], d["denoised"], d["x"], total))
            # A copy: CFG++ samplers add their post-CFG hook to extra_args in place, once per call.
            x = self.sampler_function(model_k, x, sigmas[i:i + 2], extra_args=dict(extra_args),
                                      callback=step_callback, disable=True, **options)
            sigma = float(sigmas[i + 1])
            if correctors.in_window(sigma, self.config):
                x = self.correct(model_k, model_sampling, x, sigma, extra_args, generator, state)
        return x

    def correct(self, model_k, model_sampling, x, sigma, extra_args, generator, state):
        scale, sigma_ve = _ve_view(model_sampling, x, sigma)

        def denoise(y, _sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            s_in = x.new_full([x.shape[0]], sigma)
            return model_k(y * scale, s_in, **extra_args)

        return scale * correctors.correct(denoise, x / scale, sigma_ve, self.config, generator, state)

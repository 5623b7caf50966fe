"""RePaint resampling inside any ComfyUI sampler (Lugmayr et al. 2022; the schedule and the
re-noising step are in ``samplers.resampling``).

:class:`ResampledKSampler` walks the jump schedule: it runs the base sampler function over one
interval at a time (``sigmas[i:i + 2]``), and at each jump re-noises ``x`` back up J levels and
redoes those intervals.

- Known pixels: every evaluation goes through ComfyUI's inpainting model wrapper
  (``KSamplerX0Inpaint``), which replaces the known pixels of ``x`` by the noised known image at
  the current level, and the product's prediction there by the known image; so the product always
  sees the partially known image, and what re-noising does to the known pixels is overwritten.
- Callbacks carry a global interval index over every interval the walk runs (redone ones
  included) and that total, so the progress bar and previews advance monotonically.
- Noise: re-noising draws from a CPU ``torch.Generator`` seeded from ``extra_args["seed"]``.
  Samplers that take a ``noise_sampler`` get one Brownian-tree noise sampler per pass: the r-th
  run of a block uses tree r, so a redone interval draws new noise (reusing a Brownian
  increment would correlate the passes), and same seed gives the same image.
- The base sampler runs over each stretch of intervals inside one block of J in a single call, so
  multistep samplers (dpmpp_2m, uni_pc, ...) keep their history within a block and restart it at
  block boundaries and jumps (a jump moves ``x``, which invalidates it); with J = 1, or with the
  MCMC corrector, every interval is its own call, a first-order step of that sampler.
  ``dpm_fast`` and ``dpm_adaptive`` choose their own steps and are refused.
- With the MCMC corrector (a ``CorrectedKSampler`` as the base), its correction runs after every
  interval, redone ones included; resampling must wrap the corrector, not the other way round.
- Flow models (``CONST``) are re-noised in the equivalent VE coordinates, as the corrector does.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

import comfy.model_management
import comfy.samplers

from .. import resampling
from ..correctors import in_window
from .correctors import CorrectedKSampler
from .intervals import (CORRECTOR_STREAM, RENOISE_STREAM, TREE_STREAM, ClampedNoiseSampler, IntervalKSampler,
                        check_splittable, derived_seed, stream_generator, takes_noise_sampler, ve_view)


def with_resampling(sampler, jump_length: int, count: int) -> comfy.samplers.KSAMPLER:
    """Wrap a ``SAMPLER`` (from ``KSamplerSelect``, a custom sampler node, or
    ``correctors.with_corrector``) so that it resamples RePaint-style: every block of
    ``jump_length`` intervals runs ``count`` times in all. ``count == 1`` returns ``sampler``."""
    if jump_length < 1 or count < 1:
        raise ValueError(f"jump_length and count must be >= 1, got {jump_length} and {count}")
    if isinstance(sampler, ResampledKSampler):
        raise ValueError("this sampler already resamples (PoEResample); wrap the plain sampler once, with the jump "
                         "length and count you want")
    check_splittable(sampler, "resampling", "it cannot resample; choose another sampler")
    if count == 1:
        return sampler
    return ResampledKSampler(sampler, jump_length, count)


def _refuse_inside_another_walk(*args, **kwargs):
    raise ValueError("a resampling sampler (PoEResample) was wrapped by another interval-by-interval sampler, "
                     "which would drop the resampling: apply the MCMC corrector (PoECorrectedSampler) first and "
                     "PoEResample last")


class ResampledKSampler(IntervalKSampler):
    """A ``KSAMPLER`` that walks RePaint's jump schedule. Construct it with
    :func:`with_resampling`.

    Args:
        base (`comfy.samplers.KSAMPLER`): the sampler that runs each interval; a
            ``CorrectedKSampler`` also runs its corrector after each interval.
        jump_length (`int`): J, how many levels each jump goes back.
        count (`int`): R, how many times each block of J intervals runs in all.
    """

    def __init__(self, base: comfy.samplers.KSAMPLER, jump_length: int, count: int):
        # Anything else that splits this sampler into intervals would call sampler_function and
        # silently lose the resampling, so that function refuses.
        super().__init__(_refuse_inside_another_walk, base.extra_options, base.inpaint_options)
        self.base = base
        self.jump_length = jump_length
        self.count = count

    def walk(self, model_k, model_sampling, x, sigmas, extra_args, callback, disable_pbar):
        """Sampler intervals and jumps back along the schedule; returns the final ``x``."""
        moves = resampling.jump_schedule(len(sigmas) - 1, self.jump_length, self.count)
        total = resampling.intervals(moves)
        seed = extra_args.get("seed")
        renoise_gen = stream_generator(seed, RENOISE_STREAM)
        corrector = self.base.config if isinstance(self.base, CorrectedKSampler) else None
        corrector_gen = stream_generator(seed, CORRECTOR_STREAM)
        fn = self.base.sampler_function
        options = dict(self.base.extra_options)
        trees: dict[int, ClampedNoiseSampler] = {}
        wants_tree = len(sigmas) > 1 and "noise_sampler" not in options and takes_noise_sampler(fn)
        runs = [0] * len(sigmas)
        state: dict = {}
        done = 0
        bar = tqdm(total=total, disable=disable_pbar)
        for a, b in resampling.segments(moves, self.jump_length, single=corrector is not None):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if b < a:
                x = self.jump(model_sampling, x, float(sigmas[a]), float(sigmas[b]), renoise_gen)
                state.clear()   # U-HMC momentum belongs to the level it was drawn at
                continue
            if wants_tree:
                r = runs[a]
                if r not in trees:
                    trees[r] = ClampedNoiseSampler(x, sigmas, derived_seed(seed, TREE_STREAM + r))
                options["noise_sampler"] = trees[r]
            runs[a] += 1
            x = self.run_interval(fn, model_k, x, sigmas[a:b + 1], extra_args, callback, done, total, options)
            if corrector is not None and in_window(float(sigmas[b]), corrector):
                x = self.base.correct(model_k, model_sampling, x, float(sigmas[b]), extra_args, corrector_gen, state)
            done += b - a
            bar.update(b - a)
        bar.close()
        return x

    @staticmethod
    def jump(model_sampling, x, sigma: float, sigma_back: float, generator) -> torch.Tensor:
        """Re-noise ``x`` from ``sigma`` up to ``sigma_back`` (RePaint Alg. 1 line 9, VE form)."""
        device = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        scale, ve_sigma = ve_view(model_sampling, sigma)
        scale_back, ve_sigma_back = ve_view(model_sampling, sigma_back)
        if scale_back <= 0:
            return z   # a flow model's top level is pure noise
        return resampling.renoise(x / scale, ve_sigma, ve_sigma_back, z) * scale_back

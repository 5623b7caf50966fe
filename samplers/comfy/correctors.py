"""MCMC correction inside every noise level of any ComfyUI sampler (RRR Alg. 1, "sampler +
MCMC at each intermediate distribution"; Du et al. 2023).

A guider only predicts; it cannot move the sampler's ``x``. So the sampler is wrapped instead:
:class:`CorrectedKSampler` walks the sigma schedule, runs the base sampler function up to each
level in the corrector's sigma window and, there, runs the corrector of ``samplers.correctors``.

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
  sa_solver, ...) restart their history after each corrected level: the corrector moves ``x``,
  which invalidates the stored derivatives. The steps between two corrected levels run as one
  call of the sampler function, so outside the corrector's window a multistep sampler keeps its
  history and is ComfyUI's own sampler step for step. ``dpm_fast`` and ``dpm_adaptive`` choose
  their own steps and cannot be split into intervals; they are refused.
- Flow models (``CONST`` model sampling, ``x = (1 - sigma) x0 + sigma eps``) are corrected in
  the equivalent variance-exploding coordinates ``x / (1 - sigma)`` at level ``sigma / (1 - sigma)``.
"""
from __future__ import annotations

from tqdm.auto import tqdm

import comfy.model_management
import comfy.samplers

from ..correctors import CorrectorConfig, CorrectorReport, correct, in_window
from .intervals import (CORRECTOR_STREAM, SAMPLER_NOISE_STREAM, ClampedNoiseSampler, IntervalKSampler,
                        check_splittable, derived_seed, stream_generator, takes_noise_sampler, ve_view)


def with_corrector(sampler, config: CorrectorConfig) -> comfy.samplers.KSAMPLER:
    """``sampler`` (a name in ``comfy.samplers.SAMPLER_NAMES``, or a ``SAMPLER`` object as made by
    ``KSamplerSelect`` or a custom sampler node, with its extra options) running ``config``'s
    corrector between intervals. With ``config.method == "none"`` it is the plain sampler."""
    if isinstance(sampler, str):
        sampler = comfy.samplers.sampler_object(sampler)
    if config.method == "none":
        return sampler
    check_splittable(sampler, "the MCMC corrector",
                     "it cannot be corrected; choose another sampler or set the corrector to none")
    return CorrectedKSampler(sampler, config)


def corrected_stops(sigmas, config: CorrectorConfig) -> list[int]:
    """Indices into ``sigmas`` where a sampler call ends: each level the corrector runs at, and
    the last. The steps between two stops are one call, so a multistep sampler keeps its history
    there."""
    last = len(sigmas) - 1
    return [i for i in range(1, last) if in_window(float(sigmas[i]), config)] + [last] if last > 0 else []


class CorrectedKSampler(IntervalKSampler):
    """A ``KSAMPLER`` that runs its sampler function one interval at a time with an MCMC
    corrector between intervals. Construct it with :func:`with_corrector`.

    Args:
        base (`comfy.samplers.KSAMPLER`): the sampler to correct (function and options are reused).
        config (`CorrectorConfig`): the corrector and the sigma window it runs in.
    """

    def __init__(self, base: comfy.samplers.KSAMPLER, config: CorrectorConfig):
        super().__init__(base.sampler_function, base.extra_options, base.inpaint_options)
        self.config = config
        # What the corrector did in the latest run (correctors.CorrectorReport), for the node's summary.
        self.last_report = CorrectorReport()

    def walk(self, model_k, model_sampling, x, sigmas, extra_args, callback, disable_pbar):
        """Sampler intervals with corrector levels between them; returns the final ``x``."""
        total = len(sigmas) - 1
        seed = extra_args.get("seed")
        generator = stream_generator(seed, CORRECTOR_STREAM)
        options = dict(self.extra_options)
        if total > 0 and "noise_sampler" not in options and takes_noise_sampler(self.sampler_function):
            options["noise_sampler"] = ClampedNoiseSampler(x, sigmas, derived_seed(seed, SAMPLER_NOISE_STREAM))
        state: dict = {"report": CorrectorReport()}
        self.last_report = state["report"]
        stops = corrected_stops(sigmas, self.config)
        with tqdm(total=total, disable=disable_pbar) as bar:
            for start, stop in zip([0] + stops, stops):
                comfy.model_management.throw_exception_if_processing_interrupted()
                x = self.run_interval(self.sampler_function, model_k, x, sigmas[start:stop + 1], extra_args, callback,
                                      start, total, options)
                bar.update(stop - start)
                sigma = float(sigmas[stop])
                if in_window(sigma, self.config):
                    x = self.correct(model_k, model_sampling, x, sigma, extra_args, generator, state)
        return x

    def correct(self, model_k, model_sampling, x, sigma, extra_args, generator, state):
        scale, sigma_ve = ve_view(model_sampling, sigma)

        def denoise(y, _sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            s_in = x.new_full([x.shape[0]], sigma)
            return model_k(y * scale, s_in, **extra_args)

        return scale * correct(denoise, x / scale, sigma_ve, self.config, generator, state)

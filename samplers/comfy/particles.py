"""Feynman–Kac weighted particles (``samplers/particles.py``) inside ComfyUI's stochastic samplers.

:class:`ParticleKSampler` wraps a ``SAMPLER``: the pack's ``poe_euler_maruyama`` (the step the weights
are derived for) or one of ComfyUI's ancestral and SDE samplers (:data:`STOCHASTIC`; the weights hold
to first order). The batch is the particles, in groups of K consecutive images, one group per output.

- Weights: each step's log-weight increment comes from the per-term predictions of the sampler's
  first product evaluation in that step, which the guider hands over (``guider.TERMS_SINK``); no
  evaluation is added. Every k-diffusion sampler reports a step through its callback right after
  that evaluation, which is where the walk reads it.
- Resampling: when a group's ESS falls below the threshold, the walk stops the sampler in that
  callback (before the step moves ``x``), resamples the particles systematically within their groups,
  and restarts the sampler from that step. The restart serves its first evaluation from the one just
  made (resampled alike), so resampling costs no evaluation; a multistep sampler restarts its history
  there. Samplers get a noise sampler (:class:`StepNoise`) that draws each interval's noise from the
  run's seed and the interval, one row per particle: a restart draws the same noise for the same step,
  and after resampling, copies of one particle draw their own noise and separate.
- Resample-move: with the MCMC corrector (``PoECorrectedSampler`` or PoEKSampler's ``corrector``), the
  corrector runs after each step whose particles were resampled (``ParticleConfig.move = "resampled"``),
  or at every level of its window (``"levels"``).
- Output: every particle after a final resampling, one per group drawn by weight, or the highest-weight
  particle of each group (``ParticleConfig.output``); the batch may shrink to one image per group.

Refused: deterministic samplers (resampled copies never separate), CFG++ samplers (they step partly
along the pooled null, not the product's score), ``lcm`` (it re-noises the denoised image whole, which
is no discretisation of the diffusion SDE), noise masks, guiders other than the pack's, and products
with no target for the weights (``particles.check_bindings``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import struct

import torch
from tqdm.auto import tqdm

import comfy.model_management
import comfy.samplers

from .. import particles
from ..correctors import CorrectorReport, in_window
from ..particles import ParticleConfig, ParticleReport
from .correctors import CorrectedKSampler
from .guider import TERMS_SINK
from .intervals import (CORRECTOR_STREAM, SAMPLER_NOISE_STREAM, IntervalKSampler,
                        check_splittable, derived_seed, stream_generator, takes_noise_sampler, ve_view)
from .resampling import ResampledKSampler
from .sde import SAMPLER_NAME, SDEKSampler, run_bindings, sampler_object

# ComfyUI's samplers that inject noise at every step as a discretisation of the diffusion SDE family.
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
              "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
              "dpmpp_3m_sde_gpu", "ddpm", "res_multistep_ancestral", "er_sde", "seeds_2", "seeds_3")
# The stream of the run's seed for resampling and the output draw.
PARTICLE_STREAM = 5


def sampler_name(sampler) -> str:
    return getattr(getattr(sampler, "sampler_function", None), "__name__", "").removeprefix("sample_")


def check_stochastic(sampler) -> None:
    """Refuse a sampler whose steps cannot carry particle weights, saying why."""
    name = sampler_name(sampler)
    if name == SAMPLER_NAME:
        return
    if name.endswith("_cfg_pp"):
        raise ValueError(f"{name} is a CFG++ sampler: it steps partly along the pooled null instead of the product's "
                         f"score, so the particle weights do not hold; choose {SAMPLER_NAME} or an ancestral / SDE "
                         "sampler")
    if name == "lcm":
        raise ValueError(f"lcm re-noises its denoised image whole at every step, which is no discretisation of the "
                         f"diffusion SDE the weights are derived for; choose {SAMPLER_NAME} or an ancestral / SDE sampler")
    if name not in STOCHASTIC:
        raise ValueError(f"{name or type(sampler).__name__} is deterministic: particles copied by resampling would never "
                         f"separate again; choose {SAMPLER_NAME} (exact for the weights) or one of ComfyUI's ancestral / "
                         f"SDE samplers ({', '.join(STOCHASTIC[:4])}, ...)")
    if getattr(sampler, "extra_options", {}).get("eta", 1.0) == 0:
        raise ValueError(f"{name} with eta 0 injects no noise, so particles copied by resampling would never separate; "
                         "give it eta > 0")


def with_particles(sampler, config: ParticleConfig) -> "ParticleKSampler":
    """``sampler`` (a name, a SAMPLER from KSamplerSelect or a custom sampler node, PoESDESampler's,
    or a PoECorrectedSampler around one of them; ``None``: ``poe_euler_maruyama``) with weighted
    particles. The move step is ``config.corrector``, or the corrector around the sampler."""
    if sampler is None:
        sampler = SDEKSampler()
    elif isinstance(sampler, str):
        sampler = sampler_object(sampler)
    if isinstance(sampler, ParticleKSampler):
        raise ValueError("this sampler already has particles; connect the plain sampler to the particle sampler once")
    if isinstance(sampler, ResampledKSampler):
        raise ValueError("RePaint resampling (PoEResample) cannot run inside particles; remove it")
    if isinstance(sampler, CorrectedKSampler):
        if config.corrector is not None:
            raise ValueError("two correctors: the sampler is already corrected (PoECorrectedSampler) and the particles "
                             "have their own; keep one")
        config = dataclasses.replace(config, corrector=sampler.config)
        sampler = comfy.samplers.KSAMPLER(sampler.sampler_function, sampler.extra_options, sampler.inpaint_options)
    check_splittable(sampler, "particles", "it cannot carry particles; choose another sampler")
    check_stochastic(sampler)
    return ParticleKSampler(sampler, config)


class StepNoise:
    """Standard normal noise of ``x``'s shape for each interval (sigma, sigma_next) a sampler asks
    about, drawn from a CPU generator seeded by the run's seed and the interval: a restarted sampler
    gets the same noise for the same step, each row (particle) its own, and disjoint intervals are
    independent, as Brownian increments are. Far cheaper than a Brownian tree for large batches."""

    def __init__(self, x: torch.Tensor, seed: int | None):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.seed = 0 if seed is None else int(seed)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        key = struct.pack("<qdd", self.seed, float(sigma), float(sigma_next))
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        return torch.randn(self.shape, generator=g, dtype=self.dtype).to(self.device)


def repeat_conditions(bindings, k: int) -> list:
    """The chain with every per-image condition tensor (batch > 1) repeated K times in place, so that
    each group of K consecutive particles shares its image's conditions."""
    def rows(condition):
        if not isinstance(condition, dict):
            return condition
        return {key: v.repeat_interleave(k, 0) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] > 1 else v
                for key, v in condition.items()}

    return [dataclasses.replace(b, condition=rows(b.condition), null=tuple(rows(n) for n in b.null)) for b in bindings]


def _refuse_inside_another_walk(*args, **kwargs):
    raise ValueError("a particle sampler was wrapped by another interval-by-interval sampler, which would drop the "
                     "particles: apply the MCMC corrector (PoECorrectedSampler) to the plain sampler and the particle "
                     "sampler last")


class _Resample(Exception):
    """Raised from the sampler's callback to stop it where a group must be resampled."""

    def __init__(self, step: int, x: torch.Tensor, denoised: torch.Tensor, indices: torch.Tensor):
        super().__init__(step)
        self.step, self.x, self.denoised, self.indices = step, x, denoised, indices


class _Replay:
    """The sampler's model, except that the first call at (x, sigma) returns ``denoised``: the
    evaluation that was made before the restart, resampled alike."""

    def __init__(self, model, pending: tuple | None):
        self.model, self.pending = model, pending

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, sigma, **kwargs):
        if self.pending is not None:
            px, pd, ps = self.pending
            if float(sigma.flatten()[0]) == ps and x.shape == px.shape and torch.equal(x, px):
                self.pending = None
                return pd
        return self.model(x, sigma, **kwargs)


class ParticleKSampler(IntervalKSampler):
    """A ``KSAMPLER`` that runs its sampler on weighted particles (module docstring). Construct it
    with :func:`with_particles`.

    Args:
        base (`comfy.samplers.KSAMPLER`): the stochastic sampler that moves the particles.
        config (`ParticleConfig`): particles per image, lambda, the ESS threshold, the output, the move.
    """

    def __init__(self, base: comfy.samplers.KSAMPLER, config: ParticleConfig):
        # Anything that splits this sampler into intervals would call sampler_function and lose the particles.
        super().__init__(_refuse_inside_another_walk, base.extra_options, base.inpaint_options)
        self.base = base
        self.config = config
        self.corrector = config.corrector
        self.last_report = ParticleReport()
        self.last_corrector_report = CorrectorReport()

    def summary(self) -> str:
        text = self.last_report.summary()
        if self.corrector is not None:
            text += f"\n  move (corrector after {'resampling' if self.config.move == 'resampled' else 'every level'}): " \
                    f"{self.last_corrector_report.summary()}"
        return text

    def walk(self, model_k, model_sampling, x, sigmas, extra_args, callback, disable_pbar):
        config, k = self.config, self.config.particles
        bindings = run_bindings(model_k)
        if not bindings:
            raise ValueError("particles read the product's per-term predictions: use the pack's guider (PoEGuider) "
                             "with this sampler")
        particles.check_bindings(bindings)
        if extra_args.get("denoise_mask") is not None:
            raise ValueError("particles cannot sample with a noise mask (known regions); remove SetLatentNoiseMask")
        if x.shape[0] % k:
            raise ValueError(f"the batch of {x.shape[0]} image(s) does not split into groups of {k} particles: make the "
                             f"batch a multiple of {k} (each group of {k} consecutive images is one output)")
        last = len(sigmas) - 1
        seed = extra_args.get("seed")
        generator = stream_generator(seed, PARTICLE_STREAM)
        log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        lineage = {"ancestry": torch.arange(x.shape[0])}   # each particle's starting particle, for the report
        report = ParticleReport(particles=k, groups=x.shape[0] // k, temperature=config.temperature)
        self.last_report = report
        tap: list = []
        tapped = {**extra_args, "model_options": {**extra_args.get("model_options", {}), TERMS_SINK: tap}}
        fn = self.base.sampler_function
        options = dict(self.base.extra_options)
        if last > 0 and "noise_sampler" not in options and takes_noise_sampler(fn):
            options["noise_sampler"] = StepNoise(x, derived_seed(seed, SAMPLER_NOISE_STREAM))
        mover = CorrectedKSampler(self.base, self.corrector) if self.corrector is not None else None
        move_state: dict = {"report": CorrectorReport()}
        self.last_corrector_report = move_state["report"]
        move_gen = stream_generator(seed, CORRECTOR_STREAM)
        level_stops = [i for i in range(1, last) if mover is not None and config.move == "levels"
                       and in_window(float(sigmas[i]), self.corrector)]
        state = {"pos": 0, "skip": None}
        done = [0] * last

        def on_step(d):
            i = state["pos"] + d["i"]
            if callback is not None:
                callback(i, d["denoised"], d["x"], last)
            if state["skip"] == i:
                state["skip"] = None
                tap.clear()
                return
            sigma = float(sigmas[i])
            record = next((r for r in tap if math.isclose(r.sigma, sigma, rel_tol=1e-5, abs_tol=1e-8)), None)
            tap.clear()
            if record is None:
                raise RuntimeError(f"{sampler_name(self.base)} made no product evaluation at step {i + 1} before "
                                   "reporting it, so its particles cannot be weighted")
            _, ve = ve_view(model_sampling, sigma)
            _, ve_next = ve_view(model_sampling, float(sigmas[i + 1]))
            increment = particles.log_weight_increment(particles.exponents(record), ve, ve_next, "denoised")
            log_w.add_(config.temperature * increment.to(log_w.device))
            done[i] += 1
            indices, low = particles.resample(log_w, k, config.ess_threshold, generator)
            report.record(sigma, log_w, int(low.sum()))
            if indices is not None:
                log_w.view(-1, k)[low.to(log_w.device)] = 0.0
                raise _Resample(i, d["x"], d["denoised"], indices.to(x.device))

        pending, move_at = None, None
        with tqdm(total=last, disable=disable_pbar) as bar:
            while state["pos"] < last:
                comfy.model_management.throw_exception_if_processing_interrupted()
                start = state["pos"]
                stop = min([s for s in level_stops if s > start] + [last] + ([move_at] if move_at else []))
                try:
                    x = fn(_Replay(model_k, pending), x, sigmas[start:stop + 1], extra_args=dict(tapped),
                           callback=on_step, disable=True, **options)
                except _Resample as r:
                    x = r.x[r.indices]
                    lineage["ancestry"] = lineage["ancestry"][r.indices.cpu()]
                    pending = (x, r.denoised[r.indices], float(sigmas[r.step]))
                    state["pos"], state["skip"] = r.step, r.step
                    bar.update(r.step - start)
                    if mover is not None and config.move == "resampled":
                        move_at = r.step + 1
                    continue
                pending = None
                bar.update(stop - start)
                state["pos"] = stop
                sigma = float(sigmas[stop])
                if mover is not None and (stop == move_at or stop in level_stops) and in_window(sigma, self.corrector):
                    x = mover.correct(model_k, model_sampling, x, sigma, extra_args, move_gen, move_state)
                if stop == move_at:
                    move_at = None
        if done != [1] * last:
            missing = [i + 1 for i, n in enumerate(done) if n != 1]
            raise RuntimeError(f"{sampler_name(self.base)} did not report step(s) {missing[:5]} through its callback, "
                               "so its particles cannot be weighted; choose another sampler")
        keep = particles.select_output(log_w, k, config.output, generator)
        report.finish(log_w, config.output, lineage["ancestry"])
        return x[keep.to(x.device)]

"""The pack's Euler–Maruyama step (``samplers/sde.py``) as a ComfyUI sampler, ``poe_euler_maruyama``,
and OR / AND groups (``samplers/superposition.py``), which only it runs: their Itô log-densities
need the diffusion's own noise at every step of one uninterrupted path.

:func:`sample_poe_euler_maruyama` has k-diffusion's signature, so ComfyUI's KSAMPLER, the MCMC
corrector and RePaint resampling run it like any sampler function. Each step makes one product
evaluation; with groups it reads that evaluation's per-term predictions from the guider
(``guider.TERMS_SINK``), draws the step's noise, sets each group's coefficients, mixes the rule and
steps, then adds each member's log-density increment. Flow models step in their VE view
(``intervals.ve_view``); from the flow's top level (pure noise, VE sigma infinite) the step is the
denoised image plus the next level's noise, and the log-densities start below it.
"""
from __future__ import annotations

import dataclasses
import math

import torch

import comfy.model_management
import comfy.samplers

from .. import superposition
from ..sde import euler_maruyama_step
from .guider import TERMS_SINK
from .intervals import stream_generator, ve_view

SAMPLER_NAME = "poe_euler_maruyama"
# The stream of the run's seed that this sampler draws from when it is given no noise sampler.
EM_STREAM = 4


def run_bindings(model) -> list:
    """The product's bindings for this run, from the sampler's model (KSamplerX0Inpaint around the
    guider); empty for a guider that is not the pack's."""
    guider = getattr(model, "inner_model", None)
    return list(getattr(guider, "_run_bindings", None) or getattr(guider, "bindings", None) or [])


class Composition:
    """The OR / AND groups of one run: their members' tracked log-densities, per image."""

    def __init__(self, bindings, batch: int, device, report: superposition.CompositionReport):
        superposition.check_groups(bindings)
        self.bindings = bindings
        self.groups = superposition.groups_of(bindings)
        self.log_q = {g: torch.zeros(len(g.priors), batch, dtype=torch.float64, device=device) for g in self.groups}
        self.kappa: dict = {}
        self.reports = {}
        report.groups = []
        for g in self.groups:
            names = [superposition.member_name(i, bindings[i]) for i in superposition.member_indices(bindings, g)]
            self.reports[g] = superposition.GroupReport(g.label, g.kind, names, clip=g.clip)
            report.groups.append(self.reports[g])
        self._members_eps: dict = {}

    def step(self, terms, x_ve: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor) -> torch.Tensor:
        """The denoised prediction of the rule with this step's coefficients (``superposition.mix``)."""
        if not math.isfinite(sigma):
            for g in self.groups:
                self.kappa[g] = superposition.or_coefficients(self.log_q[g], g.priors) if g.kind == "or" else \
                    torch.full_like(self.log_q[g], 1.0 / len(g.priors))
                self._members_eps[g] = None
            return self._mixed(terms)
        # In eps, where the rule without some members is still affine in the rest (superposition.base_prediction).
        terms = superposition.as_eps(terms, x_ve, sigma)
        for g in sorted(self.groups, key=lambda g: g.kind != "or"):   # OR first: AND solves given the rest
            idx = superposition.member_indices(terms.bindings, g)
            if g.kind == "or":
                kappa = superposition.or_coefficients(self.log_q[g], g.priors)
                self.reports[g].record(kappa)
            else:
                kappa, raw = superposition.and_coefficients([terms.cond[i] for i in idx],
                                                            superposition.base_prediction(terms, g), terms.pooled,
                                                            noise, sigma, sigma_next, g.weight, g.clip)
                self.reports[g].record(kappa, raw)
            terms = dataclasses.replace(terms, output=superposition.mix(terms, g, kappa))
            self.kappa[g] = kappa
            self._members_eps[g] = [terms.cond[i] for i in idx]
        return x_ve - sigma * terms.output

    def _mixed(self, terms):
        for g in self.groups:
            terms = dataclasses.replace(terms, output=superposition.mix(terms, g, self.kappa[g]))
        return terms.output

    def update(self, x_ve: torch.Tensor, x_next_ve: torch.Tensor, sigma: float, sigma_next: float) -> None:
        """Each member's Itô log-density increment over the step just taken."""
        if not math.isfinite(sigma):
            return
        for g, eps in self._members_eps.items():
            if eps is None:
                continue
            self.log_q[g] += torch.stack([superposition.ito_increment(e, x_ve, x_next_ve, sigma, sigma_next)
                                          for e in eps])

    def finish(self) -> None:
        for g in self.groups:
            kappa = self.kappa.get(g)
            if kappa is None:
                continue
            final = superposition.or_coefficients(self.log_q[g], g.priors) if g.kind == "or" else kappa
            self.reports[g].finish(final, self.log_q[g])


def _check_whole_run(model, sigmas, extra_args) -> None:
    full = getattr(model, "sigmas", None)
    if full is not None and (len(full) != len(sigmas) or not torch.equal(full.cpu().float(), sigmas.cpu().float())):
        raise ValueError("OR / AND groups track each member's log-density along one uninterrupted path of the pack's "
                         "SDE step; the MCMC corrector, RePaint resampling and particles split or move that path: remove "
                         "them, or remove the group")
    if extra_args.get("denoise_mask") is not None:
        raise ValueError("OR / AND groups cannot sample with a noise mask (known regions); remove SetLatentNoiseMask or "
                         "the group")


@torch.no_grad()
def sample_poe_euler_maruyama(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                              report: superposition.CompositionReport | None = None):
    """The reverse VE SDE by Euler–Maruyama (``samplers/sde.py``), with the product's OR / AND groups
    (module docstring). ``report`` receives what the groups did."""
    extra_args = {} if extra_args is None else extra_args
    model_sampling = model.inner_model.inner_model.model_sampling
    bindings = run_bindings(model)
    composition, sink = None, None
    if superposition.groups_of(bindings):
        _check_whole_run(model, sigmas, extra_args)
        composition = Composition(bindings, x.shape[0], x.device,
                                  report if report is not None else superposition.CompositionReport())
        sink = []
        extra_args = {**extra_args, "model_options": {**extra_args.get("model_options", {}), TERMS_SINK: sink}}
    if noise_sampler is None:
        generator = stream_generator(extra_args.get("seed"), EM_STREAM)
        noise_sampler = (lambda s, s_next: torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                       device="cpu" if generator is not None else x.device).to(x.device))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        scale, ve = ve_view(model_sampling, sigma)
        scale_next, ve_next = ve_view(model_sampling, sigma_next)
        noise = noise_sampler(sigmas[i], sigmas[i + 1]).to(x) if sigma_next > 0 else torch.zeros_like(x)
        x_ve = x / scale if scale > 0 else x
        if composition is not None:
            terms = sink[0]
            sink.clear()
            denoised = composition.step(terms, x_ve, ve if scale > 0 else math.inf, ve_next, noise)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x_next_ve = euler_maruyama_step(x_ve, ve if scale > 0 else math.inf, ve_next, denoised, noise)
        if composition is not None:
            composition.update(x_ve, x_next_ve, ve if scale > 0 else math.inf, ve_next)
        x = x_next_ve * scale_next
    if composition is not None:
        composition.finish()
    return x


class SDEKSampler(comfy.samplers.KSAMPLER):
    """``poe_euler_maruyama`` as a SAMPLER; ``last_report`` says what its OR / AND groups did."""

    def __init__(self):
        self.last_report = superposition.CompositionReport()
        super().__init__(sample_poe_euler_maruyama, {"report": self.last_report})


def sampler_object(name: str) -> comfy.samplers.KSAMPLER:
    """A ComfyUI sampler by name, ``poe_euler_maruyama`` included."""
    return SDEKSampler() if name == SAMPLER_NAME else comfy.samplers.sampler_object(name)


def has_groups(bindings) -> bool:
    return bool(superposition.groups_of(bindings))

"""The product as a ComfyUI ``GUIDER``: a ``CFGGuider`` subclass that overrides only ``predict_noise``."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from .. import poe, validation
from . import model_experts
from .models import VARIANCE_SINK, ContinuousModelSampling, ExpertHandle, ProductModel

log = logging.getLogger("unite_and_conquer")

# A list under this model_options key receives a poe.Terms record of every evaluation (the per-term
# predictions that particle weights and OR / AND read: samplers/comfy/particles.py and sde.py).
TERMS_SINK = "uac_terms"


def _step_of(sigma: float, model_options: dict) -> str:
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None:
        return ""
    i = int((sigmas.float().cpu() - sigma).abs().argmin())
    return f" at step {i + 1} of {len(sigmas) - 1}"


def _rows(value, start: int, stop: int):
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] > 1:
        return value[start:stop]
    return value


def forward_in_chunks(handle: ExpertHandle, x, sigma, condition, options, chunks: int = 1):
    """One expert's batched forward; on out-of-memory, free ComfyUI's caches and retry in smaller
    chunks (halving down to one row) before giving up with a message that says what to change."""
    n = x.shape[0]
    size = -(-n // chunks)
    try:
        outs = []
        for start in range(0, n, size):
            stop = min(n, start + size)
            outs.append(handle.model.apply_model(
                x[start:stop], _rows(sigma, start, stop), transformer_options=options,
                **{k: _rows(v, start, stop) for k, v in condition.items()}))
        return torch.cat(outs)
    except torch.OutOfMemoryError:
        comfy.model_management.soft_empty_cache(True)
        options.get(VARIANCE_SINK, []).clear()     # the retry appends every chunk's variance again
        if size > 1:
            log.warning("%s ran out of memory on %d rows; retrying in chunks of %d", handle.name, size, -(-size // 2))
            return forward_in_chunks(handle, x, sigma, condition, options, chunks * 2)
        raise MemoryError(
            f"{handle.name} ran out of memory even one image at a time; load it with dtype fp16 or bf16, start "
            "ComfyUI with --lowvram, or use fewer or smaller experts") from None


def clamp_sigmas(sigmas: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Keep custom schedules inside the range every expert can serve (0 stays 0: the last step)."""
    # Schedulers compute in float64 and land within rounding of the ends; those stay as they are,
    # so a lone expert runs on the very sigmas a stock sampler would.
    outside = (sigmas < lo * (1 - 1e-5)) | (sigmas > hi * (1 + 1e-5))
    return torch.where((sigmas > 0) & outside, sigmas.clamp(lo, hi), sigmas)


def latent_facts(latent_image: torch.Tensor, noise: torch.Tensor | None = None) -> validation.Latent:
    """What validation reads of a LATENT's samples: its shape (a nested latent has none of its own) and
    whether its values are finite."""
    if getattr(latent_image, "is_nested", False):      # several latents packed together: not one image batch
        parts = latent_image.unbind()
        return validation.Latent((len(parts), *parts[0].shape))
    return validation.Latent(tuple((noise if noise is not None else latent_image).shape),
                             bool(torch.isfinite(latent_image).all()))


class ProductGuider(comfy.samplers.CFGGuider):
    """Samples the product of experts with any ComfyUI sampler (a ``GUIDER`` for
    ``SamplerCustomAdvanced``). It overrides ``predict_noise``, and ``sample`` only to validate the
    product on the latent that reached the sampler; model loading, hooks, callbacks and previews are
    ComfyUI's own.

    Args:
        bindings: the chain.
        node (`str`): the node that made it, which refusals name.
        latent (`validation.Latent`, *optional*): the latent it will sample, when known (PoEKSampler);
            otherwise the product is validated when a latent reaches ``sample``.
    """

    def __init__(self, bindings: Sequence[poe.Binding], node: str = "PoEGuider",
                 latent: validation.Latent | None = None):
        self.node = node
        bindings = model_experts.resolve(bindings)
        self.model_experts = model_experts.model_experts(bindings)
        self.chain = bindings
        self.product = validation.prepare(bindings)
        self.bindings = list(self.product.bindings)
        self.handles: list[ExpertHandle] = list(self.product.experts)
        product = ProductModel(self.product.alphas_cumprod, [h.model for h in self.handles])
        product.latent_format = model_experts.latent_format_of(bindings)
        patcher = comfy.model_patcher.ModelPatcher(
            product, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
        # Every expert, MODEL and ControlNet loads with the product, once each (prepare_sampling).
        extra = model_experts.control_models(self.model_experts, patcher.model_dtype())
        patcher.set_additional_models("poe_experts", [h.patcher for h in self.handles] + extra)
        super().__init__(patcher)
        self.inner_set_conds({})
        # Each expert's stacked conditions on its own device, built once (poe.product_prediction).
        self.staged: dict = {}
        if latent is not None:
            self.fit(latent)

    @property
    def sigma_range(self) -> tuple[float, float]:
        ms = self.model_patcher.model.model_sampling
        return float(ms.sigma_min), float(ms.sigma_max)

    def fit(self, latent: validation.Latent) -> None:
        """Validate the product on ``latent`` (``validation.validate``, raising ``ProductError``) and take
        its resolution factors and schedule: a product with MODELs takes any canvas, and a smaller expert's
        factor and noise range follow the canvas."""
        # A MODEL binding's mask was drawn before the latent's size was known: it is fitted to the latent first.
        chain = model_experts.fit_spatial(self.chain, latent.shape) if len(latent.shape) == 4 else self.chain
        product = validation.validate(chain, latent)
        # The schedule follows the canvas: its range, and its shape, which is a canvas-sized expert's.
        if not torch.equal(product.alphas_cumprod, self.product.alphas_cumprod):
            self.model_patcher.model.model_sampling = ContinuousModelSampling(product.alphas_cumprod)
        self.product, self.bindings = product, list(product.bindings)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        # Every path reaches here with its latent (SamplerCustomAdvanced, PoEKSampler, the benchmarks): the
        # product is refused before any model loads, in the words every other path uses.
        try:
            self.fit(latent_facts(latent_image, noise))
        except validation.ProductError as err:
            raise err.named(self.node, at_sampler=True) from None
        sigmas = clamp_sigmas(sigmas, *self.sigma_range)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def _eps_fn(self, model_options, batch: int = 1):
        options = model_options.get("transformer_options", {})

        def eps_fn(handle: ExpertHandle, x, sigma, condition, with_variance: bool = False):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if isinstance(handle, model_experts.ModelExpert):
                if with_variance:
                    raise ValueError(f"{handle.name} predicts no variance, so its reliability cannot come from it")
                return handle.forward(x, sigma, condition, batch)
            if not with_variance:
                return forward_in_chunks(handle, x, sigma, condition, options)
            sink: list[torch.Tensor] = []
            denoised = forward_in_chunks(handle, x, sigma, condition, {**options, VARIANCE_SINK: sink})
            return denoised, torch.cat(sink)
        return eps_fn

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     *args, **kwargs):
        # MODEL experts prepare their conds for this run as CFGGuider does for its one model.
        try:
            # process_conds sees the latent as CFGGuider.inner_sample hands it over (inpainting models read it).
            latent_in = latent_image
            if latent_image is not None and torch.count_nonzero(latent_image) > 0:
                latent_in = self.inner_model.process_latent_in(latent_image)
            for m in self.model_experts:
                m.prepare(noise, latent_in, denoise_mask, seed, device, sigmas)
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, *args, **kwargs)
        finally:
            for m in self.model_experts:
                m.finish()

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        try:
            # Experts loaded on other devices get x there; their predictions come back to x's device.
            denoised, pooled = poe.product_prediction(x, timestep, self.bindings, self._eps_fn(model_options, x.shape[0]),
                                                      self.staged, device_of=lambda h: h.device,
                                                      prediction="denoised", terms=model_options.get(TERMS_SINK))
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}{_step_of(float(timestep.flatten()[0]), model_options)}") from None
        # CFG++ samplers read the unconditional prediction here: the product's is the pooled null.
        uncond = pooled if pooled is not None else denoised
        for fn in model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": None, "uncond": None, "cond_scale": 1.0,
                           "model": self.inner_model, "uncond_denoised": uncond, "cond_denoised": denoised,
                           "sigma": timestep, "model_options": model_options, "input": x})
        return denoised


def checked_for_stock_samplers(patcher, binding: poe.Binding, node: str = "PoEEncodeCondition"):
    """A clone of ``patcher`` (the MODEL of one binding) on which ComfyUI's stock samplers (KSampler,
    CFGGuider with SamplerCustomAdvanced, ...) validate what they are about to sample, before any model
    loads: the product of that binding alone at weight cfg (one binding at weight w is classifier-free
    guidance at scale w, the negative its null) on the latent they were given, with the same checks
    and words as PoEKSampler (``validation.validate``)."""
    binding = model_experts.resolve([binding])[0]

    def check(executor, noise, latent_image, *args, **kwargs):
        cfg = float(getattr(executor.class_obj, "cfg", 1.0))
        try:
            validation.validate([replace(binding, weight=cfg)], latent_facts(latent_image, noise))
        except validation.ProductError as err:
            raise err.named(node, at_sampler=True) from None
        return executor(noise, latent_image, *args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "unite_and_conquer", check)
    return clone

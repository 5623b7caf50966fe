"""ComfyUI's KSampler logic for a product: its sampler and scheduler lists, sigmas over the common
range, and one call that runs a sampler with noise, previews and the inpainting mask."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview

from .guider import ProductGuider, clamp_sigmas  # noqa: F401  (clamp_sigmas: re-exported)

SAMPLER_NAMES = comfy.samplers.SAMPLER_NAMES
SCHEDULER_NAMES = comfy.samplers.SCHEDULER_NAMES
sampler_object = comfy.samplers.sampler_object


def compute_sigmas(guider: ProductGuider, sampler_name: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """ComfyUI's own KSampler schedule logic, on the product's common noise range."""
    ks = comfy.samplers.KSampler(guider.model_patcher, steps=steps, device="cpu", sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise)
    return ks.sigmas


def sample(guider: ProductGuider, latent: torch.Tensor, seed: int, sampler, sigmas: torch.Tensor,
           noise_mask: torch.Tensor | None = None, add_noise: bool = True, preview: bool = True,
           noise_scale: float = 1.0) -> torch.Tensor:
    """Run the product with a ComfyUI sampler (a name or a SAMPLER object); returns B x C x H x W
    samples in [-1, 1] space."""
    if sigmas.numel() == 0:
        return latent
    noise = comfy.sample.prepare_noise(latent, seed) * noise_scale if add_noise else torch.zeros_like(latent)
    steps = len(sigmas) - 1
    callback = latent_preview.prepare_callback(guider.model_patcher, steps) if preview else None
    if isinstance(sampler, str):
        sampler = comfy.samplers.sampler_object(sampler)
    out = guider.sample(noise, latent, sampler, sigmas, denoise_mask=noise_mask, callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = out.to(comfy.model_management.intermediate_device())
    if noise_mask is not None:
        # The sampler's last step reproduces known pixels only up to rounding; keep them bit-exact.
        # Where the mask is 0 this is exactly latent * 1 + out * 0.
        keep = 1 - comfy.sampler_helpers.prepare_mask(noise_mask, out.shape, out.device)
        out = out * (1 - keep) + latent.to(out) * keep
    return out

"""Analytic Gaussian data models wrapped as real ComfyUI MODELs (BaseModel in a ModelPatcher).

The CONDITIONING's cross-attention tensor carries the Gaussian, ``[[mu, var]]`` (shape 1 x 1 x 2),
so areas, strength and batching go through ComfyUI's own ``calc_cond_batch``. Each network
computes the optimal output of its parameterisation in its own frame, from the level that
ComfyUI's model sampling hands it:

- ``eps`` / ``v``: VP input ``z`` at the exact level ``transformer_options["sigmas"]`` (the
  discrete timestep is rounded to the table);
- ``flow``: ``x_f = (1 - t) x0 + t eps`` at ``t = timestep / 1000`` (shift applied by ComfyUI).
"""
from __future__ import annotations


import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models_base

KINDS = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
         "flow": comfy.model_base.ModelType.FLOW}


class GaussianNet(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.dummy = torch.nn.Parameter(torch.zeros(1))   # a weight, so ComfyUI has something to load
        self.model_sampling = None
        self.rows = 0
        self.calls = 0

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, timesteps, context=None, **kwargs):
        self.calls += 1
        self.rows += x.shape[0]
        mu = context[:, 0, 0].view(-1, 1, 1, 1).to(x)
        var = context[:, 0, 1].view(-1, 1, 1, 1).to(x)
        t = timesteps.view(-1, 1, 1, 1).to(torch.float64)
        if self.kind == "flow":
            t = (t / 1000).to(x)
            d = mu + (1 - t) * var / ((1 - t) ** 2 * var + t**2) * (x - (1 - t) * mu)
            return (x - d) / t + self.dummy
        # The exact level ComfyUI passes along (the timestep is rounded to the table).
        sigma = kwargs["transformer_options"]["sigmas"].flatten()
        sigma = sigma.repeat(x.shape[0] // sigma.shape[0]).view(-1, 1, 1, 1).to(x)   # one per batched cond
        ab = 1 / (1 + sigma**2)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * var + 1 - ab)
        if self.kind == "eps":
            return eps + self.dummy
        d = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * d + self.dummy


def _config(latent_format, sampling_settings):
    class GaussianConfig(comfy.supported_models_base.BASE):
        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}
        memory_usage_factor = 1.0

    GaussianConfig.latent_format = latent_format
    GaussianConfig.sampling_settings = dict(sampling_settings)
    return GaussianConfig({"disable_unet_model_creation": True})


def gaussian_model(kind: str, shift: float = 1.0, latent_format=comfy.latent_formats.ChromaRadiance,
                   beta_schedule: str = "linear"):
    """A MODEL whose data law under CONDITIONING [[mu, var]] is N(mu, var) per pixel."""
    settings = {"shift": shift} if kind == "flow" else {"beta_schedule": beta_schedule}
    model = comfy.model_base.BaseModel(_config(latent_format, settings), KINDS[kind])
    model.diffusion_model = GaussianNet(kind)
    model.diffusion_model.model_sampling = model.model_sampling
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def conditioning(mu: float, var: float):
    return [[torch.tensor([[[float(mu), float(var)]]]), {}]]



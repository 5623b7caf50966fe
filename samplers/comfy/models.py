"""Each expert as a ComfyUI model, and where it runs.

Each expert is a real ``BaseModel`` in a real ``ModelPatcher``, so ComfyUI loads, offloads and
accounts for it like any other model, on the device its loader chose (experts of one product may
sit on different GPUs; the guider moves inputs to each and predictions back). The product itself
is a weightless ``BaseModel`` that owns the common noise schedule (the intersection of the
experts' ranges) and lists the experts as additional models, so ``prepare_sampling`` loads them
all with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base

from .. import noise_levels, variance_reliability


class ContinuousModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """ComfyUI's discrete EPS sampling on a given ``alphas_cumprod`` table, with continuous timesteps.

    ComfyUI's ``timestep(sigma)`` rounds to the nearest index; experts here are evaluated at the
    exact continuous timestep of the common sigma (interpolated in log sigma, see ``noise_levels``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(None)
        self.num_timesteps = len(alphas_cumprod)
        self.set_sigmas(noise_levels.sigmas_from_alphas_cumprod(alphas_cumprod).float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return noise_levels.timestep_from_log_sigmas(sigma, self.log_sigmas.to(sigma.device))


class _PixelConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.ChromaRadiance
    memory_usage_factor = 1.0


class _ExpertUNet(torch.nn.Module):
    """Holds the expert's network as ``diffusion_model`` so ComfyUI sees and moves its weights."""

    def __init__(self, expert):
        super().__init__()
        self.network = expert.network

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.network.parameters(), None)
        return p.dtype if p is not None else torch.float32


# transformer_options key of a list that ExpertModel appends Var[x0 | x] to (reliability from variance).
VARIANCE_SINK = "uac_x0_variance"


class ExpertModel(comfy.model_base.BaseModel):
    """One expert as a ComfyUI model: its own schedule, pixel latents, eps prediction."""

    def __init__(self, expert, device=None):
        super().__init__(_PixelConfig({"disable_unet_model_creation": True}), comfy.model_base.ModelType.EPS, device=device)
        self.expert = expert
        self.diffusion_model = _ExpertUNet(expert)
        self.model_sampling = ContinuousModelSampling(expert.alphas_cumprod)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **condition):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        timestep = self.model_sampling.timestep(sigma)
        eps, values = self.expert.predict(xc, timestep, condition)
        sink = transformer_options.get(VARIANCE_SINK)
        if sink is not None:
            # The variance rides on transformer_options because apply_model returns one tensor.
            if values is None:
                raise ValueError(f"{self.expert.name} predicts no variance, so its reliability cannot come from it")
            sink.append(variance_reliability.x0_variance_from_values(values, self.expert.alphas_cumprod, timestep)
                        .to(x.device))
        return self.model_sampling.calculate_denoised(sigma, eps.to(x.device), x)

    def memory_required(self, input_shape, cond_shapes={}):
        # Activations of a pixel UNet scale with pixels x channels; 1 kB per pixel per image is a
        # safe upper bound at the published widths in half precision.
        return input_shape[0] * math.prod(input_shape[2:]) * 1024 * self.memory_usage_factor


class ProductModel(comfy.model_base.BaseModel):
    """The weightless model a product samples with: it owns the common noise schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor, expert_models: Sequence[ExpertModel]):
        super().__init__(_PixelConfig({"disable_unet_model_creation": True}), comfy.model_base.ModelType.EPS)
        self.diffusion_model = torch.nn.Module()
        self.diffusion_model.dtype = torch.float32
        self.model_sampling = ContinuousModelSampling(alphas_cumprod)
        self._expert_models = list(expert_models)  # not submodules: their weights are theirs

    def memory_required(self, input_shape, cond_shapes={}):
        return sum(m.memory_required(input_shape) for m in self._expert_models)


@dataclass(eq=False)
class ExpertHandle:
    """What flows along a ``POE_EXPERT`` wire: the expert and its ComfyUI model patcher."""
    expert: Any
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def name(self) -> str:
        return self.expert.name

    @property
    def model(self) -> ExpertModel:
        return self.patcher.model

    @property
    def device(self) -> torch.device:
        """Where the expert runs while sampling: its patcher's load device."""
        return self.patcher.load_device


def device_choices() -> list[str]:
    """The loader's device options: ``auto`` (ComfyUI's own device), ``cpu``, and ``cuda:N`` for each
    CUDA device torch sees (after ComfyUI's ``--cuda-device``, which hides the others)."""
    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def expert_devices(choice: str = "auto") -> tuple[torch.device, torch.device]:
    """(load, offload) devices of an expert's patcher for a ``device_choices`` option."""
    if choice == "auto":
        return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    load = torch.device(choice)
    # With --highvram ComfyUI keeps weights on their GPU between prompts; an expert placed on
    # another GPU keeps them on that one, not on ComfyUI's.
    keep = comfy.model_management.unet_offload_device().type != "cpu"
    return load, load if keep else torch.device("cpu")


def wrap_expert(expert, device: str = "auto") -> ExpertHandle:
    """The expert in a ModelPatcher that loads it on ``device`` (a ``device_choices`` option)."""
    load_device, offload_device = expert_devices(device)
    model = ExpertModel(expert)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    return ExpertHandle(expert, patcher)


def inference_dtype(choice: str, num_params: int = 0, device: torch.device | None = None) -> torch.dtype:
    """The weight dtype for a loader's dtype option; ``auto`` asks ComfyUI for ``device`` (``None``:
    ComfyUI's own device), so an expert placed on the CPU stays in fp32."""
    fixed = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if choice in fixed:
        return fixed[choice]
    return comfy.model_management.unet_dtype(device=device, model_params=num_params,
                                             supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])

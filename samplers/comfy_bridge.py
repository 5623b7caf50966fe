"""The bridge to ComfyUI's sampling machinery.

Every ComfyUI name the pack relies on for sampling is used in this module, so an upgrade of
ComfyUI is checked here and nowhere else:

- ``comfy.model_base.BaseModel`` (+ ``_apply_model``, ``memory_required``), ``ModelType.EPS``
- ``comfy.supported_models_base.BASE`` and ``comfy.latent_formats.ChromaRadiance`` (pixel latents)
- ``comfy.model_sampling.ModelSamplingDiscrete`` (``set_sigmas``, ``timestep``) and ``EPS``
- ``comfy.model_patcher.ModelPatcher`` (``set_additional_models``)
- ``comfy.samplers.CFGGuider`` (``predict_noise``, ``inner_set_conds``, ``sample``), ``KSampler``,
  ``sampler_object``, ``SAMPLER_NAMES``, ``SCHEDULER_NAMES``
- ``comfy.sample.prepare_noise``, ``comfy.model_management`` (devices, interruption, dtypes)
- ``latent_preview.prepare_callback`` (progress bar and x0 previews)

Each expert is a real ``BaseModel`` in a real ``ModelPatcher``, so ComfyUI loads, offloads and
accounts for it like any other model, on the device its loader chose (experts of one product may
sit on different GPUs; the guider moves inputs to each and predictions back). The product itself
is a weightless ``BaseModel`` that owns the common noise schedule (the intersection of the
experts' ranges) and lists the experts as additional models, so ``prepare_sampling`` loads them
all with it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.supported_models_base
import comfy.utils
import latent_preview

from . import binding as binding_lib
from . import bridge, poe, variance_reliability

log = logging.getLogger("unite_and_conquer")


class ContinuousModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """ComfyUI's discrete EPS sampling on a given ``alphas_cumprod`` table, with continuous timesteps.

    ComfyUI's ``timestep(sigma)`` rounds to the nearest index; experts here are evaluated at the
    exact continuous timestep of the common sigma (interpolated in log sigma, see ``bridge``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(None)
        self.num_timesteps = len(alphas_cumprod)
        self.set_sigmas(bridge.sigmas_from_alphas_cumprod(alphas_cumprod).float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas.to(sigma.device)
        steps = torch.arange(len(log_sigmas), device=sigma.device, dtype=log_sigmas.dtype)
        t = bridge._interp(sigma.float().clamp_min(1e-30).log().flatten(), log_sigmas, steps)
        return t.view(sigma.shape)


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


# --- the product as a guider -------------------------------------------------------------------

def handles_of(bindings: Sequence[poe.Binding]) -> list[ExpertHandle]:
    seen: dict[int, ExpertHandle] = {}
    for b in bindings:
        seen.setdefault(id(b.expert), b.expert)
    return list(seen.values())


def check_same_shape(bindings: Sequence[poe.Binding], node: str = "PoEKSampler") -> tuple[int, int]:
    """The canvas (the largest expert's side) and the channels. Experts share the channels; a smaller
    expert must divide the canvas (it then runs on the pooled image, ``bands``); anything else is
    an error, never a silent resize."""
    handles = handles_of(bindings)
    first = handles[0].expert
    canvas = max(h.expert.resolution for h in handles)
    for h in handles[1:]:
        e = h.expert
        if e.image_channels != first.image_channels or canvas % e.resolution:
            raise ValueError(
                f"{node}: input 'experts' mixes image shapes: {first.name} is {first.resolution}px with "
                f"{first.image_channels} channels but {e.name} is {e.resolution}px with {e.image_channels}. "
                "Experts of one product share the channels, and each expert's size must divide the largest "
                f"({canvas}px) so that it runs on the pooled canvas; otherwise sample at one resolution and use "
                "an upsampler stage (PoEBindImage) to change it.")
    return canvas, first.image_channels


def product_schedule(bindings: Sequence[poe.Binding]) -> torch.Tensor:
    """The product's alphas_cumprod: the first expert's shape of schedule, cut to the common range."""
    handles = handles_of(bindings)
    factor = {id(b.expert): b.resolution_factor for b in bindings}
    tables = [h.expert.alphas_cumprod for h in handles]
    factors = [factor[id(h)] for h in handles]
    lo, hi = bridge.common_sigma_range(tables, [h.name for h in handles], factors)
    # The shape of schedule of a canvas-sized expert: a smaller one's table stops short of k times its range.
    return bridge.resample_table(tables[factors.index(min(factors))], lo, hi)


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


class PoEGuider(comfy.samplers.CFGGuider):
    """Samples the product of experts with any ComfyUI sampler (a ``GUIDER`` for
    ``SamplerCustomAdvanced``). It overrides only ``predict_noise``; model loading, hooks,
    callbacks and previews are ComfyUI's own.
    """

    def __init__(self, bindings: Sequence[poe.Binding]):
        bindings, _ = binding_lib.with_resolution_factors(list(bindings), "PoEGuider")
        poe.validate_bindings(bindings)
        check_same_shape(bindings)
        self.bindings = bindings
        self.handles = handles_of(bindings)
        schedule = product_schedule(bindings)
        poe.check_sigma_coverage(bindings, *bridge.sigma_range(schedule))
        product = ProductModel(schedule, [h.model for h in self.handles])
        patcher = comfy.model_patcher.ModelPatcher(
            product, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
        patcher.set_additional_models("poe_experts", [h.patcher for h in self.handles])
        super().__init__(patcher)
        self.inner_set_conds({})
        # Each expert's stacked conditions on its own device, built once (poe.product_prediction).
        self.staged: dict = {}

    @property
    def sigma_range(self) -> tuple[float, float]:
        ms = self.model_patcher.model.model_sampling
        return float(ms.sigma_min), float(ms.sigma_max)

    def _eps_fn(self, model_options):
        options = model_options.get("transformer_options", {})

        def eps_fn(handle: ExpertHandle, x, sigma, condition, with_variance: bool = False):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if not with_variance:
                return forward_in_chunks(handle, x, sigma, condition, options)
            sink: list[torch.Tensor] = []
            denoised = forward_in_chunks(handle, x, sigma, condition, {**options, VARIANCE_SINK: sink})
            return denoised, torch.cat(sink)
        return eps_fn

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        try:
            # Experts loaded on other devices get x there; their predictions come back to x's device.
            denoised, pooled = poe.product_prediction(x, timestep, self.bindings, self._eps_fn(model_options),
                                                      self.staged, device_of=lambda h: h.device,
                                                      prediction="denoised")
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}{_step_of(float(timestep.flatten()[0]), model_options)}") from None
        # CFG++ samplers read the unconditional prediction here: the product's is the pooled null.
        uncond = pooled if pooled is not None else denoised
        for fn in model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": None, "uncond": None, "cond_scale": 1.0,
                           "model": self.inner_model, "uncond_denoised": uncond, "cond_denoised": denoised,
                           "sigma": timestep, "model_options": model_options, "input": x})
        return denoised


# --- the KSampler logic ------------------------------------------------------------------------

SAMPLER_NAMES = comfy.samplers.SAMPLER_NAMES
SCHEDULER_NAMES = comfy.samplers.SCHEDULER_NAMES
sampler_object = comfy.samplers.sampler_object


def compute_sigmas(guider: PoEGuider, sampler_name: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """ComfyUI's own KSampler schedule logic, on the product's common noise range."""
    ks = comfy.samplers.KSampler(guider.model_patcher, steps=steps, device="cpu", sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise)
    return ks.sigmas


def clamp_sigmas(sigmas: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Keep custom schedules inside the range every expert can serve (0 stays 0: the last step)."""
    inside = sigmas.clamp(lo, hi)
    return torch.where(sigmas > 0, inside, sigmas)


def sample(guider: PoEGuider, latent: torch.Tensor, seed: int, sampler, sigmas: torch.Tensor,
           noise_mask: torch.Tensor | None = None, add_noise: bool = True, preview: bool = True,
           noise_scale: float = 1.0) -> torch.Tensor:
    """Run the product with a ComfyUI sampler (a name or a SAMPLER object); returns B x C x H x W
    samples in [-1, 1] space."""
    if sigmas.numel() == 0:
        return latent
    lo, hi = guider.sigma_range
    sigmas = clamp_sigmas(sigmas, lo, hi)
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

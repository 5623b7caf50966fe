"""ComfyUI MODELs as experts of a product (PoEBindModel).

A MODEL binding is evaluated the way ComfyUI's own guider evaluates a model: its CONDITIONINGs
are prepared with ``comfy.samplers.process_conds`` (areas, masks, strength, ControlNet, model
conds), its hooks are registered with ``comfy.sampler_helpers.prepare_model_patcher``, and each
step runs ``comfy.samplers.calc_cond_batch`` once on all of the model's conditions and nulls, with
the model's own ``model_options`` (patches, wrappers). The model never sees the product's frame:
``parameterization.to_model_frame`` hands it the common VE point at its own level (the flow map
for CONST models), and its denoised prediction is already a common-frame x0.

The ComfyUI names it uses are listed in ``samplers/comfy/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

import comfy.latent_formats
import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers

from .. import parameterization as par
from .. import poe

COND_KEY = "uac_conditioning"   # a MODEL binding's condition row: the index of its CONDITIONING


@dataclass(eq=False)
class ModelSource:
    """What a PoEBindModel binding carries: the MODEL and a name for messages. Its condition is
    ``{"conditioning": CONDITIONING}`` until a guider resolves it (:func:`resolve`)."""
    patcher: Any
    name: str

    # No native size or channels (what nodes/common.py's chain and samplers/prepare.py read of an expert).
    resolution = None
    image_channels = None

    @property
    def latent_format(self):
        return self.patcher.model.latent_format


def model_frame(patcher, name: str = "the MODEL") -> str:
    """The frame a ComfyUI model reads: VE for EPS/V_PREDICTION/EDM samplings, flow for CONST."""
    ms = patcher.get_model_object("model_sampling")
    if isinstance(ms, comfy.model_sampling.CONST):
        return par.FLOW
    if isinstance(ms, comfy.model_sampling.EPS):
        return par.VE
    raise ValueError(f"{name}: its model sampling {type(ms).__name__} is neither a discrete/EDM noise prediction nor "
                     "a rectified flow, so it cannot join a product")


def is_pixel_space(latent_format) -> bool:
    return isinstance(latent_format, comfy.latent_formats.ChromaRadiance)


@dataclass(eq=False)
class ModelExpert:
    """One MODEL inside one guider: every distinct CONDITIONING of its bindings, and per run its
    prepared conds and options. Bindings of one MODEL share it, so they share one forward."""
    patcher: Any
    name: str
    conditionings: list = field(default_factory=list)
    prepared: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    # The staged index tensor of the last call and its rows read on the host (see conditioning_rows).
    _rows: tuple | None = field(default=None, repr=False)

    @property
    def model(self):
        return self.patcher.model

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    @property
    def frame(self) -> str:
        return model_frame(self.patcher, self.name)

    @property
    def latent_format(self):
        return self.patcher.model.latent_format

    # What samplers/prepare.py reads of an expert: no native size, the levels as a VP table.
    resolution = None
    image_channels = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return 1 / (1 + self.ve_sigmas() ** 2)

    def index_of(self, conditioning) -> torch.Tensor:
        for i, c in enumerate(self.conditionings):
            if c is conditioning:
                return torch.tensor([[i]])
        self.conditionings.append(conditioning)
        return torch.tensor([[len(self.conditionings) - 1]])

    def ve_sigmas(self) -> torch.Tensor:
        """The model's own levels as increasing VE sigmas (a flow model's t = 1 left out)."""
        sig = self.patcher.get_model_object("model_sampling").sigmas.double().cpu()
        if self.frame == par.FLOW:
            sig = par.ve_level(sig[sig < 1])
        return sig

    def ve_range(self) -> tuple[float, float]:
        sig = self.ve_sigmas()
        return float(sig[0]), float(sig[-1])

    # --- one sampling run ----------------------------------------------------------------------

    def prepare(self, noise, latent_image, denoise_mask, seed, device, sigmas) -> None:
        """ComfyUI's preparation of the model's conds for this run (CFGGuider.sample/inner_sample)."""
        conds = {f"c{i}": [c.copy() for c in comfy.sampler_helpers.convert_cond(cond)]
                 for i, cond in enumerate(self.conditionings)}
        comfy.samplers.preprocess_conds_hooks(conds)
        self.options = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
        self.options.setdefault("transformer_options", {})
        comfy.sampler_helpers.prepare_model_patcher(self.patcher, conds, self.options)
        comfy.samplers.filter_registered_hooks_on_conds(conds, self.options)
        self.patcher.pre_run()
        conds = comfy.samplers.process_conds(self.model, noise, conds, device, latent_image, denoise_mask, seed)
        self.options["transformer_options"]["sample_sigmas"] = sigmas
        self.prepared = [conds[f"c{i}"] for i in range(len(self.conditionings))]
        self._rows = None

    def finish(self) -> None:
        try:
            self.patcher.cleanup()
        finally:
            self.patcher.restore_hook_patches()
            comfy.sampler_helpers.cleanup_models({f"c{i}": c for i, c in enumerate(self.prepared)}, [])
            self.prepared = []
            self._rows = None

    def conditioning_rows(self, index: torch.Tensor, batch: int) -> list[int]:
        """Which CONDITIONING each batch of rows asks for. The guider stages the index tensor on the
        device once per run, so it is read back (a host sync) once per run, not at every step; the
        tensor is kept with its rows, so a later tensor at the same address is never mistaken for it."""
        if self._rows is None or self._rows[0] is not index:
            self._rows = (index, index[::batch, 0].tolist())
        return self._rows[1]

    def forward(self, x_rows: torch.Tensor, sigma_rows: torch.Tensor, stacked: dict, batch: int) -> torch.Tensor:
        """The denoised rows of ``run_plan``'s batched call: one ``calc_cond_batch`` over every
        requested CONDITIONING, at the model's own level and input."""
        index = self.conditioning_rows(stacked[COND_KEY], batch)
        x = x_rows[:batch]
        sigma = sigma_rows[:batch] if sigma_rows.ndim else sigma_rows.expand(batch)
        x_m, level = par.to_model_frame(self.frame, x, sigma)
        outs = comfy.samplers.calc_cond_batch(self.model, [self.prepared[i] for i in index], x_m,
                                              level.to(x.dtype), self.options)
        return torch.cat(outs)


def resolve(bindings: Sequence[poe.Binding]) -> list[poe.Binding]:
    """Bindings whose MODELs are :class:`ModelExpert`s of this guider (one per MODEL), with each
    CONDITIONING replaced by its row index; other bindings pass unchanged."""
    experts: dict[int, ModelExpert] = {}
    out = []
    for b in bindings:
        src = b.expert
        if not isinstance(src, ModelSource):
            out.append(b)
            continue
        e = experts.setdefault(id(src.patcher), ModelExpert(src.patcher, src.name))
        out.append(replace(b, expert=e, condition={COND_KEY: e.index_of(b.condition["conditioning"])},
                           null=tuple({COND_KEY: e.index_of(n["conditioning"])} for n in b.null)))
    return out


def model_experts(bindings: Sequence[poe.Binding]) -> list[ModelExpert]:
    seen: dict[int, ModelExpert] = {}
    for b in bindings:
        if isinstance(b.expert, ModelExpert):
            seen.setdefault(id(b.expert), b.expert)
    return list(seen.values())


def binding_name(i: int, b: poe.Binding) -> str:
    return f"binding {i} ({getattr(b.expert, 'name', '?')}{' · ' + b.label if b.label else ''})"


def latent_format_of(bindings: Sequence[poe.Binding], node: str = "PoEKSampler"):
    """The product's latent format: the MODELs' shared one, or pixels. A latent MODEL next to a
    pixel expert, or two latent formats, is refused naming both bindings."""
    first = None
    for i, b in enumerate(bindings):
        fmt = getattr(b.expert, "latent_format", None) if isinstance(b.expert, (ModelSource, ModelExpert)) else \
            comfy.latent_formats.ChromaRadiance()
        if first is None:
            first = (i, b, fmt)
            continue
        j, bj, fj = first
        if type(fmt) is not type(fj) or fmt.latent_channels != fj.latent_channels:
            def what(f):
                return "pixels (3 channels)" if is_pixel_space(f) else \
                    f"{type(f).__name__} latents ({f.latent_channels} channels)"
            raise ValueError(
                f"{node}: input 'experts': {binding_name(j, bj)} works on {what(fj)} but {binding_name(i, b)} works on "
                f"{what(fmt)}. Experts of one product must share one space: latent models only with models of the "
                "same latent format, pixel-space models (Chroma Radiance) with the native pixel experts.")
    return first[2] if first else comfy.latent_formats.ChromaRadiance()


def control_models(experts: Sequence[ModelExpert], dtype) -> list:
    """The ControlNet/GLIGEN models that the MODELs' CONDITIONINGs carry, for loading with them."""
    conds = {f"{i}.{j}": comfy.sampler_helpers.convert_cond(c)
             for i, e in enumerate(experts) for j, c in enumerate(e.conditionings)}
    return comfy.sampler_helpers.get_additional_models(conds, dtype)[0]


def fit_spatial(bindings: Sequence[poe.Binding], shape: torch.Size) -> list[poe.Binding]:
    """MODEL bindings' mask-scaled weights and reliabilities resized to the latent (bilinear);
    their masks are bound before the latent size is known."""
    def fit(v):
        if isinstance(v, torch.Tensor) and v.ndim == 4 and tuple(v.shape[-2:]) != tuple(shape[-2:]):
            return torch.nn.functional.interpolate(v.float(), size=tuple(shape[-2:]), mode="bilinear",
                                                   align_corners=False)
        return v
    return [replace(b, weight=fit(b.weight), reliability=fit(b.reliability))
            if isinstance(b.expert, ModelExpert) else b for b in bindings]

"""PoEBindModel: a ComfyUI MODEL with its CONDITIONINGs as one binding of a product."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..conditions import maps
from ..samplers import poe
from ..samplers.comfy import model_experts as comfy_models
from ..samplers.comfy.guider import checked_for_stock_samplers
from ..samplers.comfy.models import conditioning_of
from ..samplers.validation import who
from ..samplers.describe import describe
from .common import (CATEGORY, Experts, chain, check_number, check_unit_range, experts_input, index_input,
                     indexed_chain, log, mask_inputs, node_input, reliability_input, weight_input)


def _mask_scale(mask, feather_px: int, invert: bool, outside: float):
    """The mask as a per-pixel multiplier at its own size; the guider resizes it to the latent."""
    m = maps.map_from_mask(mask)
    if invert:
        m = 1 - m
    return outside + (1 - outside) * maps.feather(m, feather_px)


class PoEBindModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEBindModel",
            display_name="Bind Model (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Binds any ComfyUI MODEL (with its LoRAs and patches) and a prompt's CONDITIONING into the "
                        "product. The model runs as ComfyUI's own samplers run it (areas, masks, strength, ControlNet, "
                        "hooks), on the product's common noise level mapped to its own (EPS, v-prediction or "
                        "rectified flow with its shift). Latent models combine only with models of the same latent "
                        "format; pixel-space models (Chroma Radiance) combine with the pack's pixel experts.",
            inputs=[
                io.Model.Input("model", tooltip="Any ComfyUI MODEL: a checkpoint, a LoRA-patched model, or a native "
                                                "expert's MODEL output."),
                io.Conditioning.Input("positive", tooltip="What this binding asks for."),
                weight_input(1.0),
                reliability_input(1.0),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="This binding's null (usually the empty prompt). Without it the "
                                              "binding has no null, and its reliability must be 0."),
                experts_input(),
                *mask_inputs(),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, model, positive, weight, reliability, negative=None, experts=None, mask=None, mask_feather=0,
                mask_invert=False, mask_outside=0.0) -> io.NodeOutput:
        node = "PoEBindModel"
        check_number(node, "weight", weight)
        check_number(node, "reliability", reliability)
        check_number(node, "mask_outside", mask_outside)
        name = f"{type(model.model.model_config).__name__} MODEL"   # e.g. "SD15 MODEL"
        with node_input(node, "model"):
            comfy_models.model_frame(model, name)
        if negative is None and reliability > 0:
            raise ValueError(f"{node}: input 'reliability': {name} has no null for this binding, so the reliability "
                             "must be 0 (another binding supplies the prior); or connect a 'negative' conditioning")
        label = "MODEL + conditioning" + (" · masked" if mask is not None else "")
        if mask is not None:
            check_unit_range(node, "mask", mask)
            scale = _mask_scale(mask, mask_feather, mask_invert, mask_outside)
            weight, reliability = weight * scale, reliability * scale
        nulls = () if negative is None else ({"conditioning": negative},)
        b = poe.Binding(comfy_models.ModelSource(model, name), {"conditioning": positive}, weight, reliability,
                        nulls, label=label)
        bindings = chain(experts, b, node, "model")
        text = describe(b)
        log.info("%s: %s", node, text)
        return io.NodeOutput(bindings, ui={"text": (text,)})


class PoEEncodeCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEEncodeCondition",
            display_name="Binding To Conditioning (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Turns one binding of a chain into ComfyUI's MODEL + positive/negative CONDITIONING, so the "
                        "stock KSampler or CFGGuider samples that expert alone (cfg plays the binding's weight). Any "
                        "PoEBind* node encodes the condition: class, text, segmentation, sketch, image. The negative "
                        "is the binding's null (several conditions, such as 'mean of k random classes', are averaged "
                        "by ComfyUI); it is empty when the binding has no null. The stock sampler checks what it "
                        "samples as PoEKSampler would (the latent against the expert's size, a null where cfg is not "
                        "1, the binding's noise window); a binding with a mask or a band is refused here, since one "
                        "cfg cannot apply them.",
            inputs=[
                Experts.Input("experts", tooltip="A chain; the chosen binding is converted."),
                index_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, experts, index) -> io.NodeOutput:
        node = "PoEEncodeCondition"
        bindings = indexed_chain(node, experts, index)
        i = index % len(bindings)
        b = bindings[i]
        # A stock sampler applies one cfg to every pixel and frequency: what it cannot apply is refused here,
        # not dropped (PoEKSampler and PoEGuider sample such a binding).
        if any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in (b.weight, b.reliability)):
            raise ValueError(f"{node}: input 'experts': {who(i, b)} has a mask, but a stock sampler applies one cfg "
                             "to the whole image; sample it with PoEKSampler or PoEGuider, or remove the mask")
        if b.band is not None and not b.band.all_pass:
            raise ValueError(f"{node}: input 'experts': {who(i, b)} has a band ({b.band.describe()}), but a stock "
                             "sampler applies one cfg to every frequency; sample it with PoEKSampler or PoEGuider, or "
                             "remove the PoEBandWeights node")
        if isinstance(b.expert, comfy_models.ModelSource):
            model, positive = b.expert.patcher, b.condition["conditioning"]
            negative = [c for n in b.null for c in n["conditioning"]]
        else:
            model = b.expert.patcher
            positive = conditioning_of([b.condition])
            negative = conditioning_of(b.null)
        # The sampler validates the one-binding product it runs (weight = its cfg) on its latent, as PoEKSampler would.
        model = checked_for_stock_samplers(model, b, node)
        return io.NodeOutput(model, positive, negative, ui={"text": (describe(b),)})

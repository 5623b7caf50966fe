"""Binding nodes: each attaches one condition of one expert to a product (a POE_EXPERTS chain)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..conditions import maps
from ..samplers import poe
from ..samplers.describe import describe, describe_rule
from ..samplers.nulls import NULL_CHOICES, class_nulls, default_nulls, reliability_from_variance
from . import class_picker
from .common import (CATEGORY, NO_LIMIT, Expert, Experts, TextEncoder, chain, check_choice, check_finite, check_number,
                     check_unit_range, experts_input, image_to_pixels, index_input, indexed_chain, log, mask_inputs,
                     node_input, reliability_input, sigma_window, sigma_window_inputs, weight_input)

def imagenet_choices() -> list[str]:
    """The picker's entries before an expert is connected: ADM's ImageNet classes, the paper's class expert."""
    from ..model_loaders import adm

    return class_picker.labels(adm.load_class_names())


def binding_schema(node_id: str, display_name: str, description: str, inputs: list, masked: bool = True) -> io.Schema:
    """A binding node's schema: its own inputs, then the chain it extends and, unless ``masked`` is
    False, the spatial mask inputs (declared once here, read by :func:`chain_binding`)."""
    return io.Schema(node_id=node_id, display_name=display_name, category=f"{CATEGORY}/bindings",
                     description=description, inputs=[*inputs, experts_input(), *(mask_inputs() if masked else [])],
                     outputs=[Experts.Output(display_name="experts")])


def chain_binding(node: str, handle, condition, weight, reliability, label, experts, warnings=(), *, nulls=None,
                  mask=None, mask_feather=0, mask_invert=False, mask_outside=0.0) -> io.NodeOutput:
    """Validate, apply the optional spatial mask (the inputs of ``binding_schema``, which every
    binding node passes on as ``**mask``), chain, and show what was bound. ``nulls`` defaults to
    the expert's trained null for ``condition``; empty ``warnings`` are dropped."""
    warnings = [w for w in warnings if w]
    nulls = default_nulls(handle, condition) if nulls is None else nulls
    check_number(node, "weight", weight)
    check_number(node, "reliability", reliability)
    check_number(node, "mask_outside", mask_outside)
    if mask is not None:
        check_unit_range(node, "mask", mask)
    if not nulls and reliability > 0:
        raise ValueError(f"{node}: input 'reliability': {handle.name} has no null for this binding, so the "
                         "reliability must be 0 (another binding supplies the prior)")
    with node_input(node, "mask"):
        scale, note = maps.spatial_scale(mask, handle.expert.resolution, mask_feather, mask_invert, mask_outside)
    if note:
        warnings.append(note)
    if scale is not None:
        weight, reliability = weight * scale, reliability * scale
        label += " · masked"
    b = poe.Binding(handle, condition, weight, reliability, tuple(nulls), label=label)
    bindings = chain(experts, b, node)
    for w in warnings:
        log.warning("%s: %s", node, w)
    return io.NodeOutput(bindings, ui={"text": ("\n".join([describe(b), *warnings]),)})


class PoEBindClass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindClass", "Bind Class (PoE)",
            "Binds a class label to a class-conditional expert (ADM ImageNet models, diffusers "
            "class-conditional UNets, the tiny digit expert).",
            [
                Expert.Input("expert", tooltip="A class-conditional expert."),
                io.Combo.Input("class", options=imagenet_choices(), default="292: tiger",
                               tooltip="The class, from the connected expert's own labels: 'index: name' for "
                                       "named classes (ADM's ImageNet), the index alone otherwise (the digit "
                                       "expert's '0'..'9'). The list follows the expert wired in; a label the "
                                       "expert does not have is refused."),
                io.Int.Input("class_index", default=-1, min=-1, max=100000,
                             tooltip="-1: the picker decides. An index >= 0 must agree with the picker (it is "
                                     "checked, never a silent override)."),
                weight_input(1.0),
                reliability_input(1.0),
                io.Combo.Input("null", options=list(NULL_CHOICES), default="class0 (paper)",
                               tooltip="How the unconditional prediction is formed. ADM class models were never "
                                       "trained without a label: 'class0 (paper)' uses class 0 as the released code "
                                       "does; 'mean of k random classes' averages k classes (k forwards, unbiased); "
                                       "'none' adds no null (reliability must be 0; another expert supplies the "
                                       "prior); 'trained' uses the expert's trained null where it has one."),
                io.Int.Input("null_k", default=8, min=1, max=1000,
                             tooltip="k for 'mean of k random classes' (each class is one more row per step)."),
            ])

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        # The class list follows the connected expert, so ComfyUI's check against the schema's static list
        # must not run (a validate_inputs taking **kwargs turns it off); execute checks the label against the
        # expert. That also turns off ComfyUI's min/max checks, which are redone here.
        return class_picker.check_ranges(cls.define_schema(), kwargs)

    @classmethod
    def execute(cls, expert, weight, reliability, null, null_k, class_index, experts=None, **inputs) -> io.NodeOutput:
        node = "PoEBindClass"
        check_choice(node, "null", null, NULL_CHOICES, "null choice")
        e = poe.unwrap(expert)
        if "class" not in e.encoders:
            with node_input(node, "expert"):
                e.encode("class", 0)  # raises, naming the modalities this expert takes
        index = class_picker.resolve(node, e, inputs.pop("class"), class_index)
        with node_input(node, "class"):
            condition = e.encode("class", index)
        with node_input(node, "null"):
            nulls = class_nulls(e, null, null_k)
        name = e.class_names[index] if e.class_names and index < len(e.class_names) else ""
        label = f"class {index}" + (f": {name}" if name and name != str(index) else "")
        return chain_binding(node, expert, condition, weight, reliability, label, experts, nulls=nulls, **inputs)


class PoEBindText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindText", "Bind Text (PoE)",
            "Binds a text prompt to a text expert (GLIDE, the face expert through a FaRL text "
            "encoder, the tiny colour expert).",
            [
                Expert.Input("expert", tooltip="A text-conditional expert."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt. GLIDE truncates past 128 tokens, CLIP/FaRL past 77; the node warns."),
                weight_input(1.0),
                reliability_input(1.0),
                TextEncoder.Input("text_encoder", optional=True,
                                  tooltip="For experts that take a text embedding (the face expert): the FaRL or "
                                          "CLIP text encoder that turns the text into it."),
            ])

    @classmethod
    def execute(cls, expert, text, weight, reliability, text_encoder=None, experts=None, **mask) -> io.NodeOutput:
        node = "PoEBindText"
        e = poe.unwrap(expert)
        if not text.strip():
            raise ValueError(f"{node}: input 'text' is empty. Type a prompt; for an unconditional prior use "
                             "PoEBindPrior instead.")
        warnings = []
        with node_input(node, "text"):
            if text_encoder is not None:
                emb = text_encoder.encode([text])
                warnings += list(text_encoder.last_warnings)
                condition = e.encode("text", emb)
            else:
                condition = e.encode("text", text)
                warning = e.warning("text", text)
                warnings += [warning] if warning else []
        short = text if len(text) <= 40 else text[:37] + "..."
        return chain_binding(node, expert, condition, weight, reliability, f'"{short}"', experts, warnings,
                             **mask)


class PoEBindPrior(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindPrior", "Bind Prior (PoE)",
            "Adds an expert's unconditional score only (weight 0, reliability > 0): the expert acts "
            "as a prior, for example ADM-256 unconditional under a class-conditional ADM-256.",
            [
                Expert.Input("expert", tooltip="Any expert with a trained null, or an unconditional model."),
                reliability_input(1.0),
                io.Float.Input("weight", default=0.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Usually 0: the binding then contributes only through the pooled null."),
            ])

    @classmethod
    def execute(cls, expert, reliability, weight, experts=None, **mask) -> io.NodeOutput:
        node = "PoEBindPrior"
        e = poe.unwrap(expert)
        null = e.null_condition
        if null is None:
            raise ValueError(f"{node}: input 'expert': {e.name} has no trained null condition, so it cannot act as a "
                             "prior. Use an unconditional model or one trained with condition dropout.")
        return chain_binding(node, expert, null, weight, reliability, "prior (unconditional)", experts, nulls=(null,),
                             **mask)


SLOTS = {"auto": None, "A: skin/face": "A", "B: hair": "B"}


class PoEBindSegmentation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindSegmentation", "Bind Segmentation (PoE)",
            "Binds a segmentation or layout map (from a MASK, an IMAGE channel or a colour-coded "
            "parsing map) to a map-conditional expert: the face expert's slots, the tiny layout expert.",
            [
                Expert.Input("expert", tooltip="An expert that accepts a segmentation map."),
                io.Combo.Input("source", options=list(maps.MAP_SOURCES), default="mask",
                               tooltip="Where the map comes from: the 'mask' input, or a channel / colour label of "
                                       "the 'image' input."),
                io.Combo.Input("slot", options=list(SLOTS), default="auto",
                               tooltip="The face expert's input slot. The released code contradicts itself about "
                                       "which slot is hair: here it is explicit. 'auto' for single-map experts."),
                weight_input(1.0),
                reliability_input(1.0),
                io.Mask.Input("map_mask", optional=True, tooltip="The map as a MASK (1 = the region)."),
                io.Image.Input("map_image", optional=True, tooltip="The map as an IMAGE."),
                io.String.Input("label_colour", default="#ffffff", optional=True,
                                tooltip="For 'image colour label': the label's colour in the parsing map."),
            ])

    @classmethod
    def execute(cls, expert, source, slot, weight, reliability, map_mask=None, map_image=None,
                label_colour="#ffffff", experts=None, **mask) -> io.NodeOutput:
        node = "PoEBindSegmentation"
        check_choice(node, "source", source, maps.MAP_SOURCES, "map source")
        check_choice(node, "slot", slot, SLOTS, "slot")
        e = poe.unwrap(expert)
        if source == "mask":
            if map_mask is None:
                raise ValueError(f"{node}: input 'map_mask' is not connected but source is 'mask'; connect a MASK "
                                 "or pick an image source")
            check_unit_range(node, "map_mask", map_mask)
            with node_input(node, "map_mask"):
                m = maps.map_from_mask(map_mask)
        else:
            if map_image is None:
                raise ValueError(f"{node}: input 'map_image' is not connected but source is {source!r}; connect an "
                                 "IMAGE or use source 'mask'")
            check_unit_range(node, "map_image", map_image)
            with node_input(node, "label_colour" if source == "image colour label" else "map_image"):
                m = maps.map_from_image(map_image, source, label_colour)
        m, note = maps.fit_to(m, e.resolution, "map")
        with node_input(node, "slot" if SLOTS[slot] else "expert"):
            condition = e.encode("segmentation", m, slot=SLOTS[slot])
        label = f"map ({source}{', slot ' + slot if SLOTS[slot] else ''}, {float(m.mean()):.0%} covered)"
        return chain_binding(node, expert, condition, weight, reliability, label, experts, [note], **mask)


class PoEBindSketch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindSketch", "Bind Sketch (PoE)",
            "Binds an edge sketch to a sketch expert. Canny edges are computed with kornia using "
            "the released sketch model's settings, or edges already drawn pass through as they are.",
            [
                Expert.Input("expert", tooltip="A sketch-conditional expert."),
                io.Image.Input("image", tooltip="A photo to take edges from, or an edge drawing (white on black)."),
                io.Combo.Input("edges", options=["canny", "as-is"], default="canny",
                               tooltip="'canny' computes edges; 'as-is' uses the image (thresholded at 0.5)."),
                io.Float.Input("low_threshold", default=100.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Canny hysteresis low threshold on 0-255 values (OpenCV convention)."),
                io.Float.Input("high_threshold", default=200.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Canny hysteresis high threshold on 0-255 values."),
                weight_input(1.0),
                reliability_input(0.0),
            ])

    @classmethod
    def execute(cls, expert, image, edges, low_threshold, high_threshold, weight, reliability, experts=None,
                **mask) -> io.NodeOutput:
        from ..conditions import edges as edge_ops

        node = "PoEBindSketch"
        check_choice(node, "edges", edges, ("canny", "as-is"), "edge mode")
        e = poe.unwrap(expert)
        check_finite(node, "image", image)
        if low_threshold > high_threshold:
            raise ValueError(f"{node}: input 'low_threshold' ({low_threshold}) is above high_threshold "
                             f"({high_threshold}); swap them")
        rgb = image[..., :3].movedim(-1, 1).float()
        rgb, note = maps.fit_to(rgb, e.resolution, "image")
        with node_input(node, "low_threshold"):
            sketch = edge_ops.canny_edges(rgb, low_threshold, high_threshold) if edges == "canny" else \
                (rgb.mean(dim=1, keepdim=True) > 0.5).float().expand(-1, 3, -1, -1) * 2 - 1
        with node_input(node, "expert"):
            condition = e.encode("sketch", sketch)
        label = f"sketch ({edges}, {float((sketch[:, :1] > 0).float().mean()):.1%} edge pixels)"
        return chain_binding(node, expert, condition, weight, reliability, label, experts, [note], **mask)


class PoEBindImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindImage", "Bind Low-res Image (PoE)",
            "Binds a low-resolution image to an upsampler expert (GLIDE upsample, ADM 64->256 and "
            "128->512), optionally with a prompt for text upsamplers. Sample the result at the "
            "upsampler's resolution: the second stage of a pipeline.",
            [
                Expert.Input("expert", tooltip="An upsampler expert."),
                io.Image.Input("image", tooltip="The low-resolution image; resized (kornia, antialiased) to the size "
                                                "the upsampler expects if needed."),
                weight_input(1.0),
                reliability_input(0.0),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="Prompt for text-conditional upsamplers (GLIDE); empty for none."),
            ])

    @classmethod
    def execute(cls, expert, image, weight, reliability, text="", experts=None, **mask) -> io.NodeOutput:
        node = "PoEBindImage"
        e = poe.unwrap(expert)
        check_finite(node, "image", image)
        low_res = image_to_pixels(image.float())
        with node_input(node, "image"):
            condition = e.encode("image", low_res, text=text) if text.strip() else e.encode("image", low_res)
        warning = e.warning("image", low_res, text=text) if text.strip() else None
        label = f"low-res {low_res.shape[-1]}x{low_res.shape[-2]}" + (f' + "{text[:30]}"' if text.strip() else "")
        return chain_binding(node, expert, condition, weight, reliability, label, experts, [warning], **mask)


class PoEBindingSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEBindingSchedule",
            display_name="Binding Noise Window (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Limits one binding of the chain to a noise window (Kynkäänniemi et al.'s guidance "
                        "interval; 'layout early, detail late') and ramps its reliability with the noise level. "
                        "Outside its window a binding costs no forward pass. A layout or segmentation binding "
                        "with sigma_min about 0.3 places the content, then leaves the strokes to the other "
                        "experts (README, 'Layout experts').",
            inputs=[
                Experts.Input("experts", tooltip="The chain whose binding gets the window and ramp."),
                index_input(),
                *sigma_window_inputs(0.0, "The binding is active for sigma_min <= sigma <= sigma_max.", "the window"),
                io.Float.Input("reliability_at_high_noise", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Multiplier of the reliability at sigma >= ramp_sigma_high."),
                io.Float.Input("reliability_at_low_noise", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Multiplier of the reliability at sigma <= ramp_sigma_low; linear in log "
                                       "sigma between."),
                io.Float.Input("ramp_sigma_high", default=10.0, min=1e-4, max=NO_LIMIT, step=0.01,
                               tooltip="Where the reliability ramp starts (high noise end)."),
                io.Float.Input("ramp_sigma_low", default=0.1, min=1e-4, max=NO_LIMIT, step=0.01,
                               tooltip="Where the reliability ramp ends (low noise end)."),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, experts, index, sigma_min, sigma_max, reliability_at_high_noise, reliability_at_low_noise,
                ramp_sigma_high, ramp_sigma_low) -> io.NodeOutput:
        import dataclasses

        node = "PoEBindingSchedule"
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max),
                            ("reliability_at_high_noise", reliability_at_high_noise),
                            ("reliability_at_low_noise", reliability_at_low_noise),
                            ("ramp_sigma_high", ramp_sigma_high), ("ramp_sigma_low", ramp_sigma_low)):
            check_number(node, name, value)
        bindings = indexed_chain(node, experts, index)
        if sigma_min >= sigma_max:
            raise ValueError(f"{node}: input 'sigma_min' ({sigma_min}) must be below sigma_max ({sigma_max})")
        if ramp_sigma_low >= ramp_sigma_high:
            raise ValueError(f"{node}: input 'ramp_sigma_low' ({ramp_sigma_low}) must be below ramp_sigma_high "
                             f"({ramp_sigma_high})")
        ramp = None
        if (reliability_at_high_noise, reliability_at_low_noise) != (1.0, 1.0):
            ramp = (ramp_sigma_high, reliability_at_high_noise, ramp_sigma_low, reliability_at_low_noise)
        bindings[index] = dataclasses.replace(bindings[index], sigma_window=sigma_window(sigma_min, sigma_max),
                                              reliability_ramp=ramp)
        return io.NodeOutput(bindings, ui={"text": (describe(bindings[index]),)})


class PoEReliabilityFromVariance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEReliabilityFromVariance",
            display_name="Reliability From Variance (PoE)",
            category=f"{CATEGORY}/bindings",
            description="EXPERIMENTAL. Each binding's share of the pooled null becomes, pixel by pixel, its "
                        "reliability divided by how unsure its expert's null is there (Var[x0 | x], read from the "
                        "expert's learned variance: ADM, GLIDE, the face experts, the shipped tiny experts). "
                        "PoE-GAN's precision-weighted product, carried over to diffusion. Put it after the last "
                        "binding. Costs nothing extra: the variance comes with the null's forward. Measured, not a "
                        "default: see BENCHMARKS.md.",
            inputs=[Experts.Input("experts", tooltip="The whole chain; every binding that supplies a null must "
                                                     "use a learned-variance expert.")],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, experts) -> io.NodeOutput:
        node = "PoEReliabilityFromVariance"
        bindings = list(experts or [])
        if not bindings:
            raise ValueError(f"{node}: input 'experts' is empty: connect a PoEBind* node")
        with node_input(node, "experts"):
            bindings = reliability_from_variance(bindings)
        return io.NodeOutput(bindings, ui={"text": (describe_rule(bindings),)})


class PoEBindInpaint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return binding_schema(
            "PoEBindInpaint", "Bind Inpainting (PoE)",
            "Binds a known image and the region to repaint to an inpainting expert (GLIDE base_inpaint, "
            "upsample_inpaint), with an optional prompt. To also keep the known pixels exact in the "
            "output, give the sampler a latent with the same noise mask (SetLatentNoiseMask).",
            [
                Expert.Input("expert", tooltip="An inpainting expert."),
                io.Image.Input("image", tooltip="The known image (resized to the expert's size if needed)."),
                io.Mask.Input("mask", tooltip="ComfyUI's convention: 1 where the expert repaints, 0 where the "
                                              "image is kept."),
                weight_input(1.0),
                reliability_input(1.0),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="Prompt for what goes in the repainted region; empty for none."),
                io.Image.Input("low_res", optional=True,
                               tooltip="For an upsampling inpainter: the low-resolution image to upsample."),
            ], masked=False)

    @classmethod
    def execute(cls, expert, image, mask, weight, reliability, text="", low_res=None, experts=None) -> io.NodeOutput:
        node = "PoEBindInpaint"
        e = poe.unwrap(expert)
        check_finite(node, "image", image)
        check_unit_range(node, "mask", mask)
        keep = 1 - maps.map_from_mask(mask)      # GLIDE's inpainting mask is 1 where the image is kept
        kwargs = {"text": text}
        if low_res is not None:
            check_finite(node, "low_res", low_res)
            kwargs["low_res"] = image_to_pixels(low_res.float())
        with node_input(node, "image"):
            condition = e.encode("inpaint", image_to_pixels(image.float()), keep, **kwargs)
        warning = e.warning("inpaint", text=text) if text.strip() else None
        label = f"inpaint {float(mask.mean()):.0%} of the image" + (f' + "{text[:30]}"' if text.strip() else "")
        return chain_binding(node, expert, condition, weight, reliability, label, experts, [warning])

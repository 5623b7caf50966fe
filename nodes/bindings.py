"""Binding nodes: each attaches one condition of one expert to a product (a POE_EXPERTS chain)."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..samplers import binding as binding_lib
from ..samplers import poe
from .common import (CATEGORY, Expert, Experts, TextEncoder, chain, check_finite, experts_input,
                     image_to_pixels, log, node_input, reliability_input, weight_input)

_IMAGENET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_loaders", "imagenet_classes.txt")


def imagenet_choices() -> list[str]:
    if os.path.isfile(_IMAGENET):
        with open(_IMAGENET, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        return [f"{i}: {n}" for i, n in enumerate(names)]
    return [f"{i}" for i in range(1000)]


def parse_class(choice: str, index: int) -> int:
    return index if index >= 0 else int(str(choice).split(":", 1)[0])


def _output(node: str, previous, binding: poe.Binding, warnings: list[str] = ()) -> io.NodeOutput:
    bindings = chain(previous, binding, node)
    summary = binding_lib.describe(binding)
    for w in warnings:
        log.warning("%s: %s", node, w)
    return io.NodeOutput(bindings, ui={"text": ("\n".join([summary, *warnings]),)})


class PoEBindClass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEBindClass",
            display_name="Bind Class (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Binds a class label to a class-conditional expert (ADM ImageNet models, diffusers "
                        "class-conditional UNets, the tiny digit expert).",
            inputs=[
                Expert.Input("expert", tooltip="A class-conditional expert."),
                io.Combo.Input("class", options=imagenet_choices(), default="292: tiger",
                               tooltip="The class, as 'index: name' (ImageNet names). For experts with other "
                                       "classes (digits), set class_index instead."),
                io.Int.Input("class_index", default=-1, min=-1, max=100000,
                             tooltip="Overrides the picker when >= 0: the class index for this expert."),
                weight_input(1.0),
                reliability_input(1.0),
                io.Combo.Input("null", options=list(binding_lib.NULL_CHOICES), default="class0 (paper)",
                               tooltip="How the unconditional prediction is formed. ADM class models were never "
                                       "trained without a label: 'class0 (paper)' uses class 0 as the released code "
                                       "does; 'mean of k random classes' averages k classes (k forwards, unbiased); "
                                       "'none' adds no null (reliability must be 0; another expert supplies the "
                                       "prior); 'trained' uses the expert's trained null where it has one."),
                io.Int.Input("null_k", default=8, min=1, max=1000,
                             tooltip="k for 'mean of k random classes' (each class is one more row per step)."),
                experts_input(),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, expert, weight, reliability, null, null_k, class_index, experts=None, **kw) -> io.NodeOutput:
        node = "PoEBindClass"
        index = parse_class(kw["class"], class_index)
        e = expert.expert
        with node_input(node, "class" if class_index < 0 else "class_index"):
            condition = e.encode("class", index)
        with node_input(node, "null"):
            nulls = binding_lib.class_nulls(e, null, null_k)
        if not nulls and reliability > 0:
            raise ValueError(f"{node}: input 'reliability': null is 'none', so the reliability must be 0 "
                             "(another binding supplies the prior)")
        name = e.class_names[index] if e.class_names and index < len(e.class_names) else ""
        label = f"class {index}" + (f": {name}" if name and name != str(index) else "")
        b = poe.Binding(expert, condition, weight, reliability, nulls, label=label)
        return _output(node, experts, b)


class PoEBindText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEBindText",
            display_name="Bind Text (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Binds a text prompt to a text expert (GLIDE, the face expert through a FaRL text "
                        "encoder, the tiny colour expert).",
            inputs=[
                Expert.Input("expert", tooltip="A text-conditional expert."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt. GLIDE truncates past 128 tokens, CLIP/FaRL past 77; the node warns."),
                weight_input(1.0),
                reliability_input(1.0),
                TextEncoder.Input("text_encoder", optional=True,
                                  tooltip="For experts that take a text embedding (the face expert): the FaRL or "
                                          "CLIP text encoder that turns the text into it."),
                experts_input(),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, expert, text, weight, reliability, text_encoder=None, experts=None) -> io.NodeOutput:
        node = "PoEBindText"
        e = expert.expert
        if not text.strip():
            raise ValueError(f"{node}: input 'text' is empty. Type a prompt; for an unconditional prior use "
                             "PoEBindPrior instead.")
        warnings = []
        with node_input(node, "text"):
            if text_encoder is not None:
                emb, warning = text_encoder.encode_with_warning([text])
                warnings += [warning] if warning else []
                condition = e.encode("text", emb)
            else:
                warn_fn = getattr(e, "text_warning", None) or e.info.get("text_warning")
                if callable(warn_fn):
                    w = warn_fn(text)
                    warnings += [w] if w else []
                condition = e.encode("text", text)
        nulls = binding_lib.default_nulls(expert, condition)
        if not nulls and reliability > 0:
            raise ValueError(f"{node}: input 'reliability': {e.name} has no trained null, so the reliability must be 0")
        short = text if len(text) <= 40 else text[:37] + "..."
        b = poe.Binding(expert, condition, weight, reliability, nulls, label=f'"{short}"')
        return _output(node, experts, b, warnings)


class PoEBindPrior(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEBindPrior",
            display_name="Bind Prior (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Adds an expert's unconditional score only (weight 0, reliability > 0): the expert acts "
                        "as a prior, for example ADM-256 unconditional under a class-conditional ADM-256.",
            inputs=[
                Expert.Input("expert", tooltip="Any expert with a trained null, or an unconditional model."),
                reliability_input(1.0),
                io.Float.Input("weight", default=0.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Usually 0: the binding then contributes only through the pooled null."),
                experts_input(),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, expert, reliability, weight, experts=None) -> io.NodeOutput:
        node = "PoEBindPrior"
        e = expert.expert
        null = e.null_condition
        if null is None:
            raise ValueError(f"{node}: input 'expert': {e.name} has no trained null condition, so it cannot act as a "
                             "prior. Use an unconditional model or one trained with condition dropout.")
        b = poe.Binding(expert, null, weight, reliability, (null,), label="prior (unconditional)")
        return _output(node, experts, b)

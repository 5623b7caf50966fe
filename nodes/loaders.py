"""Loader nodes: experts from models/experts, and text encoders for the face experts."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.v0_0_2 import io

from .. import model_loaders
from ..model_loaders import speed
from ..samplers.comfy import loading as comfy_loading
from ..samplers.comfy import models as comfy_models
from .common import CATEGORY, Expert, TextEncoder, check_choice, node_input

SCHEDULE_CHOICES = ("published", "linear", "cosine")


def file_input(name: str, folder: str, tooltip: str) -> io.Input:
    """A picker of the files in models/``folder``; read the choice with :func:`model_file`."""
    return io.Combo.Input(name, options=folder_paths.get_filename_list(folder), tooltip=tooltip)


def model_file(folder: str, name: str) -> str:
    """The path of a file of models/``folder``, refused when it is not there (any more)."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name} is not in models/{folder}; put the file there and refresh the node list "
                         "(press R in the browser)")
    return path


def expert_path(name: str) -> str:
    """A file in models/experts; a diffusers weight file stands for its whole folder."""
    path = model_file("experts", name)
    folder = os.path.dirname(path)
    if os.path.basename(path).startswith("diffusion_pytorch_model") and os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    return path


class PoEExpertLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEExpertLoader",
            display_name="Load Expert (PoE)",
            category=f"{CATEGORY}/loaders",
            description="Loads a pixel-space diffusion model from models/experts as one expert of a product. "
                        "The family is detected from the file's keys and shapes. Experts of one product may run "
                        "on different devices (the 'device' option).",
            inputs=[
                file_input("expert_name", "experts",
                           tooltip="A checkpoint in models/experts (.safetensors, .pt, .pth, .bin, or a diffusers "
                                   "folder's diffusion_pytorch_model file). The pack's tiny digit experts are listed "
                                   "too."),
                io.Combo.Input("family", options=list(model_loaders.FAMILIES), default="auto",
                               tooltip="Checkpoint family; 'auto' reads it from the file."),
                io.Combo.Input("dtype", options=list(model_loaders.DTYPES), default="auto",
                               tooltip="Weight dtype. 'auto' lets ComfyUI pick for the device (fp32 on the CPU, "
                                       "fp16/bf16 on GPUs that run them well). Normalisation always runs in fp32."),
                io.Combo.Input("schedule", options=list(SCHEDULE_CHOICES), default="published",
                               tooltip="Training noise schedule. It cannot be read from the weights: 'published' uses the "
                                       "one the family's published configuration was trained with."),
                io.Combo.Input("compile", options=list(speed.COMPILE_MODES), default="off", optional=True,
                               tooltip="torch.compile the network. The first prompt of each image batch size pays the "
                                       "compilation (minutes for the published sizes; the time is logged); later "
                                       "prompts of that size reuse it, also after the expert is loaded again. "
                                       "'reduce-overhead' adds CUDA graphs on a GPU. Needs Triton on a GPU, a C++ "
                                       "compiler on the CPU."),
                io.Boolean.Input("channels_last", default=False, optional=True,
                                 tooltip="Keep weights and activations in the channels_last (NHWC) layout, which GPU "
                                         "convolution kernels read directly. Same results up to float rounding."),
                io.Combo.Input("device", options=comfy_models.device_choices(), default="auto", optional=True,
                               tooltip="Where this expert runs. 'auto' is ComfyUI's device (its GPU, or the CPU "
                                       "with --cpu). With several GPUs, put big experts that do not fit on one GPU "
                                       "together on different ones (cuda:0, cuda:1): each GPU holds its expert's "
                                       "weights. 'cpu' keeps a small expert off the GPU, leaving its memory to the "
                                       "big ones. ComfyUI-Distributed's local workers see one GPU each: leave them "
                                       "at 'auto' there (docs/scaling.md). The sampler moves the image to each "
                                       "expert and its prediction back: same results up to float rounding."),
            ],
            outputs=[Expert.Output(display_name="expert"),
                     io.Model.Output(display_name="MODEL",
                                     tooltip="The same expert as a ComfyUI MODEL, for the stock KSampler or CFGGuider "
                                             "(conditions from Binding To Conditioning) or for Bind Model.")],
        )

    @classmethod
    def execute(cls, expert_name, family, dtype, schedule, compile="off", channels_last=False,
                device="auto") -> io.NodeOutput:
        node = "PoEExpertLoader"
        check_choice(node, "family", family, model_loaders.FAMILIES, "family")
        check_choice(node, "dtype", dtype, model_loaders.DTYPES, "dtype")
        check_choice(node, "schedule", schedule, SCHEDULE_CHOICES, "schedule")
        check_choice(node, "compile", compile, speed.COMPILE_MODES, "compile mode")
        # A workflow saved on a machine with more GPUs names devices this one lacks.
        check_choice(node, "device", device, comfy_models.device_choices(), "device")
        load_device, _ = comfy_models.expert_devices(device)
        if compile != "off":
            why = speed.compile_unavailable(load_device)
            if why:
                raise ValueError(f"{node}: input 'compile': torch.compile cannot build kernels here: {why}; "
                                 "set compile to off")
        with node_input(node, "expert_name"):
            path = expert_path(expert_name)
            expert, notes = comfy_loading.load_expert(
                path, family, None if schedule == "published" else schedule,
                lambda n: comfy_models.inference_dtype(dtype, n, None if device == "auto" else load_device), load_device)
        n_params = sum(p.numel() for p in expert.network.parameters())
        speed.set_channels_last(expert, bool(channels_last))
        speed.compile_expert(expert, compile)
        handle = comfy_models.wrap_expert(expert, device)
        summary = (f"{expert.name} · {expert.family} · {expert.resolution}px · {n_params / 1e6:.1f}M params · "
                   f"modalities: {', '.join(expert.modalities) or 'unconditional'}")
        if device != "auto":
            summary += f" · on {load_device}"
        if compile != "off":
            summary += f" · torch.compile {compile} (compiles on its first prompt)"
        summary += "".join(f" · {note}" for note in notes)
        return io.NodeOutput(handle, handle.patcher, ui={"text": (summary,)})


class PoETextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoETextEncoderLoader",
            display_name="Load Text Encoder (PoE, FaRL/CLIP)",
            category=f"{CATEGORY}/loaders",
            description="Loads a FaRL text encoder (FaRL-Base-Patch16-LAIONFace20M-ep64.pth) or an OpenAI CLIP "
                        "ViT-B/16 checkpoint from models/text_encoders: prompts become the 512-d, L2-normalised "
                        "embeddings the face expert was trained with. CLIP's vocabulary comes from ComfyUI.",
            inputs=[
                file_input("text_encoder_name", "text_encoders",
                           tooltip="A file in models/text_encoders (OpenAI CLIP layout; FaRL's .pth works as is)."),
            ],
            outputs=[TextEncoder.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, text_encoder_name) -> io.NodeOutput:
        from ..model_loaders import text_encoders

        node = "PoETextEncoderLoader"
        with node_input(node, "text_encoder_name"):
            encoder = text_encoders.load_text_encoder(model_file("text_encoders", text_encoder_name))
        i = encoder.info
        summary = f"text tower: {i['layers']} layers x {i['width']}, {i['heads']} heads, {i['embed_dim']}-d output"
        return io.NodeOutput(encoder, ui={"text": (summary,)})

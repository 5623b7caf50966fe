"""Checkpoint loaders: format detection and the architectures of every supported family.

Python entry point, usable without ComfyUI (put the pack's folder on ``sys.path``)::

    from model_loaders import load_expert
    expert = load_expert("models/experts/64x64_diffusion.pt", family="auto")
    out = expert(x_t, t, y=torch.tensor([292]))     # raw network output, as the original returns
    eps = expert.eps(x_t, t, {"y": torch.tensor([292])})

This package imports nothing from ComfyUI and nothing from ``samplers``.
"""
from __future__ import annotations

import importlib
import os

import torch

from .expert import Condition, Expert, load_state_dict
from .ops import torch_ops
from .schedules import alphas_cumprod_for

# Detection order matters: the more specific layouts claim a file before the general ones.
FAMILY_MODULES = {
    "tiny": ".tiny",
    "face": ".face",
    "glide": ".glide",
    "glide_upsample": ".glide",
    "adm": ".adm",
    "diffusers": ".diffusers_unet",
}
FAMILIES = ("auto",) + tuple(FAMILY_MODULES)
DTYPES = ("auto", "fp32", "fp16", "bf16")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _family_module(family: str):
    return importlib.import_module(FAMILY_MODULES[family], __name__)


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and safetensors metadata (empty for .pt) of a file, read safely."""
    meta: dict[str, str] = {}
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as err:
            raise ValueError(f"{os.path.basename(path)}: not a readable safetensors file ({err})") from err
    return load_state_dict(path), meta


def detect_family(sd: dict[str, torch.Tensor], meta: dict[str, str], path: str = "") -> str:
    """The first family whose ``detect(sd, meta)`` claims the state dict."""
    for family in FAMILY_MODULES:
        try:
            module = _family_module(family)
        except ModuleNotFoundError:
            continue
        if module.detect(sd, meta, family):
            return family
    sample = ", ".join(list(sd)[:8])
    raise ValueError(
        f"{os.path.basename(path) or 'checkpoint'}: no known expert family matches this file "
        f"({len(sd)} tensors; first keys: {sample}). Supported families: {', '.join(FAMILY_MODULES)}. "
        "Pick the family by hand on the loader if you know it."
    )


def load_expert(path: str, family: str = "auto", *, schedule: str | None = None,
                dtype: str = "fp32", device: str | torch.device = "cpu", operations=torch_ops) -> Expert:
    """Load a checkpoint (file, or diffusers folder) as an :class:`Expert`.

    Args:
        path: a ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file, or a diffusers model folder.
        family: one of ``FAMILIES``; ``auto`` detects it from the keys and shapes.
        schedule: override of the training noise schedule (``linear`` or ``cosine``), for files
            whose schedule cannot be read from the weights.
        dtype: ``fp32``, ``fp16``, ``bf16``, or ``auto`` (fp32; ComfyUI's loader node picks for
            the device instead).
        device: where the weights go.
        operations: the layer namespace the network is built from (``model_loaders.ops``).
    """
    if os.path.isdir(path):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        expert = diffusers_expert_from_folder(path, schedule=schedule, operations=operations)
    else:
        sd, meta = read_checkpoint(path)
        expert = expert_from_state_dict(sd, meta, path, family, schedule=schedule, operations=operations)
    torch_dtype = _TORCH_DTYPES.get(dtype, torch.float32)
    expert.network.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    return expert


def diffusers_expert_from_folder(path: str, *, schedule: str | None = None, operations=torch_ops,
                                 read=load_state_dict) -> Expert:
    """The :class:`Expert` of a diffusers model folder; ``read(file)`` reads its weights file."""
    expert = _family_module("diffusers").build_from_folder(path, schedule=schedule, operations=operations, read=read)
    expert.info.setdefault("path", path)
    return expert


def expert_from_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str], path: str, family: str = "auto", *,
                           schedule: str | None = None, operations=torch_ops) -> Expert:
    """The :class:`Expert` of a checkpoint already read (``path`` names it in errors); the weights keep
    the state dict's dtype and device. Arguments as :func:`load_expert`'s."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if family == "auto":
        family = detect_family(sd, meta, path)
    module = _family_module(family)
    if not module.detect(sd, meta, family):
        raise ValueError(
            f"{os.path.basename(path)}: this file is not a {family!r} checkpoint "
            f"(first keys: {', '.join(list(sd)[:6])}). Try family 'auto'."
        )
    try:
        expert = module.build(sd, meta, family, schedule=schedule, operations=operations)
    except (ValueError, KeyError, RuntimeError) as err:
        # Builders see tensors, not files: name the file here.
        message = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{os.path.basename(path)}: {message}") from err
    expert.info.setdefault("path", path)
    return expert


__all__ = ["Condition", "Expert", "FAMILIES", "DTYPES", "load_expert", "expert_from_state_dict", "diffusers_expert_from_folder", "read_checkpoint",
           "detect_family", "load_state_dict", "alphas_cumprod_for"]

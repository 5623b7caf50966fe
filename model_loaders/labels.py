"""An expert's class names without loading its weights, for a class picker.

The names come from each family's own rule (checkpoint metadata, or the family's published list),
applied to the configuration its builder infers from the file's tensor shapes: the tensors are meta
tensors (safetensors header, or a memory-mapped .pt), so asking for the labels of a 2 GB checkpoint
costs its header, not its size. A diffusers folder is loaded on the CPU instead.
"""
from __future__ import annotations

import os

import torch

from . import FAMILIES, _family_module, detect_family, load_expert, load_state_dict


def _shapes(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors as meta tensors of their shapes, and its safetensors metadata."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as err:
            raise ValueError(f"{os.path.basename(path)}: not a readable safetensors file ({err})") from err
        return sd, meta
    try:
        # mmap: the tensors stay on disk; weights_only refuses pickled objects as load_state_dict does.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        sd = load_state_dict(path)
    except Exception:
        sd = load_state_dict(path)  # raises the loader's own refusal message
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{os.path.basename(path)}: expected a state dict of tensors, found {type(sd).__name__}")
    return {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}, {}


def class_names(path: str, family: str = "auto") -> list[str]:
    """The class names of the loaded expert (``Expert.class_names``); [] if it takes no class label."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if os.path.isdir(path):
        expert = load_expert(path, family)
        return list(expert.class_names or []) if "class" in expert.encoders else []
    sd, meta = _shapes(path)
    if family == "auto":
        family = detect_family(sd, meta, path)
    module = _family_module(family)
    if not module.detect(sd, meta, family):
        raise ValueError(f"{os.path.basename(path)}: this file is not a {family!r} checkpoint. Try family 'auto'.")
    try:
        # Each family's own rule, on the configuration its builder infers from the same shapes and metadata.
        if family == "tiny":
            config = module.read_config(meta)
            encoders, _, names = module._modality(config, module.NAMES[config["modality"]])
            return list(names or []) if "class" in encoders else []
        if family == "adm":
            config = module.infer_config(sd, meta)[0]
            return [] if config.is_upsampler else list(module.class_names_for(config) or [])
        if family == "diffusers":
            return list(module.class_names_for(module.infer_config(module.rename_old_attention(sd), meta)) or [])
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{os.path.basename(path)}: {err}") from err
    return []  # GLIDE and the face experts take no class label

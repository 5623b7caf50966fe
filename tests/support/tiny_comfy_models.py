"""Tiny random-weight models built from ComfyUI's own model classes and configs (no downloads)."""
from __future__ import annotations

import torch

import comfy.model_patcher
import comfy.supported_models

SD15_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32, "out_channels": 4,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 2, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}

CHROMA_RADIANCE_CONFIG = {
    "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 16, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1,
    "nerf_hidden_size": 16, "nerf_mlp_ratio": 2, "nerf_depth": 1, "nerf_max_freqs": 4, "nerf_tile_size": 0,
    "nerf_final_head_type": "linear", "nerf_embedder_dtype": torch.float32, "dtype": torch.float32,
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # ComfyUI's layers skip initialisation (weights come from checkpoints): fill them here.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _patcher(config_class, config: dict, seed: int):
    model = config_class(dict(config)).get_model({})
    _randomise(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_sd15(seed: int):
    """An SD1.5-architecture UNet (ComfyUI's SD15 config, EPS, SD1 latents) at width 32."""
    return _patcher(comfy.supported_models.SD15, SD15_CONFIG, seed)


def tiny_chroma_radiance(seed: int):
    """A Chroma Radiance-architecture pixel-space flow model at width 64 (patch 16)."""
    return _patcher(comfy.supported_models.ChromaRadiance, CHROMA_RADIANCE_CONFIG, seed)


def text_conditioning(seed: int, tokens: int = 7, width: int = 32, pooled: bool = False):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": None} if pooled else {}
    return [[torch.randn(1, tokens, width, generator=g), extra]]

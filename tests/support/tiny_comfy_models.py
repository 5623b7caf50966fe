"""Tiny random-weight models built from ComfyUI's own model classes and configs (no downloads)."""
from __future__ import annotations

import dataclasses

import torch

import comfy.model_patcher
import comfy.samplers
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

# Four fields ComfyUI 0.33 added to ChromaRadianceParams (required: no defaults), with the values its
# model_detection gives a Chroma Radiance checkpoint that has no pooled vector and no x0/sequential markers.
# A ComfyUI whose dataclass lacks a field gets its config without it.
CHROMA_RADIANCE_NEWER_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False,
                                "use_sequential_txt_ids": False}


def chroma_radiance_config() -> dict:
    """CHROMA_RADIANCE_CONFIG with the fields the running ComfyUI's ChromaRadianceParams declares."""
    from comfy.ldm.chroma_radiance.model import ChromaRadianceParams

    declared = {f.name for f in dataclasses.fields(ChromaRadianceParams)}
    return dict(CHROMA_RADIANCE_CONFIG, **{k: v for k, v in CHROMA_RADIANCE_NEWER_FIELDS.items() if k in declared})


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
    return _patcher(comfy.supported_models.ChromaRadiance, chroma_radiance_config(), seed)


def text_conditioning(seed: int, tokens: int = 7, width: int = 32, pooled: bool = False):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": None} if pooled else {}
    return [[torch.randn(1, tokens, width, generator=g), extra]]


# An SD2.x-architecture UNet cut to one level (one res block, one transformer) at the width and
# context size that ComfyUI's model detection needs to recognise it (model_channels 320, context 1024):
# 26M parameters, so a checkpoint loads in a moment on a CPU. SD2 rather than SD1.5 because the stock
# LotusConditioning node makes a 1024-wide CONDITIONING without any text encoder.
SD2_FILE_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 320, "out_channels": 4,
    "num_res_blocks": [1], "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64,
    "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}


def tiny_sd2_unet_state(seed: int) -> dict[str, torch.Tensor]:
    """The diffusion model's state dict as UNETLoader reads it (fp16, no prefix)."""
    model = comfy.supported_models.SD20(dict(SD2_FILE_CONFIG)).get_model({})
    _randomise(model, seed)
    return {k: v.detach().half().contiguous() for k, v in model.diffusion_model.state_dict().items()}


def write_tiny_sd2_unet(path, seed: int):
    from safetensors.torch import save_file

    save_file(tiny_sd2_unet_state(seed), str(path))
    return path


def write_tiny_lora(path, seed: int, rank: int = 4, scale: float = 0.5):
    """A LoRA in the kohya key style on the tiny SD2 UNet's time embedding (1280 x 320), which every
    block reads, so LoraLoaderModelOnly changes the whole prediction."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_time_embed_0"
    save_file({f"{key}.lora_up.weight": torch.randn(1280, rank, generator=g) * scale,
               f"{key}.lora_down.weight": torch.randn(rank, 320, generator=g) * scale,
               f"{key}.alpha": torch.tensor(float(rank))}, str(path))
    return path


# An SD3-architecture MMDiT at one block (hidden 64: detection reads depth as hidden / 64), reading the
# same 1024-wide CONDITIONING: a second latent family (SD3 latents, 16 channels) to mix with the SD2 UNet.
SD3_FILE_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None, "adm_in_channels": 64,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 1024, "out_features": 64}},
    "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    "dtype": torch.float32,
}


def write_tiny_sd3_mmdit(path, seed: int):
    from safetensors.torch import save_file

    model = comfy.supported_models.SD3(dict(SD3_FILE_CONFIG)).get_model({})
    _randomise(model, seed)
    save_file({k: v.detach().contiguous() for k, v in model.diffusion_model.state_dict().items()}, str(path))
    return path


def stock_denoised(patcher, cond, x, sigma):
    """The model's own denoised prediction via the stock CFGGuider at cfg 1 (one Euler step to 0)."""
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(cond, [])
    guider.set_cfg(1.0)
    return guider.sample(x, torch.zeros_like(x), comfy.samplers.sampler_object("euler"),
                         torch.tensor([sigma, 0.0]), disable_pbar=True, seed=0)

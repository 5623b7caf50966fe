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



def _random_state(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fixed random weights for a state dict's shapes, at a scale that keeps activations O(1): matrices
    N(0, 1 / fan_in), norm scales 1, other vectors N(0, 0.02^2). The values are windows of one pool of
    2^22 + 15 normal draws (a period coprime with every width here), so that a billion weights take a
    copy rather than a billion draws."""
    pool = torch.randn(2**22 + 15, generator=torch.Generator().manual_seed(seed))
    out, offset = {}, 0
    for key in sorted(shapes):
        shape = shapes[key]
        n = shape.numel()
        if len(shape) == 1 and (key.endswith(".scale") or "norm" in key):
            out[key] = torch.ones(shape, dtype=dtype)
            continue
        start = offset % pool.numel()
        values = pool.repeat(-(-(n + start) // pool.numel()))[start:start + n]
        scale = shape[1:].numel() ** -0.5 if len(shape) >= 2 else 0.02
        out[key] = (values * scale).to(dtype).view(shape).contiguous()
        offset += n
    return out


# The smallest Chroma Radiance that ComfyUI's model detection reads from a file: detection fixes the
# hidden size (3072: 24 heads x 128 RoPE dims on 0.3.75, the approximator's out_dim on both), the
# guidance approximator (5 layers of 5120), the NeRF head (4 blocks, each generating its pixel MLP from
# the 3072-wide token: 151M parameters a block) and, on 0.3.75, the 16 px patch; only the block counts and
# the context width are free. One double block and no single block leave 1.11e9 parameters: 2.2 GB in
# bf16 on disk, 4.4 GB once ComfyUI loads it in fp32 on a CPU. A 32 px image is 2 x 2 patches, the
# native tiny experts' canvas; the context width 768 is CLIP-L's (write_clip_l).
CHROMA_RADIANCE_FILE_CONFIG = {
    "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "context_in_dim": 768,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 0,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 16, "qkv_bias": True, "in_dim": 64, "out_dim": 3072,
    "hidden_dim": 5120, "n_layers": 5, "nerf_hidden_size": 64, "nerf_mlp_ratio": 4, "nerf_depth": 4,
    "nerf_max_freqs": 8, "nerf_tile_size": 512, "nerf_final_head_type": "linear",
    "nerf_embedder_dtype": torch.float32,
}


def chroma_radiance_file_state(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """CHROMA_RADIANCE_FILE_CONFIG's diffusion model as UNETLoader reads it (no prefix), with the RMSNorm
    keys named ``.scale`` as Chroma Radiance checkpoints have them (0.3.75's names; 0.33 names them
    ``.weight`` and converts on load), so one file serves both ComfyUIs. Checks that the running
    ComfyUI's detection gives the config back."""
    import comfy.model_detection
    from comfy.ldm.chroma_radiance.model import ChromaRadianceParams

    declared = {f.name for f in dataclasses.fields(ChromaRadianceParams)}
    config = dict(CHROMA_RADIANCE_FILE_CONFIG,
                  **{k: v for k, v in CHROMA_RADIANCE_NEWER_FIELDS.items() if k in declared})
    meta = comfy.supported_models.ChromaRadiance(dict(config, dtype=torch.float32)).get_model({}, device="meta")
    shapes = {(k[:-len(".weight")] + ".scale" if len(v.shape) == 1 and "norm" in k and k.endswith(".weight") else k):
              v.shape for k, v in meta.diffusion_model.state_dict().items()}
    state = _random_state(shapes, seed, dtype)
    detected = comfy.model_detection.detect_unet_config(state, "")
    wrong = {k: (v, detected.get(k)) for k, v in config.items() if detected.get(k) != v}
    if wrong:
        raise RuntimeError(f"ComfyUI's detection reads this Chroma Radiance differently (written, read): {wrong}")
    return state


def write_chroma_radiance_file(path, seed: int):
    from safetensors.torch import save_file

    save_file(chroma_radiance_file_state(seed), str(path))
    return path


def write_clip_l(path, seed: int):
    """A CLIP-L text encoder (ComfyUI's SD1 config, random weights, fp16) for the stock CLIPLoader
    (type stable_diffusion): CLIPTextEncode then gives a 77 x 768 CONDITIONING with a pooled_output,
    which ComfyUI 0.3.75's Flux-family models (Chroma Radiance) require (LotusConditioning has none)."""
    import json
    import os

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    from safetensors.torch import save_file

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        config = json.load(f)
    meta = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.manual_cast)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    save_file(_random_state(shapes, seed, torch.float16), str(path))
    return path

"""Tier (b): every ComfyUI name the pack uses exists in the running ComfyUI, with the parameters the pack
passes. tools/test.sh runs this on 0.3.75 and on 0.33.0; docs/comfyui_api.md's "0.33.0 (run)" column is
what it found there.

The names are found the way tests/test_layers.py finds them (every ``module.Name`` read from a ComfyUI
module in the pack's own files), so a name the pack starts to use is checked here without a list to edit.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from test_layers import comfy_names_used  # noqa: E402

PACK_FILES = sorted(p for p in REPO.rglob("*.py")
                    if p.relative_to(REPO).parts[0] not in {"tests", "benchmarks", "tools", "docs", ".venv", ".cache"})
USED = sorted(set().union(*(comfy_names_used(p) for p in PACK_FILES)))

# Methods the pack overrides or calls on ComfyUI's classes, and the parameters it passes to them by name or
# position (a subset that must lead the signature, in order).
METHODS = {
    ("comfy.model_base.BaseModel", "__init__"): ["self", "model_config", "model_type", "device"],
    ("comfy.model_base.BaseModel", "_apply_model"): ["self", "x", "t", "c_concat", "c_crossattn", "control",
                                                     "transformer_options"],
    ("comfy.model_base.BaseModel", "memory_required"): ["self", "input_shape", "cond_shapes"],
    ("comfy.model_base.BaseModel", "extra_conds"): ["self"],
    ("comfy.model_base.BaseModel", "process_latent_in"): ["self", "latent"],
    ("comfy.model_patcher.ModelPatcher", "__init__"): ["self", "model", "load_device", "offload_device"],
    ("comfy.model_patcher.ModelPatcher", "set_additional_models"): ["self", "key", "models"],
    ("comfy.model_patcher.ModelPatcher", "get_additional_models_with_key"): ["self", "key"],
    ("comfy.model_patcher.ModelPatcher", "pre_run"): ["self"],
    ("comfy.model_patcher.ModelPatcher", "cleanup"): ["self"],
    ("comfy.model_patcher.ModelPatcher", "restore_hook_patches"): ["self"],
    ("comfy.model_patcher.ModelPatcher", "get_model_object"): ["self", "name"],
    ("comfy.samplers.CFGGuider", "__init__"): ["self", "model_patcher"],
    ("comfy.samplers.CFGGuider", "predict_noise"): ["self", "x", "timestep", "model_options", "seed"],
    ("comfy.samplers.CFGGuider", "inner_set_conds"): ["self", "conds"],
    ("comfy.samplers.CFGGuider", "inner_sample"): ["self", "noise", "latent_image", "device", "sampler", "sigmas",
                                                   "denoise_mask", "callback", "disable_pbar", "seed"],
    ("comfy.samplers.CFGGuider", "sample"): ["self", "noise", "latent_image", "sampler", "sigmas", "denoise_mask",
                                             "callback", "disable_pbar", "seed"],
    ("comfy.samplers.KSAMPLER", "__init__"): ["self", "sampler_function", "extra_options", "inpaint_options"],
    ("comfy.samplers.KSAMPLER", "sample"): ["self", "model_wrap", "sigmas", "extra_args", "callback", "noise",
                                            "latent_image", "denoise_mask", "disable_pbar"],
    ("comfy.samplers.KSampler", "__init__"): ["self", "model", "steps", "device", "sampler", "scheduler", "denoise",
                                              "model_options"],
    ("comfy.samplers.KSamplerX0Inpaint", "__init__"): ["self", "model", "sigmas"],
    ("comfy.model_sampling.ModelSamplingDiscrete", "__init__"): ["self", "model_config", "zsnr"],
    ("comfy.model_sampling.ModelSamplingDiscrete", "set_sigmas"): ["self", "sigmas"],
    ("comfy.model_sampling.ModelSamplingDiscrete", "timestep"): ["self", "sigma"],
    ("comfy.model_sampling.EPS", "calculate_input"): ["self", "sigma", "noise"],
    ("comfy.model_sampling.EPS", "calculate_denoised"): ["self", "sigma", "model_output", "model_input"],
    ("comfy.model_sampling.EPS", "noise_scaling"): ["self", "sigma", "noise", "latent_image", "max_denoise"],
    ("comfy.model_sampling.EPS", "inverse_noise_scaling"): ["self", "sigma", "latent"],
    ("comfy.supported_models_base.BASE", "__init__"): ["self", "unet_config"],
    ("comfy.k_diffusion.sampling.BrownianTreeNoiseSampler", "__init__"): ["self", "x", "sigma_min", "sigma_max",
                                                                          "seed", "transform", "cpu"],
    ("comfy.conds.CONDRegular", "__init__"): ["self", "cond"],
}
FUNCTIONS = {  # functions the pack calls: (its positional arguments, in order; the keywords it names)
    "comfy.model_management.unet_dtype": ([], {"device", "model_params", "supported_dtypes"}),
    "comfy.model_management.unet_manual_cast": (["weight_dtype", "inference_device"], set()),
    "comfy.ops.pick_operations": (["weight_dtype", "compute_dtype"], {"load_device"}),
    "comfy.utils.load_torch_file": (["ckpt"], {"safe_load", "return_metadata"}),
    "comfy.sample.prepare_noise": (["latent_image", "seed"], set()),
    "comfy.sampler_helpers.prepare_mask": (["noise_mask", "shape", "device"], set()),
    "latent_preview.prepare_callback": (["model", "steps"], set()),
    "comfy.samplers.calc_cond_batch": (["model", "conds", "x_in", "timestep", "model_options"], set()),
    "comfy.samplers.process_conds": (["model", "noise", "conds", "device", "latent_image", "denoise_mask", "seed"],
                                     set()),
    "comfy.sampler_helpers.prepare_model_patcher": (["model", "conds", "model_options"], set()),
}


def resolve(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_the_scan_finds_the_names_the_glue_lists():
    assert len(USED) >= 40
    assert {"comfy.samplers.CFGGuider", "comfy.model_patcher.ModelPatcher", "folder_paths.get_full_path",
            "comfy_api.v0_0_2.io", "server.PromptServer"} <= set(USED)
    assert {name for name, _ in METHODS} | set(FUNCTIONS) <= set(USED)


@pytest.mark.parametrize("dotted", USED)
def test_every_name_the_pack_uses_exists(dotted):
    assert resolve(dotted) is not None


@pytest.mark.parametrize("owner, method", sorted(METHODS), ids=[f"{o}.{m}" for o, m in sorted(METHODS)])
def test_methods_take_the_parameters_the_pack_passes(owner, method):
    params = list(inspect.signature(getattr(resolve(owner), method)).parameters)
    expected = METHODS[owner, method]
    assert params[:len(expected)] == expected, params


@pytest.mark.parametrize("dotted", sorted(FUNCTIONS))
def test_functions_take_the_arguments_the_pack_passes(dotted):
    signature = inspect.signature(resolve(dotted))
    positional, keywords = FUNCTIONS[dotted]
    assert list(signature.parameters)[:len(positional)] == positional, f"{dotted}{signature}"
    assert keywords <= set(signature.parameters), f"{dotted}{signature}"

"""Tier (c): a product of two ComfyUI MODELs on a real server, driven over HTTP.

Two tiny random-weight SD2-architecture UNets (different seeds: two "fine-tunes") are saved into the
server's diffusion_models folder and loaded by the stock UNETLoader, which must detect them as SD2;
the stock LotusConditioning node supplies a 1024-wide CONDITIONING without a text encoder, and
ConditioningZeroOut its null. The tests cover the product's output, a binding patched by a LoRA
(LoraLoaderModelOnly, or the same LoRA as a hook on its CONDITIONINGs), the refusals of mixed latent
formats, spaces and sizes, and interruption.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from support import fuzz
from support.model_prompts import two_unet_product
from support.tiny_comfy_models import write_tiny_lora, write_tiny_sd2_unet, write_tiny_sd3_mmdit

UNETS = ("uac_tiny_sd2_a.safetensors", "uac_tiny_sd2_b.safetensors")
LORA = "uac_tiny_sd2_lora.safetensors"
SD3 = "uac_tiny_sd3.safetensors"
SAMPLER_ID = "7"


def write_native(path, resolution: int, seed: int):
    """A tiny class expert (the pack's native pixel family) at a chosen resolution."""
    from safetensors.torch import save_file

    from unite_and_conquer.model_loaders import tiny

    config = dict(tiny.default_config("class"), widths=list(fuzz.SMALL_WIDTHS), resolution=resolution)
    torch.manual_seed(seed)
    net = tiny.network_from_config(config)
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata=tiny.metadata_for(config))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfy_client import ComfyServer

    work = tmp_path_factory.mktemp("model_product")
    models = work / "models"
    models.mkdir()
    for seed, name in enumerate(UNETS):
        write_tiny_sd2_unet(models / name, seed)
    write_tiny_lora(models / LORA, 7)
    write_tiny_sd3_mmdit(models / SD3, 3)
    write_native(models / "uac_native_32.safetensors", 32, 0)
    write_native(models / "uac_native_48.safetensors", 48, 1)
    config = work / "extra_model_paths.yaml"
    config.write_text(f"uac_model_tests:\n  diffusion_models: {models}\n  loras: {models}\n  experts: {models}\n")
    srv = ComfyServer(work / "comfy", python=sys.executable, extra_args=("--extra-model-paths-config", str(config)))
    srv.start(timeout=240)
    yield srv
    srv.stop()
    assert not srv.import_failures()


def model_prompt(seed: int = 1, steps: int = 3, lora: float | None = None, hook: float | None = None,
                 prefix: str = "uac_model") -> dict:
    """UNETLoader x 2 -> PoEBindModel x 2 (Lotus prompt, zeroed null) -> PoEKSampler -> SaveLatent + SaveImage."""
    prompt = {
        **two_unet_product(UNETS),
        SAMPLER_ID: {"class_type": "PoEKSampler", "inputs": {"experts": ["6", 0], "seed": seed, "steps": steps,
                                                             "sampler_name": "euler", "scheduler": "normal",
                                                             "denoise": 1.0, "width": 32, "height": 32,
                                                             "batch_size": 1}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER_ID, 0], "filename_prefix": prefix}},
        "9": {"class_type": "SaveImage", "inputs": {"images": [SAMPLER_ID, 1], "filename_prefix": prefix}},
    }
    if lora is not None:
        prompt["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA,
                                                                       "strength_model": lora}}
        prompt["5"]["inputs"]["model"] = ["10", 0]
    if hook is not None:
        # The same LoRA as a hook on the first binding's CONDITIONINGs (the stock hook nodes).
        prompt["11"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": LORA,
                                                                           "strength_model": hook}}
        for nid, source, slot in (("12", "3", "positive"), ("13", "4", "negative")):
            prompt[nid] = {"class_type": "ConditioningSetProperties",
                           "inputs": {"cond_NEW": [source, 0], "strength": 1.0, "set_cond_area": "default",
                                      "hooks": ["11", 0]}}
            prompt["5"]["inputs"][slot] = [nid, 0]
    return prompt


def saved_latent(server, entry: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    (item,) = entry["outputs"]["8"]["latents"]
    path = server.workdir / "output" / item["subfolder"] / item["filename"]
    return load_file(str(path))["latent_tensor"]


def run_ok(server, prompt: dict, timeout: float = 120) -> dict:
    status, answer = server.queue(prompt)
    assert status == 200, answer
    entry = fuzz.wait_end(server, answer["prompt_id"], timeout)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail(30))
    return entry


def error_of(server, prompt: dict, timeout: float = 60) -> dict:
    status, answer = server.queue(prompt)
    assert status == 200, answer
    entry = fuzz.wait_end(server, answer["prompt_id"], timeout)
    assert entry["status"]["status_str"] == "error"
    (err,) = [d for kind, d in entry["status"]["messages"] if kind == "execution_error"]
    return err


def test_a_product_of_two_tiny_models_saves_a_finite_latent_and_an_image(server):
    entry = run_ok(server, model_prompt(seed=1))
    latent = saved_latent(server, entry)
    # SD2 UNets (UNETLoader's detection; the refusal test reads "SD20 MODEL") make SD1.x's 4-channel latents at 1/8.
    assert tuple(latent.shape) == (1, 4, 4, 4)
    assert torch.isfinite(latent).all() and latent.std() > 1e-3
    (name, png), = server.images(entry)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lora_or_hook_patched_binding_changes_the_product_and_leaves_the_model_unpatched(server):
    base = saved_latent(server, run_ok(server, model_prompt(seed=2, prefix="base")))
    patched = saved_latent(server, run_ok(server, model_prompt(seed=2, lora=1.0, prefix="lora")))
    assert (patched - base).abs().max() > 1e-2
    # The LoRA as a hook on that binding's prompt and null patches the same weights for the same rows,
    # and leaves the other binding (same prompts, other MODEL) alone: the same latent.
    hooked = saved_latent(server, run_ok(server, model_prompt(seed=2, hook=1.0, prefix="hook")))
    torch.testing.assert_close(hooked, patched, atol=1e-4, rtol=1e-4)
    # The LoRA rides on a clone: after ComfyUI forgets its cache the plain graph gives the plain latent again.
    fuzz.free_cache(server)
    again = saved_latent(server, run_ok(server, model_prompt(seed=2, prefix="base_again")))
    assert torch.equal(again, base)


def test_mixed_spaces_and_sizes_are_refused_naming_both_and_the_queue_goes_on(server):
    native = {
        "20": {"class_type": "PoEExpertLoader", "inputs": {"expert_name": "uac_native_32.safetensors",
                                                           "family": "auto", "dtype": "fp32",
                                                           "schedule": "published"}},
        "21": {"class_type": "PoEBindClass", "inputs": {"expert": ["20", 0], "class": "3", "class_index": -1,
                                                        "weight": 1.0, "reliability": 1.0, "null": "trained",
                                                        "null_k": 8}},
    }
    # An SD2 MODEL (SD1.x latents) after a native pixel expert.
    mixed = dict(model_prompt(seed=3), **native)
    mixed["5"]["inputs"]["experts"] = ["21", 0]
    err = error_of(server, mixed)
    assert err["node_id"] == "5" and err["node_type"] == "PoEBindModel"
    # ComfyUI ends exception_message with a newline.
    assert err["exception_message"].rstrip("\n") == (
        "PoEBindModel: input 'model': binding 0 (Tiny digits · class · class 3) works on pixels (3 channels) but "
        "binding 1 (SD20 MODEL · MODEL + conditioning) works on SD15 latents (4 channels). Experts of one product "
        "must share one space: latent models only with models of the same latent format, pixel-space models "
        "(Chroma Radiance) with the native pixel experts.")

    # Two latent formats: the SD2 UNet's SD1.x latents and an SD3 MMDiT's.
    formats = model_prompt(seed=3)
    formats["2"]["inputs"]["unet_name"] = SD3
    err = error_of(server, formats)
    assert err["node_id"] == "6"
    assert err["exception_message"].rstrip("\n") == (
        "PoEBindModel: input 'model': binding 0 (SD20 MODEL · MODEL + conditioning) works on SD15 latents "
        "(4 channels) but binding 1 (SD3 MODEL · MODEL + conditioning) works on SD3 latents (16 channels). Experts "
        "of one product must share one space: latent models only with models of the same latent format, "
        "pixel-space models (Chroma Radiance) with the native pixel experts.")

    # Two native pixel experts whose sizes do not divide (32 px and 48 px).
    sizes = dict(native)
    sizes["22"] = {"class_type": "PoEExpertLoader", "inputs": {"expert_name": "uac_native_48.safetensors",
                                                               "family": "auto", "dtype": "fp32",
                                                               "schedule": "published"}}
    sizes["23"] = {"class_type": "PoEBindClass", "inputs": {"expert": ["22", 0], "class": "5", "class_index": -1,
                                                            "weight": 1.0, "reliability": 1.0, "null": "trained",
                                                            "null_k": 8, "experts": ["21", 0]}}
    sizes["24"] = {"class_type": "PoEKSampler", "inputs": {"experts": ["23", 0], "seed": 0, "steps": 2,
                                                           "sampler_name": "euler", "scheduler": "normal",
                                                           "denoise": 1.0, "width": 0, "height": 0, "batch_size": 1}}
    sizes["25"] = {"class_type": "SaveImage", "inputs": {"images": ["24", 1], "filename_prefix": "sizes"}}
    err = error_of(server, sizes)
    assert err["node_id"] == "23"
    assert err["exception_message"].rstrip("\n") == (
        "PoEBindClass: input 'expert': binding 1 (Tiny digits · class · 48px · class 5) makes 48px images and "
        "binding 0 (Tiny digits · class · class 3) 32px: a smaller expert runs on the pooled canvas, so each expert's "
        "size must divide the larger ones (their blocks must nest); sample them at one size, or use an upsampler "
        "stage (PoEBindImage) to change the size")

    latent = saved_latent(server, run_ok(server, model_prompt(seed=4, prefix="after_refusals")))
    assert torch.isfinite(latent).all()
    assert server.alive()


def test_interrupt_stops_a_model_product_within_a_step_and_the_next_prompt_runs(server, record_property):
    from test_runtime import interrupt_long_run

    long = model_prompt(seed=5, steps=5000, prefix="long")
    short = model_prompt(seed=6, steps=2, prefix="short")
    long_id, short_id, msg, latency, step_s = interrupt_long_run(server, long, short)
    record_property("interrupt_latency_s", round(latency, 3))
    record_property("step_s", round(step_s, 3))
    print(f"MODEL product: interrupt latency {latency:.3f}s, one step {step_s:.3f}s")
    assert msg["type"] == "execution_interrupted" and msg["data"]["node_id"] == SAMPLER_ID
    assert latency < step_s + 1.0, f"interrupt took {latency:.2f}s; one step takes {step_s:.2f}s"
    entry = fuzz.wait_end(server, long_id, 30)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in fuzz.status_kinds(entry)
    after = fuzz.wait_end(server, short_id, 120)
    assert after["status"]["status_str"] == "success"
    assert math.isfinite(float(saved_latent(server, after).abs().max()))

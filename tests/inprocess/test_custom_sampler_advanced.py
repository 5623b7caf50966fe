"""Tier (b): the product through ComfyUI's SamplerCustomAdvanced and the pixel_space VAE, in process.

PoEGuider + PoEScheduler + PoECorrectedSampler(KSamplerSelect) into SamplerCustomAdvanced must give
exactly what PoEKSampler gives for the same seed, sampler, steps and corrector, and VAEDecode with the
pixel_space VAE must turn that LATENT into the IMAGE (latent + 1) / 2 clamped, channels last. The
shipped workflow example_workflows/api/tiny_custom_sampler.json is run here as a prompt, and by the server tier.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unite_and_conquer.nodes import bindings, loaders, sampling
from support.comfy_harness import api_workflow, comfy_nodes, run_prompt

nodes = comfy_nodes()

STEPS, SEED, BATCH = 6, 7, 2


def stock(node_id):
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def tiny_product():
    load = loaders.PoEExpertLoader.execute
    cls = load(expert_name="tiny_class.safetensors", family="auto", dtype="auto", schedule="published").args[0]
    col = load(expert_name="tiny_colour.safetensors", family="auto", dtype="auto", schedule="published").args[0]
    experts = bindings.PoEBindClass.execute(expert=cls, **{"class": "7"}, class_index=-1, weight=4.0,
                                            reliability=1.0, null="trained", null_k=8).args[0]
    return bindings.PoEBindText.execute(expert=col, text="red", weight=2.0, reliability=1.0, experts=experts).args[0]


def corrector():
    return sampling.PoECorrector.execute(method="uhmc", steps=2, step_scale=0.05, sigma_min=0.6, sigma_max=1e5,
                                         leapfrog_steps=1, momentum_refresh=0.5).args[0]


def custom_advanced(experts, sampler_name, corr):
    guider = sampling.PoEGuider.execute(experts=experts).args[0]
    sigmas = sampling.PoEScheduler.execute(experts=experts, scheduler="karras", steps=STEPS, denoise=1.0).args[0]
    sampler = stock("KSamplerSelect").execute(sampler_name=sampler_name).args[0]
    if corr is not None:
        sampler = sampling.PoECorrectedSampler.execute(sampler=sampler, corrector=corr).args[0]
    noise = stock("RandomNoise").execute(noise_seed=SEED).args[0]
    latent = stock("EmptyChromaRadianceLatentImage").execute(width=32, height=32, batch_size=BATCH).args[0]
    out, denoised = stock("SamplerCustomAdvanced").execute(noise=noise, guider=guider, sampler=sampler,
                                                           sigmas=sigmas, latent_image=latent).args
    return out


def poe_ksampler(experts, sampler_name, corr):
    kw = {"corrector": corr} if corr is not None else {}
    latent, image, _ = sampling.PoEKSampler.execute(experts=experts, seed=SEED, steps=STEPS, sampler_name=sampler_name,
                                                    scheduler="karras", denoise=1.0, width=0, height=0,
                                                    batch_size=BATCH, **kw).args
    return latent, image


def pixel_space_decode(latent):
    vae, = stock("VAELoader")().load_vae("pixel_space")
    image, = stock("VAEDecode")().decode(vae, latent)
    return image


def test_sampler_custom_advanced_equals_poe_ksampler_and_pixel_space_decodes_it():
    experts = tiny_product()
    for sampler_name, corr in (("euler", corrector()), ("dpmpp_2m", None)):
        out = custom_advanced(experts, sampler_name, corr)
        latent, image = poe_ksampler(experts, sampler_name, corr)
        assert out["samples"].shape == (BATCH, 3, 32, 32)
        torch.testing.assert_close(out["samples"], latent["samples"], rtol=0, atol=1e-4, msg=sampler_name)
        decoded = pixel_space_decode(out)
        assert decoded.shape == (BATCH, 32, 32, 3)
        expected = ((out["samples"].float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        torch.testing.assert_close(decoded.float(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(decoded.float(), image.float(), rtol=0, atol=1e-4, msg=sampler_name)
        # The samples are images, not constants: some pixels sit outside [-1, 1] and are clamped.
        assert out["samples"].std() > 0.1


def test_the_shipped_workflow_runs_and_both_rows_agree(tmp_path):
    import folder_paths

    # Fewer steps and images here; the server tier runs it as shipped.
    wf = api_workflow("tiny_custom_sampler.json", {"6": {"steps": 4}, "15": {"steps": 4, "batch_size": 2},
                                                   "11": {"batch_size": 2}})
    assert {"SamplerCustomAdvanced", "PoEGuider", "PoEScheduler", "PoECorrectedSampler", "KSamplerSelect",
            "VAELoader", "VAEDecode"} <= {n["class_type"] for n in wf.values()}
    assert wf["13"]["inputs"]["vae_name"] == "pixel_space"
    assert (wf["6"]["class_type"], wf["15"]["class_type"]) == ("PoEScheduler", "PoEKSampler")
    # Save each branch on its own to compare them pixel by pixel.
    wf["90"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "uac_test_sca"}}
    wf["91"] = {"class_type": "SaveImage", "inputs": {"images": ["15", 1], "filename_prefix": "uac_test_ks"}}
    _, history = run_prompt(wf)
    out_dir = Path(folder_paths.get_output_directory())

    def pixels(nid):
        from PIL import Image
        return [np.asarray(Image.open(out_dir / i["subfolder"] / i["filename"]), dtype=np.int16)
                for i in history["outputs"][nid]["images"]]

    a, b = pixels("90"), pixels("91")
    assert len(a) == len(b) == 2
    # Identical up to rounding at the 8-bit boundary (the float paths agree to 1e-4).
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b)) <= 1
    assert all(x.std() > 5 for x in a)
    assert history["outputs"]["18"]["images"]

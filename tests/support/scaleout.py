"""The two workflows of the scale-out tier and its benchmark, as a single server runs them, and what
Distributed adds to them (``tools/comfy_cluster.py``).

- ``digits``: the tiny digit product with the MCMC corrector (example_workflows' tiny_mcmc, its
  corrected sampler only), shortened for a CPU;
- ``model``: a product of two tiny SD2-architecture UNets, loaded by the stock UNETLoader.

Each samples a batch of ``BATCH`` images per participant.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))

import comfy_cluster  # noqa: E402
from comfy_client import load_api_workflow  # noqa: E402

from .model_prompts import two_unet_product  # noqa: E402

TINY_MCMC = REPO / "example_workflows" / "api" / "tiny_mcmc.json"
UNETS = ("uac_scaleout_sd2_a.safetensors", "uac_scaleout_sd2_b.safetensors")
BATCH = 4


def digit_prompt(seed: int) -> dict:
    """tiny_mcmc's corrected sampler only (no plain row, no grid): 10 Euler steps with 2 U-HMC
    corrector steps per level instead of 30 and 4, a batch of ``BATCH``."""
    wf = load_api_workflow(TINY_MCMC)
    for node in ("13", "15", "16"):       # the plain sampler and the grid of both rows
        del wf[node]
    wf["14"]["inputs"].update(seed=seed, steps=10, batch_size=BATCH)
    wf["12"]["inputs"]["steps"] = 2
    wf["17"]["inputs"].update(images=["14", 1], filename_prefix="uac_scaleout_digits")
    return wf


def model_prompt(seed: int) -> dict:
    """The two UNets bound with PoEBindModel (the stock Lotus prompt and its zeroed null), 4 Euler
    steps at 64 px (8 x 8 latents); the IMAGE is ComfyUI's latent-to-RGB preview of the product."""
    return {
        **two_unet_product(UNETS),
        "7": {"class_type": "PoEKSampler", "inputs": {"experts": ["6", 0], "seed": seed, "steps": 4,
                                                      "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                                      "width": 64, "height": 64, "batch_size": BATCH}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 1], "filename_prefix": "uac_scaleout_model"}},
    }


# name: (the prompt at a seed, its sampler's id, its SaveImage's id)
WORKFLOWS = {"digits": (digit_prompt, "14", "17"), "model": (model_prompt, "7", "8")}


def single_prompt(name: str, seed: int) -> dict:
    return WORKFLOWS[name][0](seed)


def distributed_prompt(name: str, seed: int) -> dict:
    """The workflow with ``DistributedSeed`` and ``DistributedCollector`` added, ``seed`` on the master."""
    build, sampler_id, save_id = WORKFLOWS[name]
    return comfy_cluster.distribute(build(seed), sampler_id, save_id)


def write_models(folder: Path) -> dict[str, list[Path]]:
    """The MODEL product's checkpoints, as ``install_server`` takes them (two seeds: two "fine-tunes").
    The digit product's experts ship with the pack (models_tiny/)."""
    from .tiny_comfy_models import write_tiny_sd2_unet

    folder.mkdir(parents=True, exist_ok=True)
    return {"diffusion_models": [write_tiny_sd2_unet(folder / name, seed) for seed, name in enumerate(UNETS)]}


def pixels(server, entry: dict) -> list[bytes]:
    """The RGB pixels of every image a finished prompt saved or previewed, in its order (PNG
    metadata, which names the prompt, left out)."""
    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB").tobytes() for _, data in server.images(entry)]

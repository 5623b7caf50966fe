"""Tier (c): OR / AND groups and particles on a real server, over HTTP.

Two tiny random-weight SD2-architecture UNets (SD1.x latents; test_model_product.py says why SD2: the
stock LotusConditioning node prompts them without a text encoder) are saved into the server's
diffusion_models folder and loaded by the stock UNETLoader, then made an OR or an AND group and
sampled by PoEKSampler with the pack's SDE step; the shipped tiny_particles workflow runs with fewer
steps, and particles run through SamplerCustomAdvanced with PoEGuider and PoEParticleSampler.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from support import fuzz
from support.model_prompts import two_unet_product
from support.tiny_comfy_models import write_tiny_sd2_unet

REPO = Path(__file__).resolve().parents[2]
UNETS = ("uac_or_and_a.safetensors", "uac_or_and_b.safetensors")
SAMPLER_ID = "9"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfy_client import ComfyServer

    work = tmp_path_factory.mktemp("composition")
    models = work / "models"
    models.mkdir()
    for seed, name in enumerate(UNETS):
        write_tiny_sd2_unet(models / name, seed + 10)
    config = work / "extra_model_paths.yaml"
    config.write_text(f"uac_composition_tests:\n  diffusion_models: {models}\n")
    srv = ComfyServer(work / "comfy", python=sys.executable, extra_args=("--extra-model-paths-config", str(config)))
    srv.start(timeout=240)
    yield srv
    srv.stop()
    assert not srv.import_failures()


def group_prompt(kind: str | None, seed: int = 1, steps: int = 3, sampler: str = "poe_euler_maruyama",
                 second: str = UNETS[1], prefix: str = "uac_group") -> dict:
    """UNETLoader x 2 -> PoEBindModel x 2 (one Lotus prompt, zeroed null) -> PoEOrGroup / PoEAndGroup ->
    PoEKSampler -> SaveLatent."""
    prompt = {
        **two_unet_product((UNETS[0], second), weights=(1.0, 1.0)),
        SAMPLER_ID: {"class_type": "PoEKSampler", "inputs": {"experts": ["7", 0] if kind else ["6", 0], "seed": seed,
                                                             "steps": steps, "sampler_name": sampler,
                                                             "scheduler": "karras", "denoise": 1.0, "width": 32,
                                                             "height": 32, "batch_size": 2}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER_ID, 0], "filename_prefix": prefix}},
    }
    if kind == "or":
        prompt["7"] = {"class_type": "PoEOrGroup", "inputs": {"experts": ["6", 0], "members": 2, "priors": "0.7, 0.3",
                                                              "weight": 3.0}}
    elif kind == "and":
        prompt["7"] = {"class_type": "PoEAndGroup", "inputs": {"experts": ["6", 0], "members": 2, "weight": 3.0,
                                                               "clip_min": -100.0, "clip_max": 101.0}}
    return prompt


def run_ok(server, prompt: dict, timeout: float = 300) -> dict:
    status, answer = server.queue(prompt)
    assert status == 200, answer
    entry = fuzz.wait_end(server, answer["prompt_id"], timeout)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail(30))
    return entry


def saved_latent(server, entry: dict, node: str = "10") -> torch.Tensor:
    from safetensors.torch import load_file

    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(server.workdir / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def rule_text(entry: dict, node: str = SAMPLER_ID) -> str:
    return "".join(entry["outputs"][node]["text"])


@pytest.mark.parametrize("kind", ["or", "and"])
def test_two_models_as_an_or_or_and_group_sample_over_http(server, kind):
    entry = run_ok(server, group_prompt(kind, prefix=f"uac_{kind}"))
    latent = saved_latent(server, entry)
    assert tuple(latent.shape) == (2, 4, 4, 4) and torch.isfinite(latent).all() and latent.std() > 1e-3
    text = rule_text(entry)
    if kind == "or":
        assert ("OR(1, 2): mixture of 1. SD20 MODEL · MODEL + conditioning (pi=0.7), 2. SD20 MODEL · MODEL + conditioning "
                "(pi=0.3), weight 3") in text, text
        assert "groups did: OR(1, 2): images by the member that leads at the end: 1. SD20 MODEL" in text and "images by the member that leads at the end" in text
    else:
        assert "AND(1, 2): AND of 1. SD20 MODEL" in text and "groups did: AND(1, 2) (1. SD20" in text and "tracked log-density gap at the end" in text


def test_a_group_of_two_equal_members_is_that_member(server):
    """One MODEL twice in an OR (same prompt): every coefficient mixes equal predictions, so the
    sample is the one binding at the group's weight, sampled by the same SDE step and seed."""
    grouped = group_prompt("or", seed=4, second=UNETS[0], prefix="uac_or_same")
    single = group_prompt(None, seed=4, second=UNETS[0], prefix="uac_single")
    del single["6"]
    single["5"]["inputs"]["weight"] = 3.0
    single[SAMPLER_ID]["inputs"]["experts"] = ["5", 0]
    a = saved_latent(server, run_ok(server, grouped))
    b = saved_latent(server, run_ok(server, single))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_group_with_another_sampler_is_refused_and_the_queue_goes_on(server):
    status, answer = server.queue(group_prompt("and", sampler="euler", prefix="uac_refused"))
    assert status == 200, answer
    entry = fuzz.wait_end(server, answer["prompt_id"], 120)
    assert entry["status"]["status_str"] == "error"
    (err,) = [d for kind, d in entry["status"]["messages"] if kind == "execution_error"]
    assert err["node_id"] == SAMPLER_ID
    assert err["exception_message"].rstrip("\n") == (
        "PoEKSampler: input 'sampler_name' is 'euler', but the chain has an OR / AND group, whose members' "
        "log-densities only the pack's SDE step tracks: choose poe_euler_maruyama")
    assert torch.isfinite(saved_latent(server, run_ok(server, group_prompt("or", prefix="uac_after")))).all()


def test_the_tiny_particles_workflow_runs_over_http(server):
    from comfy_client import load_api_workflow

    api = load_api_workflow(REPO / "example_workflows" / "api" / "tiny_particles.json")
    for node in api.values():
        if node["class_type"] == "PoEKSampler":
            node["inputs"].update(steps=5, batch_size=2)
    entry = run_ok(server, api)
    (name, png), = server.images(entry)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    sampler = next(k for k, v in api.items() if v["class_type"] == "PoEKSampler" and "particles" in v["inputs"])
    text = rule_text(entry, sampler)
    assert "particles: 4 particle(s) per image, lambda = 1 (exact)" in text
    assert "particles did: 4 particle(s) per image x 2 image(s)" in text


def test_particles_through_samplercustomadvanced(server):
    """PoEGuider + PoEScheduler + PoEParticleSampler (around PoESDESampler) in SamplerCustomAdvanced:
    a batch of 6 pixel latents is 2 outputs of 3 particles; 'best' keeps one per group."""
    prompt = {
        "1": {"class_type": "PoEExpertLoader", "inputs": {"expert_name": "tiny_class.safetensors", "family": "auto",
                                                          "dtype": "auto", "schedule": "published"}},
        "2": {"class_type": "PoEBindClass", "inputs": {"expert": ["1", 0], "class": "3", "class_index": -1,
                                                       "weight": 3.0, "reliability": 1.0, "null": "trained",
                                                       "null_k": 8}},
        "3": {"class_type": "PoEGuider", "inputs": {"experts": ["2", 0]}},
        "4": {"class_type": "PoEScheduler", "inputs": {"experts": ["2", 0], "scheduler": "karras", "steps": 8,
                                                       "denoise": 1.0}},
        "5": {"class_type": "PoEParticles", "inputs": {"particles_per_image": 3, "temperature": 1.0,
                                                       "ess_threshold": 0.5, "output": "best"}},
        "6": {"class_type": "PoESDESampler", "inputs": {}},
        "7": {"class_type": "PoEParticleSampler", "inputs": {"particles": ["5", 0], "sampler": ["6", 0]}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "9": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 6}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["3", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["4", 0],
                                                                 "latent_image": ["9", 0]}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "uac_custom_particles"}},
    }
    latent = saved_latent(server, run_ok(server, prompt), "11")
    assert tuple(latent.shape) == (2, 3, 32, 32) and torch.isfinite(latent).all()

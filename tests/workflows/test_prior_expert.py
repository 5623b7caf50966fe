"""Tier (b): ADM-256 class-conditional with ADM-256 unconditional as the prior (the prior-expert
workflow), on small random checkpoints in the published layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from support.checkpoints import small_adm
from support.comfy_harness import comfy_nodes, run_prompt

REPO = Path(__file__).resolve().parents[2]


def test_class_model_with_an_unconditional_prior_runs(tmp_path):
    comfy_nodes()
    import folder_paths

    small_adm(tmp_path / "adm256_cond.safetensors", resolution=256, num_classes=1000, schedule="linear", seed=1)
    small_adm(tmp_path / "adm256_uncond.safetensors", resolution=256, num_classes=None, schedule="linear", seed=2)
    folder_paths.add_model_folder_path("experts", str(tmp_path))
    wf = json.loads((REPO / "example_workflows" / "api" / "prior_expert.json").read_text())
    wf["1"]["inputs"]["expert_name"] = "adm256_cond.safetensors"
    wf["2"]["inputs"]["expert_name"] = "adm256_uncond.safetensors"
    wf["5"]["inputs"]["steps"] = 3
    _, history = run_prompt(wf)
    rule = history["outputs"]["5"]["text"][0]
    assert "product of 2 binding(s) over 2 expert(s)" in rule
    assert "class 207: golden retriever · w=3 · a=0" in rule and "prior (unconditional) · w=0 · a=1" in rule
    saved = history["outputs"]["6"]["images"][0]
    img = Image.open(Path(folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"])
    assert img.size == (256, 256) and np.asarray(img, dtype=np.float32).std() > 1.0

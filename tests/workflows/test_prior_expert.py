"""Tier (b): ADM-256 class-conditional with ADM-256 unconditional as the prior (the prior-expert
workflow), on small random checkpoints in the published layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from support.checkpoints import small_adm
from support.comfy_harness import api_workflow, comfy_nodes, run_prompt



def test_class_model_with_an_unconditional_prior_runs(tmp_path):
    comfy_nodes()
    import folder_paths

    small_adm(tmp_path / "adm256_cond.safetensors", resolution=256, num_classes=1000, schedule="linear", seed=1)
    small_adm(tmp_path / "adm256_uncond.safetensors", resolution=256, num_classes=None, schedule="linear", seed=2)
    folder_paths.add_model_folder_path("experts", str(tmp_path))
    _, history = run_prompt(api_workflow("prior_expert.json", {
        "1": {"expert_name": "adm256_cond.safetensors"}, "2": {"expert_name": "adm256_uncond.safetensors"},
        "5": {"steps": 3}}))
    rule = history["outputs"]["5"]["text"][0]
    assert "product of 2 binding(s) over 2 expert(s)" in rule
    assert "class 207: golden retriever · w=3 · a=0" in rule and "prior (unconditional) · w=0 · a=1" in rule
    saved = history["outputs"]["6"]["images"][0]
    img = Image.open(Path(folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"])
    assert img.size == (256, 256) and np.asarray(img, dtype=np.float32).std() > 1.0

"""Tier (b): a 64 px ADM class expert guiding a 256 px ADM canvas (the class-guides-canvas workflow), on
small random checkpoints in the published layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from support.checkpoints import small_adm
from support.comfy_harness import comfy_nodes, run_prompt

REPO = Path(__file__).resolve().parents[2]


def test_class_expert_at_64_guides_a_256_canvas(tmp_path):
    comfy_nodes()
    import folder_paths

    small_adm(tmp_path / "adm64_cond.safetensors", resolution=64, num_classes=1000, schedule="cosine", seed=1)
    small_adm(tmp_path / "adm256_uncond.safetensors", resolution=256, num_classes=None, schedule="linear", seed=2)
    folder_paths.add_model_folder_path("experts", str(tmp_path))
    wf = json.loads((REPO / "example_workflows" / "api" / "class_guides_canvas.json").read_text())
    wf["1"]["inputs"]["expert_name"] = "adm64_cond.safetensors"
    wf["2"]["inputs"]["expert_name"] = "adm256_uncond.safetensors"
    wf["5"]["inputs"]["steps"] = 3
    _, history = run_prompt(wf)
    rule = history["outputs"]["5"]["text"][0]
    assert "product of 2 binding(s) over 2 expert(s)" in rule
    assert "class 207: golden retriever · w=3 · a=0 · at 64px, 1/4 of the canvas (sigma/4, lifted into P)" in rule
    assert "cost: " in rule and "runs on 1/16 of the canvas's pixels (its own size)" in rule
    saved = history["outputs"]["6"]["images"][0]
    img = Image.open(Path(folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"])
    assert img.size == (256, 256) and np.asarray(img, dtype=np.float32).std() > 1.0

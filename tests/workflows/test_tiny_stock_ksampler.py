"""Tier (b): the tiny digit expert sampled by ComfyUI's stock KSampler (example_workflows/api/tiny_stock_ksampler.json):
its MODEL from PoEExpertLoader, its class and trained null from PoEEncodeCondition, VAEDecode with the
pixel-space VAE."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from support.comfy_harness import comfy_nodes, run_prompt

REPO = Path(__file__).resolve().parents[2]


def test_tiny_expert_runs_in_the_stock_ksampler():
    comfy_nodes()
    import folder_paths

    wf = json.loads((REPO / "example_workflows" / "api" / "tiny_stock_ksampler.json").read_text())
    wf["5"]["inputs"]["steps"] = 6
    _, history = run_prompt(wf)
    saved = history["outputs"]["8"]["images"]
    assert len(saved) == 4
    img = Image.open(Path(folder_paths.get_output_directory()) / saved[0]["subfolder"] / saved[0]["filename"])
    assert img.size == (32, 32) and np.asarray(img, dtype=np.float32).std() > 1.0

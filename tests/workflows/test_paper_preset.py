"""Tier (b): the paper's natural-image preset (ADM-64 class + GLIDE text, then GLIDE's upsampler) as a
workflow, on small random checkpoints in the published layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.checkpoints import from_fixture, small_adm
from support.comfy_harness import api_workflow, comfy_nodes, run_prompt



@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, fixtures_dir):
    comfy_nodes()
    import folder_paths

    d = tmp_path_factory.mktemp("experts")
    small_adm(d / "64x64_diffusion.safetensors")
    from_fixture(fixtures_dir / "glide_base_small.safetensors", d / "base.safetensors")
    from_fixture(fixtures_dir / "glide_upsample_small.safetensors", d / "upsample.safetensors")
    folder_paths.add_model_folder_path("experts", str(d))
    return d


def test_paper_class_text_preset_produces_a_256px_image(experts_dir, tmp_path):
    import folder_paths

    wf = api_workflow("paper_class_text.json")
    rename = {"64x64_diffusion.pt": "64x64_diffusion.safetensors", "base.pt": "base.safetensors",
              "upsample.pt": "upsample.safetensors"}
    for node in wf.values():
        if node["class_type"] == "PoEExpertLoader":
            node["inputs"]["expert_name"] = rename[node["inputs"]["expert_name"]]
    stage1 = wf["6"]["inputs"]
    assert (stage1["steps"], stage1["sampler_name"], wf["4"]["inputs"]["weight"], wf["5"]["inputs"]["weight"]) == \
        (100, "ddim", 5.0, 5.0)
    assert wf["4"]["inputs"]["reliability"] == pytest.approx(5 / 9, abs=1e-4)
    assert wf["5"]["inputs"]["reliability"] == pytest.approx(4 / 9, abs=1e-4)
    wf["8"]["inputs"]["steps"] = 10   # the upsampler stage at reduced cost on the CPU
    executor, history = run_prompt(wf)
    out_dir = Path(folder_paths.get_output_directory())
    saved = {k: v["images"][0] for k, v in history["outputs"].items() if "images" in v}
    big = Image.open(out_dir / saved["10"]["subfolder"] / saved["10"]["filename"])
    small = Image.open(out_dir / saved["9"]["subfolder"] / saved["9"]["filename"])
    assert big.size == (256, 256) and small.size == (64, 64)
    pixels = np.asarray(big, dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0

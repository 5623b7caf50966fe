"""Tier (b): the 4-binding face workflow (hair mask, skin mask, text, sketch) on small random face
experts in the released layouts, with both weight presets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.checkpoints import from_fixture
from support.comfy_harness import api_workflow, comfy_nodes, run_prompt

SKIN, HAIR = (204, 0, 0), (0, 0, 204)


@pytest.fixture(scope="module")
def face_files(tmp_path_factory, fixtures_dir):
    comfy_nodes()
    import folder_paths

    d = tmp_path_factory.mktemp("face_models")
    from_fixture(fixtures_dir / "face_latest_small.safetensors", d / "model_latest.safetensors")
    from_fixture(fixtures_dir / "face_sketch_small.safetensors", d / "model_sketch.safetensors")
    from_fixture(fixtures_dir / "clip_text_small.safetensors", d / "farl_small.safetensors")
    folder_paths.add_model_folder_path("experts", str(d))
    folder_paths.add_model_folder_path("text_encoders", str(d))
    parsing = np.zeros((256, 256, 3), np.uint8)
    parsing[60:200, 70:190] = SKIN
    parsing[20:80, 50:210] = HAIR
    photo = np.zeros((256, 256, 3), np.uint8)
    photo[64:192, 64:192] = 255
    inputs = Path(folder_paths.get_input_directory())
    inputs.mkdir(parents=True, exist_ok=True)
    Image.fromarray(parsing).save(inputs / "uac_test_parsing.png")
    Image.fromarray(photo).save(inputs / "uac_test_sketch.png")
    return d


def test_four_binding_face_workflow_runs_with_both_presets(face_files):
    import folder_paths

    wf = api_workflow("faces.json")
    names = {"model_latest.pt": "model_latest.safetensors", "model_sketch.pt": "model_sketch.safetensors"}
    for node in wf.values():
        inputs = node["inputs"]
        if node["class_type"] == "PoEExpertLoader":
            inputs["expert_name"] = names[inputs["expert_name"]]
        elif node["class_type"] == "PoETextEncoderLoader":
            inputs["text_encoder_name"] = "farl_small.safetensors"
        elif node["class_type"] == "LoadImage":
            inputs["image"] = {"face_parsing.png": "uac_test_parsing.png",
                               "face_sketch_source.png": "uac_test_sketch.png"}[inputs["image"]]
        elif node["class_type"] == "PoEKSampler":
            inputs["steps"] = 3
    released = [wf[k]["inputs"]["weight"] for k in ("6", "7", "8", "9")]
    paper = [wf[k]["inputs"]["weight"] for k in ("10", "11", "12", "13")]
    assert released == [1.2, 1.2, 1.25, 0.6] and paper == [1.0, 1.0, 1.0, 1.0]
    executor, history = run_prompt(wf)
    ui = history["outputs"]
    rule = ui["14"]["text"][0]
    assert "product of 4 binding(s) over 2 expert(s)" in rule and "sum of weights = 4.25" in rule
    assert "slot A: skin/face" in rule and "slot B: hair" in rule
    saved = ui["17"]["images"][0]
    img = Image.open(Path(folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"])
    assert img.size == (256, 256)
    a = np.asarray(img, dtype=np.float32)
    assert np.isfinite(a).all() and a.std() > 1.0


def test_hair_expert_only_in_the_hair_region(face_files):
    """The 'bright pink hair' binding is spatial: its weight is 1.5 in the hair region, 0 elsewhere."""
    _, history = run_prompt(api_workflow("faces_hair_region.json", {
        "1": {"expert_name": "model_latest.safetensors"}, "2": {"text_encoder_name": "farl_small.safetensors"},
        "3": {"image": "uac_test_parsing.png"}, "9": {"steps": 2}}))
    rule = history["outputs"]["9"]["text"][0]
    assert '"bright pink hair" · masked · w=0..1.5 (spatial)' in rule
    assert "product of 4 binding(s) over 1 expert(s)" in rule

"""Tier (c): a real ComfyUI server with the pack, driven over HTTP and the websocket."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import ComfyServer, load_api_workflow  # noqa: E402

PACK_NODES = {"PoEExpertLoader", "PoEBindClass", "PoEBindText", "PoEBindSegmentation", "PoEBindSketch",
              "PoEBindImage", "PoEBindPrior", "PoEBindingSchedule", "PoEKSampler", "PoEGuider", "PoEScheduler",
              "PoEReliabilitySweep", "PoEImageGrid", "PoECorrector", "PoECorrectedSampler",
              "PoETextEncoderLoader", "PoEResample", "PoEImageToLatent", "PoEBindInpaint",
              "PoEReliabilityFromVariance", "PoEBandWeights", "PoEBindModel", "PoEEncodeCondition",
              "PoEParticles", "PoEParticleSampler", "PoESDESampler", "PoEOrGroup", "PoEAndGroup"}
DEMO = REPO / "example_workflows" / "api" / "tiny_demo.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Previews are off in ComfyUI unless asked for; users turn them on, and so does this test.
    srv = ComfyServer(tmp_path_factory.mktemp("comfy"), python=sys.executable,
                      extra_args=("--preview-method", "auto"))
    srv.start()
    yield srv
    srv.stop()
    assert not srv.import_failures()


def test_object_info_lists_every_node_of_the_pack(server):
    info = server.get_json("/object_info")
    missing = PACK_NODES - set(info)
    assert not missing, f"nodes missing from /object_info: {sorted(missing)}"
    for name in PACK_NODES:
        node = info[name]
        assert node["category"].startswith("unite_and_conquer/"), name
        assert node["description"], f"{name} has no description"


def test_demo_workflow_runs_end_to_end_and_returns_a_png(server):
    from PIL import Image

    if not DEMO.is_file():
        pytest.fail(f"{DEMO} is missing")
    entry = server.run(load_api_workflow(DEMO), timeout=600)
    images = server.images(entry)
    assert images, "the demo saved no image"
    name, data = images[0]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.size[0] >= 32 * 4 and img.size[1] >= 32
    extrema = img.getextrema()
    assert any(lo != hi for lo, hi in extrema), "the image is constant"
    # the sampler reported progress, and x0 previews, over the websocket
    assert any(m.get("type") == "progress" for m in server.messages)
    assert any(m.get("type") == "preview" and m["bytes"] > 100 for m in server.messages)


def test_a_bad_prompt_is_refused_and_the_server_stays_up(server):
    from comfy_client import ExecutionError

    wf = load_api_workflow(DEMO)
    sampler_id = next(k for k, v in wf.items() if v["class_type"] == "PoEKSampler")
    wf[sampler_id]["inputs"]["steps"] = 0           # below the schema's minimum: refused at validation
    status, answer = server.queue(wf)
    assert status == 400
    assert sampler_id in answer.get("node_errors", {})
    # An unknown combo value: ComfyUI 0.33.0 refuses it at validation; 0.3.75 does not check V3 combo
    # values, so there the node refuses it itself, by name. Either way it never samples.
    wf = load_api_workflow(DEMO)
    wf[sampler_id]["inputs"]["sampler_name"] = "no_such_sampler"
    status, answer = server.queue(wf)
    if status == 400:
        (error,) = answer["node_errors"][sampler_id]["errors"]
        assert error["type"] == "value_not_in_list", error
        assert error["details"].startswith("sampler_name: 'no_such_sampler' not in "), error
    else:
        assert status == 200, answer
        with pytest.raises(ExecutionError) as err:
            server.wait(answer["prompt_id"], timeout=300)
        assert err.value.data["exception_message"].startswith(
            "PoEKSampler: input 'sampler_name': unknown sampler 'no_such_sampler'; pick one of: euler, ")
    assert server.alive()


def test_every_node_and_input_has_a_tooltip_or_description(server):
    info = server.get_json("/object_info")
    missing = []
    for name in PACK_NODES:
        node = info[name]
        for group in ("required", "optional"):
            for input_name, spec in node["input"].get(group, {}).items():
                if len(spec) < 2 or not spec[1].get("tooltip"):
                    missing.append(f"{name}.{input_name}")
    assert not missing, f"inputs without a tooltip: {missing}"


RUNNABLE = sorted(p for p in (REPO / "example_workflows" / "api").glob("tiny_*.json"))


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_every_workflow_that_needs_no_download_runs_end_to_end(server, path):
    """The shipped tiny experts are all these need; the demo itself is checked in detail above."""
    from PIL import Image

    entry = server.run(load_api_workflow(path), timeout=600)
    images = server.images(entry)
    assert images, f"{path.name} saved no image"
    for _, data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        assert any(lo != hi for lo, hi in img.getextrema()), f"{path.name} saved a constant image"

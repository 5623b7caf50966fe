"""The shipped workflows against a real ComfyUI server with the pack.

Every API copy (example_workflows/api/*.json) is checked input by input against /object_info and then by the
server's own POST /prompt validation; the UI workflows (example_workflows/*.json) must stand for exactly their
API copies, and the template browser must list them. The tiny demo's end-to-end run is in
test_server.py; workflows whose checkpoints are not downloaded cannot run here.
"""
from __future__ import annotations

import io
import json
import sys
import time
from urllib.parse import urlencode
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import PACK_NAME, ComfyServer, load_api_workflow  # noqa: E402
import workflow_ui  # noqa: E402

API_WORKFLOWS = sorted((REPO / "example_workflows" / "api").glob("*.json"))
UI_WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
ids = [p.stem for p in API_WORKFLOWS]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy-workflows"), python=sys.executable)
    srv.start()
    yield srv
    srv.stop()
    assert not srv.import_failures()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info")


# Pickers whose options follow the connected expert (the node's validate_inputs turns ComfyUI's check against
# the static list off): checked against the labels the pack's route gives for the loader's file.
EXPERT_PICKERS = {("PoEBindClass", "class")}


def class_labels_from(server: ComfyServer):
    """The labels /unite_and_conquer/class_labels gives for an expert file; None when the file is not there."""
    def labels(expert_name: str, family: str):
        query = urlencode({"expert_name": expert_name, "family": family})
        status, body = server.request(f"/unite_and_conquer/class_labels?{query}")
        return json.loads(body)["labels"] if status == 200 else None
    return labels


def picker_errors(api: dict, nid: str, name: str, value, class_labels) -> list[str]:
    node = api[nid]
    src = node["inputs"].get("expert")
    loader = api.get(src[0]) if workflow_ui.is_link(src) else None
    if class_labels is None or loader is None or loader["class_type"] != "PoEExpertLoader":
        return []
    options = class_labels(loader["inputs"]["expert_name"], loader["inputs"].get("family", "auto"))
    if options is None or value in options:
        return []
    return [f"node {nid} ({node['class_type']}).{name}: {value!r} is not one of the labels of "
            f"{loader['inputs']['expert_name']}"]


def static_errors(api: dict, object_info: dict, class_labels=None) -> list[str]:
    """Everything /object_info says is wrong with an API workflow, except files that are not there.
    ``class_labels(expert_name, family)`` gives an expert file's labels (see EXPERT_PICKERS)."""
    errors = []
    for nid, node in api.items():
        ctype = node["class_type"]
        if ctype not in object_info:
            errors.append(f"node {nid}: unknown node type {ctype!r}")
            continue
        info = object_info[ctype]
        specs = {name: (kind, opts) for name, kind, opts in workflow_ui.input_specs(info)}
        required = set(info.get("input_order", {}).get("required", []))
        errors += [f"node {nid} ({ctype}): unknown input {k!r}" for k in sorted(set(node["inputs"]) - set(specs))]
        errors += [f"node {nid} ({ctype}): required input {k!r} is missing" for k in sorted(required - set(node["inputs"]))]
        for name, value in node["inputs"].items():
            if name not in specs:
                continue
            kind, opts = specs[name]
            where = f"node {nid} ({ctype}).{name}"
            if workflow_ui.is_link(value):
                src = api.get(value[0])
                if src is None:
                    errors.append(f"{where}: links to missing node {value[0]}")
                    continue
                outputs = object_info.get(src["class_type"], {}).get("output", [])
                if value[1] >= len(outputs):
                    errors.append(f"{where}: node {value[0]} has no output {value[1]}")
                elif kind != "*" and outputs[value[1]] not in (kind, "*") and \
                        not set(outputs[value[1]].split(",")) & set(kind.split(",")):
                    errors.append(f"{where}: gets {outputs[value[1]]} but takes {kind}")
                continue
            if not workflow_ui.is_widget(kind, opts):
                errors.append(f"{where}: a {kind} socket needs a link, got {value!r}")
            elif (ctype, name) in EXPERT_PICKERS:
                errors += picker_errors(api, nid, name, value, class_labels)
            elif kind == "COMBO":
                if value not in (opts.get("options") or []) and (ctype, name) not in workflow_ui.FILE_INPUTS:
                    errors.append(f"{where}: {value!r} is not one of its options")
            elif kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        (kind == "INT" and not isinstance(value, int)):
                    errors.append(f"{where}: {value!r} is not an {kind}")
                elif not opts.get("min", value) <= value <= opts.get("max", value):
                    errors.append(f"{where}: {value} is outside [{opts.get('min')}, {opts.get('max')}]")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                errors.append(f"{where}: {value!r} is not a BOOLEAN")
            elif kind == "STRING" and not isinstance(value, str):
                errors.append(f"{where}: {value!r} is not a STRING")
    return errors


def validate_without_running(server: ComfyServer, api: dict) -> tuple[int, dict]:
    """POST /prompt; a prompt that passes is taken off the queue (and interrupted) before it runs."""
    status, answer = server.queue(api)
    if status == 200:
        server.request("/queue", {"delete": [answer["prompt_id"]]})
        server.interrupt()
        deadline = time.time() + 60
        while time.time() < deadline:
            queue = server.get_json("/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                break
            time.sleep(0.2)
    return status, answer


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=ids)
def test_api_workflow_matches_object_info(path, object_info, server):
    errors = static_errors(load_api_workflow(path), object_info, class_labels_from(server))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=ids)
def test_api_workflow_passes_the_servers_validation(path, server, object_info):
    api = load_api_workflow(path)
    missing = set(workflow_ui.missing_files(api, object_info))
    status, answer = validate_without_running(server, api)
    if status == 200:
        assert answer.get("node_errors") == {}, answer
        return
    # Files that are not downloaded here may only show up as 'value not in list' on their own input.
    file_inputs = {name for (_, name) in workflow_ui.FILE_INPUTS}
    assert "node_errors" in answer, answer
    for nid, err in answer["node_errors"].items():
        for e in err["errors"]:
            name = e.get("extra_info", {}).get("input_name")
            # LoadImage checks its file in its own validation ('Invalid image file').
            ok = e["type"] in ("value_not_in_list", "custom_validation_failed") and name in file_inputs and \
                api[nid]["inputs"].get(name) in missing
            assert ok, f"node {nid} ({err['class_type']}): {e['type']}: {e['message']}: {e.get('details')}"


def test_the_static_check_catches_what_the_server_would_refuse(object_info, server):
    """static_errors is not vacuous: a bad type, a bad link, a bad option and a missing input are caught."""
    api = load_api_workflow(REPO / "example_workflows" / "api" / "tiny_demo.json")
    sampler = next(k for k, v in api.items() if v["class_type"] == "PoEKSampler")
    grid = next(k for k, v in api.items() if v["class_type"] == "PoEImageGrid")
    api[sampler]["inputs"]["sampler_name"] = "no_such_sampler"
    api[sampler]["inputs"]["steps"] = 0
    del api[sampler]["inputs"]["seed"]
    api[grid]["inputs"]["images"] = [sampler, 0]  # a LATENT into an IMAGE input
    api["99"] = {"class_type": "NoSuchNodeUAC", "inputs": {}}
    errors = static_errors(api, object_info)
    assert errors == [
        f"node {sampler} (PoEKSampler): required input 'seed' is missing",
        f"node {sampler} (PoEKSampler).steps: 0 is outside [1, 10000]",
        f"node {sampler} (PoEKSampler).sampler_name: 'no_such_sampler' is not one of its options",
        f"node {grid} (PoEImageGrid).images: gets LATENT but takes IMAGE",
        "node 99: unknown node type 'NoSuchNodeUAC'",
    ]
    api = load_api_workflow(REPO / "example_workflows" / "api" / "tiny_demo.json")
    bind = next(k for k, v in api.items() if v["class_type"] == "PoEBindClass")
    api[bind]["inputs"]["class"] = "292: tiger"  # an ImageNet label on the digit expert
    assert static_errors(api, object_info, class_labels_from(server)) == [
        f"node {bind} (PoEBindClass).class: '292: tiger' is not one of the labels of tiny_class.safetensors"]


def test_every_api_workflow_has_a_ui_workflow_that_agrees(object_info):
    assert API_WORKFLOWS, "no workflows in example_workflows/api/"
    problems = workflow_ui.check(object_info)
    assert not problems, "\n".join(problems) + "\n(regenerate with: .venv/bin/python tools/workflow_ui.py)"


def test_the_check_sees_a_changed_widget_and_a_dropped_link(object_info):
    ui = json.loads((REPO / "example_workflows" / "tiny_demo.json").read_text(encoding="utf-8"))
    api = load_api_workflow(REPO / "example_workflows" / "api" / "tiny_demo.json")
    assert workflow_ui.compare(ui, api, object_info) == []
    sampler = next(n for n in ui["nodes"] if n["type"] == "PoEKSampler")
    sampler["widgets_values"][2] = 31  # steps (after seed and its control value)
    link = sampler["inputs"][0]["link"]
    sampler["inputs"][0]["link"] = None
    problems = workflow_ui.compare(ui, api, object_info)
    sid = str(sampler["id"])
    assert f"node {sid} (PoEKSampler).steps: 30 (API) vs 31 (UI)" in problems
    assert any(p.startswith(f"node {sid} (PoEKSampler).experts: [") and p.endswith("(API) vs None (UI)")
               for p in problems), problems
    assert f"link {link}: input {sid}:0 does not point back to it" in problems


def test_ui_workflows_carry_titles_and_the_files_note():
    for path in UI_WORKFLOWS:
        ui = json.loads(path.read_text(encoding="utf-8"))
        assert ui["version"] == 0.4
        api = load_api_workflow(REPO / "example_workflows" / "api" / path.name)
        notes = [n for n in ui["nodes"] if n["type"] == "Note"]
        files = [n for n in notes if n["title"] == workflow_ui.FILES_NOTE_TITLE]
        assert len(files) == 1, path.name
        # Any other note is the workflow's explanation, example_workflows/notes/NAME.md.
        explanation = workflow_ui.workflow_note(path.stem)
        assert [(n["title"], n["widgets_values"][0]) for n in notes if n not in files] == \
            ([explanation] if explanation else []), path.name
        text = files[0]["widgets_values"][0]
        for node in api.values():
            for (ctype, name) in workflow_ui.FILE_INPUTS:
                if node["class_type"] == ctype:
                    assert f"- {node['inputs'][name]}:" in text, f"{path.name}: the note misses {node['inputs'][name]}"
        # Left to right: every link goes from a column to one further right.
        pos = {n["id"]: n["pos"] for n in ui["nodes"]}
        assert all(pos[src][0] < pos[dst][0] for _, src, _, dst, _, _ in ui["links"]), path.name


def test_template_browser_lists_the_ui_workflows_and_their_thumbnails(server, object_info):
    listed = server.get_json("/workflow_templates").get(PACK_NAME, [])
    assert sorted(listed) == sorted(p.stem for p in UI_WORKFLOWS)
    for path in UI_WORKFLOWS:
        status, body = server.request(f"/api/workflow_templates/{PACK_NAME}/{path.name}")
        assert status == 200 and json.loads(body) == json.loads(path.read_text(encoding="utf-8"))
        runnable = not workflow_ui.missing_files(load_api_workflow(REPO / "example_workflows" / "api" / path.name),
                                                 object_info)
        thumb = path.with_suffix(".jpg")
        if runnable:
            assert thumb.is_file(), f"{path.name} runs here but has no thumbnail (tools/workflow_ui.py writes it)"
        if thumb.is_file():
            from PIL import Image

            status, body = server.request(f"/api/workflow_templates/{PACK_NAME}/{thumb.name}")
            assert status == 200
            img = Image.open(io.BytesIO(body))
            assert img.format == "JPEG" and img.width == workflow_ui.THUMB_WIDTH

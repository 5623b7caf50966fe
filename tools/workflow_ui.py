"""Turn the API-format workflows (example_workflows/api/NAME.json) into the UI-format workflows the ComfyUI
frontend loads and its template browser lists (example_workflows/NAME.json), with thumbnails.

    .venv/bin/python tools/workflow_ui.py            # write example_workflows/NAME.json (+ NAME.jpg where it runs)
    .venv/bin/python tools/workflow_ui.py --check    # exit 1 if a UI workflow and its API copy disagree

Both modes start a headless ComfyUI with the pack (tools/comfy_client.py) for its /object_info, which
says which inputs are widgets and in which order; ``--object-info FILE`` uses a saved copy instead.

The UI format is LiteGraph's serialisation (version 0.4): ``nodes`` with id, type, pos, size, inputs
(sockets), outputs, title and ``widgets_values``; ``links`` as ``[id, origin, origin_slot, target,
target_slot, type]``. Widget values follow the order of the node's required then optional inputs that
are widgets; a seed with ``control_after_generate`` is followed by its control value ("fixed").
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
API_DIR = WORKFLOWS / "api"
# A workflow's explanation (NAME.md: a '# title' line, then the text) becomes a second Note beside the files note.
NOTES_DIR = WORKFLOWS / "notes"
FILES_NOTE_TITLE = "Files this workflow needs"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}
THUMB_WIDTH = 256
# ComfyUI's model metadata for a loader node (``properties.models``: name, url, directory), which the
# frontend's missing-models dialog offers when the file is not in the directory.
MODEL_DIRECTORIES = {("PoEExpertLoader", "expert_name"): "experts",
                     ("PoETextEncoderLoader", "text_encoder_name"): "text_encoders",
                     ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
                     ("UNETLoader", "unet_name"): "diffusion_models",
                     ("CLIPLoader", "clip_name"): "text_encoders",
                     ("VAELoader", "vae_name"): "vae"}
# (node type, input) pairs that name a file to put in place, and the folder it goes in. The shipped
# workflows' VAELoader reads the built-in pixel_space VAE, so it names no file to put anywhere.
FILE_INPUTS = {**{key: f"ComfyUI/models/{directory}/" for key, directory in MODEL_DIRECTORIES.items()
                  if key[0] != "VAELoader"},
               ("LoadImage", "image"): "ComfyUI/input/ (your own image)"}
# Files ComfyUI builds in, which no one downloads.
BUILT_IN_MODELS = {("VAELoader", "pixel_space")}
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion"
_PACK_RAW = "https://raw.githubusercontent.com/unite-and-conquer/unite-and-conquer/main"
MODEL_URLS = {
    **{f: f"{_OPENAI}/jul-2021/{f}" for f in (
        "64x64_diffusion.pt", "128x128_diffusion.pt", "256x256_diffusion.pt", "256x256_diffusion_uncond.pt",
        "512x512_diffusion.pt", "64_256_upsampler.pt", "128_512_upsampler.pt", "lsun_bedroom.pt", "lsun_cat.pt",
        "lsun_horse.pt", "lsun_horse_nodropout.pt")},
    **{f: f"{_OPENAI}/dec-2021/{f}" for f in ("base.pt", "upsample.pt", "base_inpaint.pt", "upsample_inpaint.pt")},
    # The face experts are linked from their authors' README (no direct file URL is published).
    "model_latest.pt": "https://github.com/Nithin-GK/UniteandConquer",
    "model_sketch.pt": "https://github.com/Nithin-GK/UniteandConquer",
    "FaRL-Base-Patch16-LAIONFace20M-ep64.pth":
        "https://github.com/FacePerceiver/FaRL/releases/download/pretrained_weights/FaRL-Base-Patch16-LAIONFace20M-ep64.pth",
    **{f"tiny_{m}.safetensors": f"{_PACK_RAW}/models_tiny/tiny_{m}.safetensors" for m in ("class", "colour", "layout")},
    # Stock loaders' files: the published .safetensors on Hugging Face, which the frontend can download.
    "DreamShaper_8_pruned.safetensors":
        "https://huggingface.co/Lykon/DreamShaper/resolve/main/DreamShaper_8_pruned.safetensors",
    "Realistic_Vision_V5.1_fp16-no-ema.safetensors":
        "https://huggingface.co/SG161222/Realistic_Vision_V5.1_noVAE/resolve/main/Realistic_Vision_V5.1_fp16-no-ema.safetensors",
    "Chroma1-Radiance-v0.4.safetensors":
        "https://huggingface.co/lodestones/Chroma1-Radiance/resolve/main/Chroma1-Radiance-v0.4.safetensors",
    "t5xxl_fp16.safetensors":
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
}

# Layout, in canvas pixels.
COL_GAP, ROW_GAP, MARGIN = 90, 50, 40
NODE_WIDTH, NOTE_WIDTH, EXPLAIN_WIDTH = 330, 560, 1100
TITLE_H, SLOT_H, WIDGET_H, MULTILINE_H = 30, 22, 26, 80
# Room for the run summary the pack's web extension shows under a node of the pack (web/js).
SUMMARY_H = 90


# --- node definitions ------------------------------------------------------------------------

def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every required then optional input, in the order the frontend uses."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if isinstance(kind, list):  # legacy combo: the options themselves
                kind, opts = "COMBO", dict(opts, options=kind)
            out.append((name, kind, opts))
    return out


def is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def has_control(kind: str, opts: dict) -> bool:
    """The frontend adds a 'control after generate' widget after these (its value is saved too)."""
    return kind in ("INT", "COMBO") and bool(opts.get("control_after_generate"))


def default_value(kind: str, opts: dict):
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else ""
    return {"INT": opts.get("min", 0), "FLOAT": opts.get("min", 0.0), "STRING": "", "BOOLEAN": False}.get(kind)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def node_def(object_info: dict, class_type: str, node_id: str) -> dict:
    if class_type not in object_info:
        raise KeyError(f"node {node_id}: type {class_type!r} is not in /object_info (is its pack installed?)")
    return object_info[class_type]


# --- API -> UI -------------------------------------------------------------------------------

def depths(api: dict) -> dict[str, int]:
    """Longest path from a source node: the column each node goes in."""
    memo: dict[str, int] = {}

    def depth(nid: str, stack=()) -> int:
        if nid in memo:
            return memo[nid]
        if nid in stack:
            raise ValueError(f"the workflow has a cycle through node {nid}")
        parents = [v[0] for v in api[nid]["inputs"].values() if is_link(v)]
        memo[nid] = 1 + max((depth(p, stack + (nid,)) for p in parents), default=-1)
        return memo[nid]

    for nid in api:
        depth(nid)
    return memo


def node_height(n_sockets: int, widgets: list[tuple[str, str, dict]]) -> int:
    multiline = sum(1 for _, kind, opts in widgets if kind == "STRING" and opts.get("multiline"))
    return TITLE_H + n_sockets * SLOT_H + len(widgets) * WIDGET_H + multiline * MULTILINE_H + 10


def layout(api: dict, sizes: dict[str, list[int]], top: int) -> dict[str, list[int]]:
    """Columns by depth, left to right; inside a column, nodes follow the mean row of their parents."""
    depth = depths(api)
    columns: dict[int, list[str]] = {}
    for nid in sorted(api, key=lambda k: (depth[k], int(k) if k.isdigit() else k)):
        columns.setdefault(depth[nid], []).append(nid)
    pos: dict[str, list[int]] = {}
    rank: dict[str, float] = {}
    x = MARGIN
    for d in sorted(columns):
        col = columns[d]
        first = {nid: i for i, nid in enumerate(col)}

        def key(nid):
            parents = [rank[v[0]] for v in api[nid]["inputs"].values() if is_link(v) and v[0] in rank]
            return (sum(parents) / len(parents) if parents else -1.0, first[nid])

        col.sort(key=key)
        y = top
        for i, nid in enumerate(col):
            pos[nid] = [x, y]
            rank[nid] = i + d * 0.001
            y += sizes[nid][1] + ROW_GAP
        x += max(sizes[n][0] for n in col) + COL_GAP
    return pos


def readme_checkpoints(readme: Path = ROOT / "README.md") -> list[tuple[str, str, str, str]]:
    """Rows (expert, file, size, notes) of the README's checkpoint table."""
    rows, in_table = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_table = line.strip() == "## Checkpoints"
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if in_table and line.startswith("|") and len(cells) == 4 and not set(cells[0]) <= {"-"} and cells[0] != "expert":
            rows.append(tuple(cells))
    return rows


def files_note(api: dict) -> str:
    """The text of the Note node: every file the workflow loads, and where it goes."""
    rows = readme_checkpoints()
    lines = ["Files this workflow needs:"]
    for nid in sorted(api, key=lambda k: int(k) if k.isdigit() else k):
        node = api[nid]
        for (ctype, name), folder in FILE_INPUTS.items():
            value = node["inputs"].get(name)
            if node["class_type"] != ctype or not isinstance(value, str):
                continue
            base = value.replace("\\", "/").split("/")[-1]
            if base.startswith("tiny_"):
                lines.append(f"- {value}: ships with the pack in models_tiny/ (listed with {folder}); "
                             "nothing to download")
                continue
            row = next((r for r in rows if re.search(rf"`{re.escape(base)}`", r[1])), None)
            where = f"put it in {folder}"
            if row:
                lines.append(f"- {value}: {row[0]}, {row[2]}; {where} ({row[3]})" if row[3] else
                             f"- {value}: {row[0]}, {row[2]}; {where}")
            else:
                lines.append(f"- {value}: {where}")
    if len(lines) == 1:
        lines.append("- none")
    lines.append("")
    lines.append("Subfolders of models/experts are fine. The README's 'Checkpoints' table lists every "
                 "supported file and where to get it.")
    return "\n".join(lines)


def workflow_note(name: str) -> tuple[str, str] | None:
    """(title, text) of the workflow's explanation in example_workflows/notes/NAME.md, or None."""
    path = NOTES_DIR / f"{name}.md"
    if not name or not path.is_file():
        return None
    first, _, rest = path.read_text(encoding="utf-8").partition("\n")
    if not first.startswith("# "):
        raise ValueError(f"{path.relative_to(ROOT)}: the first line must be '# title'")
    return first[2:].strip(), rest.strip("\n")


def note_height(text: str, width: int) -> int:
    # The Note's text box wraps its lines; about 7 px per character at the default font.
    per_line = max(1, (width - 20) // 7)
    lines = sum(max(1, math.ceil(len(line) / per_line)) for line in text.split("\n"))
    return TITLE_H + 22 * (lines + 2)


def model_links(node: dict) -> list[dict]:
    """ComfyUI's ``properties.models`` entries for the files a loader node names."""
    links = []
    for (ctype, name), directory in MODEL_DIRECTORIES.items():
        value = node["inputs"].get(name)
        if node["class_type"] == ctype and isinstance(value, str) and (ctype, value) not in BUILT_IN_MODELS:
            base = value.replace("\\", "/").split("/")[-1]
            if base in MODEL_URLS:  # tests/test_presentation.py checks that every shipped file has one
                links.append({"name": value, "url": MODEL_URLS[base], "directory": directory})
    return links


def node_properties(node: dict) -> dict:
    props = {"Node name for S&R": node["class_type"]}
    models = model_links(node)
    if models:
        props["models"] = models
    return props


def api_to_ui(api: dict, object_info: dict, name: str = "") -> dict:
    """The UI-format (LiteGraph) workflow for an API-format one."""
    ids = {nid: int(nid) for nid in api}
    sizes, nodes, links = {}, {}, []
    defs = {nid: node_def(object_info, api[nid]["class_type"], nid) for nid in api}
    for nid, node in api.items():
        specs = input_specs(defs[nid])
        sockets = [s for s in specs if not is_widget(s[1], s[2]) or is_link(node["inputs"].get(s[0]))]
        widgets = [s for s in specs if is_widget(s[1], s[2])]
        n_out = len(defs[nid]["output"])
        summary = SUMMARY_H if defs[nid].get("category", "").startswith("unite_and_conquer") else 0
        sizes[nid] = [NODE_WIDTH, node_height(max(len(sockets), n_out), widgets) + summary]
    note_text = files_note(api)
    note_h = TITLE_H + 22 * (note_text.count("\n") + 2)
    explanation = workflow_note(name)
    explain_h = note_height(explanation[1], EXPLAIN_WIDTH) if explanation else 0
    pos = layout(api, sizes, top=MARGIN + max(note_h, explain_h) + ROW_GAP)

    # Links get ids in the order of their target nodes and inputs, so a re-run writes the same file.
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in sorted(api, key=lambda k: ids[k]):
        node, info = api[nid], defs[nid]
        inputs, values = [], []
        for name_, kind, opts in input_specs(info):
            value = node["inputs"].get(name_)
            widget = is_widget(kind, opts)
            if is_link(value):
                src, slot = value[0], value[1]
                if src not in api:
                    raise KeyError(f"node {nid}: input {name_!r} links to missing node {src}")
                src_type = defs[src]["output"][slot]
                link_id = len(links) + 1
                links.append([link_id, ids[src], slot, ids[nid], len(inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name_, "type": kind if widget else src_type, "link": link_id}
                if widget:
                    entry["widget"] = {"name": name_}
                inputs.append(entry)
            elif not widget:
                inputs.append({"name": name_, "type": kind, "link": None})
            if widget:
                values.append(default_value(kind, opts) if value is None or is_link(value) else value)
                if has_control(kind, opts):
                    values.append("fixed")
        nodes[nid] = {"inputs": inputs, "widgets_values": values}

    order = {nid: i for i, nid in enumerate(sorted(api, key=lambda k: (depths(api)[k], ids[k])))}
    ui_nodes = []
    for nid in sorted(api, key=lambda k: ids[k]):
        info = defs[nid]
        outputs = []
        for slot, (otype, oname) in enumerate(zip(info["output"], info.get("output_name") or info["output"])):
            out = {"name": oname, "type": otype, "links": out_links.get((nid, slot), [])}
            if out["links"]:
                out["slot_index"] = slot
            outputs.append(out)
        ui_nodes.append({
            "id": ids[nid], "type": api[nid]["class_type"], "pos": pos[nid], "size": sizes[nid],
            "flags": {}, "order": order[nid], "mode": 0,
            "inputs": nodes[nid]["inputs"], "outputs": outputs,
            "title": api[nid].get("_meta", {}).get("title", info.get("display_name", api[nid]["class_type"])),
            "properties": node_properties(api[nid]),
            "widgets_values": nodes[nid]["widgets_values"],
        })
    note_id = max(ids.values()) + 1
    ui_nodes.append({
        "id": note_id, "type": "Note", "pos": [MARGIN, MARGIN], "size": [NOTE_WIDTH, note_h],
        "flags": {}, "order": len(api), "mode": 0, "inputs": [], "outputs": [],
        "title": FILES_NOTE_TITLE, "properties": {"text": ""},
        "widgets_values": [note_text], "color": "#432", "bgcolor": "#653",
    })
    if explanation:
        note_id += 1
        ui_nodes.append({
            "id": note_id, "type": "Note", "pos": [MARGIN + NOTE_WIDTH + COL_GAP, MARGIN],
            "size": [EXPLAIN_WIDTH, explain_h], "flags": {}, "order": len(api) + 1, "mode": 0, "inputs": [],
            "outputs": [], "title": explanation[0], "properties": {"text": ""},
            "widgets_values": [explanation[1]],
        })
    return {
        "last_node_id": note_id, "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": fit_scale(ui_nodes), "offset": [0, 0]},
                  "info": {"name": name, "api_copy": f"example_workflows/api/{name}.json"}},
        "version": 0.4,
    }


def fit_scale(ui_nodes: list[dict], view=(1600, 900), largest: float = 0.8) -> float:
    """The zoom at which every node, the output images included, fits a laptop-sized canvas.

    The frontend loads a node's output image only once it has drawn the node, so a workflow opened
    with its SaveImage off screen shows no result until the user scrolls.
    """
    right = max(n["pos"][0] + n["size"][0] for n in ui_nodes) + MARGIN
    bottom = max(n["pos"][1] + n["size"][1] for n in ui_nodes) + MARGIN
    return math.floor(100 * min(largest, view[0] / right, view[1] / bottom)) / 100


# --- UI -> API, and the check ----------------------------------------------------------------

def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt a UI workflow stands for (notes dropped), as the frontend would queue it."""
    link_src = {l[0]: (str(l[1]), l[2]) for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        nid = str(node["id"])
        info = node_def(object_info, node["type"], nid)
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, kind, opts in input_specs(info):
            if is_widget(kind, opts):
                if not values:
                    raise ValueError(f"node {nid} ({node['type']}): too few widgets_values at {name!r}")
                inputs[name] = values.pop(0)
                if has_control(kind, opts):
                    values.pop(0)
            if name in linked:
                inputs[name] = list(link_src[linked[name]])
        if values:
            raise ValueError(f"node {nid} ({node['type']}): {len(values)} widgets_values left over: {values}")
        api[nid] = {"class_type": node["type"], "_meta": {"title": node.get("title", "")}, "inputs": inputs}
    return api


def normalise_api(api: dict, object_info: dict) -> dict:
    """The API workflow with every widget input the file leaves out set to its default."""
    out = {}
    for nid, node in api.items():
        info = node_def(object_info, node["class_type"], nid)
        inputs = {}
        for name, kind, opts in input_specs(info):
            if name in node["inputs"]:
                inputs[name] = node["inputs"][name]
            elif is_widget(kind, opts):
                inputs[name] = default_value(kind, opts)
        unknown = set(node["inputs"]) - {s[0] for s in input_specs(info)}
        if unknown:
            raise ValueError(f"node {nid} ({node['class_type']}): unknown inputs {sorted(unknown)}")
        out[nid] = {"class_type": node["class_type"], "_meta": {"title": node.get("_meta", {}).get("title", "")},
                    "inputs": inputs}
    return out


def compare(ui: dict, api: dict, object_info: dict) -> list[str]:
    """Every difference between a UI workflow and its API copy (empty when they agree)."""
    problems = []
    try:
        from_ui = ui_to_api(ui, object_info)
        want = normalise_api(api, object_info)
    except (KeyError, ValueError) as err:
        return [str(err)]
    for nid in sorted(set(want) | set(from_ui), key=lambda k: int(k) if k.isdigit() else k):
        a, b = want.get(nid), from_ui.get(nid)
        if a is None or b is None:
            problems.append(f"node {nid} is only in the {'UI' if a is None else 'API'} workflow")
            continue
        if a["class_type"] != b["class_type"]:
            problems.append(f"node {nid}: type {a['class_type']} (API) vs {b['class_type']} (UI)")
            continue
        if a["_meta"]["title"] != b["_meta"]["title"]:
            problems.append(f"node {nid}: title {a['_meta']['title']!r} (API) vs {b['_meta']['title']!r} (UI)")
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            va, vb = a["inputs"].get(name), b["inputs"].get(name)
            if va != vb:
                problems.append(f"node {nid} ({a['class_type']}).{name}: {va!r} (API) vs {vb!r} (UI)")
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, slot, dst, dst_slot, ltype in ui["links"]:
        out = by_id[src]["outputs"][slot]
        if out["type"] != ltype or link_id not in out.get("links", []):
            problems.append(f"link {link_id}: output {src}:{slot} does not list it with type {ltype}")
        if by_id[dst]["inputs"][dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: input {dst}:{dst_slot} does not point back to it")
    return problems


# --- files -----------------------------------------------------------------------------------

def api_workflows() -> list[Path]:
    return sorted(API_DIR.glob("*.json"))


def load_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def missing_files(api: dict, object_info: dict) -> list[str]:
    """File-name inputs whose file the server does not list."""
    missing = []
    for node in api.values():
        for (ctype, name), _ in FILE_INPUTS.items():
            if node["class_type"] == ctype and name in node["inputs"]:
                options = next(o for n, k, o in input_specs(object_info[ctype]) if n == name).get("options", [])
                if node["inputs"][name] not in options:
                    missing.append(node["inputs"][name])
    return missing


def thumbnail(png: bytes, width: int = THUMB_WIDTH) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    height = max(1, round(img.height * width / img.width))
    # Nearest keeps the tiny experts' pixels crisp when they are enlarged.
    resample = Image.NEAREST if img.width < width else Image.LANCZOS
    out = io.BytesIO()
    img.resize((width, height), resample).save(out, "JPEG", quality=90)
    return out.getvalue()


def server_object_info(server) -> dict:
    return server.get_json("/object_info")


def generate(object_info: dict, server=None) -> None:
    for path in api_workflows():
        name = path.stem
        api = load_json(path)
        target = WORKFLOWS / f"{name}.json"
        write_json(target, api_to_ui(api, object_info, name))
        print(f"wrote {target.relative_to(ROOT)}")
        missing = missing_files(api, object_info)
        if missing:
            print(f"  no thumbnail: needs {', '.join(missing)}")
            continue
        if server is None:
            print("  no thumbnail: no server (--object-info)")
            continue
        entry = server.run(api, timeout=900)
        images = server.images(entry)
        if not images:
            print("  no thumbnail: the workflow saved no image")
            continue
        (WORKFLOWS / f"{name}.jpg").write_bytes(thumbnail(images[-1][1]))
        print(f"wrote example_workflows/{name}.jpg")


def check(object_info: dict) -> list[str]:
    problems = []
    api_names = {p.stem for p in api_workflows()}
    ui_names = {p.stem for p in WORKFLOWS.glob("*.json")}
    problems += [f"example_workflows/{n}.json has no API copy in example_workflows/api/" for n in sorted(ui_names - api_names)]
    problems += [f"example_workflows/api/{n}.json has no UI workflow example_workflows/{n}.json" for n in sorted(api_names - ui_names)]
    problems += [f"example_workflows/notes/{p.name} has no API workflow example_workflows/api/{p.stem}.json"
                 for p in sorted(NOTES_DIR.glob("*.md")) if p.stem not in api_names]
    for name in sorted(api_names & ui_names):
        ui = load_json(WORKFLOWS / f"{name}.json")
        problems += [f"{name}: {p}" for p in compare(ui, load_json(API_DIR / f"{name}.json"), object_info)]
        explanation = workflow_note(name)
        shown = [(n.get("title"), (n.get("widgets_values") or [""])[0]) for n in ui["nodes"]
                 if n["type"] in NOTE_TYPES and n.get("title") != FILES_NOTE_TITLE]
        if shown != ([explanation] if explanation else []):
            problems.append(f"{name}: the UI's explanation note differs from example_workflows/notes/{name}.md")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare the UI workflows with their API copies")
    ap.add_argument("--object-info", type=Path, help="a saved /object_info (JSON) instead of starting ComfyUI")
    ap.add_argument("--no-thumbnails", action="store_true", help="do not run the workflows")
    args = ap.parse_args(argv)
    if args.object_info:
        object_info, server = load_json(args.object_info), None
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from comfy_client import ComfyServer

        tmp = tempfile.TemporaryDirectory(prefix="uac-ui-")
        server = ComfyServer(Path(tmp.name)).start()
        object_info = server_object_info(server)
    try:
        if args.check:
            problems = check(object_info)
            for p in problems:
                print(p)
            print("UI and API workflows agree" if not problems else f"{len(problems)} problem(s)")
            return 1 if problems else 0
        generate(object_info, None if args.no_thumbnails else server)
        return 0
    finally:
        if server is not None:
            server.stop()
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())

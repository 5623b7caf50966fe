"""What a user sees before running anything: the template browser's workflows and thumbnails, the
model links in every loader, the Registry icon, the demo's labelled grid, the web extension."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import workflow_ui  # noqa: E402

EXAMPLES = REPO / "example_workflows"
UI_WORKFLOWS = sorted(EXAMPLES.glob("*.json"))


def test_every_workflow_is_in_example_workflows_with_its_api_copy():
    assert not (REPO / "workflows").exists(), "workflows/ moved to example_workflows/"
    assert {p.stem for p in UI_WORKFLOWS} == {p.stem for p in (EXAMPLES / "api").glob("*.json")}
    assert len(UI_WORKFLOWS) >= 9


def loader_files(path):
    """(UI node, (class, input), file) for every file a loader of the workflow names, from its API copy."""
    ui = json.loads(path.read_text(encoding="utf-8"))
    api = json.loads((EXAMPLES / "api" / path.name).read_text(encoding="utf-8"))
    by_id = {str(n["id"]): n for n in ui["nodes"]}
    for nid, node in api.items():
        for key in workflow_ui.MODEL_DIRECTORIES:
            value = node["inputs"].get(key[1])
            if node["class_type"] == key[0] and isinstance(value, str):
                yield by_id[nid], key, value


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_every_loader_carries_comfys_model_metadata(path):
    """Every file a loader (the pack's or ComfyUI's) names has its name, download URL and folder, so the
    frontend's missing-models dialog can offer it; only ComfyUI's built-in pixel_space VAE has none."""
    found = list(loader_files(path))
    assert found, path.name
    for node, key, value in found:
        assert node["type"] == key[0] and value in node["widgets_values"], (path.name, node["id"])
        models = node["properties"].get("models")
        if (key[0], value) in workflow_ui.BUILT_IN_MODELS:
            assert models is None, (path.name, node["id"], models)
            continue
        base = value.split("/")[-1]
        assert base in workflow_ui.MODEL_URLS, f"{path.name}: no URL for {value}"
        assert models == [{"name": value, "url": workflow_ui.MODEL_URLS[base],
                           "directory": workflow_ui.MODEL_DIRECTORIES[key]}], (path.name, node["id"], models)
        url = models[0]["url"]
        assert re.fullmatch(r"https://[\w.-]+/\S+", url), url
        if base.endswith(".safetensors") and not base.startswith("tiny_"):
            # The frontend downloads only .safetensors from huggingface.co or civitai, named as the URL names it.
            assert url.startswith("https://huggingface.co/") and url.endswith("/" + base), url


def test_each_links_directory_is_the_folder_its_loader_lists():
    """A link's directory is where the loader looks: the picker of each loader lists that folder."""
    from support.comfy_harness import comfy_nodes

    import folder_paths

    nodes = comfy_nodes()
    real = folder_paths.get_filename_list
    try:
        folder_paths.get_filename_list = lambda folder: [f"<{folder}>"]
        for (ctype, name), directory in workflow_ui.MODEL_DIRECTORIES.items():
            spec = nodes.NODE_CLASS_MAPPINGS[ctype].INPUT_TYPES()["required"][name]
            options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
            assert f"<{directory}>" in options, (ctype, name, options)
    finally:
        folder_paths.get_filename_list = real
    for ctype, value in workflow_ui.BUILT_IN_MODELS:
        name = next(n for c, n in workflow_ui.MODEL_DIRECTORIES if c == ctype)
        assert value in nodes.NODE_CLASS_MAPPINGS[ctype].INPUT_TYPES()["required"][name][0], (ctype, value)


def test_the_tiny_models_link_to_the_files_the_pack_ships():
    for m in ("class", "colour", "layout"):
        url = workflow_ui.MODEL_URLS[f"tiny_{m}.safetensors"]
        assert url.endswith(f"/models_tiny/tiny_{m}.safetensors")
        assert (REPO / "models_tiny" / f"tiny_{m}.safetensors").is_file()


def test_the_registry_icon_is_shipped():
    from PIL import Image

    toml = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    url = re.search(r'^Icon = "([^"]+)"', toml, re.M).group(1)
    rel = url.split("/main/", 1)[1]
    assert rel == "docs/icon.png"
    img = Image.open(REPO / rel)
    assert img.format == "PNG" and img.size == (256, 256) and img.mode == "RGBA"
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 128


def test_readme_shows_the_editor_and_the_output():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (REPO / image).is_file(), image
    assert "docs/demo_editor.png" in readme and "docs/demo_output.png" in readme


def test_the_demo_writes_an_upscaled_labelled_grid():
    api = json.loads((EXAMPLES / "api" / "tiny_demo.json").read_text(encoding="utf-8"))
    scale = [n for n in api.values() if n["class_type"] == "ImageScale"]
    assert len(scale) == 1 and scale[0]["inputs"]["upscale_method"] == "nearest-exact"
    assert scale[0]["inputs"]["width"] == scale[0]["inputs"]["height"] == 128
    grid = next(n for n in api.values() if n["class_type"] == "PoEImageGrid")
    assert grid["inputs"]["row_labels"].splitlines() == ["class alone", "colour alone", "layout alone", "product"]


def test_no_shipped_workflow_binds_a_label_its_expert_lacks():
    """The digit expert's binding reads its own label ("7"), never an ImageNet name."""
    for path in sorted((EXAMPLES / "api").glob("tiny_*.json")):
        api = json.loads(path.read_text(encoding="utf-8"))
        for node in api.values():
            if node["class_type"] == "PoEBindClass":
                assert re.fullmatch(r"[0-9]", node["inputs"]["class"]), (path.name, node["inputs"]["class"])
                assert node["inputs"]["class_index"] == -1


def test_the_web_extension_renders_summaries_as_text_only():
    """Summaries echo prompts: the extension never hands them to an HTML parser."""
    js = (REPO / "web" / "js" / "unite_and_conquer.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser", "eval("):
        assert sink not in js, sink
    init = (REPO / "__init__.py").read_text(encoding="utf-8")
    assert 'WEB_DIRECTORY = "./web"' in init


BENCHMARKS = REPO / "BENCHMARKS.md"
HISTORY = REPO / "docs" / "benchmark_history.md"


def heading_anchor(title):
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path):
    return {heading_anchor(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", path.read_text(encoding="utf-8"))}


def test_every_link_to_a_section_finds_it():
    """Links with an anchor, in the READMEs, BENCHMARKS.md and docs/, name a heading of the file they point to
    (sections move between BENCHMARKS.md and docs/benchmark_history.md)."""
    docs = [REPO / "README.md", REPO / "tools" / "README.md", BENCHMARKS, *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for doc in docs:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            dest = (doc.parent / target).resolve() if target else doc
            if dest.suffix == ".md":
                assert dest.is_file() and anchor in anchors(dest), f"{doc.relative_to(REPO)}: {target}#{anchor}"
                checked += 1
    assert checked >= 20


def test_benchmarks_open_with_the_table_of_current_figures():
    """One table before the first section; each row that cites a section links to a section of BENCHMARKS.md
    and copies its figures from it (every decimal of the row is in that section); each superseded section in
    docs/benchmark_history.md starts by linking to what replaced it."""
    text = BENCHMARKS.read_text(encoding="utf-8")
    head, *sections = re.split(r"(?m)^(?=## )", text)
    by_title = {s.split("\n", 1)[0][3:]: s for s in sections}
    rows = [line for line in head.splitlines() if line.startswith("|")]
    assert rows[:2] == ["| question | current figure | section | command | date |", "|---|---|---|---|---|"]
    assert len(rows) >= 15
    for row in rows[2:]:
        question, figure, section, command, date = (c.strip() for c in row.strip("|").split("|"))
        link = re.fullmatch(r"\[(.+)\]\(#(.+)\)", section)
        if not link:
            assert section in ("-", "every section below"), row
            continue
        assert link[1] in by_title and link[2] == heading_anchor(link[1]), row
        for number in re.findall(r"\d+\.\d+", figure):
            assert re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", by_title[link[1]]), (question, number)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date) and date in by_title[link[1]], (question, date)
    history = re.split(r"(?m)^(?=## )", HISTORY.read_text(encoding="utf-8"))[1:]
    assert history and not {h.split("\n", 1)[0][3:] for h in history} & set(by_title)
    for moved in history:
        first = moved.split("\n\n")[1]
        assert re.match(r"> Replaced by \[[^]]+\]\(\.\./BENCHMARKS\.md#[^)]+\).* Why: ", first), moved[:80]


README = REPO / "README.md"


def test_the_readme_gives_the_two_commands_and_ci_runs_its_test_command():
    """The README's two commands stay as they are, and `.ci/run` runs exactly the test command it gives."""
    block = re.search(r"(?ms)^## Two commands\n.*?```bash\n(.*?)```", README.read_text(encoding="utf-8"))[1]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["./tools/demo.sh", "./tools/test.sh"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [commands[1]]


def cited_blocks(path):
    """(block, sources) for each paragraph or list item of ``path`` that cites BENCHMARKS.md: the sources are
    its opening table and every section the block links to."""
    text = BENCHMARKS.read_text(encoding="utf-8")
    head, *sections = re.split(r"(?m)^(?=## )", text)
    by_anchor = {heading_anchor(s.split("\n", 1)[0][3:]): s for s in sections}
    body = re.sub(r"(?s)```.*?```", "", path.read_text(encoding="utf-8"))
    for para in re.split(r"\n\s*\n", body):
        for block in re.split(r"\n(?=- )", para):
            if "BENCHMARKS.md" not in block:
                continue
            linked = re.findall(r"BENCHMARKS\.md#([^)\s]+)\)", block)
            assert all(a in by_anchor for a in linked), (path.name, linked)
            yield block, [head] + [by_anchor[a] for a in linked]


@pytest.mark.parametrize("path", [README, REPO / "docs" / "method.md"], ids=["README", "method"])
def test_figures_that_cite_benchmarks_are_copied_from_it(path):
    """Every decimal figure in a paragraph that cites BENCHMARKS.md is in its opening table or in a section the
    paragraph links to (no rounding, no stale copy); versions (x.y.z) and numbers glued to a unit (0.57M) aside."""
    checked = 0
    for block, sources in cited_blocks(path):
        prose = re.sub(r"`[^`]*`", "", block)
        for number in re.findall(r"(?<![\w.])(\d+\.\d+)(?![\w.])", prose):
            pattern = rf"(?<![\d.]){re.escape(number)}(?!\d)"
            assert any(re.search(pattern, s) for s in sources), (path.name, number, block[:120])
            checked += 1
    assert checked >= 3


def test_every_relative_link_names_a_file_of_the_repository():
    """Links to files (documents, modules, images) in the READMEs, BENCHMARKS.md and docs/ point at files that exist."""
    docs = [README, REPO / "tools" / "README.md", BENCHMARKS, *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)}: {target}"
            checked += 1
    assert checked >= 20

"""Tier (d): the pack in ComfyUI's own frontend, in a real headless Chromium (Selenium + chromedriver).

A real ComfyUI server with the pack serves its pinned frontend (comfyui-frontend-package). The browser
finds the pack's nodes through the node search box, loads every shipped UI workflow, checks that the
frontend turns each into exactly its API copy, and queues workflows with the Run button. Screenshots go
to tests/artifacts/ (tests/artifacts/comfyui-0.33.0/ on 0.33.0).

Every test runs against two frontends: the comfyui-frontend-package that the ComfyUI under test pins
in its requirements.txt (PINNED: 1.32.9 for 0.3.75, 1.48.7 for 0.33.0, served from that ComfyUI's venv)
and the newest on PyPI (NEWEST, installed with ``pip install --no-deps --target`` into .cache/ and
served with ``--front-end-root``; skipped with the reason when it cannot be had). The pack's web
extension (web/js) is checked on both: node summaries as plain text after a run, the class picker
that follows the connected expert, and the missing-models notice with its download link.

The browser comes from Debian (``apt-get install chromium chromium-driver``, done by tools/setup_env.sh);
when it is missing the test installs it where it can, and skips with the reason where it cannot.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import COMFY, ComfyServer, load_api_workflow  # noqa: E402
import workflow_ui  # noqa: E402
from support.locks import exclusive  # noqa: E402



def comfyui_version() -> str:
    return re.search(r'__version__\s*=\s*"([^"]+)"', (COMFY / "comfyui_version.py").read_text()).group(1)


# 0.3.75's screenshots keep their names (tools/README.md points at one); another ComfyUI's go in a subfolder.
ARTIFACTS = REPO / "tests" / "artifacts" / ("" if comfyui_version() == "0.3.75" else f"comfyui-{comfyui_version()}")


def pinned_frontend() -> str:
    """The comfyui-frontend-package version the ComfyUI under test pins (and its venv has)."""
    found = re.search(r"^comfyui-frontend-package==(\S+)", (COMFY / "requirements.txt").read_text(), re.M)
    return found.group(1)


PINNED, NEWEST = pinned_frontend(), "1.58.1"
FRONTENDS = (PINNED, NEWEST)
WORKFLOWS = sorted(p for p in (REPO / "example_workflows").glob("*.json"))
DEMO = REPO / "example_workflows" / "tiny_demo.json"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1920,1200")
# The first-run template browser would cover the canvas.
# Text stays drawn at the zoom that fits a whole workflow in the screenshot (down to 1 px fonts). This
# frontend replaced LowQualityRenderingZoomThreshold with MinFontSizeForLOD; given the old name, it
# migrates it and then fails to delete it (HTTP 500 on /api/settings).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1}


# --- browser -------------------------------------------------------------------------------------

def browser_paths() -> tuple[str, str] | None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


def install_browser() -> str:
    """Install Debian's chromium and chromium-driver; returns why it could not, or ''."""
    if not shutil.which("apt-get"):
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "not root, so apt-get install is not possible"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(cmd)} failed: {err}"
        if res.returncode != 0:
            return f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr.strip()[-400:]}"
    return ""


@pytest.fixture(scope="module")
def browser_bin() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements-test.txt)")
    paths = browser_paths()
    if paths is None:
        with exclusive("browser-install"):   # apt-get refuses a second install beside the other run's
            why = "" if browser_paths() else install_browser()
            paths = browser_paths()
        if paths is None:
            pytest.skip(f"no Chromium + chromedriver, and installing them failed: {why or 'not found after install'}")
    return paths


def installed_frontend(version: str) -> Path | str:
    """The static folder of comfyui-frontend-package ``version`` under .cache/, installed there with
    ``pip install --no-deps --target`` (never into the venv); the reason as a str when it cannot be had."""
    target = REPO / ".cache" / f"comfyui-frontend-{version}"
    static = target / "comfyui_frontend_package" / "static"
    # Both ComfyUIs' runs (side by side in tools/test.sh) test the newest frontend: one installs it.
    with exclusive(f"frontend-{version}"):
        return static if (static / "index.html").is_file() else _pip_install_frontend(version, target, static)


def _pip_install_frontend(version: str, target: Path, static: Path) -> Path | str:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
           f"comfyui-frontend-package=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"pip install comfyui-frontend-package=={version} failed: {err}"
    if res.returncode != 0 or not (static / "index.html").is_file():
        return f"pip install comfyui-frontend-package=={version} failed: {res.stderr.strip()[-400:]}"
    return static


@pytest.fixture(scope="module", params=FRONTENDS, ids=[f"frontend-{v}" for v in FRONTENDS])
def frontend(request) -> str:
    """The frontend version this module's server serves (the pinned one is ComfyUI's own)."""
    return request.param


# The markup a shared workflow could carry in a prompt; f() counts what would run if it were parsed as HTML.
MARKUP = "<img src=x onerror=f()><script>f()</script>"


def markup_expert(folder: Path) -> Path:
    """A small random tiny-family colour expert whose vocabulary holds MARKUP as a word, so that the
    prompt is accepted and echoed in the binding's summary."""
    from safetensors.torch import save_file
    import torch
    from unite_and_conquer.model_loaders import tiny

    config = tiny.default_config("colour")
    config["widths"] = [8, 16, 16]
    config["vocabulary"] = list(config["vocabulary"][:-1]) + [MARKUP]
    torch.manual_seed(0)
    net = tiny.network_from_config(config)
    path = folder / "uac_fe_markup_colour.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata=tiny.metadata_for(config))
    return path


@pytest.fixture(scope="module")
def server(frontend, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy-frontend")
    user = work / "user"
    (user / "default").mkdir(parents=True)
    (user / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    experts = work / "experts"
    experts.mkdir()
    markup_expert(experts)
    paths = work / "extra_model_paths.yaml"
    paths.write_text(f"uac_frontend_tests:\n  experts: {experts}\n")
    args = ["--user-directory", str(user), "--extra-model-paths-config", str(paths)]
    if frontend != PINNED:
        static = installed_frontend(frontend)
        if isinstance(static, str):
            pytest.skip(static)
        args += ["--front-end-root", str(static)]
    srv = ComfyServer(work, python=sys.executable, extra_args=tuple(args))
    srv.start()
    srv.frontend = frontend
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(browser_bin, server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver_path = browser_bin
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(server.url)
        wait_for(driver, "return !!(window.app && window.app.graph && window.LiteGraph && "
                         "document.getElementById('graph-canvas'))", 90, "the ComfyUI app to start")
        wait_for(driver, "return Object.keys(LiteGraph.registered_node_types).includes('PoEKSampler')", 30,
                 "the pack's nodes to be registered")
        driver.uac_frontend = server.frontend
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float, what: str, *args):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def dialogs(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.p-dialog, [role=dialog]')).map(d => d.innerText)")


def close_dialogs(driver) -> None:
    from selenium.webdriver.common.keys import Keys

    for _ in range(3):
        if not dialogs(driver):
            return
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        time.sleep(0.3)


def load_graph(driver, workflow: dict) -> None:
    driver.execute_script("return app.loadGraphData(arguments[0]).then(() => null)", workflow)
    time.sleep(0.5)  # the missing-nodes dialog opens asynchronously after the graph is configured


def fit_view(driver) -> None:
    """Zoom and pan the canvas so that every node is on screen, and draw it."""
    driver.execute_script("app.canvas.ds.fitToBounds && app.graph.nodes.length && "
                          "app.canvas.ds.fitToBounds(app.graph.nodes.reduce((b, n) => {"
                          "  const [x, y, w, h] = n.boundingRect;"
                          "  return [Math.min(b[0], x), Math.min(b[1], y), Math.max(b[2], x + w), Math.max(b[3], y + h)];"
                          "}, [1e9, 1e9, -1e9, -1e9]).map((v, i, a) => i < 2 ? v : v - a[i - 2]));"
                          "app.canvas.setDirty(true, true); app.canvas.draw(true, true);")


def artifact(driver, name: str) -> Path:
    return ARTIFACTS / f"frontend_{driver.uac_frontend}_{name}.png"


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fit_view(driver)
    path = artifact(driver, name)
    driver.save_screenshot(str(path))
    return path


def closeup(driver, name: str, scale: float = 0.8) -> Path:
    """The graph's top-left corner at a readable zoom (the README's picture of the demo)."""
    driver.execute_script("const b = app.graph.nodes.reduce((b, n) => [Math.min(b[0], n.pos[0]), Math.min(b[1], n.pos[1])],"
                          "  [1e9, 1e9]);"
                          "app.canvas.ds.scale = arguments[0]; app.canvas.ds.offset = [60 - b[0], 60 - b[1]];"
                          "app.canvas.setDirty(true, true); app.canvas.draw(true, true);", scale)
    time.sleep(0.5)
    path = artifact(driver, name)
    driver.save_screenshot(str(path))
    return path


def click_run(driver) -> None:
    button = driver.execute_script(
        "return document.querySelector('[data-testid=queue-button] button') || "
        "Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'Run')")
    assert button is not None, "the Run button is not on the page"
    button.click()


def wait_for_saved_image(driver, node_id: int, timeout: float) -> list[dict]:
    """The images the frontend shows on a SaveImage node once the run finished.

    The frontend loads a node's output images only when it draws the node (onDrawBackground), and the
    canvas draws only the nodes in view: a SaveImage node off screen keeps its output in app.nodeOutputs
    but never gets node.imgs. So the whole graph is brought into view first, as a user would scroll to it.
    """
    fit_view(driver)
    return wait_for(driver, "const n = app.graph.getNodeById(arguments[0]);"
                            "const out = app.nodeOutputs && app.nodeOutputs[String(arguments[0])];"
                            "return n && n.imgs && n.imgs.length && n.imgs[0].complete && out ? out.images : null;",
                    timeout, f"an image on node {node_id}", node_id)


def saved_png(server, image: dict) -> Path:
    """The file a SaveImage output names, in the server's output folder."""
    assert image["type"] == "output", image
    return server.workdir / "output" / image.get("subfolder", "") / image["filename"]


# --- (a) the node search box ---------------------------------------------------------------------

def test_node_search_finds_and_adds_every_pack_node(page, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    info = server.get_json("/object_info")
    # Deprecated nodes are hidden from the search on purpose (they only keep old workflows loading).
    pack = {k: v["display_name"] for k, v in info.items()
            if v["category"].startswith("unite_and_conquer/") and not v.get("deprecated")}
    assert len(pack) >= 13 and "PoEImageToLatent" not in pack, sorted(pack)
    page.execute_script("app.graph.clear()")
    canvas = page.find_element(By.ID, "graph-canvas")
    for node_id, display in sorted(pack.items()):
        for attempt in range(3):  # a double-click right after the last drop is sometimes taken as clicks
            ActionChains(page).move_to_element_with_offset(canvas, -300, -150).double_click().perform()
            try:
                box = wait_for(page, "const e = document.activeElement; return e && e.tagName === 'INPUT' && "
                                     "/search|add a node/i.test(e.placeholder || '') ? e : null;",
                               5 if attempt < 2 else 10, f"the node search box (to add {node_id})")
                break
            except AssertionError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        box.send_keys(display)
        option = wait_for(page, "return Array.from(document.querySelectorAll('[role=option]'))"
                                ".find(o => o.innerText.split('\\n')[0].trim() === arguments[0]) || null;",
                          10, f"{display!r} in the search results", display)
        option.click()
        # Newer frontends attach the new node to the pointer until a click drops it.
        ActionChains(page).move_to_element_with_offset(canvas, -300, -150).click().perform()
        wait_for(page, "return app.graph.nodes.some(n => n.type === arguments[0])", 5,
                 f"{node_id} on the canvas", node_id)
        wait_for(page, "return !document.querySelector('.p-dialog, [role=dialog]')", 5, "the search box to close")
        # Off the spot the next double-click goes to, laid out in a grid for the screenshot.
        i = page.execute_script("return app.graph.nodes.length")
        page.execute_script("const n = app.graph.nodes.find(n => n.type === arguments[0]);"
                            "n.pos[0] = arguments[1]; n.pos[1] = arguments[2]; app.canvas.setDirty(true, true);",
                            node_id, 3000 + 380 * ((i - 1) % 5), 400 * ((i - 1) // 5))
    types = page.execute_script("return app.graph.nodes.map(n => n.type)")
    assert sorted(types) == sorted(pack), types
    assert not dialogs(page)
    screenshot(page, "search_added_nodes")


# --- (b) every shipped workflow loads, with no missing node ---------------------------------------

def open_issues(driver) -> None:
    """Newer frontends: click 'View details' on the issues notice, which opens the Issues panel."""
    details = wait_for(driver, "return Array.from(document.querySelectorAll('button'))"
                               ".find(b => /view details/i.test(b.innerText)) || null", 20, "the issues notice")
    details.click()


def reports_in_dialogs(driver, what: str, timeout: float = 15) -> bool:
    """Whether this frontend reports ``what`` ("missing nodes", "missing models") in a dialog (1.32.9) or
    in the Issues panel behind a notice (newer ones): waits for whichever appears first."""
    found = wait_for(driver, "if (Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))"
                             "  .some(d => d.innerText.toLowerCase().includes(arguments[0]))) return 'dialog';"
                             "return Array.from(document.querySelectorAll('button'))"
                             "  .some(b => /view details/i.test(b.innerText)) ? 'notice' : null;",
                     timeout, f"a dialog or a notice about {what}", what)
    return found == "dialog"


def test_a_missing_node_is_reported(page, server):
    """The check below would be empty if the frontend never reported missing nodes."""
    bogus = {"last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {},
             "version": 0.4, "nodes": [{"id": 1, "type": "NoSuchNodeUAC", "pos": [0, 0], "size": [200, 80],
                                        "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                                        "properties": {}, "widgets_values": []}]}
    load_graph(page, bogus)
    if reports_in_dialogs(page, "missing nodes"):
        shown = wait_for(page, "return Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))"
                               ".map(d => d.innerText).find(t => /missing nodes/i.test(t)) || null", 10,
                         "the missing-nodes dialog")
    else:  # newer frontends list it in the Issues panel, opened from a notice
        open_issues(page)
        shown = wait_for(page, "const t = document.body.innerText;"
                               "return /missing node/i.test(t) && t.includes('NoSuchNodeUAC') ? t : null", 10,
                         "the missing node in the Issues panel")
    assert "NoSuchNodeUAC" in shown
    assert page.execute_script("return app.graph.nodes[0].has_errors") is True
    close_dialogs(page)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_and_queues_as_its_api_copy(page, server, path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    close_dialogs(page)
    load_graph(page, ui)
    # Missing checkpoints are reported (test_missing_model_...); missing node types must not be.
    assert not [d for d in dialogs(page) if "missing nodes" in d.lower()], dialogs(page)
    # Newer frontends keep node ids as strings.
    loaded = page.execute_script("return app.graph.nodes.map(n => [String(n.id), n.type, n.title, "
                                 "n.type in LiteGraph.registered_node_types])")
    assert sorted(loaded) == sorted([str(n["id"]), n["type"], n["title"], True] for n in ui["nodes"])
    # What the frontend would queue is exactly the API copy: same nodes, links and widget values.
    queued = page.execute_script("return app.graphToPrompt().then(p => p.output)")
    api = load_api_workflow(REPO / "example_workflows" / "api" / path.name)
    want = workflow_ui.normalise_api(api, server.get_json("/object_info"))
    assert sorted(queued) == sorted(want)
    for nid, node in want.items():
        assert queued[nid]["class_type"] == node["class_type"], nid
        assert queued[nid]["inputs"] == node["inputs"], f"node {nid} ({node['class_type']})"
    shot = screenshot(page, path.stem)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- (c) queueing from the UI shows the image ----------------------------------------------------

def test_run_button_shows_the_saved_image(page, server):
    """A graph of ComfyUI's own nodes: the Run button, the queue and the image preview work."""
    graph = {"last_node_id": 2, "last_link_id": 1, "groups": [], "config": {}, "extra": {}, "version": 0.4,
             "links": [[1, 1, 0, 2, 0, "IMAGE"]],
             "nodes": [{"id": 1, "type": "EmptyImage", "pos": [0, 0], "size": [300, 130], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
                        "properties": {}, "widgets_values": [48, 32, 1, 0xFF0000]},
                       {"id": 2, "type": "SaveImage", "pos": [400, 0], "size": [300, 300], "flags": {}, "order": 1,
                        "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
                        "properties": {}, "widgets_values": ["uac_frontend"]}]}
    close_dialogs(page)
    load_graph(page, graph)
    click_run(page)
    images = wait_for_saved_image(page, 2, 60)
    assert images[0]["filename"].startswith("uac_frontend")
    assert saved_png(server, images[0]).is_file()
    size = page.execute_script("const i = app.graph.getNodeById(2).imgs[0]; return [i.naturalWidth, i.naturalHeight]")
    assert size == [48, 32]


def test_tiny_demo_queued_from_the_ui_produces_an_image(page, server):
    """The pack's demo, queued with the Run button: the grid shows on its SaveImage node and is on disk."""
    from PIL import Image

    api = load_api_workflow(REPO / "example_workflows" / "api" / "tiny_demo.json")
    missing = workflow_ui.missing_files(api, server.get_json("/object_info"))
    if missing:
        pytest.xfail(f"the tiny experts are not in models_tiny/ yet: {', '.join(missing)}")
    ui = json.loads(DEMO.read_text(encoding="utf-8"))
    save_id = next(n["id"] for n in ui["nodes"] if n["type"] == "SaveImage")
    close_dialogs(page)
    load_graph(page, ui)
    click_run(page)
    images = wait_for_saved_image(page, save_id, 300)
    assert len(images) == 1 and images[0]["filename"].startswith("uac_tiny_demo"), images
    errors = [d for d in dialogs(page) if "error" in d.lower()]
    assert not errors, errors
    # The server ran it as a prompt of its own, which saved exactly the file the UI shows.
    runs = [h for h in server.get_json("/history").values()
            if h["outputs"].get(str(save_id), {}).get("images") == images]
    assert len(runs) == 1, f"no finished prompt saved {images} on node {save_id}"
    assert runs[0]["status"]["status_str"] == "success", runs[0]["status"]
    assert runs[0]["prompt"][2][str(save_id)]["class_type"] == "SaveImage"
    png = saved_png(server, images[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    # 4 rows (three experts alone, then their product) of 4 samples at 32 px.
    width, height = Image.open(png).size
    assert width >= 4 * 32 and height >= 4 * 32, (width, height)
    shown = page.execute_script(
        "const i = app.graph.getNodeById(arguments[0]).imgs[0]; return [i.naturalWidth, i.naturalHeight]", save_id)
    assert shown == [width, height]
    screenshot(page, "tiny_demo_run")
    closeup(page, "tiny_demo_run_closeup")


# --- (d) the pack's web extension: summaries, the class picker, model links --------------------------

def summary_graph(info: dict, expert: str, text: str) -> dict:
    """Loader -> Bind Text -> PoEKSampler (1 step, 1 image) -> PreviewImage, in the UI format."""
    api = {"1": {"class_type": "PoEExpertLoader", "inputs": {"expert_name": expert}},
           "2": {"class_type": "PoEBindText", "inputs": {"expert": ["1", 0], "text": text}},
           "3": {"class_type": "PoEKSampler", "inputs": {"experts": ["2", 0], "seed": 1, "steps": 1,
                                                         "sampler_name": "euler", "batch_size": 1}},
           "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}}
    return workflow_ui.api_to_ui(api, info, "summaries")


def summary_of(driver, node_id: int):
    """The text the extension shows on a node, and whether its box is on screen (None if not shown)."""
    return driver.execute_script(
        "const n = app.graph.getNodeById(arguments[0]);"
        "const w = n && n.widgets && n.widgets.find(w => w.name === 'uac_summary');"
        "if (!w || !w.element) return null;"
        "const r = w.element.getBoundingClientRect();"
        "return [w.element.value, w.element.tagName, r.width > 0 && r.height > 0 && w.element.isConnected];",
        node_id)


def test_summaries_show_on_the_nodes_as_text_and_markup_stays_text(page, server):
    """A run puts each pack node's summary on it; a prompt holding markup shows literally and nothing runs."""
    info = server.get_json("/object_info")
    assert "uac_fe_markup_colour.safetensors" in info["PoEExpertLoader"]["input"]["required"]["expert_name"][1]["options"]
    close_dialogs(page)
    page.execute_script("window.__uacRan = 0; window.f = () => { window.__uacRan += 1; };")
    graph = summary_graph(info, "uac_fe_markup_colour.safetensors", MARKUP)
    load_graph(page, graph)
    click_run(page)
    fit_view(page)
    texts = {}
    for nid in (1, 2, 3):
        shown = wait_for(page, "const n = app.graph.getNodeById(arguments[0]);"
                               "const w = n && n.widgets && n.widgets.find(w => w.name === 'uac_summary');"
                               "return w && w.element && w.element.value ? true : null;", 120,
                         f"the summary on node {nid}", nid)
        assert shown
        value, tag, visible = summary_of(page, nid)
        assert tag == "TEXTAREA" and visible, (nid, tag, visible)
        texts[nid] = value
    assert texts[1].startswith("Tiny digits · colour · tiny · 32px · "), texts[1]
    assert texts[1].endswith("modalities: colour, text"), texts[1]
    # The binding echoes the prompt (cut at 40 characters): the tags are there as characters.
    assert texts[2].startswith('Tiny digits · colour · "' + MARKUP[:37] + '..."'), texts[2]
    assert texts[3].startswith("product of 1 binding(s) over 1 expert(s)"), texts[3]
    # Nothing was parsed as HTML: no <img src=x> anywhere, and f() never ran (onerror would have called it).
    time.sleep(1)
    assert page.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert page.execute_script("return window.__uacRan") == 0
    assert page.execute_script(
        "return Array.from(document.querySelectorAll('.uac-summary')).every(e => e.children.length === 0)")
    # The summary is a run's result, never saved in the workflow or sent as an input.
    saved = page.execute_script("return app.graph.serialize().nodes.find(n => n.id === 2).widgets_values")
    assert saved == next(n for n in graph["nodes"] if n["id"] == 2)["widgets_values"]
    queued = page.execute_script("return app.graphToPrompt().then(p => p.output['2'].inputs)")
    assert "uac_summary" not in queued
    screenshot(page, "summaries")


def class_picker_graph(info: dict, expert: str, choice: str) -> dict:
    """A loader and an unconnected PoEBindClass."""
    api = {"1": {"class_type": "PoEExpertLoader", "inputs": {"expert_name": expert}},
           "2": {"class_type": "PoEBindClass", "inputs": {"class": choice, "null": "trained"}}}
    return workflow_ui.api_to_ui(api, info, "class_picker")


def picker(driver, node_id: int) -> tuple[list[str], str]:
    return driver.execute_script(
        "const w = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class');"
        "const v = w.options.values; return [typeof v === 'function' ? v() : Array.from(v), w.value];", node_id)


def test_class_picker_offers_the_connected_experts_own_labels(page, server):
    digits = [str(k) for k in range(10)]
    status, body = server.request("/unite_and_conquer/class_labels?expert_name=tiny_class.safetensors&family=auto")
    assert status == 200 and json.loads(body)["labels"] == digits
    status, body = server.request("/unite_and_conquer/class_labels?expert_name=tiny_colour.safetensors")
    assert status == 200 and json.loads(body)["labels"] == []
    status, body = server.request("/unite_and_conquer/class_labels?expert_name=nope.safetensors")
    assert status == 400 and "nope.safetensors is not in models/experts" in json.loads(body)["error"]

    close_dialogs(page)
    load_graph(page, class_picker_graph(server.get_json("/object_info"), "tiny_class.safetensors", "292: tiger"))
    options, value = picker(page, 2)
    assert value == "292: tiger" and "7: cock" in options  # unconnected: the schema's ImageNet list
    # Wire the digit expert in, as a user drags the link.
    page.execute_script("const g = app.graph; g.getNodeById(1).connect(0, g.getNodeById(2), 0);")
    wait_for(page, "const w = app.graph.getNodeById(2).widgets.find(w => w.name === 'class');"
                   "const v = w.options.values; return (typeof v === 'function' ? v() : v).length === 10;", 20,
             "the picker to list the digit expert's classes")
    options, value = picker(page, 2)
    assert options == digits and value == "0", (options, value)
    assert not any(":" in o for o in options)
    # The shipped demo: its binding reads "7", the digit expert's own label.
    ui = json.loads(DEMO.read_text(encoding="utf-8"))
    bind = next(n for n in ui["nodes"] if n["type"] == "PoEBindClass")
    assert bind["widgets_values"][0] == "7"
    load_graph(page, ui)
    wait_for(page, "const n = app.graph.getNodeById(arguments[0]); return n.uacClassLabels ? true : null;", 20,
             "the demo's picker to be refreshed", bind["id"])
    assert picker(page, bind["id"]) == [digits, "7"]
    # The server refuses a label the expert does not have, as a workflow edited by hand would carry.
    api = load_api_workflow(REPO / "example_workflows" / "api" / "tiny_demo.json")
    nid = next(k for k, v in api.items() if v["class_type"] == "PoEBindClass")
    api[nid]["inputs"]["class"] = "7: cock"
    entry_id = server.queue(api)[1]["prompt_id"]
    with pytest.raises(Exception, match="'7: cock' is not a class of Tiny digits · class"):
        server.wait(entry_id, timeout=120)


def test_missing_model_shows_comfys_notice_with_the_download_link(page, server):
    """A workflow whose checkpoint is not there: the frontend names the file and offers its link."""
    path = REPO / "example_workflows" / "paper_class_text.json"
    ui = json.loads(path.read_text(encoding="utf-8"))
    loader = next(n for n in ui["nodes"] if n["type"] == "PoEExpertLoader" and
                  n["widgets_values"][0] == "64x64_diffusion.pt")
    model = loader["properties"]["models"][0]
    assert model == {"name": "64x64_diffusion.pt", "directory": "experts",
                     "url": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt"}
    close_dialogs(page)
    page.execute_script("app.graph.clear()")
    page.execute_script("window.__uacCopied = [];"
                        "navigator.clipboard.writeText = t => { window.__uacCopied.push(t); return Promise.resolve(); };")
    load_graph(page, ui)
    if reports_in_dialogs(page, "missing models"):
        shown = wait_for(page, "return Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))"
                               ".map(d => d.innerText).find(t => /missing models/i.test(t)) || null", 15,
                         "the missing-models dialog")
        assert "experts / 64x64_diffusion.pt" in shown, shown
        # This frontend downloads in the browser only from Hugging Face and Civitai, so it shows the link as text.
        assert model["url"] in shown, shown
        screenshot(page, "missing_models")
        close_dialogs(page)
        return
    # Newer frontends list missing models in the Issues panel, each with a button that copies its link.
    open_issues(page)
    button = wait_for(page, "return Array.from(document.querySelectorAll('button')).find(b => "
                            "/copy url/i.test(b.getAttribute('aria-label') || '') && "
                            "b.parentElement.innerText.trim().startsWith('64x64_diffusion.pt')) || null", 20,
                      "64x64_diffusion.pt with its link button in the missing-models list")
    panel = page.execute_script("return document.body.innerText")
    assert "Missing Models" in panel and "64x64_diffusion.pt\nexperts" in panel, panel[-800:]
    button.click()
    wait_for(page, "return window.__uacCopied.length ? true : null", 10, "the link to be copied")
    assert page.execute_script("return window.__uacCopied") == [model["url"]]
    screenshot(page, "missing_models")


# --- (d) the screenshots are there ---------------------------------------------------------------

def test_screenshots_are_saved_as_artifacts(page):
    from PIL import Image

    shots = [artifact(page, p.stem) for p in WORKFLOWS] + [artifact(page, "search_added_nodes")]
    for shot in shots:
        assert shot.is_file(), f"{shot} was not written"
        img = Image.open(shot).convert("L")
        assert img.size == tuple(page.execute_script("return [window.innerWidth, window.innerHeight]"))
        lo, hi = img.getextrema()
        assert hi - lo > 64, f"{shot} is blank"

"""Install tier: the pack installed the way users install it, by ComfyUI-Manager's own CLI.

``cm-cli install file://localhost/<clone>`` (PyPI ``comfyui-manager``, installed by tools/setup_env.sh
into .cache/cm-venv for ComfyUI 0.3.75, and the ``comfyui_manager==4.2.2`` that 0.33.0 pins into
.cache/cm-venv-0.33.0) clones the repository into a fresh copy of ComfyUI under the repository's name,
``unite-and-conquer``, and pip-installs requirements.txt into cm-venv. That venv sees the ComfyUI venv's
packages through a .pth file, so every requirement is already satisfied there and the shared venv is
never written to; pip runs with no index, so a requirement that is not satisfied fails the install
instead of downloading. Then a ComfyUI server on the copy, run by cm-venv's Python, must list every
node of the pack in /object_info.

cm-cli exits 0 even when an install fails, so the tests read what it printed and what it left on disk.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import COMFY, ComfyServer  # noqa: E402


def comfyui_version() -> str:
    return re.search(r'__version__\s*=\s*"([^"]+)"', (COMFY / "comfyui_version.py").read_text()).group(1)


# One cm-venv per ComfyUI (tools/setup_env.sh): 0.3.75 pins no Manager and gets the newest; 0.33.0 gets
# the comfyui_manager its manager_requirements.txt pins, over its own venv.
CM_VENV = REPO / ".cache" / ("cm-venv" if comfyui_version() == "0.3.75" else f"cm-venv-{comfyui_version()}")
CM_CLI = CM_VENV / "bin" / "cm-cli"
CLONE_NAME = "unite-and-conquer"

pytestmark = pytest.mark.skipif(
    not CM_CLI.exists(),
    reason=f"ComfyUI-Manager's CLI is not installed at {CM_CLI}: run tools/setup_env.sh (it installs "
           "comfyui-manager from PyPI into .cache/cm-venv)")


def pack_node_ids() -> set[str]:
    """Every node the pack's sources declare (each node class is named by its node id)."""
    return {m for f in (REPO / "nodes").glob("*.py")
            for m in re.findall(r"^class (\w+)\(io\.ComfyNode\):", f.read_text(), re.M)}


def fresh_comfyui(dest: Path) -> Path:
    """A copy of the test ComfyUI without the pack, its outputs or its user data."""
    # Only the top-level data folders: 0.33's comfy_api has a package named "input" of its own.
    top = {"output", "input", "user", "temp"}
    shutil.copytree(COMFY, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                             or (Path(d) == COMFY and n in top)
                                             or (Path(d).name == "custom_nodes" and n == "unite_and_conquer")])
    # The Manager reads its settings here: pip (which sees the shared venv's packages) rather than uv
    # (which does not), and no network.
    manager = dest / "user" / "__manager"
    manager.mkdir(parents=True)
    (manager / "config.ini").write_text("[default]\nuse_uv = False\nnetwork_mode = offline\nfile_logging = False\n")
    return dest


def cm_cli_install(comfy: Path, url: str, tmp: Path) -> str:
    empty = tmp / "no-wheels"
    empty.mkdir(exist_ok=True)
    blackhole = "http://127.0.0.1:9"
    # COLUMNS: cm-cli prints through rich, which wraps long lines (the URL) at 80 columns without a terminal.
    env = dict(os.environ, COMFYUI_PATH=str(comfy), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty),
               PIP_DISABLE_PIP_VERSION_CHECK="1", UV_OFFLINE="1", COLUMNS="400", TQDM_DISABLE="1", HTTP_PROXY=blackhole, HTTPS_PROXY=blackhole,
               http_proxy=blackhole, https_proxy=blackhole, NO_PROXY="", no_proxy="")
    run = subprocess.run([str(CM_CLI), "install", "--mode", "local", url], cwd=comfy, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"cm-cli exited {run.returncode} (it exits 0 even on failure):\n{run.stdout[-3000:]}"
    return run.stdout + run.stderr


def install_problems(out: str, url: str, requirements: list[str]) -> list[str]:
    """What went wrong in a cm-cli install, read from its output (its exit code is always 0)."""
    problems = []
    if f"[INSTALLED] {url}" not in out:
        problems.append(f"no '[INSTALLED] {url}' line")
    if "An error occurred while installing" in out:
        problems.append("cm-cli reported an error")
    for line in out.splitlines():
        if re.match(r"^ERROR: (Could not|No matching|ResolutionImpossible|Cannot install)", line):
            problems.append(f"pip: {line}")
    for req in requirements:
        ran = re.search(rf"'install', '{re.escape(req)}'\]", out) or f"skip black listed pip installation: '{req}'" in out
        if not ran:
            problems.append(f"requirement {req!r} was not installed")
    return problems


def requirement_lines() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [l.split("#", 1)[0].strip() for l in lines if l.split("#", 1)[0].strip()]


def test_cm_cli_installs_the_pack_and_every_node_loads(tmp_path):
    src = tmp_path / "src" / CLONE_NAME
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(src)], check=True, timeout=120)
    comfy = fresh_comfyui(tmp_path / "ComfyUI")
    url = f"file://localhost{src}"

    out = cm_cli_install(comfy, url, tmp_path)
    problems = install_problems(out, url, requirement_lines())
    assert not problems, f"{problems}\n{out[-4000:]}"
    assert "Successfully installed" not in out, f"pip installed something into cm-venv:\n{out[-4000:]}"
    pack = comfy / "custom_nodes" / CLONE_NAME
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=pack, capture_output=True, text=True).stdout == head
    assert not (comfy / "custom_nodes" / "unite_and_conquer").exists()

    info, log = ComfyServer(tmp_path / "run", python=str(CM_VENV / "bin" / "python"), comfy_dir=comfy,
                            pack_name=CLONE_NAME).object_info_and_log()
    assert re.search(rf"\d+\.\d+ seconds: {re.escape(str(pack))}\s*$", log, re.M), \
        f"ComfyUI did not import {pack}:\n{log[-3000:]}"
    ours = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{CLONE_NAME}"}
    expected = pack_node_ids()
    assert len(expected) >= 20 and ours == expected, (sorted(expected - ours), sorted(ours - expected))


def test_a_failed_install_is_caught_although_cm_cli_exits_0(tmp_path):
    comfy = fresh_comfyui(tmp_path / "ComfyUI")
    url = f"file://localhost{tmp_path / 'missing' / CLONE_NAME}"
    out = cm_cli_install(comfy, url, tmp_path)   # asserts the exit code 0 itself
    problems = install_problems(out, url, requirement_lines())
    assert f"no '[INSTALLED] {url}' line" in problems and "cm-cli reported an error" in problems, out[-3000:]
    assert not (comfy / "custom_nodes" / CLONE_NAME).exists()

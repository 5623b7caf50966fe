"""Distribution: the Comfy Registry accepts pyproject.toml, requirements.txt mirrors it, and a git clone
of the repository installs into a fresh ComfyUI the way ComfyUI-Manager does it.

The Registry check runs comfy-cli's own validator (``comfy node validate``, offline) and its pyproject
parser, then the rules the Registry enforces on what that parser extracts.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import COMFY, ComfyServer  # noqa: E402

PYPROJECT = REPO / "pyproject.toml"
# The folder name ComfyUI-Manager gives the clone: the repository's name in its URL.
CLONE_NAME = "unite-and-conquer"
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


@pytest.fixture(scope="module")
def comfy_config():
    pytest.importorskip("comfy_cli", reason="comfy-cli is a test dependency: pip install -r requirements-test.txt")
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(PYPROJECT))
    assert config is not None, "comfy-cli could not parse pyproject.toml"
    return config


def requirement_set(lines) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = str(req.specifier) + (f";{req.marker}" if req.marker else "")
    return out


# --- the Comfy Registry ------------------------------------------------------------------------

def test_comfy_cli_validate_passes_without_warnings(tmp_path):
    pytest.importorskip("comfy_cli", reason="comfy-cli is a test dependency: pip install -r requirements-test.txt")
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path), NO_COLOR="1", TERM="dumb")
    res = subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "All validation checks passed" in out, out
    assert "Warning" not in out and "Security warnings" not in out, out


def test_registry_project_fields(comfy_config):
    from comfy_cli.registry.config_parser import normalize_project_name, sanitize_node_name
    from packaging.requirements import Requirement

    p = comfy_config.project
    assert p.name and normalize_project_name(p.name) == p.name, f"not a valid registry name: {p.name!r}"
    assert "comfy" not in p.name.lower() and sanitize_node_name(p.name) == p.name, \
        f"the Registry strips ComfyUI from node names: {p.name!r}"
    assert SEMVER.match(p.version), f"version {p.version!r} is not major.minor.patch"
    assert len(p.description) >= 20
    assert (REPO / p.license.file).is_file() if p.license.file else p.license.text, "no license"
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / p.license.file).read_text()[:200]
    for dep in p.dependencies:
        Requirement(dep)  # raises on anything pip would not read
    assert re.match(r"^https://github\.com/[\w.-]+/[\w.-]+$", p.urls.repository), p.urls.repository
    assert p.urls.documentation.startswith("https://")
    assert p.supported_os == ["OS Independent"]


def test_registry_tool_comfy_fields(comfy_config):
    from comfy_cli.registry.config_parser import validate_version
    from packaging.specifiers import SpecifierSet

    c = comfy_config.tool_comfy
    assert re.match(r"^[a-z0-9][a-z0-9-]*$", c.publisher_id), f"PublisherId {c.publisher_id!r}"
    assert c.display_name.strip()
    assert re.match(r"^https://\S+\.(png|jpg|jpeg|svg|gif|webp)$", c.icon), f"Icon {c.icon!r}"
    requires = comfy_config.project.supported_comfyui_version
    assert requires and validate_version(requires, "requires-comfyui") == requires
    comfy_version = re.search(r'__version__\s*=\s*"([^"]+)"', (COMFY / "comfyui_version.py").read_text()).group(1)
    assert comfy_version in SpecifierSet(requires), f"ComfyUI {comfy_version} does not satisfy {requires}"


def test_registry_includes_are_in_the_repository(comfy_config):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for include in comfy_config.tool_comfy.includes:
        if include == "models_tiny" and not any(t.startswith("models_tiny/") for t in tracked):
            pytest.xfail("models_tiny/ (the tiny experts) is not committed yet")
        assert any(t == include or t.startswith(include.rstrip("/") + "/") for t in tracked), \
            f"[tool.comfy] includes {include!r}, which is not in the repository"


def test_requirements_txt_mirrors_project_dependencies():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    reqs = (REPO / "requirements.txt").read_text().splitlines()
    assert requirement_set(reqs) == requirement_set(deps)


# --- installing as ComfyUI-Manager does ----------------------------------------------------------

def test_git_clone_installs_into_a_fresh_comfyui(tmp_path):
    base = tmp_path / "base"
    pack = base / "custom_nodes" / CLONE_NAME
    pack.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(pack)], check=True, timeout=120)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=pack, capture_output=True, text=True).stdout == head

    # The Manager runs `pip install -r requirements.txt`; here everything is already in the venv.
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                          "-r", str(pack / "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    # A fresh ComfyUI: only base/ holds custom_nodes, models, user, input and output.
    info, log = ComfyServer(tmp_path / "run", python=sys.executable,
                            extra_args=("--base-directory", str(base))).object_info_and_log()
    # (ComfyUI's own optional extras, e.g. the audio nodes without torchaudio, may fail: not ours.)
    assert not [l for l in log.splitlines() if "IMPORT FAILED" in l and CLONE_NAME in l], log[-3000:]
    assert re.search(rf"\d+\.\d+ seconds: {re.escape(str(pack))}\s*$", log, re.M), \
        f"ComfyUI did not import {pack}:\n{log[-3000:]}"
    ours = {k: v for k, v in info.items() if v.get("python_module") == f"custom_nodes.{CLONE_NAME}"}
    assert {"PoEExpertLoader", "PoEBindClass", "PoEKSampler", "PoEImageGrid"} <= set(ours), sorted(ours)
    assert all(v["category"].startswith("unite_and_conquer/") for v in ours.values())
    # The only copy of the pack is the clone: the work tree's own link into .cache/ComfyUI is not loaded.
    assert not [k for k, v in info.items() if v.get("python_module") == "custom_nodes.unite_and_conquer"]
    assert (base / "models" / "experts").is_dir(), "the pack did not create models/experts on start"

"""Shared test set-up.

Tests import the pack as the package ``unite_and_conquer`` (``from unite_and_conquer.samplers import
poe``), which the pack's ``__init__.py`` registers from this checkout; when ComfyUI later loads the
pack from ``custom_nodes``, it hands over to that same package, so every module exists once. The
repository folder never goes on ``sys.path``; ComfyUI's root does, for ``comfy`` and its peers.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("UAC_COMFYUI", REPO / ".cache" / "ComfyUI"))
FIXTURES = Path(os.environ.get("UAC_FIXTURES", REPO.parent / "shared" / "fixtures"))

if COMFY.is_dir() and str(COMFY) not in sys.path:
    sys.path.insert(0, str(COMFY))
    # ComfyUI picks its device when comfy.model_management is first imported, whichever test does it.
    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()

runpy.run_path(str(REPO / "__init__.py"))  # registers the package unite_and_conquer


def comfyui_version() -> str:
    """The version of the ComfyUI under test (UAC_COMFYUI; tools/test.sh runs 0.3.75, then 0.33.0)."""
    try:
        text = (COMFY / "comfyui_version.py").read_text()
    except OSError:
        return "none"
    return text.split("__version__", 1)[1].split('"')[1]


def pytest_report_header(config):
    return f"ComfyUI {comfyui_version()} at {COMFY}, Python {sys.executable}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_sep("-", f"these tests ran on ComfyUI {comfyui_version()} ({COMFY})")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"parity fixtures not found at {FIXTURES} (set UAC_FIXTURES to their folder)")
    return FIXTURES

"""Shared test set-up.

The pack's pure packages (``samplers``, ``model_loaders``) are imported as top-level packages with
the repository root appended to ``sys.path``. ComfyUI's root goes first, so that its ``nodes``
module is never shadowed by the pack's ``nodes/`` folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("UAC_COMFYUI", REPO / ".cache" / "ComfyUI"))
FIXTURES = Path(os.environ.get("UAC_FIXTURES", REPO.parent / "shared" / "fixtures"))

if COMFY.is_dir() and str(COMFY) not in sys.path:
    sys.path.insert(0, str(COMFY))
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))

# ComfyUI's nodes.py puts comfy/ (which holds a samplers.py) first on sys.path: bind the pack's
# pure packages to their names before any test starts ComfyUI.
import model_loaders  # noqa: E402,F401
import samplers  # noqa: E402,F401


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"parity fixtures not found at {FIXTURES} (set UAC_FIXTURES to their folder)")
    return FIXTURES

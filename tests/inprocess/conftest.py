"""Tier (b) runs with ComfyUI started in this process and the pack loaded the way ComfyUI loads it."""
import pytest

from support.comfy_harness import comfy_nodes


@pytest.fixture(scope="session", autouse=True)
def comfyui():
    return comfy_nodes()

"""The tests, the scripts and ComfyUI share one copy of every pack module, under ``unite_and_conquer``."""
import sys

from unite_and_conquer.nodes import sampling
from unite_and_conquer.samplers import poe


def test_comfyui_loads_the_same_modules_the_tests_import(comfyui):
    assert comfyui.NODE_CLASS_MAPPINGS["PoEKSampler"] is sampling.PoEKSampler
    copies = [name for name, m in list(sys.modules.items())
              if name.endswith(".samplers.poe") or getattr(m, "__file__", None) == poe.__file__]
    assert copies == ["unite_and_conquer.samplers.poe"]
    assert "samplers" not in sys.modules or not sys.modules["samplers"].__file__.startswith(str(poe.__file__)[:-15])

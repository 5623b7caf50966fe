"""Helpers for the reliability tests: small tiny-family checkpoints, a real server that lists them,
prompts over them, and a seeded generator of malformed prompts.

The experts here are untrained tiny-family networks (``model_loaders.tiny``) at reduced widths,
with fixed random weights: they sample deterministic (meaningless) images fast on a CPU, which is
all that interruption, determinism, memory and fuzz tests need. They never depend on the shipped
``models_tiny/`` files, which are trained separately.
"""
from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))

from comfy_client import ComfyServer  # noqa: E402

SMALL_WIDTHS = [8, 16, 16]
MODALITIES = ("class", "colour", "layout")


def expert_file(modality: str) -> str:
    return f"uac_test_{modality}.safetensors"


def tiny_state(modality: str, widths=SMALL_WIDTHS, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and metadata of a tiny-family expert with fixed random weights."""
    from unite_and_conquer.model_loaders import tiny

    config = tiny.default_config(modality)
    config["widths"] = list(widths)
    torch.manual_seed(seed)
    net = tiny.network_from_config(config)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    return sd, tiny.metadata_for(config)


def write_tiny(path: Path, modality: str, widths=SMALL_WIDTHS, seed: int = 0,
               edit=None) -> Path:
    """Save a tiny expert as safetensors; ``edit(sd, meta)`` may change it first (bad files)."""
    from safetensors.torch import save_file

    sd, meta = tiny_state(modality, widths, seed)
    if edit is not None:
        edit(sd, meta)
    save_file(sd, str(path), metadata=meta)
    return path


def write_experts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(MODALITIES):
        write_tiny(folder / expert_file(m), m, seed=i)
    return folder


def start_server(workdir: Path, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """A real ComfyUI (CPU, 127.0.0.1, free port) whose ``experts`` folder lists the test experts."""
    experts = write_experts(workdir / "experts")
    config = workdir / "extra_model_paths.yaml"
    config.write_text(f"uac_tests:\n  experts: {experts}\n")
    server = ComfyServer(workdir / "comfy", python=sys.executable,
                         extra_args=("--extra-model-paths-config", str(config), *extra_args))
    return server.start(timeout=240)


# --- prompts -------------------------------------------------------------------------------------

def product_prompt(seed: int = 1, steps: int = 4, batch: int = 1, digit: int = 3, colour: str = "red",
                   sampler: str = "euler", scheduler: str = "karras", prefix: str = "uac_test") -> dict:
    """Three tiny experts (class, colour, layout) bound in a chain and sampled into a saved PNG."""
    def loader(m):
        return {"class_type": "PoEExpertLoader",
                "inputs": {"expert_name": expert_file(m), "family": "auto", "dtype": "fp32", "schedule": "published"}}

    return {
        "1": loader("class"), "2": loader("colour"), "3": loader("layout"),
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 12, "height": 16}},
        "6": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["5", 0], "x": 10,
                                                        "y": 8, "operation": "add"}},
        "7": {"class_type": "PoEBindClass", "inputs": {"expert": ["1", 0], "class": str(digit), "class_index": -1,
                                                       "weight": 1.0, "reliability": 1.0, "null": "trained",
                                                       "null_k": 8}},
        "8": {"class_type": "PoEBindText", "inputs": {"expert": ["2", 0], "text": colour, "weight": 1.0,
                                                      "reliability": 1.0, "experts": ["7", 0]}},
        "9": {"class_type": "PoEBindSegmentation", "inputs": {"expert": ["3", 0], "source": "mask", "slot": "auto",
                                                              "weight": 1.0, "reliability": 1.0, "map_mask": ["6", 0],
                                                              "label_colour": "#ffffff", "experts": ["8", 0]}},
        "10": {"class_type": "PoEKSampler", "inputs": {"experts": ["9", 0], "seed": seed, "steps": steps,
                                                       "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0,
                                                       "width": 0, "height": 0, "batch_size": batch}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 1], "filename_prefix": prefix}},
    }


SAMPLER_ID = "10"


def pixels(server: ComfyServer, entry: dict) -> list[bytes]:
    """The decoded RGB pixels of every image a finished prompt saved (PNG metadata ignored)."""
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB").tobytes() for _, data in server.images(entry)]


def cached_nodes(entry: dict) -> set[str]:
    """Nodes a finished prompt took from ComfyUI's cache instead of running them."""
    out: set[str] = set()
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            out |= set(data.get("nodes", []))
    return out


def free_cache(server: ComfyServer) -> None:
    """Ask ComfyUI to drop its output cache (and unload models) before the next prompt, so it
    recomputes every node instead of returning cached outputs. (0.33's RAM-pressure cache keeps the
    outputs of every earlier prompt; 0.3.75's classic cache only the last prompt's.)"""
    server.request("/free", {"unload_models": True, "free_memory": True})
    # The prompt worker applies the flags when it wakes (at once, it is notified); a prompt queued in
    # the same instant could be taken first.
    time.sleep(0.5)


def wait_end(server: ComfyServer, prompt_id: str, timeout: float) -> dict:
    """The history entry of a prompt once it ended (success, error or interrupted); never raises
    on an execution error, and never waits past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.history(prompt_id)
        if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        if not server.alive():
            raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{server.log_tail()}")
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not end within {timeout:.0f}s")


def status_kinds(entry: dict) -> list[str]:
    return [kind for kind, _ in entry.get("status", {}).get("messages", [])]


# --- fuzzing -------------------------------------------------------------------------------------

# Values that are wrong for most widgets: wrong types, non-finite numbers, sizes past any bound.
NASTY = [None, "", "abc", "1e309", [], {}, [1, 2, 3], True, -1, -10**30, 10**30, 2**64, 1e308, -1e308,
         float("nan"), float("inf"), float("-inf"), 0.5, "\x00", "x" * 10000, {"samples": 1}]


def _widget_inputs(prompt: dict) -> list[tuple[str, str]]:
    return [(nid, name) for nid, node in prompt.items() for name, v in node["inputs"].items()
            if not isinstance(v, list)]


def _link_inputs(prompt: dict) -> list[tuple[str, str]]:
    return [(nid, name) for nid, node in prompt.items() for name, v in node["inputs"].items()
            if isinstance(v, list)]


def _past_bounds(spec: dict, rng: random.Random):
    """A number just or far outside the schema's [min, max]."""
    lo, hi = spec.get("min"), spec.get("max")
    choices = []
    if hi is not None:
        choices += [hi + (spec.get("step", 1) or 1), hi * 10 + 1, hi + 1e9]
    if lo is not None:
        choices += [lo - (spec.get("step", 1) or 1), lo - 1e9]
    return rng.choice(choices) if choices else rng.choice(NASTY)


class PromptFuzzer:
    """Seeded mutations of a valid prompt. Every mutation must be refused by validation or fail
    cleanly at execution; none may hang (values that pass validation stay small).

    Args:
        base (`dict`): a valid API prompt.
        object_info (`dict`): the server's ``/object_info`` (for each widget's bounds).
        seed (`int`): the RNG seed; the same seed gives the same prompts.
    """

    KINDS = ("widget_nasty", "widget_past_bounds", "widget_extreme_valid", "link_missing", "link_missing_node",
             "link_bad_index", "link_wrong_type", "link_malformed", "unknown_class", "empty_experts",
             "drop_node", "inputs_not_dict", "huge_work", "combo_bad")

    def __init__(self, base: dict, object_info: dict, seed: int = 0):
        self.base = base
        self.info = object_info
        self.rng = random.Random(seed)

    def spec(self, class_type: str, name: str) -> tuple[str, dict]:
        node = self.info.get(class_type, {})
        for group in ("required", "optional"):
            entry = node.get("input", {}).get(group, {}).get(name)
            if entry is not None:
                kind = entry[0]
                return (kind if isinstance(kind, str) else "COMBO"), (entry[1] if len(entry) > 1 else {})
        return "?", {}

    def __iter__(self):
        while True:
            kind = self.rng.choice(self.KINDS)
            yield kind, getattr(self, kind)(copy.deepcopy(self.base))

    # Each mutation returns a prompt (or, for the raw kinds, any JSON value to post as "prompt").

    def widget_nasty(self, p):
        for _ in range(self.rng.randint(1, 3)):
            nid, name = self.rng.choice(_widget_inputs(p))
            p[nid]["inputs"][name] = self.rng.choice(NASTY)
        return p

    def widget_past_bounds(self, p):
        numeric = [(n, k) for n, k in _widget_inputs(p)
                   if self.spec(p[n]["class_type"], k)[0] in ("INT", "FLOAT")]
        nid, name = self.rng.choice(numeric)
        p[nid]["inputs"][name] = _past_bounds(self.spec(p[nid]["class_type"], name)[1], self.rng)
        return p

    def widget_extreme_valid(self, p):
        """In-bounds but extreme values of the cheap widgets (weights, reliabilities, seeds, masks)."""
        nid, name = self.rng.choice([(n, k) for n, k in _widget_inputs(p)
                                     if k in ("weight", "reliability", "seed", "class_index", "null_k", "value",
                                              "x", "y")])
        kind, spec = self.spec(p[nid]["class_type"], name)
        lo, hi = spec.get("min", 0), spec.get("max", 1)
        p[nid]["inputs"][name] = self.rng.choice([lo, hi]) if kind in ("INT", "FLOAT") else lo
        p[SAMPLER_ID]["inputs"]["steps"] = 1
        return p

    def link_missing(self, p):
        nid, name = self.rng.choice(_link_inputs(p))
        del p[nid]["inputs"][name]
        return p

    def link_missing_node(self, p):
        nid, name = self.rng.choice(_link_inputs(p))
        p[nid]["inputs"][name] = [str(self.rng.randint(100, 10**6)), 0]
        return p

    def link_bad_index(self, p):
        nid, name = self.rng.choice(_link_inputs(p))
        p[nid]["inputs"][name][1] = self.rng.choice([-1, 3, 7, 99, 2**40])
        return p

    def link_wrong_type(self, p):
        """Link an input to an output of another type (an IMAGE where an expert goes, and so on)."""
        nid, name = self.rng.choice(_link_inputs(p))
        current = tuple(p[nid]["inputs"][name])
        targets = [t for t in [("10", 1), ("10", 2), ("1", 0), ("4", 0), ("9", 0), ("10", 0)] if t != current]
        target = self.rng.choice(targets)
        p[nid]["inputs"][name] = [target[0], target[1]]
        return p

    def link_malformed(self, p):
        nid, name = self.rng.choice(_link_inputs(p))
        p[nid]["inputs"][name] = self.rng.choice([["1"], ["1", 0, 0], [None, 0], ["1", "zero"], [1.5, 0], [[], 0]])
        return p

    def unknown_class(self, p):
        nid = self.rng.choice(list(p))
        p[nid]["class_type"] = self.rng.choice(["NoSuchNode", "", "PoEKSamplerX", "poekSampler"])
        return p

    def empty_experts(self, p):
        """A sampler fed by a sweep over no values, or by a chain index that does not exist."""
        p["20"] = {"class_type": "PoEReliabilitySweep",
                   "inputs": {"experts": ["9", 0], "index": self.rng.choice([-1, 5, -7]), "field": "weight",
                              "values": self.rng.choice(["", ",", "a, b", "nan", "-1", "1e400"])}}
        p[SAMPLER_ID]["inputs"]["experts"] = ["20", 0]
        p[SAMPLER_ID]["inputs"]["steps"] = 1
        return p

    def drop_node(self, p):
        del p[self.rng.choice([k for k in p if k != "11"])]
        return p

    def inputs_not_dict(self, p):
        nid = self.rng.choice(list(p))
        choice = self.rng.randrange(3)
        if choice == 0:
            p[nid]["inputs"] = self.rng.choice([None, [], "x", 3])
        elif choice == 1:
            del p[nid]["class_type"]
        else:
            p[nid] = self.rng.choice([None, [], "node", 0])
        return p

    def huge_work(self, p):
        """Steps or batch past the schema's max (refused by validation, never run)."""
        s = p[SAMPLER_ID]["inputs"]
        name = self.rng.choice(["steps", "batch_size", "width", "height"])
        spec = self.spec("PoEKSampler", name)[1]
        s[name] = spec.get("max", 10**6) + self.rng.choice([1, 10**6, 2**62])
        return p

    def combo_bad(self, p):
        nid, name = self.rng.choice([(n, k) for n, k in _widget_inputs(p)
                                     if self.spec(p[n]["class_type"], k)[0] == "COMBO"])
        p[nid]["inputs"][name] = self.rng.choice(["", "no_such_value", "../../etc/passwd", "x" * 300, 7])
        return p


def finite_json(value) -> bool:
    """Whether a value serialises as strict JSON (no NaN or Infinity literals)."""
    try:
        json.dumps(value, allow_nan=False)
        return True
    except ValueError:
        return False


def is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)

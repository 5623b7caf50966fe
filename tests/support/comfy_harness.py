"""Tier (b): ComfyUI in this process, with the pack loaded the way ComfyUI loads custom nodes."""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

_STATE: dict = {}


class RecordingServer:
    """What PromptExecutor needs from a server: it records the messages instead of sending them."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def comfy_nodes():
    """Initialise ComfyUI once (CPU) and return its ``nodes`` module with the pack loaded."""
    if "nodes" not in _STATE:
        import torch
        from comfy.cli_args import args

        args.cpu = args.cpu or not torch.cuda.is_available()
        import comfy.model_management  # noqa: F401  (device set-up before the nodes)
        # nodes.py puts comfy/ (with a utils.py) first on sys.path; main.py imports ComfyUI's own
        # utils package before that, and so must we, or comfy_extras/nodes_images.py fails.
        import utils.install_util  # noqa: F401
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if "PoEKSampler" not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("IMPORT FAILED: the unite_and_conquer pack did not register its nodes")
        _STATE["nodes"] = nodes
    return _STATE["nodes"]


class PromptFailed(Exception):
    def __init__(self, kind: str, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def run_prompt(prompt: dict, executor=None):
    """Validate and execute an API-format prompt; returns (executor, history_result)."""
    comfy_nodes()
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise PromptFailed("validation", {"error": valid[1], "node_errors": valid[3]})
    if executor is None:
        # main.py's keys: 0.33's PromptExecutor.execute reads cache_args["ram"] and ["ram_inactive"] (the
        # RAM-pressure cache's headrooms) whatever the cache type; 0.3.75 reads neither. The classic cache
        # (cache_type=False) keeps each prompt's outputs until the next prompt, on both.
        executor = execution.PromptExecutor(RecordingServer(), cache_type=False,
                                            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, prompt_id, {}, valid[2])
    if not executor.success:
        errors = [d for e, d in executor.status_messages if e == "execution_error"]
        raise PromptFailed("execution", errors[0] if errors else executor.status_messages)
    return executor, executor.history_result


def api_workflow(name: str, changes: dict[str, dict] | None = None) -> dict:
    """The shipped API-format workflow ``example_workflows/api/<name>``, with ``changes`` ({node id: {input:
    value}}) applied."""
    wf = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / "api" / name).read_text())
    for node, inputs in (changes or {}).items():
        wf[node]["inputs"].update(inputs)
    return wf

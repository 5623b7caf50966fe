"""The class picker of PoEBindClass: the connected expert's own labels, offered and checked.

An expert's labels are ``"k: name"`` for named classes (ADM's ImageNet names) and plain ``"k"`` where
the name is the index (the tiny digit expert, unnamed class-conditional UNets). The web extension
(web/js/unite_and_conquer.js) asks GET /unite_and_conquer/class_labels for the labels of the file a
loader names, and the binding node refuses a label that its expert does not have.
"""
from __future__ import annotations

import asyncio
import functools
import os

from .. import model_loaders
from ..model_loaders import labels as labels_lib
from .common import log

ROUTE = "/unite_and_conquer/class_labels"


def label(index: int, name: str) -> str:
    return str(index) if name in ("", str(index)) else f"{index}: {name}"


def labels(names) -> list[str]:
    return [label(i, n) for i, n in enumerate(names or [])]


def expert_labels(expert) -> list[str]:
    """The picker's entries for a loaded expert (empty when it takes no class)."""
    return labels(expert.class_names) if "class" in expert.encoders else []


def resolve(node: str, expert, choice: str, class_index: int) -> int:
    """The class index the picker (and class_index, when set) stand for, checked against the expert."""
    options = expert_labels(expert)
    if not options:
        raise ValueError(f"{node}: input 'expert': {expert.name} takes no class label; bind it with the node "
                         "of its own modality (PoEBindText, PoEBindSegmentation, ...)")
    if choice not in options:
        shown = ", ".join(options[:10]) + (", ..." if len(options) > 10 else "")
        raise ValueError(f"{node}: input 'class': {str(choice)[:80]!r} is not a class of {expert.name}, whose "
                         f"{len(options)} classes are: {shown}. Pick one of them (the picker lists the connected "
                         "expert's own classes)")
    index = options.index(choice)
    if class_index >= 0 and class_index != index:
        raise ValueError(f"{node}: input 'class_index' is {class_index} but the picker says {choice!r} (class "
                         f"{index}); set class_index to -1 to use the picker, or pick {options[class_index]!r}"
                         if class_index < len(options) else
                         f"{node}: input 'class_index' is {class_index} but {expert.name} has {len(options)} "
                         "classes; set class_index to -1 to use the picker")
    return index


def check_ranges(schema, values: dict) -> bool | str:
    """ComfyUI's min/max check of a node's numeric inputs: True, or the message of the first violation."""
    for spec in schema.inputs:
        value, lo, hi = values.get(spec.id), getattr(spec, "min", None), getattr(spec, "max", None)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if lo is not None and value < lo:
            return f"{schema.node_id}: input '{spec.id}' is {value}, below its minimum {lo}"
        if hi is not None and value > hi:
            return f"{schema.node_id}: input '{spec.id}' is {value}, above its maximum {hi}"
    return True


@functools.lru_cache(maxsize=64)
def _labels_of_file(path: str, mtime: float, family: str) -> tuple[str, ...]:
    return tuple(labels(labels_lib.class_names(path, family)))


def labels_of_file(expert_name: str, family: str = "auto") -> list[str]:
    """The labels the expert in models/experts named ``expert_name`` would offer once loaded."""
    from .loaders import expert_path

    path = expert_path(expert_name)
    return list(_labels_of_file(path, os.path.getmtime(path), family))


def register_routes() -> None:
    """GET /unite_and_conquer/class_labels?expert_name=...&family=... -> {"labels": [...]}, or 400 with the reason."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # the pack imported outside a ComfyUI server (tests, scripts)
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get(ROUTE)
    async def class_labels(request):
        name = request.query.get("expert_name", "")
        family = request.query.get("family", "auto")
        if family not in model_loaders.FAMILIES:
            return web.json_response({"error": f"unknown family {family!r}"}, status=400)
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, labels_of_file, name, family)
        except (ValueError, KeyError, OSError) as err:
            log.info("class labels of %s: %s", name, err)
            return web.json_response({"error": str(err)}, status=400)
        return web.json_response({"expert_name": name, "labels": found})

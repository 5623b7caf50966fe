"""unite-and-conquer: product-of-experts sampling with pixel-space diffusion models, for ComfyUI.

ComfyUI imports this file as the pack's entry point. It registers the ``models/experts`` folder
(plus the pack's shipped tiny experts), returns the nodes through ``comfy_entrypoint``, serves the web
extension in ``web/js`` (``WEB_DIRECTORY``: node summaries, the class picker) and its route.
"""
import os

import folder_paths

EXPERT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _register_expert_folders() -> None:
    experts_dir = os.path.join(folder_paths.models_dir, "experts")
    paths, exts = folder_paths.folder_names_and_paths.get("experts", ([], set()))
    for p in (experts_dir, os.path.join(PACK_DIR, "models_tiny")):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths["experts"] = (paths, set(exts) | EXPERT_EXTENSIONS)
    os.makedirs(experts_dir, exist_ok=True)


_register_expert_folders()

from .nodes import UniteAndConquerExtension  # noqa: E402  (needs the folder registered first)
from .nodes import class_picker  # noqa: E402

WEB_DIRECTORY = "./web"
class_picker.register_routes()


async def comfy_entrypoint() -> UniteAndConquerExtension:
    return UniteAndConquerExtension()

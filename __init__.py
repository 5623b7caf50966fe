"""unite-and-conquer: product-of-experts sampling with pixel-space diffusion models, for ComfyUI.

ComfyUI imports this file as the pack's entry point, under a module name made from the folder's
path. The pack's modules live under one package name, ``unite_and_conquer``, whoever imports them
first (ComfyUI, the tests, a benchmark script), so each module is loaded once. Run under any other
name (ComfyUI's, or ``runpy.run_path`` from a script), this file registers that package and hands
over to it. Importing the package runs no ComfyUI code; ``comfy_entrypoint`` registers the
``models/experts`` folder (plus the pack's shipped tiny experts) and returns the nodes.
"""
import importlib.util
import os
import sys

PACKAGE = "unite_and_conquer"
EXPERT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _register_expert_folders() -> None:
    import folder_paths

    experts_dir = os.path.join(folder_paths.models_dir, "experts")
    paths, exts = folder_paths.folder_names_and_paths.get("experts", ([], set()))
    for p in (experts_dir, os.path.join(PACK_DIR, "models_tiny")):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths["experts"] = (paths, set(exts) | EXPERT_EXTENSIONS)
    os.makedirs(experts_dir, exist_ok=True)


async def comfy_entrypoint():
    _register_expert_folders()
    from .nodes import UniteAndConquerExtension  # the node schemas list the registered folder

    return UniteAndConquerExtension()


def _the_package():
    """The package ``unite_and_conquer`` from this folder, registered on first use."""
    package = sys.modules.get(PACKAGE)
    if package is None:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(PACK_DIR, "__init__.py"),
                                                      submodule_search_locations=[PACK_DIR])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    elif os.path.realpath(package.__path__[0]) != os.path.realpath(PACK_DIR):
        raise ImportError(f"another copy of {PACKAGE} is already loaded from {package.__path__[0]}; remove one of "
                          f"the two from custom_nodes (this one is {PACK_DIR})")
    return package


if __name__ != PACKAGE:
    comfy_entrypoint = _the_package().comfy_entrypoint  # noqa: F811  (one copy of every module)

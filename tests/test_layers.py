"""The layers of docs/architecture.md, read from every module's imports with ``ast``: the pure core, the
loaders and the condition operators import nothing from ComfyUI, no layer imports one above it, and the
ComfyUI glue uses only the ComfyUI names its package docstring lists."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "unite_and_conquer"
# ComfyUI's top-level modules (0.3.75 and newer), so a pure module cannot reach ComfyUI under any of them.
COMFY_MODULES = {"comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras",
                 "folder_paths", "latent_preview", "node_helpers", "nodes", "execution", "server", "app", "utils",
                 "main", "protocol", "cuda_malloc", "new_updater", "comfyui_version", "middleware", "api_server",
                 "hook_breaker_ac10a0", "alembic_db"}
LAYERS = {  # layer: (pack modules it may import, whether it may import ComfyUI)
    "core": ({"samplers"}, False),
    "model_loaders": ({"model_loaders"}, False),
    "conditions": ({"conditions"}, False),
    "glue": ({"samplers", "samplers.comfy", "model_loaders", "conditions"}, True),
    "nodes": ({"nodes", "samplers", "samplers.comfy", "model_loaders", "conditions"}, True),
    "entry": ({"nodes"}, True),
}


def layer_of(module: str) -> str | None:
    if module == "":
        return "entry"
    top = module.split(".")[0]
    if module == "samplers.comfy" or module.startswith("samplers.comfy."):
        return "glue"
    if top == "samplers":
        return "core"
    return top if top in ("model_loaders", "conditions", "nodes") else None


def area_of(target: str) -> str:
    """The part of the pack a module path belongs to, in the names LAYERS uses."""
    return "samplers.comfy" if target == "samplers.comfy" or target.startswith("samplers.comfy.") else target.split(".")[0]


def pack_modules() -> dict[str, Path]:
    found = {"": REPO / "__init__.py"}
    for folder in ("samplers", "model_loaders", "conditions", "nodes"):
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[int, str, str]]:
    """(line, kind, target): kind is "pack" (target a module path inside the pack) or "outside"
    (target a top-level module name), for every import in the file, however deep."""
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = [p for p in package if p]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    out.append((node.lineno, "pack", name.removeprefix(PACKAGE).lstrip(".")))
                else:
                    out.append((node.lineno, "outside", name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = node.module or ""
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    base = name.removeprefix(PACKAGE).lstrip(".")
                    out += [(node.lineno, "pack", f"{base}.{a.name}".lstrip(".")) for a in node.names]
                else:
                    out.append((node.lineno, "outside", name.split(".")[0]))
                continue
            base = package[:len(package) - node.level + 1]
            if node.module:
                out.append((node.lineno, "pack", ".".join(base + node.module.split("."))))
            else:
                out += [(node.lineno, "pack", ".".join(base + [a.name])) for a in node.names]
    return out


def violations(modules: dict[str, Path] | None = None) -> list[str]:
    modules = pack_modules() if modules is None else modules
    found = []
    for module, path in modules.items():
        layer = layer_of(module)
        allowed, comfy_ok = LAYERS[layer]
        for line, kind, target in imports_of(module, path):
            where = f"{path.name}:{line}"
            if kind == "outside" and target in COMFY_MODULES and not comfy_ok:
                found.append(f"{where}: the {layer} layer imports ComfyUI's {target}")
            elif kind == "pack" and target and area_of(target) not in allowed:
                found.append(f"{where}: the {layer} layer imports {target}, a layer it may not use")
    return found


def test_every_import_respects_the_layers():
    assert violations() == []


@pytest.mark.parametrize("source, added, expected", [
    ("samplers/poe.py", "import comfy.samplers", "the core layer imports ComfyUI's comfy"),
    ("model_loaders/adm.py", "import folder_paths", "the model_loaders layer imports ComfyUI's folder_paths"),
    ("samplers/correctors.py", "from .comfy import intervals", "the core layer imports samplers.comfy"),
    ("samplers/comfy/guider.py", "from ...nodes import common", "the glue layer imports nodes"),
])
def test_the_check_catches_an_import_across_the_layers(tmp_path, source, added, expected):
    bad = tmp_path / Path(source).name
    bad.write_text((REPO / source).read_text(encoding="utf-8") + f"\n\ndef late():\n    {added}\n", encoding="utf-8")
    module = source.removesuffix(".py").replace("/", ".")
    assert [v.split(": ", 1)[1] for v in violations({module: bad})] == [expected + (
        "" if "ComfyUI" in expected else ", a layer it may not use")]


def test_the_check_resolves_relative_imports_to_pack_modules():
    got = {t for _, kind, t in imports_of("samplers.comfy.resampling", REPO / "samplers/comfy/resampling.py")
           if kind == "pack"}
    assert {"samplers.resampling", "samplers.correctors", "samplers.comfy.correctors",
            "samplers.comfy.intervals"} <= got
    assert area_of("samplers.comfy.intervals") == "samplers.comfy" and area_of("samplers.poe") == "samplers"


def comfy_names_used(path: Path) -> set[str]:
    """``module.Name`` for every ComfyUI module attribute the file reads (``comfy.samplers.KSAMPLER``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.split(".")[0] in COMFY_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in COMFY_MODULES:
            names |= {f"{node.module}.{a.name}" for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name):
                continue
            dotted = ".".join([cur.id, *reversed(chain)])
            owners = [m for m in imported if dotted.startswith(m + ".")]
            if owners:
                owner = max(owners, key=len)
                names.add(owner + "." + dotted[len(owner) + 1:].split(".")[0])
    return names


def test_the_glue_uses_only_the_comfyui_names_it_lists():
    listed = ast.get_docstring(ast.parse((REPO / "samplers/comfy/__init__.py").read_text(encoding="utf-8")))
    used = set()
    for path in sorted((REPO / "samplers/comfy").glob("*.py")):
        used |= comfy_names_used(path)
    assert "comfy.samplers.CFGGuider" in used   # the scan sees what the guider subclasses
    assert sorted(n for n in used if n not in listed) == []


def test_the_package_and_its_pure_layers_import_without_comfyui():
    """Registered from a script, the package and its pure layers load no ComfyUI module and leave the
    pack's folder off sys.path."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "import unite_and_conquer.samplers.validation, unite_and_conquer.samplers.describe, "
            "unite_and_conquer.model_loaders, unite_and_conquer.conditions.maps; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2].split(',')))); "
            "print(any(p.rstrip('/') == sys.argv[3] for p in sys.path))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "__init__.py"), ",".join(sorted(COMFY_MODULES)),
                          str(REPO)], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "False"]

"""The ComfyUI range in pyproject.toml (``[tool.comfy] requires-comfyui``), read by both of its readers.

- The frontend's Manager UI compares it with the running ComfyUI through node-semver: ``satisfies(clean(v)
  || v, range)`` (ComfyUI_frontend ``src/workbench/extensions/manager/utils/versionUtil.ts``). A range that
  node-semver cannot parse, such as ``">=0.3.75,<0.4.0"``, satisfies nothing, so the pack is shown with a
  version conflict on every ComfyUI.
- comfy-cli publishes it to the Registry as ``supported_comfyui_version``, after
  ``comfy_cli.registry.config_parser.validate_version``: comma-separated ``[op]X.Y.Z`` parts, or nothing
  is published.

Both readers run here for real: node-semver from the npm registry (tools/setup_env.sh installs it into
.cache/node_modules and Node runs it), comfy-cli from requirements-test.txt. ``range_problems`` is the
check; the bad ranges below prove that it fails for what either reader would reject.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
SEMVER = REPO / ".cache" / "node_modules" / "semver"
# The ComfyUIs the tiers run (0.3.75 and 0.33.0) and the newest whose sources docs/comfyui_api.md reads.
MUST_SATISFY = ("0.3.75", "0.33.0", "0.38.1")

# What the Manager UI does with the field, in node-semver's own words.
NODE_SCRIPT = """
const semver = require(process.argv[1]);
const [range, versions] = JSON.parse(process.argv[2]);
const out = {validRange: semver.validRange(range), satisfies: {}};
for (const v of versions) {
  try { out.satisfies[v] = semver.satisfies(semver.clean(v) || v, range); }
  catch (e) { out.satisfies[v] = 'throws: ' + e.message; }
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def node_semver():
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: node-semver (the frontend's reader of requires-comfyui) cannot run")
    if not (SEMVER / "package.json").is_file():
        pytest.skip(f"node-semver is not installed at {SEMVER}: run tools/setup_env.sh (npm install semver)")

    def check(spec: str, versions=MUST_SATISFY) -> dict:
        res = subprocess.run([node, "-e", NODE_SCRIPT, str(SEMVER), json.dumps([spec, list(versions)])],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    return check


@pytest.fixture(scope="module")
def comfy_cli_published(tmp_path_factory):
    """What comfy-cli's own parser would publish as supported_comfyui_version for a given range."""
    pytest.importorskip("comfy_cli", reason="comfy-cli is a test dependency: pip install -r requirements-test.txt")
    from comfy_cli.registry.config_parser import extract_node_configuration, validate_version

    folder = tmp_path_factory.mktemp("pyproject")
    original = PYPROJECT.read_text()
    current = tomllib.loads(original)["tool"]["comfy"]["requires-comfyui"]

    def published(spec: str) -> str:
        assert f'requires-comfyui = "{current}"' in original
        (folder / "pyproject.toml").write_text(original.replace(f'requires-comfyui = "{current}"',
                                                               f"requires-comfyui = {json.dumps(spec)}"))
        config = extract_node_configuration(str(folder / "pyproject.toml"))
        assert config is not None
        # The parser's answer and its validator's must agree: a rejected range publishes as "".
        assert validate_version(spec, "requires-comfyui") == config.project.supported_comfyui_version
        return config.project.supported_comfyui_version

    return published


def range_problems(spec: str, node_semver, comfy_cli_published) -> list[str]:
    """Why ``spec`` would not do as requires-comfyui (empty when it does)."""
    problems = []
    semver = node_semver(spec)
    if semver["validRange"] is None:
        problems.append("node-semver: not a valid range")
    for version, ok in semver["satisfies"].items():
        if ok is not True:
            problems.append(f"node-semver: {version} does not satisfy it ({ok})")
    if comfy_cli_published(spec) != spec:
        problems.append("comfy-cli: rejected, nothing would be published")
    return problems


def declared() -> str:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["comfy"]["requires-comfyui"]


def test_the_declared_range_passes_node_semver_and_comfy_cli(node_semver, comfy_cli_published):
    spec = declared()
    assert range_problems(spec, node_semver, comfy_cli_published) == []
    # node-semver reads it as exactly the lower bound; a version below it is refused.
    assert node_semver(spec, ["0.3.74", "0.3.75", "1.0.0"]) == {
        "validRange": ">=0.3.75", "satisfies": {"0.3.74": False, "0.3.75": True, "1.0.0": True}}


@pytest.mark.parametrize("spec, expected", [
    # The old field: comfy-cli accepts the comma, node-semver does not, so every ComfyUI showed a conflict.
    (">=0.3.75,<0.4.0", ["node-semver: not a valid range"]
     + [f"node-semver: {v} does not satisfy it (False)" for v in MUST_SATISFY]),
    # node-semver's own spelling of that range: comfy-cli drops it at publish; its bound flags 0.33 and 0.38.
    (">=0.3.75 <0.4.0", ["node-semver: 0.33.0 does not satisfy it (False)",
                         "node-semver: 0.38.1 does not satisfy it (False)", "comfy-cli: rejected, nothing would be published"]),
    # Operators and partial versions node-semver knows and comfy-cli does not.
    ("^0.3.75", ["node-semver: 0.33.0 does not satisfy it (False)", "node-semver: 0.38.1 does not satisfy it (False)",
                 "comfy-cli: rejected, nothing would be published"]),
    (">=0.3", ["comfy-cli: rejected, nothing would be published"]),
    ("0.3.x || >=0.4.0", ["comfy-cli: rejected, nothing would be published"]),
    # Valid for both, but it leaves out a ComfyUI the tiers run or docs/comfyui_api.md reads.
    ("<0.33.0", ["node-semver: 0.33.0 does not satisfy it (False)", "node-semver: 0.38.1 does not satisfy it (False)"]),
    (">=0.4.0", ["node-semver: 0.3.75 does not satisfy it (False)"]),
])
def test_ranges_either_reader_rejects_are_caught(spec, expected, node_semver, comfy_cli_published):
    assert range_problems(spec, node_semver, comfy_cli_published) == expected

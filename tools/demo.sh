#!/usr/bin/env bash
# Sets up a local ComfyUI with the pack (tools/setup_env.sh) and runs the demo workflow headless on
# the CPU: the shipped tiny digit experts, each alone and then their product. PNGs go to output/demo/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
UAC_SKIP_TEST_DEPS="${UAC_SKIP_TEST_DEPS:-1}" bash tools/setup_env.sh
exec .venv/bin/python tools/run_workflow.py example_workflows/api/tiny_demo.json --out output/demo "$@"

#!/usr/bin/env bash
# Sets up everything (tools/setup_env.sh) and runs every test tier: unit, parity, in-process
# ComfyUI, the real server over HTTP and websocket. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -c tests/pytest.ini --rootdir=tests tests "$@"

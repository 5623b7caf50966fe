#!/usr/bin/env bash
# Sets up everything (tools/setup_env.sh) and runs every test tier: unit, parity, in-process
# ComfyUI, the real server over HTTP and websocket, the frontend and the install tier, on ComfyUI
# 0.3.75. Then the ComfyUI-facing tiers again on ComfyUI 0.33.0, with its own venv (skipped, and
# said so, where ../shared/comfyui/ is absent). Extra arguments go to both pytest runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup_env.sh
pytest_args=(-c tests/pytest.ini --rootdir=tests)
c33="$root/.cache/ComfyUI-0.33.0"
v33="$root/.cache/venv-0.33.0"
have33=0
[ -f "$c33/comfyui_version.py" ] && [ -x "$v33/bin/python" ] && have33=1
# Said before the first run too, so that pytest's closing line stays the last line.
[ "$have33" = 1 ] || echo "=== ComfyUI 0.33.0: SKIPPED, ../shared/comfyui/ComfyUI-0.33.0.tar.gz is not there" \
                          "(tools/setup_env.sh sets it up when it is); only ComfyUI 0.3.75 is tested ==="

echo "=== ComfyUI 0.3.75 (.cache/ComfyUI): every tier ==="
rc=0
.venv/bin/python -m pytest "${pytest_args[@]}" tests "$@" || rc=$?

# The tiers that run ComfyUI: in process, workflows, the server, the frontend (0.33's pinned
# 1.48.7 and the newest) and the install tier (comfyui_manager 4.2.2, as 0.33 pins it).
if [ "$have33" = 1 ]; then
  echo "=== ComfyUI 0.33.0 (.cache/ComfyUI-0.33.0, .cache/venv-0.33.0): the ComfyUI-facing tiers ==="
  rc33=0
  UAC_COMFYUI="$c33" "$v33/bin/python" -m pytest "${pytest_args[@]}" tests/inprocess tests/workflows \
    tests/server tests/frontend tests/install "$@" || rc33=$?
  [ "$rc" != 0 ] || rc=$rc33
fi
exit "$rc"

#!/usr/bin/env bash
# Sets up everything (tools/setup_env.sh) and runs every test tier: unit, parity, in-process
# ComfyUI, the real server over HTTP and websocket, the frontend and the install tier, on ComfyUI
# 0.3.75, and beside them the ComfyUI-facing tiers again on ComfyUI 0.33.0, with its own venv (skipped, and
# said so, where ../shared/comfyui/ is absent). Extra arguments go to every pytest run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup_env.sh
pytest_args=(-c tests/pytest.ini --rootdir=tests)
c33="$root/.cache/ComfyUI-0.33.0"
v33="$root/.cache/venv-0.33.0"
have33=0
[ -f "$c33/comfyui_version.py" ] && [ -x "$v33/bin/python" ] && have33=1
# Said before the runs too, so that pytest's closing line stays the last line.
[ "$have33" = 1 ] || echo "=== ComfyUI 0.33.0: SKIPPED, ../shared/comfyui/ComfyUI-0.33.0.tar.gz is not there" \
                          "(tools/setup_env.sh sets it up when it is); only ComfyUI 0.3.75 is tested ==="

# Two streams side by side: one pytest run keeps about one of the two cores busy (servers start, models load,
# one-thread tests), so together they take little longer than the larger alone.
#   1. ComfyUI 0.3.75, every tier, less the longest test (below); its output as it runs.
#   2. ComfyUI 0.33.0, the ComfyUI-facing tiers (in process, workflows, the server, the frontend with 0.33's
#      pinned 1.48.7 and the newest, the install tier with comfyui_manager 4.2.2 as 0.33 pins it); then, on
#      0.3.75, the longest test (the digits with the corrector, one thread, about 5 minutes), which evens the
#      two. Kept in .cache/test-stream-2.log and printed after stream 1.
# They share no ComfyUI folder; the one test too large to meet its twin (tests/server/test_model_management.py)
# and the one-time installs take locks (tests/support/locks.py).
# One torch (OpenMP) thread per process, servers included: with two threads each, the two streams' processes
# spun against each other on two cores (the first stream took 1.7 times its serial time), and one stream alone
# kept only 1.03 cores busy. Tests that want another count set it themselves.
export OMP_NUM_THREADS=1
longest=tests/benchmarks/test_eval_digits.py::test_correction_beats_plain_sampling_at_equal_evaluations
log2="$root/.cache/test-stream-2.log"
rm -f "$log2" "$log2.rc"
# Exit status 5 is "no tests collected": extra arguments such as -k may leave one of stream 2's runs nothing.
allow_empty() { "$@" || { local r=$?; [ "$r" = 5 ] || return "$r"; }; }
(
  rc2=0
  if [ "$have33" = 1 ]; then
    echo "=== ComfyUI 0.33.0 (.cache/ComfyUI-0.33.0, .cache/venv-0.33.0): the ComfyUI-facing tiers ==="
    UAC_COMFYUI="$c33" allow_empty "$v33/bin/python" -m pytest "${pytest_args[@]}" tests/inprocess tests/workflows \
      tests/server tests/frontend tests/install "$@" || rc2=$?
  fi
  echo "=== ComfyUI 0.3.75 (.cache/ComfyUI): the test left out of the first run ==="
  allow_empty .venv/bin/python -m pytest "${pytest_args[@]}" "$longest" "$@" || { r=$?; [ "$rc2" != 0 ] || rc2=$r; }
  echo "$rc2" > "$log2.rc"
) > "$log2" 2>&1 &
pid2=$!

echo "=== ComfyUI 0.3.75 (.cache/ComfyUI): every tier (one test runs beside it, printed below) ==="
rc=0
# --deselect takes the test's id as pytest names it, relative to --rootdir.
.venv/bin/python -m pytest "${pytest_args[@]}" tests --deselect "${longest#tests/}" "$@" || rc=$?

wait "$pid2" || true
cat "$log2"
rc2="$(cat "$log2.rc" 2>/dev/null || echo 1)"
[ "$rc" != 0 ] || rc=$rc2
exit "$rc"

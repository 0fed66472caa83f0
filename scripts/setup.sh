#!/usr/bin/env bash
# Everything selfsup-zoo needs on a fresh machine. README's two commands and .ci/run call this.
#
#   scripts/setup.sh [--tests] [VENV]
#
# VENV (default: .venv in the checkout) gets the project installed editable with every extra
# (".[all]"); it is reused, without dependency resolution, while pyproject.toml and this script are
# unchanged (their hash is kept in VENV/.spec-hash).
# --tests adds what the test suite needs beyond Python packages, so that nothing is skipped for a
# missing environment:
#   - the PyTriton venv at $ZOO_CACHE/triton-venv (default ~/.cache/selfsup-zoo/triton-venv), where
#     serve/triton.py finds it: PyTriton pins numpy<2, which the main environment cannot have
#     (mlxtend needs numpy>=2), so it cannot live in VENV;
#   - headless Chromium for the demo's browser test: Debian's chromium + chromium-driver via
#     apt-get (sudo when not root) when /usr/bin/chromium is missing; never a downloaded browser.
# With --tests the script fails when it cannot provide one of them, so a broken setup cannot hide
# behind skipped tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

tests=0
VENV=".venv"
for arg in "$@"; do
  case "$arg" in
    --tests) tests=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "setup.sh: unknown option $arg (see scripts/setup.sh --help)" >&2; exit 2 ;;
    *) VENV="$arg" ;;
  esac
done
CACHE="${ZOO_CACHE:-$HOME/.cache/selfsup-zoo}"
# torch and torchvision come from PyPI as a pair: keep a machine-local CPU-only torch wheel (pip's
# find-links or config) out of the resolution, or torchvision's import fails (docs/install.md).
export PIP_FIND_LINKS="" PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
apt_install() {  # apt_install PACKAGE...: Debian packages, quietly; fails when apt-get cannot run
  command -v apt-get >/dev/null || return 1
  $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@" >/dev/null
}

make_venv() {  # make_venv DIR: python3 -m venv, installing Debian's python3-venv when ensurepip is missing
  python3 -m venv "$1" 2>/dev/null && return 0
  rm -rf "$1"
  echo "== python3 -m venv failed; installing python3-venv (apt)"
  apt_install python3-venv || { echo "setup.sh: cannot create a virtualenv: install python3-venv" >&2; return 1; }
  python3 -m venv "$1"
}

# ---- the project's venv
spec_hash=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
[ -x "$VENV/bin/python" ] || make_venv "$VENV"
if [ "$(cat "$VENV/.spec-hash" 2>/dev/null || true)" != "$spec_hash" ]; then
  echo "== installing selfsup-zoo and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[all]"
  echo "$spec_hash" > "$VENV/.spec-hash"
else
  echo "== reusing $VENV (dependency spec unchanged)"
  # Point the `zoo` command and the packages at this checkout (cheap: no dependency resolution).
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi

if [ "$tests" -eq 1 ]; then
  # ---- PyTriton (a real Triton server with the Python backend) in its own venv
  TRITON_VENV="$CACHE/triton-venv"
  triton_spec="nvidia-pytriton==0.7.0 onnxruntime>=1.18"
  if [ "$(cat "$TRITON_VENV/.spec" 2>/dev/null || true)" != "$triton_spec" ]; then
    echo "== installing PyTriton into $TRITON_VENV"
    rm -rf "$TRITON_VENV"
    mkdir -p "$CACHE"
    make_venv "$TRITON_VENV"
    # shellcheck disable=SC2086 - the spec is a list of requirements
    "$TRITON_VENV/bin/python" -m pip install -q $triton_spec
    echo "$triton_spec" > "$TRITON_VENV/.spec"  # last: an interrupted install is redone next time
  fi
  # ---- headless Chromium for the browser test of the demo
  if [ ! -x /usr/bin/chromium ]; then
    echo "== installing chromium + chromium-driver (apt)"
    if ! apt_install chromium chromium-driver || [ ! -x /usr/bin/chromium ]; then
      echo "setup.sh: could not install Chromium (the demo's browser test needs /usr/bin/chromium):" \
           "run 'apt-get install chromium chromium-driver' as root" >&2
      exit 1
    fi
  fi
fi
echo "== setup took $(( $(date +%s) - start ))s"

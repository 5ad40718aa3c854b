#!/usr/bin/env bash
# Set up a fresh clone and run the demo or the test suite, in one command each:
#   bash scripts/setup.sh demo [ARGS...]   # python -m erasure demo ARGS...
#   bash scripts/setup.sh test             # ruff, pytest, then the host tests when a ComfyUI is found (what CI runs)
# Setup (skipped when .venv is already set up for this pyproject.toml): a virtual environment in .venv (python3 -m
# venv, Python >= 3.10), torch 2.13.0 (TORCH_INDEX=<url> picks the wheel index, e.g. the CPU-only
# https://download.pytorch.org/whl/cpu), then this package in editable mode with its test extras.
# Host tests: COMFYUI_PATH (default ~/ComfyUI) and COMFY_PYTHON (default ~/comfy-venv/bin/python); A1111 loader tests:
# A1111_PATH (default ~/stable-diffusion-webui; docs/lora-files.md says how to get one). Without them those tests are
# skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VENV=.venv

usage() {
  echo "usage: bash scripts/setup.sh {demo [ARGS...]|test}" >&2
  exit 2
}

setup() {
  local stamp="$VENV/.setup-done" want
  want="torch==$TORCH_VERSION $(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "Python >= 3.10 is needed as python3 (found $(python3 --version 2>&1))" >&2
    exit 1
  }
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" "torch==$TORCH_VERSION" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  "${pip[@]}" -e ".[test]"
  echo "$want" >"$stamp"
}

run_tests() {
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  "$VENV/bin/ruff" check erasure tests nodes __init__.py benchmarks scripts
  # host tests are collected here and skipped loudly: this venv cannot run ComfyUI
  "$VENV/bin/python" -m pytest -q
  local comfy="${COMFYUI_PATH:-$HOME/ComfyUI}" comfy_py="${COMFY_PYTHON:-$HOME/comfy-venv/bin/python}"
  if [ -f "$comfy/nodes.py" ] && [ -x "$comfy_py" ]; then
    # the nodes' requirements, pytest, and what one host test needs beyond them: it compares the library's own
    # single-file loader (diffusers, accelerate) with ComfyUI's (test_single_file_host.py)
    "$comfy_py" -m pip install -q --disable-pip-version-check -r requirements.txt pytest "diffusers>=0.30" accelerate
    OMP_NUM_THREADS=1 COMFYUI_PATH="$comfy" "$comfy_py" -m pytest -q tests/host
  else
    echo "!!! HOST TESTS SKIPPED: no ComfyUI at $comfy or no interpreter at $comfy_py (see docs/development.md, 'Host tests') !!!"
  fi
}

[ $# -ge 1 ] || usage
command="$1"
shift
case "$command" in
  demo)
    setup
    exec "$VENV/bin/python" -m erasure demo "$@"
    ;;
  test)
    [ $# -eq 0 ] || usage
    setup
    run_tests
    ;;
  *) usage ;;
esac

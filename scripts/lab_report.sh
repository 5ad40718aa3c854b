#!/usr/bin/env bash
# Reproduces the lab numbers in the README: the original model, and each method on one and on three concepts.
# Writes reports/*.json and reports/*.png. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports out
run() { echo "+ $*"; "$@"; }
run python -m erasure lab eval --json reports/original.json --grid reports/original.png
for method in esd mace; do
  if [ "$method" = esd ]; then
    run python -m erasure lab baseline --concept red --out out/esd-red.safetensors
  else
    run python -m erasure mace --model lab --concepts "red" --out out/mace-red.safetensors
    run python -m erasure mace --model lab --concepts "red; green; striped" --out out/mace-3.safetensors
    run python -m erasure lab eval --lora out/mace-3.safetensors --json reports/mace-3.json --grid reports/mace-3.png
  fi
  run python -m erasure lab eval --lora "out/$method-red.safetensors" --json "reports/$method-red.json" \
      --grid "reports/$method-red.png"
done

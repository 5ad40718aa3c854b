#!/usr/bin/env bash
# Reproduces the lab tables in docs/lab.md: the original model; ESD, MACE and ANT on one shape; MACE and ANT on
# three concepts. Default settings everywhere. Writes reports/*.json and reports/*.png. About 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports out
run() { echo "+ $*"; "$@"; }
ONE="circle"
THREE="circle; green; striped"
run python -m erasure lab eval --json reports/original.json --grid reports/original.png
run python -m erasure lab baseline --concept "$ONE" --out "out/esd-$ONE.safetensors"
run python -m erasure mace --model lab --concepts "$ONE" --out "out/mace-$ONE.safetensors"
run python -m erasure ant --model lab --concept "$ONE" --out "out/ant-$ONE.safetensors"
run python -m erasure mace --model lab --concepts "$THREE" --out out/mace-3.safetensors
run python -m erasure ant --model lab --concepts "$THREE" --out out/ant-3.safetensors
for name in "esd-$ONE" "mace-$ONE" "ant-$ONE" mace-3 ant-3; do
  run python -m erasure lab eval --lora "out/$name.safetensors" --json "reports/$name.json" --grid "reports/$name.png"
done

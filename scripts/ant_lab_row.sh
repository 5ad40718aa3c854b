#!/usr/bin/env bash
# ANT's default on one lab row (one or more concepts, "a; b; c") at one training seed, then `lab eval`: the ANT side
# of MACE's held-out mixes (docs/mace.md#held-out-mixes). One thread unless OMP_NUM_THREADS says otherwise; about
# 12-16 min for three concepts on lab-clip at one thread (training 730 s, evaluation ~3 min).
#
#   PY=.venv/bin/python bash scripts/ant_lab_row.sh "triangle; blue; striped" 0   # -> reports/ant-heldout-mix/
#   MODEL=lab TAG=... bash scripts/ant_lab_row.sh ROW SEED                         # -> reports/ant-TAG/
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-python}"
MODEL="${MODEL:-lab-clip}"
TAG="${TAG:-heldout-mix}"
row="$1"; seed="$2"
name="$(echo "$row" | tr -d ' ' | tr ';' '+')-s$seed"
OUT=out/ant-$TAG; REP=reports/ant-$TAG
mkdir -p "$OUT" "$REP"
"$PY" -m erasure ant --model "$MODEL" --concepts "$row" --seed "$seed" --no-report --out "$OUT/$name.safetensors" \
  2>&1 | grep -v "Loading weights" > "$REP/$name.train.txt"
"$PY" -m erasure lab eval --model "$MODEL" --lora "$OUT/$name.safetensors" --json "$REP/$name.eval.json" \
  --grid "$OUT/$name.png" 2>&1 | grep -v "Loading weights" > "$REP/$name.eval.txt"

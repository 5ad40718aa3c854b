#!/usr/bin/env bash
# Issue 18, item 3: MACE's default preset on the lab, no per-concept flags: one shape alone, three concepts of
# three kinds at once, two held-out concepts at once, at training seeds 0-2; `lab eval` after each (efficacy,
# generality, specificity, fidelity, kept). Resumable (a row whose evaluation exists is skipped); about 3-5 min a
# row at one thread. Table: .venv/bin/python scripts/mace_lab_bars.py (docs/mace.md#lab-bars-issue-18-item-3).
#
#   FLAGS="--protect 0.999" TAG=pgrad bash scripts/mace_lab_bars.sh   # the default preset -> reports/mace-bars-pgrad/
#   MODEL=lab-clip FLAGS="--protect 0.999" TAG=pgrad bash scripts/mace_lab_bars.sh   # -> ...-lab-clip-pgrad/
#   FLAGS="--protect 0" bash scripts/mace_lab_bars.sh   # the reference's result (reports/mace-bars/, the runs before
#                                                       # protect became the default; -lab-clip likewise)
#   LANE=0/2 bash scripts/mace_lab_bars.sh &  LANE=1/2 bash scripts/mace_lab_bars.sh &   # two cores
#   MODEL=lab-clip FLAGS=--suppress-following TAG=following bash scripts/mace_lab_bars.sh  # -> ...-lab-clip-following/
#   ROWS="green|circle; green; striped" ...   # other rows ("|" between rows)
#   SEEDS="0" ...                              # other training seeds (default 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-python}"
MODEL="${MODEL:-lab}"  # or lab-clip (docs/lab.md#the-second-lab-model-lab-clip)
SUFFIX=""; [ "$MODEL" = lab ] || SUFFIX="-$MODEL"
[ -z "${TAG:-}" ] || SUFFIX="$SUFFIX-$TAG"
read -r -a flags <<< "${FLAGS:-}"  # extra `erasure mace` flags, the same for every row
IFS='|' read -r -a rows <<< "${ROWS:-circle|circle; green; striped|triangle; checkered}"
OUT=out/mace-bars$SUFFIX
REP=reports/mace-bars$SUFFIX
mkdir -p "$OUT" "$REP"
lane=${LANE:-0/1}
i=0
for row in "${rows[@]}"; do
  for seed in ${SEEDS:-0 1 2}; do
    i=$((i + 1))
    if [ $(( (i - 1) % ${lane#*/} )) -ne "${lane%/*}" ]; then continue; fi
    name="$(echo "$row" | tr -d ' ' | tr ';' '+')-s$seed"
    if [ -f "$REP/$name.eval.json" ]; then echo "= $name: done"; continue; fi
    echo "+ $name"
    "$PY" -m erasure mace --model "$MODEL" --concepts "$row" --seed "$seed" ${flags[@]+"${flags[@]}"} --no-report --out "$OUT/$name.safetensors" \
      2>&1 | grep -v "Loading weights" > "$REP/$name.train.txt"
    "$PY" -m erasure lab eval --model "$MODEL" --lora "$OUT/$name.safetensors" --json "$REP/$name.eval.json" --grid "$OUT/$name.png" \
      2>&1 | grep -v "Loading weights" > "$REP/$name.eval.txt"
  done
done

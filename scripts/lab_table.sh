#!/usr/bin/env bash
# One lab table of every method (issue 19, item 6; docs/lab.md#every-method): each method erases one concept at one
# training seed, then `lab eval` (efficacy, generality, specificity, fidelity, kept) and `audit` (concept inversion:
# attack success rate). Resumable: a row whose two reports exist is skipped. About an hour at one thread.
#
#   bash scripts/lab_table.sh                  # circle, seed 0 -> reports/lab-table/, table in reports/lab-table/table.md
#   CONCEPT=square SEED=1 bash scripts/lab_table.sh
#   MODEL=lab-clip bash scripts/lab_table.sh      # the second lab model -> reports/lab-table/circle-s0-lab-clip/
#   ONLY="ant-paper mace-default" bash scripts/lab_table.sh   # some rows (e.g. two processes on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-python}"
C="${CONCEPT:-circle}"
SEED="${SEED:-0}"
MODEL="${MODEL:-lab}"  # or lab-clip (docs/lab.md#the-second-lab-model-lab-clip)
SUFFIX=""; [ "$MODEL" = lab ] || SUFFIX="-$MODEL"
OUT="out/lab-table/$C-s$SEED$SUFFIX"
REP="reports/lab-table/$C-s$SEED$SUFFIX"
mkdir -p "$OUT" "$REP"

row() {  # name, training command...
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -f "$REP/$name.eval.json" ] && [ -f "$REP/$name.audit.json" ]; then echo "= $name: done"; return; fi
  echo "+ $name: $*"
  local t0; t0=$(date +%s)
  "$@" > "$REP/$name.train.txt" 2>&1
  echo "training wall s: $(( $(date +%s) - t0 )); command: $*" >> "$REP/$name.train.txt"
  "$PY" -m erasure lab eval --model "$MODEL" --lora "$OUT/$name.safetensors" --json "$REP/$name.eval.json" --grid "$OUT/$name.png" \
    > "$REP/$name.eval.txt" 2>&1
  "$PY" -m erasure audit --model "$MODEL" --lora "$OUT/$name.safetensors" --concept "$C" --json "$REP/$name.audit.json" \
    --out-dir "$OUT/$name-audit" > "$REP/$name.audit.txt" 2>&1
}

# ESD-x as published: cross-attention layers, lr 1e-5, 1000 iterations; beside the lab-tuned ESD (lr 1e-3, 150)
row esd-published "$PY" -m erasure lab baseline --model "$MODEL" --concept "$C" --scope xattn --lr 1e-5 --steps 1000 --seed "$SEED" \
  --out "$OUT/esd-published.safetensors"
row esd-tuned "$PY" -m erasure lab baseline --model "$MODEL" --concept "$C" --seed "$SEED" --out "$OUT/esd-tuned.safetensors"
row ant-default "$PY" -m erasure ant --model "$MODEL" --concept "$C" --seed "$SEED" --no-report \
  --out "$OUT/ant-default.safetensors"
row ant-paper "$PY" -m erasure ant --model "$MODEL" --concept "$C" --preset paper --seed "$SEED" --no-report \
  --out "$OUT/ant-paper.safetensors"
# the paper's saliency scope with the default's loss, preservation at the prompts' own images weighted 25
row ant-robust "$PY" -m erasure ant --model "$MODEL" --concept "$C" --preset robust --seed "$SEED" --no-report \
  --out "$OUT/ant-robust.safetensors"
row mace-default "$PY" -m erasure mace --model "$MODEL" --concepts "$C" --seed "$SEED" --no-report \
  --out "$OUT/mace-default.safetensors"
row ant-adversarial "$PY" -m erasure ant --model "$MODEL" --concept "$C" --protect 0 --adversarial 1 --seed "$SEED" \
  --no-report --out "$OUT/ant-adversarial.safetensors"
row ant-protect0 "$PY" -m erasure ant --model "$MODEL" --concept "$C" --protect 0 --seed "$SEED" --no-report \
  --out "$OUT/ant-protect0.safetensors"
row mace-protect0 "$PY" -m erasure mace --model "$MODEL" --concepts "$C" --protect 0 --importance-sampling --masks \
  --no-suppress-following --seed "$SEED" --no-report \
  --out "$OUT/mace-protect0.safetensors"
# the default before the loss looked at whole images, uniform timesteps and the words after the concept
row mace-pt-masks "$PY" -m erasure mace --model "$MODEL" --concepts "$C" --importance-sampling --masks \
  --no-suppress-following --seed "$SEED" --no-report --out "$OUT/mace-pt-masks.safetensors"
"$PY" scripts/lab_table.py "$REP" | tee "$REP/table.md"

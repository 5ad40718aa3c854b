#!/usr/bin/env bash
# MACE over N lab concepts (default object preset, report off): one process one concept at a time, one process with
# 4 and 8 concepts per batch (--concept-batch), and 2 processes under torchrun (gloo, CPU), one thread each: wall
# time, concepts per hour, UNet evaluations and calls, peak memory of rank 0, and the largest difference of each
# file's tensors from the one-at-a-time file (their metadata differ in the output name and hashes).
# Usage: bash benchmarks/mace_processes.sh [OUT_DIR [ROWS]]   ROWS: any of sequential,batch4,batch8,two-processes
# (default: all; about 8 minutes for 10 concepts on 2 free cores). CONCEPTS=FILE: another concepts file (for example
# benchmarks/lab-concepts-100.txt: lab words, synonyms and their phrases) instead of the 10 lab concepts; MODEL=lab-clip:
# the second lab model; FLAGS="...": more `mace` flags for every row.
set -euo pipefail
out=${1:-out/mace-processes}
rows=${2:-sequential,batch4,batch8,two-processes}
py=${PYTHON:-python}
mkdir -p "$out"
if [ -n "${CONCEPTS:-}" ]; then
  grep -v '^#' "$CONCEPTS" | grep . > "$out/concepts.txt"
else
  printf "circle\nsquare\ntriangle\ncross\nred\ngreen\nblue\nyellow\nstriped\ncheckered\n" > "$out/concepts.txt"
fi
n=$(grep -c . "$out/concepts.txt")
run() {  # label, extra flags (quoted), launcher...
  local label=$1 extra=$2; shift 2
  case ",$rows," in *",$label,"*) ;; *) return 0 ;; esac
  rm -rf "$out/work-$label"
  local t0; t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 "$@" -m erasure mace --model "${MODEL:-lab}" --concepts-file "$out/concepts.txt" --no-report --target 0 ${FLAGS:-} $extra \
    --work-dir "$out/work-$label" --out "$out/$label.safetensors" > "$out/$label.log" 2>&1
  local t1; t1=$(date +%s.%N)
  local evals calls peak diff
  evals=$(grep -o "[0-9]* UNet evaluations" "$out/$label.log" | head -1 | cut -d' ' -f1)
  calls=$(grep -o "in [0-9]* UNet calls" "$out/$label.log" | head -1 | cut -d' ' -f2)
  peak=$(grep -o "peak RSS [0-9]* MB" "$out/$label.log" | head -1 | cut -d' ' -f3)
  diff=$("$py" - "$out/sequential.safetensors" "$out/$label.safetensors" <<'PY'
import os, sys
from safetensors import safe_open
if not os.path.exists(sys.argv[1]):
    print("(no sequential file)")
else:
    a, b = safe_open(sys.argv[1], "pt"), safe_open(sys.argv[2], "pt")
    print(f"{max(float((a.get_tensor(k) - b.get_tensor(k)).abs().max()) for k in a.keys()):.1e}")
PY
)
  python3 -c "w=$t1-$t0; print(f'| $label | {w:.1f} | {$n * 3600 / w:,.0f} | $evals | $calls | $peak | $diff |')"
}
echo "| run ($n concepts) | wall s | concepts/hour | UNet evaluations | UNet calls | peak RSS rank 0 (MB) | max difference from sequential |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
run sequential "--concept-batch 1" "$py"
run batch4 "--concept-batch 4" "$py"
run batch8 "--concept-batch 8" "$py"
run two-processes "--concept-batch 1" "$py" -m torch.distributed.run --nproc-per-node 2

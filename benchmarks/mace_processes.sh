#!/usr/bin/env bash
# MACE over 10 lab concepts (default object preset, report off) in one process and in 2 processes under torchrun
# (gloo, CPU, one thread each): wall time, concepts per hour, UNet evaluations, peak memory of rank 0, and whether
# the two files hold the same tensors (their metadata differ in the output name and hashes). Usage: bash benchmarks/mace_processes.sh [OUT_DIR]   (about 5 minutes)
set -euo pipefail
out=${1:-out/mace-processes}
py=${PYTHON:-python}
mkdir -p "$out"
printf "circle\nsquare\ntriangle\ncross\nred\ngreen\nblue\nyellow\nstriped\ncheckered\n" > "$out/concepts.txt"
run() {  # label, launcher...
  local label=$1; shift
  rm -rf "$out/work-$label"
  local t0; t0=$(date +%s.%N)
  OMP_NUM_THREADS=1 "$@" -m erasure mace --model lab --concepts-file "$out/concepts.txt" --no-report \
    --work-dir "$out/work-$label" --out "$out/$label.safetensors" > "$out/$label.log" 2>&1
  local t1; t1=$(date +%s.%N)
  local evals peak
  evals=$(grep -o "[0-9]* UNet evaluations" "$out/$label.log" | head -1 | cut -d' ' -f1)
  peak=$(grep -o "peak RSS [0-9]* MB" "$out/$label.log" | head -1 | cut -d' ' -f3)
  python3 -c "w=$t1-$t0; print(f'| $label | {w:.1f} | {10 * 3600 / w:,.0f} | $evals | $peak |')"
}
echo "| run | wall s | concepts/hour | UNet evaluations | peak RSS rank 0 (MB) |"
echo "| --- | ---: | ---: | ---: | ---: |"
run one-process "$py"
run two-processes "$py" -m torch.distributed.run --nproc-per-node 2
"$py" - "$out" <<'PY'
import sys
from safetensors import safe_open
a = safe_open(f"{sys.argv[1]}/one-process.safetensors", "pt")
b = safe_open(f"{sys.argv[1]}/two-processes.safetensors", "pt")
print("max |difference| of the tensors:", max(float((a.get_tensor(k) - b.get_tensor(k)).abs().max()) for k in a.keys()))
PY

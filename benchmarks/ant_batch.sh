#!/usr/bin/env bash
# ANT's many-concept path with scope lora, the concepts' LoRAs trained one at a time (--concept-batch 1) and all
# together (--concept-batch N, one training forward per step): wall time, UNet forwards (the same in both), training
# forwards (steps x batches of concepts), peak memory, and the largest difference of the fused file's tensors.
# Usage: bash benchmarks/ant_batch.sh [OUT_DIR ["c1; c2; c3"]]   (one thread; lab model; no erasure report)
set -euo pipefail
out=${1:-out/ant-batch}
concepts=${2:-circle; green; striped}
py=${PYTHON:-python}
n=$(echo "$concepts" | tr ';' '\n' | grep -c .)
steps=$("$py" -c "from erasure.ant import AntSettings; print(AntSettings().multi_steps)")
mkdir -p "$out"
echo "| run ($n concepts, scope lora) | wall s | UNet forwards | training forwards | peak RSS (MB) | max difference from one at a time |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for b in 1 "$n"; do
  t0=$(date +%s.%N)
  OMP_NUM_THREADS=1 "$py" -m erasure ant --model lab --concepts "$concepts" --scope lora --concept-batch "$b" \
    --no-report --out "$out/batch$b.safetensors" > "$out/batch$b.log" 2>&1
  t1=$(date +%s.%N)
  fwd=$(grep -o "[0-9,]* UNet forwards" "$out/batch$b.log" | head -1 | cut -d' ' -f1)
  peak=$(grep -o "peak RSS [0-9]* MB" "$out/batch$b.log" | head -1 | cut -d' ' -f3)
  diff=$("$py" - "$out/batch1.safetensors" "$out/batch$b.safetensors" <<'PY'
import sys
from erasure.lora_files import load_lora
a, b = load_lora(sys.argv[1]), load_lora(sys.argv[2])
print(f"{max(float((a.deltas[k].matrix() - b.deltas[k].matrix()).abs().max()) for k in a.deltas):.1e} "
      f"(of {max(float(a.deltas[k].matrix().abs().max()) for k in a.deltas):.2f})")
PY
)
  python3 -c "print(f'| --concept-batch $b | {$t1-$t0:.1f} | $fwd | {$steps * -(-$n // $b):,} | $peak | $diff |')"
done

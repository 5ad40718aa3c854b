#!/usr/bin/env bash
# ANT (or the ESD baseline) on the lab model over several training seeds, each run then evaluated with `lab eval`:
# the multi-seed tables in docs/ant.md. THREADS=1 (default): one thread per run, two runs at a time; THREADS=2: two
# threads per run, one at a time (float reductions differ with the thread count: a second draw of each seed). JOBS=N
# runs N at a time instead (for example JOBS=1 beside another job).
#
#   scripts/ant_seed_sweep.sh OUTDIR TAG "SEEDS" [ANT FLAGS...]      e.g.
#   scripts/ant_seed_sweep.sh out/sweep kv8 "0 1 2 3 4 5 6 7" --scope kv --reuse 8
#   scripts/ant_seed_sweep.sh out/sweep esd "0 1 2 3 4 5" --baseline
#   python scripts/seed_sweep_table.py out/sweep          # the table (pass counts, means, lowest values)
#
# Each run writes OUTDIR/TAG-sSEED.{safetensors,json,ant.log,eval.log}. Give every setting explicitly: the runs read
# the library's defaults when they start, so a change of default during a sweep would mix two settings.
set -euo pipefail
out=$(realpath -m "$1"); tag=$2; seeds=$3; shift 3
mkdir -p "$out"
cd "$(dirname "$0")/.."
threads=${THREADS:-1}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
one() {
  set -euo pipefail
  local s=$1; shift
  local f="$out/$tag-s$s"
  if [ "${1:-}" = "--baseline" ]; then
    /usr/bin/time -f "%e s" python -m erasure lab baseline --concept circle --seed "$s" --out "$f.safetensors" \
      > "$f.ant.log" 2>&1
  else
    /usr/bin/time -f "%e s" python -m erasure ant --model lab --concept circle --seed "$s" "$@" \
      --out "$f.safetensors" > "$f.ant.log" 2>&1
  fi
  python -m erasure lab eval --lora "$f.safetensors" --erased circle --json "$f.json" > "$f.eval.log" 2>&1
  echo "done $tag seed $s"
}
export -f one
export out tag
printf '%s\n' $seeds | xargs -P "${JOBS:-$(( 2 / threads > 0 ? 2 / threads : 1 ))}" -I{} bash -c 'one "$@"' _ {} "$@"

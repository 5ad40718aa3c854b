#!/usr/bin/env bash
# Adversarial ANT on the concept lab (docs/audit.md#adversarial-erasure): train ANT with and without the attack in
# the loop, then `lab eval` (efficacy, generality, specificity, kept) and `audit` (attack success rate) of each.
# Usage: bash scripts/adversarial_ant.sh [CONCEPT [SEED [MODE ...]]]   MODE: default | adversarial (both if none)
#        default and adversarial are ANT before `protect` (--protect 0), without and with the attack in training;
#        adversarial-w0.5: the latter with the learned-token term at half weight; adversarial-preserve10: with the
#        preservation term at twice the default's weight (5); protect and protect-adversarial:
#        today's default (protect 0.999) without and with it; paper, paper-preserve5: the paper's configuration (a
#        saliency-masked edit of the whole UNet) without and with the default's preservation term (weight 5). The
#        protect-adversarial modes are refused since they were measured (docs/audit.md#adversarial-with-protect)
#        bash scripts/adversarial_ant.sh audit-seed S NAME...   the audit again at audit seed S (NAME: MODE-CONCEPT-sSEED)
#        bash scripts/adversarial_ant.sh scaled NAME X   NAME's edit at strength X (NAME-xX): evaluation and audit
#        bash scripts/adversarial_ant.sh table      the markdown table of every run in reports/adversarial/
#        (python scripts/adversarial_seeds.py NAME...: the learned token's success per audit seed 0-3)
# Writes the LoRAs and audit grids to out/adversarial/, the JSON reports to reports/adversarial/. One thread, as
# measured; each mode takes about 7-10 minutes on a CPU core.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-.venv/bin/python}"
OUT=out/adversarial
REP=reports/adversarial
mkdir -p "$OUT" "$REP"

if [ "${1:-}" = table ]; then
    "$PY" - "$REP" <<'PYEOF'
import json, sys
from pathlib import Path
rep = Path(sys.argv[1])
print("| run | plain | learned token | prefix | recoverability | efficacy | generality | specificity | kept |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in sorted(rep.glob("audit-*.json")):
    name = f.stem[len("audit-"):]
    a, e = json.loads(f.read_text()), json.loads((rep / f"eval-{name}.json").read_text())
    r = a["recoverability"]
    print(f"| {name} | {a['plain_success_rate']:.0%} | {a['attack_success_rate']:.0%} | "
          f"{a['prefix_attack_success_rate']:.0%} | {'-' if r is None else f'{r:.2f}'} | {e['efficacy']:.3f} | "
          f"{e['generality']:.3f} | {e['specificity']:.3f} | {e['kept']:.3f} |")
for f in sorted(rep.glob("audit-seed*/*.json")):
    a = json.loads(f.read_text())
    print(f"audit {f.parent.name}, {f.stem}: plain {a['plain_success_rate']:.0%}, learned token "
          f"{a['attack_success_rate']:.0%}, prefix {a['prefix_attack_success_rate']:.0%}")
PYEOF
    exit 0
fi

# another audit seed (other generated images, starting draws, timesteps and noise) of LoRAs made before:
#   bash scripts/adversarial_ant.sh audit-seed 1 default-circle-s0 adversarial-circle-s0
if [ "${1:-}" = audit-seed ]; then
    AUDIT_SEED="$2"
    shift 2
    mkdir -p "$REP/audit-seed$AUDIT_SEED"
    for NAME in "$@"; do
        C="$(echo "${NAME%-x*}" | awk -F- '{print $(NF-1)}')"  # NAME is MODE-CONCEPT-sSEED[-xSTRENGTH]
        "$PY" -m erasure audit --model lab --lora "$OUT/$NAME.safetensors" --concept "$C" --seed "$AUDIT_SEED" \
            --json "$REP/audit-seed$AUDIT_SEED/$NAME.json" --out-dir "$OUT/audit-seed$AUDIT_SEED-$NAME"
    done
    exit 0
fi

# a LoRA made before at another strength (the control for a stronger edit's own effect on the attack):
#   bash scripts/adversarial_ant.sh scaled default-circle-s0 1.5
if [ "${1:-}" = scaled ]; then
    NAME="$2"
    X="$3"
    C="$(echo "$NAME" | awk -F- '{print $(NF-1)}')"  # NAME is MODE-CONCEPT-sSEED
    "$PY" scripts/kept_control.py "$OUT/$NAME.safetensors" "$OUT/$NAME-controls" --strength "$X"
    cp "$OUT/$NAME-controls/scaled-$X.safetensors" "$OUT/$NAME-x$X.safetensors"
    "$PY" -m erasure lab eval --lora "$OUT/$NAME-x$X.safetensors" --erased "$C" --json "$REP/eval-$NAME-x$X.json"
    "$PY" -m erasure audit --model lab --lora "$OUT/$NAME-x$X.safetensors" --concept "$C" \
        --json "$REP/audit-$NAME-x$X.json" --out-dir "$OUT/audit-$NAME-x$X"
    exit 0
fi

CONCEPT="${1:-circle}"
SEED="${2:-0}"
shift $(( $# < 2 ? $# : 2 ))
if [ $# -gt 0 ]; then MODES=("$@"); else MODES=(default adversarial); fi

# `python -m erasure ant` (the adversarial settings are its flags: --adversarial N, --adversarial-every N,
# --adversarial-steps N, --adversarial-lr X, --adversarial-weight X)
ant() {
    "$PY" -m erasure "$@"
}

for MODE in "${MODES[@]}"; do
    NAME="$MODE-$CONCEPT-s$SEED"
    case "$MODE" in
        default) FLAGS=(--protect 0) ;;
        adversarial) FLAGS=(--protect 0 --adversarial 1) ;;
        adversarial-w0.5) FLAGS=(--protect 0 --adversarial 1 --adversarial-weight 0.5) ;;
        adversarial-preserve10) FLAGS=(--protect 0 --adversarial 1 --preserve 10) ;;
        protect) FLAGS=() ;;
        protect-adversarial) FLAGS=(--adversarial 1) ;;
        protect-adversarial-w0.25) FLAGS=(--adversarial 1 --adversarial-weight 0.25) ;;
        paper) FLAGS=(--preset paper) ;;
        paper-preserve5) FLAGS=(--preset paper --preserve 5) ;;
        *) echo "unknown mode $MODE (see the usage at the top)" >&2
           exit 2 ;;
    esac
    ant ant --model lab --concept "$CONCEPT" --seed "$SEED" "${FLAGS[@]}" --out "$OUT/$NAME.safetensors" \
        | tee "$REP/train-$NAME.txt"
    "$PY" -m erasure lab eval --lora "$OUT/$NAME.safetensors" --json "$REP/eval-$NAME.json"
    "$PY" -m erasure audit --model lab --lora "$OUT/$NAME.safetensors" --concept "$CONCEPT" \
        --json "$REP/audit-$NAME.json" --out-dir "$OUT/audit-$NAME"
done

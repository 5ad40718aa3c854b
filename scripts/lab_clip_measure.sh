#!/usr/bin/env bash
# Everything measured on the second lab model (`--model lab-clip`, docs/lab.md#the-second-lab-model-lab-clip), in two
# lanes for two cores: its own evaluation, MACE's lab bars (issue 18, item 3), the text diagnostics with CFR alone
# on both lab models, and the every-method table. Resumable (the scripts it calls skip finished rows).
#
#   PY=.venv/bin/python bash scripts/lab_clip_measure.sh      # logs in runs/lab-clip-measure-*.log
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PY="${PY:-python}" MODEL=lab-clip
mkdir -p reports/lab-clip
[ -f reports/lab-clip/original.json ] || "$PY" -m erasure lab eval --model lab-clip --json reports/lab-clip/original.json \
  --grid reports/lab-clip/original.png 2>&1 | grep -v "Loading weights" > reports/lab-clip/original.txt
(
  LANE=0/2 bash scripts/mace_lab_bars.sh
  ONLY="mace-default ant-default esd-tuned" bash scripts/lab_table.sh
) > runs/lab-clip-measure-0.log 2>&1 &
(
  LANE=1/2 bash scripts/mace_lab_bars.sh
  [ -f reports/lab-clip/diagnostics.txt ] || "$PY" scripts/lab_text_diagnostics.py --cfr 2>&1 \
    | grep -v "Loading weights" > reports/lab-clip/diagnostics.txt
  ONLY="ant-paper ant-adversarial esd-published" bash scripts/lab_table.sh
) > runs/lab-clip-measure-1.log 2>&1 &
wait
"$PY" scripts/mace_lab_bars.py reports/mace-bars-lab-clip | tee reports/mace-bars-lab-clip/table.md

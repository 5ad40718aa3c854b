#!/usr/bin/env bash
# The whole benchmark table on one GPU (sized for an H200-class card; designed for under 8 minutes, not yet run:
# no GPU was available when it was written). Writes benchmarks/results/gpu.json and gpu.log.
#
#   bash benchmarks/gpu.sh            # from the repository root, with an environment that has the requirements
#
# A cell that runs out of memory is reported as an error row and the others still run; the JSON is rewritten after
# every cell, so a run stopped by the time limit still leaves the cells it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run --size cpu instead')"
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee benchmarks/results/gpu.log
# the closed-form steps run on the host in float64: give them the host's cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# cells in this process (CUDA peaks are reset per cell); the projection reuses the committed activation probes
timeout "${BENCH_TIMEOUT:-470}" "$PY" benchmarks/run.py --size gpu --json benchmarks/results/gpu.json \
  --in-process --probe-dir benchmarks/results/probes 2>&1 | tee -a benchmarks/results/gpu.log

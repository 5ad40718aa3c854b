#!/usr/bin/env bash
# The whole benchmark table on one GPU (sized for an H200-class card; designed for under 8 minutes, not yet run:
# no GPU was available when it was written). Writes benchmarks/results/gpu.json and gpu.log, then MACE's concept
# batch scaling at SD1.5 512 px (benchmarks/results/gpu-mace-batch-sd15.json; about a minute).
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
  --in-process --probe-dir benchmarks/results/probes 2>&1 | tee -a benchmarks/results/gpu.log \
  || echo "benchmark table stopped early (exit $?); its finished cells are in gpu.json" | tee -a benchmarks/results/gpu.log
# MACE's stages 1 and 3 with 1, 4, 8 and 16 concepts per UNet batch (issue 20's batched-vs-sequential goal)
timeout "${BATCH_TIMEOUT:-240}" "$PY" benchmarks/mace_batch.py --device cuda --latent 64 --concepts 16 \
  --batches 1,4,8,16 --json benchmarks/results/gpu-mace-batch-sd15.json 2>&1 | tee -a benchmarks/results/gpu.log

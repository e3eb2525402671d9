#!/usr/bin/env bash
# The first GPU run in one command: `python -m pure.gpu_check` with the GPU machine's own python3 (no .venv):
# environment, the tiny model on the GPU against the CPU, 7B decoding speed (eager, CUDA graphs, Jacobi
# compiled), a profile of 3 compiled steps, a LoRA micro-step. Every stage has its own timeout and all of
# them fit in 8 minutes on an H200; summary.json, check.log and table.md land in OUT_DIR.
#
#   bash recipes/bench/gpu_7b.sh OUT_DIR        # = PYTHONPATH=. timeout 480 python3 -m pure.gpu_check OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:?usage: bash recipes/bench/gpu_7b.sh OUT_DIR}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "${PYTHON:-python3}" -m pure.gpu_check "$OUT_DIR"

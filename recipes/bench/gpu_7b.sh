#!/usr/bin/env bash
# The GPU half of the decoding benchmark in one go: a 7B-architecture model with random weights (no download),
# a 512x512 output with guidance (the full ~4.2k-token prompt, ~4.3k image tokens), on one CUDA GPU. Each run
# prints its table (steps/s, s/image, forward passes, peak memory, ratios); all of them are also appended to
# $LOG (default outputs/bench_7b.log), ready for the README's "Decoding speed".
#
#   bash recipes/bench/gpu_7b.sh          # about 10 minutes on an H200; needs ~30 GB of GPU memory for (a)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
LOG=${LOG:-outputs/bench_7b.log}
mkdir -p "$(dirname "$LOG")"
: >"$LOG"

run() {
    printf '\n== python -m pure.bench --arch 7b %s\n' "$*" | tee -a "$LOG"
    $PY -m pure.bench --arch 7b "$@" 2>&1 | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
run                                                          # (a), (b), (c) eager; default attention, rows
run --skip a --compile                                       # (b), (c) in CUDA graphs
run --skip a --compile --attn sdpa --guidance-layout shared  # the layout that fits under 22 GB
run --skip a --attn sdpa                                     # eager sdpa (against flash-attention 2 above)

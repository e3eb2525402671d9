#!/usr/bin/env bash
# PURE-tiny v2's recipe on one GPU, from the shards the CPU run made: the same random start (seed, size and
# tokenizer), the same four training stages (recipes/pure_tiny/train_v2*.yaml; the plain engine where
# DeepSpeed is missing), then the hold-out measurement. For the project's GPU machine (the device tool),
# which has neither the data nor tensorboard:
#
#   here:    bash recipes/pure_tiny/gpu_v2.sh --pack   # the shards, hold-out images and their captions in
#                                                      # data/pure_tiny_v2/gpu_carry.tar.gz (11 MB)
#   device:  carry data/pure_tiny_v2/gpu_carry.tar.gz, command
#            bash recipes/pure_tiny/gpu_v2.sh $OUT/pure_tiny_gpu                 (timeout_s 600)
#
# The tree and what a call carries must fit in 64 MiB together (tests/test_pure_tiny_v2.py keeps the tree
# small enough). The recipe gets BUDGET seconds (450), then is stopped and what it made is packed all the
# same; every stage resumes, so the same command continues it. The hold-out skips the whole-image pictures
# (WHOLE_PICTURES=1 makes them).
# OUT_DIR gets four files (the device tool brings back 8 at most): log.txt (each step with its elapsed
# seconds), results.md (the hold-out table), model.safetensors (the last stage's weights, 11 MB in bf16) and
# run.tar.gz (the rest of that export but its VQ, which is VQ's; the hold-out's results.json and pictures;
# each stage's metrics.jsonl and config.yaml). Another size: LAYERS=12 HIDDEN=512 HEADS=8 INTERMEDIATE=1408
# (RUN=outputs/NAME keeps runs apart). Without CUDA it refuses, unless CPU=1 (a dry run: add
# TRAIN_ARGS="--set train.max_steps=2" and HOLDOUT_ARGS="--limit 1 --crops-per-image 1"; 3.5 min here).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:?usage: bash recipes/pure_tiny/gpu_v2.sh OUT_DIR | --pack}
export DATA=${DATA:-data/pure_tiny_v2}
BUNDLE=$DATA/gpu_carry.tar.gz
if [ "$OUT_DIR" = --pack ]; then
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    mkdir "$staging/sources"  # the hold-out's captions only: all 8050 would be 8 MB
    ls "$DATA/sources/holdout" | sed 's/.*/"file": "&"/' | grep -F -f - "$DATA/sources/captions.jsonl" \
        > "$staging/sources/captions.jsonl"
    tar -czf "$staging/bundle.tar.gz" -C "$DATA" shards_photos shards_scenes shards_scenes2 sources/holdout \
        -C "$staging" sources/captions.jsonl
    mv "$staging/bundle.tar.gz" "$BUNDLE"
    echo "wrote $BUNDLE ($(du -h "$BUNDLE" | cut -f1)): carry it to the GPU machine"
    exit 0
fi
if [ ! -d "$DATA/shards_photos" ] && [ -f "$BUNDLE" ]; then  # on the GPU machine: the carried data
    tar -xzf "$BUNDLE" -C "$DATA"
fi
export PY=${PY:-python3} PYTHONPATH=${PYTHONPATH:-.}
if [ "${CPU:-0}" != 1 ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device (CPU=1 runs it on the CPU anyway)" >&2
    exit 2
fi
export SHARDS=given TOKENIZER=${TOKENIZER:-examples/pure-tiny} VQ=${VQ:-examples/pure-tiny-v2/vq}
export RUN=${RUN:-outputs/pure_tiny_v2_gpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TRAIN_THREADS=${TRAIN_THREADS:-8}
export TRAIN_ARGS="--set logging.tensorboard=false logging.progress=false ${TRAIN_ARGS:-}"
export HOLDOUT_ARGS="--quiet ${HOLDOUT_ARGS:-}"
export WHOLE_PICTURES=${WHOLE_PICTURES:-0} BUDGET=${BUDGET:-450}
mkdir -p "$OUT_DIR"
status=0
timeout "$BUDGET" bash recipes/pure_tiny/reproduce_v2.sh 2>&1 | tee -a "$OUT_DIR/log.txt" || status=$?
if [ $status = 124 ]; then
    echo "stopped after BUDGET=$BUDGET s: run the same command to continue" | tee -a "$OUT_DIR/log.txt"
fi

# what came of it, packed into four files
parts=()
for run in train train2 train3 train4; do
    for f in metrics.jsonl config.yaml; do
        if [ -f "$RUN/$run/$f" ]; then parts+=("$run/$f"); fi
    done
done
if [ -f "$RUN/holdout/results.md" ]; then
    parts+=(holdout)
    cp "$RUN/holdout/results.md" "$OUT_DIR/"
fi
if [ -f "$RUN/train4/export/model.safetensors" ]; then
    cp "$RUN/train4/export/model.safetensors" "$OUT_DIR/"
    for f in "$RUN"/train4/export/*; do
        case $f in */vq | */model.safetensors) ;; *) parts+=("train4/export/${f##*/}") ;; esac
    done
fi
if [ ${#parts[@]} -gt 0 ]; then tar -czf "$OUT_DIR/run.tar.gz" -C "$RUN" "${parts[@]}"; fi
$PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    >> "$OUT_DIR/log.txt"
exit $status

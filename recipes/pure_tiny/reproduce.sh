#!/usr/bin/env bash
# PURE-tiny from scratch, offline, on a CPU (about an hour on 2 cores): images -> VQ -> pairs -> tokenizer
# and random model -> shards -> instruction tuning -> held-out measurement -> comparison with the shipped card ->
# examples/pure-tiny/.
#
#   bash recipes/pure_tiny/reproduce.sh            # or: make pure-tiny
#
# Every step is resumable or skipped when its output exists, so an interrupted run continues where it
# stopped. Outputs: data/pure_tiny/ (images, pairs, shards), outputs/pure_tiny/ (VQ run, starting checkpoint,
# training run, measurement). SHIP=1 copies the result over examples/pure-tiny/ (the bundled checkpoint).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
DATA=data/pure_tiny
OUT=outputs/pure_tiny
SIZE=128  # HQ side in px; LQ is SIZE/4

step() { printf '\n== %s\n' "$*"; }

step "1/8 offline images (scikit-image, matplotlib, drawn) with captions"
[ -d $DATA/sources ] || $PY -m pure.data.sample_images recipes/pure_tiny/sources.yaml --out $DATA/sources

step "2/8 VQ tokenizer (LlamaGen architecture, 1024 codes)"
$PY -m pure.train_vq recipes/pure_tiny/vq.yaml

step "3/8 LQ/HQ pairs: 200 random $SIZE px crops per training image, Real-ESRGAN x4"
$PY -m pure.data.pairs --hq $DATA/sources/train --out $DATA/pairs --crop $SIZE --scale 4 \
    --crops-per-image 200 --flip --seed 0
$PY -m pure.data.records --pairs $DATA/pairs --captions $DATA/sources/captions.jsonl --out $DATA/records.jsonl

step "4/8 text tokenizer (BPE on the instruction, labels and captions) and a random 6-layer model"
[ -f $OUT/init/config.json ] || $PY -m pure.make_random_checkpoint $OUT/init --vq $OUT/vq/vq \
    --captions $DATA/sources/captions.jsonl --hidden 256 --layers 6 --heads 4 --intermediate 704 \
    --image-size $SIZE

step "5/8 pre-tokenised shards"
$PY -m pure.data.pretokenize --records $DATA/records.jsonl --model $OUT/init --out $DATA/shards \
    --size $SIZE --device cpu

step "6/8 instruction tuning (DeepSpeed ZeRO-2, one CPU process)"
if [ -f $OUT/train/export/config.json ]; then
    echo "already trained: $OUT/train/export"
elif [ -d $OUT/train/checkpoints ]; then
    $PY -m pure.train recipes/pure_tiny/train.yaml --resume
else
    $PY -m pure.train recipes/pure_tiny/train.yaml
fi

step "7/8 held-out measurement (bicubic, VQ ceiling, PURE-tiny with and without entropy top-k and guidance)"
# one thread: the numbers are then bit-reproducible, and tests/test_pure_tiny.py re-measures them that way
OMP_NUM_THREADS=1 $PY -m pure.eval.holdout --model $OUT/train/export --holdout $DATA/sources/holdout --seeds 0,1,2 \
    --crops-per-image 4 --overwrite \
    --out $OUT/holdout

step "8/8 does it reproduce the shipped checkpoint? (paired crop-by-crop differences against its card)"
$PY recipes/pure_tiny/compare.py $OUT/holdout/results.json examples/pure-tiny/holdout_results.json ||
    echo "(the scores above differ from the shipped card's by more than the hold-out set can resolve)"

if [ "${SHIP:-0}" = 1 ]; then
    $PY recipes/pure_tiny/ship.py --run $OUT --out examples/pure-tiny
fi

#!/usr/bin/env bash
# PURE-tiny v2, stage 7 (an experiment): stage 6 again, on its data and schedule, but from the shipped model
# deepened from 6 to 8 layers (recipes/pure_tiny/grow.py; the new layers start as no-ops). Stage 6 gained
# nothing from more data; this asks whether capacity is what holds the model back.
#
#   bash recipes/pure_tiny/stage7.sh     # after stage6.sh (its data and hold-out); ~60 min on 2 idle cores
#
# Outputs: outputs/pure_tiny_v2/{grown8,train7,holdout7}; resumes (rerun to continue the training).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=data/pure_tiny_v2
OUT=outputs/pure_tiny_v2
step() { printf '\n== [%s s] %s\n' "$SECONDS" "$*"; }

for need in $DATA/shards_photos $DATA/shards_scenes3 $DATA/sources/holdout; do
    [ -e $need ] || { echo "error: $need is missing: run recipes/pure_tiny/stage6.sh first" >&2; exit 2; }
done

step "the shipped model, 6 -> 8 layers (new after layers 2 and 5; the same logits)"
[ -d $OUT/grown8 ] || $PY recipes/pure_tiny/grow.py --model examples/pure-tiny --after 2,5 --out $OUT/grown8

step "stage 7 training (resumable: rerun to continue)"
if [ ! -f $OUT/train7/export/config.json ]; then
    resume=()
    [ -d $OUT/train7/checkpoints ] && resume=(--resume)
    OMP_NUM_THREADS=${TRAIN_THREADS:-2} $PY -m pure.train recipes/pure_tiny/train_v2_stage7.yaml \
        --set output_dir=$OUT/train7 ${resume[@]+"${resume[@]}"}
fi
cp recipes/pure_tiny/sampling.json $OUT/train7/export/sampling.json

step "hold-out (the card's protocol), paired with the shipped card and with stage 6"
$PY -m pure.eval.holdout --model $OUT/train7/export --holdout $DATA/sources/holdout --seeds 0 \
    --crops-per-image 4 --captions $DATA/sources/captions.jsonl --overwrite --out $OUT/holdout7 --whole-pictures
$PY recipes/pure_tiny/compare.py $OUT/holdout7/results.json examples/pure-tiny/holdout_results.json || true
[ -f $OUT/holdout6/results.json ] && $PY recipes/pure_tiny/compare.py $OUT/holdout7/results.json \
    $OUT/holdout6/results.json || true

#!/usr/bin/env bash
# PURE-tiny v2, stage 7 (an experiment): stage 6 again, on its data and schedule, but from the shipped model
# deepened from 6 to 8 layers (recipes/pure_tiny/grow.py; the new layers start as no-ops). Stage 6 gained
# nothing from more data; this asks whether capacity is what holds the model back.
#
#   bash recipes/pure_tiny/stage7.sh     # after stage6.sh (its data and hold-out); ~50 min on 2 idle cores
#   SHARE=0.5 bash recipes/pure_tiny/stage7.sh   # the new layers split their neighbour's work (grow.py --share)
#
# Outputs: outputs/pure_tiny_v2/{grown8,train7,holdout7}, with SHARE=0.5 {grown8_split,train7_split,
# holdout7_split}; resumes (rerun to continue the training).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=data/pure_tiny_v2
OUT=outputs/pure_tiny_v2
SHARE=${SHARE:-0}
SUFFIX=$([ "$SHARE" = 0 ] && echo "" || echo _split)
step() { printf '\n== [%s s] %s\n' "$SECONDS" "$*"; }

for need in $DATA/shards_photos $DATA/shards_scenes3 $DATA/sources/holdout; do
    [ -e $need ] || { echo "error: $need is missing: run recipes/pure_tiny/stage6.sh first" >&2; exit 2; }
done

step "the shipped model, 6 -> 8 layers (new after layers 2 and 5; the same logits)"
[ -d $OUT/grown8$SUFFIX ] || $PY recipes/pure_tiny/grow.py --model examples/pure-tiny --after 2,5 \
    --share "$SHARE" --out $OUT/grown8$SUFFIX

step "stage 7 training (resumable: rerun to continue)"
RUN=$OUT/train7$SUFFIX
if [ ! -f $RUN/export/config.json ]; then
    resume=()
    [ -d $RUN/checkpoints ] && resume=(--resume)
    OMP_NUM_THREADS=${TRAIN_THREADS:-2} $PY -m pure.train recipes/pure_tiny/train_v2_stage7.yaml \
        --set output_dir=$RUN model.init_from=$OUT/grown8$SUFFIX ${resume[@]+"${resume[@]}"}
fi
cp recipes/pure_tiny/sampling.json $RUN/export/sampling.json

step "hold-out (the card's protocol), paired with the shipped card and with stage 6"
$PY -m pure.eval.holdout --model $RUN/export --holdout $DATA/sources/holdout --seeds 0 --crops-per-image 4 \
    --captions $DATA/sources/captions.jsonl --overwrite --out $OUT/holdout7$SUFFIX --whole-pictures
$PY recipes/pure_tiny/compare.py $OUT/holdout7$SUFFIX/results.json examples/pure-tiny/holdout_results.json || true
[ -f $OUT/holdout6/results.json ] && $PY recipes/pure_tiny/compare.py $OUT/holdout7$SUFFIX/results.json \
    $OUT/holdout6/results.json || true

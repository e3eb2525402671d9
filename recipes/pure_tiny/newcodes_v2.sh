#!/usr/bin/env bash
# PURE-tiny v2 tuned onto another tokenizer's codes (an experiment; issue 16), then measured like the card:
#
#   VQ=outputs/pure_tiny_v2/vq_joint/vq bash recipes/pure_tiny/newcodes_v2.sh     # resumable: rerun to continue
#
# 1. RUN/init: the shipped model (examples/pure-tiny) with VQ in its vq/ (VQ must have the same vocabulary),
#    each new code's embedding and output row the mean of the old codes' it replaces (remap_codes.py, 7 min);
# 2. data/pure_tiny_v2/shards_{photos,scenes,scenes2}_newcodes: reproduce_v2.sh's records tokenised with it
#    (the pairs and records must exist: reproduce_v2.sh steps 1 and 3);
# 3. RUN/train: recipes/pure_tiny/train_v2_newcodes.yaml from RUN/init (checkpoints every 100 steps);
# 4. RUN/holdout: pure.eval.holdout on the card's protocol, and compare.py against the shipped card.
# RUN is outputs/pure_tiny_v2/newcodes unless set. MORE=1 adds 3b, RUN/train2: 800 more steps from RUN/train's
# export (recipes/pure_tiny/train_v2_newcodes2.yaml, resumable), and step 4 measures that into RUN/holdout2.
# SCRATCH=1 instead trains the whole four-stage recipe on those shards from the random start, as the shipped
# model was trained on the old codes (reproduce_v2.sh with the shipped tokenizer.json and VQ's weights, its data
# folder data/pure_tiny_v2_newcodes linking the new shards; ~6 h on 2 cores, resumable) into
# outputs/pure_tiny_v2/scratch_newcodes, and measures it on the card's protocol.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=data/pure_tiny_v2
OUT=${RUN:-outputs/pure_tiny_v2/newcodes}
: "${VQ:?set VQ to the tokenizer folder whose codes the model should learn}"

step() { printf '\n== [%s s] %s\n' "$SECONDS" "$*"; }

step "1/4 $OUT/init: the shipped model, its image rows carried over to $VQ's codes, with $VQ as its tokenizer"
[ -f $OUT/init/vq/config.json ] || $PY recipes/pure_tiny/remap_codes.py --model examples/pure-tiny --vq "$VQ" \
    --out $OUT/init --fit $DATA/sources/train $DATA/sources/train/scenes --limit 500 --check $DATA/sources/holdout

step "2/4 shards tokenised with $VQ"
for set in photos scenes scenes2; do
    $PY -m pure.data.pretokenize --records $DATA/records_$set.jsonl --model $OUT/init \
        --out $DATA/shards_${set}_newcodes --size 128 --device cpu --workers ${WORKERS:-2} --shard-size 500
done

if [ "${SCRATCH:-0}" = 1 ]; then
    step "3/4 the four stages from the random start on these shards (reproduce_v2.sh; resumable)"
    scratch=data/pure_tiny_v2_newcodes
    mkdir -p $scratch
    for set in photos scenes scenes2; do ln -sfn ../pure_tiny_v2/shards_${set}_newcodes $scratch/shards_$set; done
    ln -sfn ../pure_tiny_v2/sources $scratch/sources
    VQ="$VQ" TOKENIZER=examples/pure-tiny SHARDS=given DATA=$scratch RUN=outputs/pure_tiny_v2/scratch_newcodes \
        exec bash recipes/pure_tiny/reproduce_v2.sh
fi

# tune RUN RECIPE INIT: train (or resume, or skip when exported) one stage from INIT's export
tune() {
    [ -f $OUT/$1/export/config.json ] && return
    local resume=()
    [ -d $OUT/$1/checkpoints ] && resume=(--resume)
    OMP_NUM_THREADS=${TRAIN_THREADS:-2} $PY -m pure.train "$2" \
        --set output_dir=$OUT/$1 model.init_from=$3 ${resume[@]+"${resume[@]}"}
}

step "3/4 tuning (resumable)"
tune train recipes/pure_tiny/train_v2_newcodes.yaml $OUT/init
last=train holdout=holdout
if [ "${MORE:-0}" = 1 ]; then
    step "3b/4 800 more steps from its export, on a lower cosine (resumable)"
    tune train2 recipes/pure_tiny/train_v2_newcodes2.yaml $OUT/train/export
    last=train2 holdout=holdout2
fi

step "4/4 hold-out measurement of $OUT/$last, and the paired differences against the shipped card"
cp recipes/pure_tiny/sampling.json $OUT/$last/export/sampling.json
[ -f $OUT/$holdout/results.json ] || $PY -m pure.eval.holdout --model $OUT/$last/export \
    --holdout $DATA/sources/holdout --seeds 0 --crops-per-image 4 --captions $DATA/sources/captions.jsonl \
    --overwrite --out $OUT/$holdout
$PY recipes/pure_tiny/compare.py $OUT/$holdout/results.json examples/pure-tiny/holdout_results.json || true

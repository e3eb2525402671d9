#!/usr/bin/env bash
# PURE-tiny v2 from scratch, offline, on a CPU: images -> VQ (with its curve) -> pairs -> tokenizer and
# random model -> shards -> instruction tuning -> hold-out measurement (copy baseline, token accuracy,
# Perceive, Understand, GMS-Y).
#
#   bash recipes/pure_tiny/reproduce_v2.sh
#
# Every step skips or resumes what exists, so an interrupted run continues where it stopped (the VQ in
# chunks of 250 steps, the model from its latest checkpoint). Outputs: data/pure_tiny_v2/ and
# outputs/pure_tiny_v2/. VQ=examples/pure-tiny-v2/vq skips the tokenizer's 47 minutes (its committed
# result). SHIP=1 copies the result over examples/pure-tiny/ (only do that when its card beats the shipped
# one: see the README). VQ_STEPS (1500, as the recipe) and the trainer's max_steps set the length.
#
# From shards made before (another machine's, e.g. on a GPU: recipes/pure_tiny/gpu_v2.sh): SHARDS=given skips
# the images, pairs and shards (steps 1, 3, 5; the hold-out images and captions.jsonl must be there), and
# TOKENIZER=examples/pure-tiny gives the new model the tokenizer they were made with (a BPE learnt again
# can differ; the trainer refuses shards of another tokenizer). RUN=outputs/NAME trains elsewhere than
# outputs/pure_tiny_v2, DATA=data/NAME makes (or, SHARDS=given, reads) the images, pairs and shards there
# (each stage's recipe copied into RUN/recipes with its shard paths pointed there); LAYERS, HIDDEN, HEADS,
# INTERMEDIATE another size; TRAIN_ARGS="--set KEY=VALUE ..." go to every stage's trainer, HOLDOUT_ARGS to the
# hold-out measurement (WHOLE_PICTURES=0: no whole-image pictures).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${DATA:-data/pure_tiny_v2}
OUT=${RUN:-outputs/pure_tiny_v2}
SIZE=128  # HQ side in px; LQ is SIZE/4
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"

step() { printf '\n== [%s s] %s\n' "$SECONDS" "$*"; }

if [ "${SHARDS:-}" = given ]; then
    for need in $DATA/shards_photos $DATA/shards_scenes $DATA/shards_scenes2 $DATA/sources/holdout \
        $DATA/sources/captions.jsonl; do
        [ -e "$need" ] || { echo "error: SHARDS=given but $need is missing" >&2; exit 2; }
    done
    step "1/8 images: given (SHARDS=given)"
else
    step "1/8 images: v1's photos and hold-out, 2000 + 6000 procedural training scenes, 16 hold-out scenes"
    bash recipes/pure_tiny/data_v2.sh
fi

if [ -n "${VQ:-}" ]; then  # VQ=examples/pure-tiny-v2/vq: the committed tokenizer, not trained again
    step "2/8 VQ tokenizer: $VQ (given)"
    VQ_METRICS=$VQ/metrics.json  # its hold-out figures, for the card
else
    step "2/8 VQ tokenizer, trained in chunks, each measured against bicubic ($OUT/vq/curve.png)"
    STEPS=${VQ_STEPS:-1500} RUN=$OUT/vq bash recipes/pure_tiny/vq_v2_curve.sh
    VQ=$OUT/vq/vq
    VQ_METRICS=$OUT/vq/metrics.json
fi

if [ "${SHARDS:-}" = given ]; then
step "3/8 LQ/HQ pairs: given (SHARDS=given)"
else
step "3/8 LQ/HQ pairs, Real-ESRGAN x4: 100 random $SIZE px crops per photo, each scene whole twice, fresh ones once"
$PY -m pure.data.pairs --hq $DATA/sources/train --out $DATA/pairs_photos --crop $SIZE --scale 4 \
    --crops-per-image 100 --flip --seed 0
$PY -m pure.data.pairs --hq $DATA/sources/train/scenes --out $DATA/pairs_scenes --crop $SIZE --scale 4 \
    --crops-per-image 2 --flip --seed 0
$PY -m pure.data.pairs --hq $DATA/sources/train/scenes2 --out $DATA/pairs_scenes2 --crop $SIZE --scale 4 \
    --crops-per-image 1 --flip --seed 1
for set in photos scenes scenes2; do
    $PY -m pure.data.records --pairs $DATA/pairs_$set --captions $DATA/sources/captions.jsonl \
        --out $DATA/records_$set.jsonl
done
fi

step "4/8 text tokenizer (BPE on the instruction, labels and captions, or TOKENIZER's) and a random model"
if [ -n "${TOKENIZER:-}" ]; then TEXT=(--tokenizer "$TOKENIZER"); else TEXT=(--captions $DATA/sources/captions.jsonl); fi
[ -f $OUT/init/config.json ] || $PY -m pure.make_random_checkpoint $OUT/init --vq $VQ "${TEXT[@]}" \
    --hidden ${HIDDEN:-256} --layers ${LAYERS:-6} --heads ${HEADS:-4} --intermediate ${INTERMEDIATE:-704} \
    --image-size $SIZE

if [ "${SHARDS:-}" = given ]; then
step "5/8 pre-tokenised shards: given (SHARDS=given)"
else
step "5/8 pre-tokenised shards"
for set in photos scenes scenes2; do
    $PY -m pure.data.pretokenize --records $DATA/records_$set.jsonl --model $OUT/init --out $DATA/shards_$set \
        --size $SIZE --device cpu --workers ${WORKERS:-2} --shard-size 500
done
fi

# train RUN RECIPE [--set ...]: train (or resume, or skip when exported) one stage, on every core. The
# stage recipes read data/pure_tiny_v2's shards; another DATA trains from a copy of each pointed at its own.
train() {
    local run=$1 recipe=$2
    shift 2
    if [ -f $OUT/$run/export/config.json ]; then
        echo "already trained: $OUT/$run/export"
        return
    fi
    if [ "$DATA" != data/pure_tiny_v2 ]; then
        mkdir -p $OUT/recipes
        sed "s#data/pure_tiny_v2/#${DATA%/}/#g" "$recipe" > $OUT/recipes/$(basename "$recipe")
        recipe=$OUT/recipes/$(basename "$recipe")
    fi
    [ -d $OUT/$run/checkpoints ] && set -- "$@" --resume
    OMP_NUM_THREADS=${TRAIN_THREADS:-2} $PY -m pure.train $recipe --set output_dir=$OUT/$run "$@" \
        ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
}

step "6/8 instruction tuning (resumable: rerun to continue)"
train train recipes/pure_tiny/train_v2.yaml --set model.init_from=$OUT/init

step "6b/8 stage 2: on from stage 1's export, part of the HQ image inputs replaced (resumable)"
train train2 recipes/pure_tiny/train_v2_stage2.yaml --set model.init_from=$OUT/train/export

step "6c/8 stage 3: on from stage 2's export, half of the HQ image inputs replaced (resumable)"
train train3 recipes/pure_tiny/train_v2_stage3.yaml --set model.init_from=$OUT/train2/export

step "6d/8 stage 4: on from stage 3's export, on 6000 fresh scenes, its own samples as part of its inputs (resumable)"
train train4 recipes/pure_tiny/train_v2_stage4.yaml --set model.init_from=$OUT/train3/export

step "7/8 hold-out measurement: bicubic, copy, VQ ceiling, PURE-tiny (PURE's defaults, no entropy, no guidance, greedy, both)"
# the model's decoding defaults, chosen on validation scenes (recipes/pure_tiny/choose_sampling.py; README)
cp recipes/pure_tiny/sampling.json $OUT/train4/export/sampling.json
read -r -a HOLDOUT_ARGS <<< "${HOLDOUT_ARGS:-}"  # e.g. "--limit 1" for a dry run
[ "${WHOLE_PICTURES:-1}" = 1 ] && HOLDOUT_ARGS+=(--whole-pictures)  # each photo restored whole, by tiles
$PY -m pure.eval.holdout --model $OUT/train4/export --holdout $DATA/sources/holdout --seeds 0 \
    --crops-per-image 4 --captions $DATA/sources/captions.jsonl --overwrite --out $OUT/holdout \
    ${HOLDOUT_ARGS[@]+"${HOLDOUT_ARGS[@]}"}

step "8/8 the card, and does it reproduce the shipped checkpoint? (paired crop-by-crop differences against its card)"
cat $OUT/holdout/results.md
$PY recipes/pure_tiny/compare.py $OUT/holdout/results.json examples/pure-tiny/holdout_results.json ||
    echo "(the scores above differ from the shipped card's by more than the hold-out set can resolve)"
if [ "${SHIP:-0}" = 1 ]; then
    $PY recipes/pure_tiny/ship.py --run $OUT --out examples/pure-tiny --card recipes/pure_tiny/card_template_v2.md \
        --stages train train2 train3 train4 --vq-metrics "$VQ_METRICS"
fi

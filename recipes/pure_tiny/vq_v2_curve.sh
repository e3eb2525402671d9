#!/usr/bin/env bash
# PURE-tiny v2 tokenizer, trained in chunks with a hold-out measurement after each (the curve):
#
#   bash recipes/pure_tiny/vq_v2_curve.sh            # resumable: rerun after an interruption
#
# Each chunk is `python -m pure.train_vq recipes/pure_tiny/vq_v2.yaml --max-steps S` (the run checkpoints
# and resumes exactly; the LR schedule spans the recipe's train.steps whatever the chunking), then
# recipes/pure_tiny/vq_curve.py measures the chunk's export against bicubic on the hold-out protocol and
# appends to outputs/pure_tiny_v2/vq/curve.jsonl (plot: curve.png). CHUNK (250) and STEPS (1500) may be set;
# RECIPE=recipes/pure_tiny/vq_v2_gn32.yaml RUN=outputs/pure_tiny_v2/vq_gn32 runs the A/B twin, and
# RECIPE=recipes/pure_tiny/vq_v2_decoder.yaml RUN=outputs/pure_tiny_v2/vq_decoder CHUNK=500 the decoder's stage
# (RUN is the run's output_dir whatever the recipe says; SET="key=value ..." go to the trainer's --set).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RECIPE=${RECIPE:-recipes/pure_tiny/vq_v2.yaml}
RUN=${RUN:-outputs/pure_tiny_v2/vq}
HOLDOUT=data/pure_tiny_v2/sources/holdout
CHUNK=${CHUNK:-250}
STEPS=${STEPS:-1500}
[ -d $HOLDOUT ] || bash recipes/pure_tiny/data_v2.sh
for ((s = CHUNK; s <= STEPS; s += CHUNK)); do
    if [ -f $RUN/curve.jsonl ] && grep -q "\"step\": $s," $RUN/curve.jsonl; then continue; fi
    $PY -m pure.train_vq $RECIPE --max-steps $s --no-progress --set output_dir=$RUN ${SET:-}
    $PY recipes/pure_tiny/vq_curve.py $RUN $HOLDOUT
done

#!/usr/bin/env bash
# PURE-tiny v2 images, offline (about 10 min on 2 shared cores): data/pure_tiny_v2/sources/{train,holdout}/
# and captions.jsonl (DATA=data/NAME: data/NAME/sources/).
#
# - the v1 image set (recipes/pure_tiny/sources.yaml): 29 training photos and drawings, and the 5 hold-out
#   images of the v1 card (astronaut, coffee, camera, gravel, shapes_holdout), with their fixed captions;
# - 2000 procedural training scenes in train/scenes/, seeds 100000-101999 (pure.data.synthetic_images,
#   128 px; a subfolder, so that pairs are cut from photos and scenes at different rates);
# - 6000 fresh procedural training scenes in train/scenes2/, seeds 102000-107999, each cut once: stage 4's
#   data, never seen by stages 1-3 (which saw the first 2000 some ten times over);
# - 16 procedural hold-out scenes, seeds 0-15: never drawn for training (training seeds start at 100000),
#   each captioned from its parameters, so the model's captions of them can be scored (Understand).
#
# The hold-out is fixed by these seeds and sources.yaml; every step skips what exists, so reruns are cheap.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${DATA:-data/pure_tiny_v2}/sources  # reproduce_v2.sh's DATA
TRAIN_SCENES=${TRAIN_SCENES:-2000}
FRESH_SCENES=${FRESH_SCENES:-6000}
[ -d $OUT/holdout ] || $PY -m pure.data.sample_images recipes/pure_tiny/sources.yaml --out $OUT
$PY -m pure.data.synthetic_images --out $OUT --split holdout --first-seed 0 --count 16 --size 128
$PY -m pure.data.synthetic_images --out $OUT --split train/scenes --first-seed 100000 --count $TRAIN_SCENES --size 128
$PY -m pure.data.synthetic_images --out $OUT --split train/scenes2 --first-seed 102000 --count $FRESH_SCENES --size 128

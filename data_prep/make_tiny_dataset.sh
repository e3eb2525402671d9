#!/usr/bin/env bash
# From a folder of a few bundled photographs (scikit-image's sample images) to training shards, offline,
# on a CPU, in a minute or two. Every step is a documented `python -m pure.data.*` command (see
# data_prep/README.md); each is resumable, so rerunning this script finishes an interrupted run.
#
#   data_prep/make_tiny_dataset.sh [OUT]          # default OUT=outputs/tiny_dataset
#
# Environment:
#   PYTHON  interpreter (default .venv/bin/python)
#   CKPT    checkpoint folder whose tokenizer.json and vq/ encode the shards (default: a tiny *random*
#           checkpoint made in OUT/checkpoint; use the real PURE folder + --vq vq_ds8_c2i.pt for real data)
#   LLAVA   a LLaVA model id or folder: caption the HQ crops with it (default: import the hand-written
#           captions of the source images below; no model is loaded)
#   CROP    HQ crop size, also the image size of the shards (default 512, PURE's; 128 is quick)
set -euo pipefail

OUT=${1:-outputs/tiny_dataset}
PY=${PYTHON:-.venv/bin/python}
CKPT=${CKPT:-$OUT/checkpoint}
CROP=${CROP:-512}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT"

echo "== 0. source images: scikit-image's bundled photographs (+ one broken file, to show skipping)"
"$PY" - "$OUT/src" <<'PYEOF'
import sys
from pathlib import Path

import skimage.data
from PIL import Image

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
# 512 px and larger ones give crops; coffee and chelsea are smaller than a 512 crop and are skipped.
for name in ("astronaut", "retina", "hubble_deep_field", "immunohistochemistry", "camera", "coffee", "chelsea"):
    path = out / f"{name}.png"
    if not path.exists():
        Image.fromarray(getattr(skimage.data, name)()).save(path)
broken = out / "broken.jpg"
if not broken.exists():
    Image.fromarray(skimage.data.rocket()).save(broken, quality=90)
    broken.write_bytes(broken.read_bytes()[:5000])  # truncated: a download that stopped half-way
PYEOF

echo "== 1. LQ/HQ pairs: random ${CROP} px HQ crops, Real-ESRGAN degradations, parameter records"
"$PY" -m pure.data.pairs --hq "$OUT/src" --out "$OUT/pairs" --crop "$CROP" --crops-per-image 2 --seed 0

echo "== 2. captions"
if [ -n "${LLAVA:-}" ]; then
  "$PY" -m pure.data.captions --images "$OUT/pairs/hq" --out "$OUT/captions.jsonl" --model "$LLAVA"
else
  cat > "$OUT/source_captions.json" <<'JSONEOF'
{
  "astronaut.png": "The image shows a smiling astronaut in a white spacesuit holding a helmet, with an American flag and a space shuttle model behind her.",
  "retina.png": "The image shows a photograph of the back of a human eye, an orange-red retina with branching blood vessels spreading from a bright optic disc.",
  "hubble_deep_field.png": "The image shows a dark field of deep space scattered with many small galaxies of different shapes and colours.",
  "immunohistochemistry.png": "The image shows a microscope view of stained tissue, with many small brown and blue cells on a pale background.",
  "camera.png": "The image shows a black-and-white photograph of a man in a dark coat looking through a camera on a tripod in an open field.",
  "coffee.png": "The image shows a cup of coffee with latte art on a saucer, next to a spoon on a wooden table."
}
JSONEOF
  # Captions of the *source* images: records fall back to them for every crop of that image.
  "$PY" -m pure.data.captions --images "$OUT/src" --out "$OUT/captions.jsonl" \
    --import "$OUT/source_captions.json" --no-model
fi

echo "== 3. instruction records (PURE's {conversations, image: [lq, hq]} shape)"
"$PY" -m pure.data.records --pairs "$OUT/pairs" --captions "$OUT/captions.jsonl" --out "$OUT/records.jsonl"

if [ ! -f "$CKPT/tokenizer.json" ]; then
  echo "== (a tiny random checkpoint for its tokenizer and VQ: $CKPT)"
  "$PY" -m pure.make_random_checkpoint "$CKPT"
fi

echo "== 4. pre-tokenised shards"
"$PY" -m pure.data.pretokenize --records "$OUT/records.jsonl" --model "$CKPT" --out "$OUT/shards" \
  --shard-size 4 --size "$CROP" --device cpu

echo "== 5. data config for training"
cat > "$OUT/data.yaml" <<'YAMLEOF'
# Shard sets and their sampling ratios (see recipes/data/example.yaml); paths relative to this file.
sets:
  - {path: shards, ratio: 1.0, name: skimage}
YAMLEOF
"$PY" -c "
import sys
from pure.data.shards import load_data_config, shard_set_summary
for s in shard_set_summary(load_data_config(sys.argv[1])):
    print(f\"data config {sys.argv[1]}: set {s['name']}: {s['examples']} examples, ratio {s['ratio']}\")
" "$OUT/data.yaml"

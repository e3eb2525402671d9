"""Tokens per forward of Jacobi 16 on a trained checkpoint: independent vs coupled drafts, random vs from the
input (LQ) image, on 4 scikit-image photos restored x4 at the checkpoint's size, temperature 0.9.

    python recipes/bench/jacobi_drafts.py [CHECKPOINT]     # default examples/pure-tiny
"""

import sys

import torch
from PIL import Image
from skimage import data

from pure.decoding.config import SamplingConfig
from pure.restorer import PureRestorer

torch.set_num_threads(1)
r = PureRestorer.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "examples/pure-tiny", device="cpu")
size = r.image_size
tot = {}
for name, arr in {
    "astronaut": data.astronaut(),
    "coffee": data.coffee(),
    "chelsea": data.chelsea(),
    "camera": data.camera(),
}.items():
    img = Image.fromarray(arr).convert("RGB").resize((size // 4, size // 4), Image.BICUBIC)
    prepared, lq_codes, prompts = r._prompts([img], size)
    h, w = lq_codes.shape[1:]
    body = h * (w + 1)
    row = []
    for coupled in (False, True):
        for drafts in ("random", "input"):
            s = SamplingConfig(
                temperature=0.9, jacobi_window=16, jacobi_drafts=drafts, jacobi_coupled=coupled
            )
            out = r.decoder(s).generate(prompts, h, w, generators=[torch.Generator().manual_seed(0)])
            tpp = body / (out.image_forward_passes - 1)
            tot.setdefault((coupled, drafts), []).append(tpp)
            row.append(f"{'coupled' if coupled else 'independent'}/{drafts} {tpp:.2f}")
    print(name, "T=0.9:", "; ".join(row), flush=True)
for k, v in tot.items():
    print(k, f"mean {sum(v) / len(v):.2f} tokens per forward")

"""What an 8x tokenizer could reach on the v2 hold-out, without training one: references for the VQ curve.

    .venv/bin/python recipes/pure_tiny/vq_bounds.py [HOLDOUT] [TRAIN]    # ~1 min on one CPU thread

On the hold-out protocol of ``vq_curve.py`` (128 px crops, up to 4 per image), against the HQ crop:

- ``thumbnail x8`` / ``x4``: the crop box-filtered to 1/8 (1/4) of its side at full precision and upsampled
  bicubically: 24 bits per 8x8 block (per 4x4 block), no degradation;
- ``k-means VQ-8, 1024 codes``: a VQ-8 with PURE-tiny's vocabulary and no learning but k-means: each 8x8
  block is its mean colour, replaced by the nearest of 1024 colours (k-means on the training photos' block
  colours, seed 0), and decoded by bicubic upsampling. 10 bits per block, as the learned tokenizer.

If the k-means VQ beats bicubic x4, a 1024-code VQ-8 is not too small for the target; a learned one below it
is short of training or of a way to carry colour, not of codes.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from pure.eval.holdout import crop_boxes, gms_y, psnr_y, ssim_y
from pure.imageio import list_images, load_image

CROP, CROPS, CODES, ITERATIONS = 128, 4, 1024, 30


def block_colours(paths, per_image: int = 2000) -> torch.Tensor:
    rng = np.random.default_rng(0)
    out = []
    for path in paths:
        image = load_image(path).convert("RGB")
        w, h = image.size
        small = np.asarray(image.resize((max(w // 8, 1), max(h // 8, 1)), Image.BOX), np.float32).reshape(
            -1, 3
        )
        out.append(small[rng.choice(len(small), min(len(small), per_image), replace=False)])
    return torch.from_numpy(np.concatenate(out))


def kmeans(x: torch.Tensor, k: int) -> torch.Tensor:
    """Lloyd's k-means, ``ITERATIONS`` rounds from ``k`` random points (seed 0)."""
    centres = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k]].clone()
    for _ in range(ITERATIONS):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


def main(holdout: str, train: str) -> None:
    centres = kmeans(block_colours(list_images(train)), CODES)
    grid = CROP // 8
    scores: dict[str, list] = {"thumbnail x8": [], "thumbnail x4": [], f"k-means VQ-8, {CODES} codes": []}
    for path in list_images(holdout):
        image = load_image(path).convert("RGB")
        for top, left in crop_boxes(*image.size, CROP, CROPS):
            hq = image.crop((left, top, left + CROP, top + CROP))
            outputs = {}
            for factor in (8, 4):
                small = hq.resize((CROP // factor, CROP // factor), Image.BOX)
                outputs[f"thumbnail x{factor}"] = small.resize((CROP, CROP), Image.BICUBIC)
            colours = torch.from_numpy(
                np.asarray(hq.resize((grid, grid), Image.BOX), np.float32).reshape(-1, 3)
            )
            quantised = centres[torch.cdist(colours, centres).argmin(1)].view(grid, grid, 3).numpy()
            small = Image.fromarray(np.clip(quantised + 0.5, 0, 255).astype(np.uint8))
            outputs[f"k-means VQ-8, {CODES} codes"] = small.resize((CROP, CROP), Image.BICUBIC)
            for name, output in outputs.items():
                scores[name].append((psnr_y(output, hq), ssim_y(output, hq), gms_y(output, hq)))
    print("| reference | crops | PSNR-Y | SSIM-Y | GMS-Y |\n|---|---|---|---|---|")
    for name, rows in scores.items():
        psnr, ssim, gms = np.mean(rows, axis=0)
        print(f"| {name} | {len(rows)} | {psnr:.2f} | {ssim:.4f} | {gms:.4f} |")


if __name__ == "__main__":
    args = (
        sys.argv[1:]
        + ["data/pure_tiny_v2/sources/holdout", "data/pure_tiny_v2/sources/train"][len(sys.argv) - 1 :]
    )
    torch.set_num_threads(1)
    main(args[0], args[1])

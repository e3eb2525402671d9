"""How many codes two tokenizers of the same vocabulary give alike: can a model trained on one keep its codes?

    .venv/bin/python recipes/pure_tiny/vq_code_agreement.py \
        examples/pure-tiny/vq outputs/pure_tiny_v2/vq_joint/vq \
        data/pure_tiny_v2/sources/holdout data/pure_tiny_v2/sources/train/scenes --limit 200

encodes the images of each folder (whole, centre-cropped to a multiple of 8 px and at most 512 px a side; the
first ``--limit`` of each, sorted) with both tokenizers and prints, per folder, the share of positions whose
codes are equal. A tokenizer trained on from another (recipes/pure_tiny/vq_v2_joint.yaml) changes codes; a
model trained on the old codes needs tuning on the new ones, and this says how much of its vocabulary moved.
``--picture PATH`` also draws, for the first ``--picture-images`` images of the first folder (256 px centre
crops), the image beside both tokenizers' reconstructions, with a zoomed row.
"""

from __future__ import annotations

import argparse

import torch

from pure.imageio import list_images
from pure.train_vq import centre_crop, load_rgb
from pure.viz import comparison, stack
from pure.vq import VQModel, pil_to_pixels, pixels_to_pil

MAX_SIDE = 512  # images are encoded whole up to this side, centre-cropped beyond it


@torch.no_grad()
def code_pairs(a: VQModel, b: VQModel, paths: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tokenizers' codes of every position of ``paths``' images, flattened."""
    codes_a, codes_b = [], []
    for path in paths:
        pixels = pil_to_pixels(centre_crop(load_rgb(path), a.config.downsample, MAX_SIDE))[None]
        codes_a.append(a.encode(pixels).flatten())
        codes_b.append(b.encode(pixels).flatten())
    return torch.cat(codes_a), torch.cat(codes_b)


def agreement(a: VQModel, b: VQModel, paths: list) -> tuple[float, int]:
    """Share of equal codes over all positions of ``paths``' images, and the number of positions."""
    codes_a, codes_b = code_pairs(a, b, paths)
    return int((codes_a == codes_b).sum()) / codes_a.numel(), codes_a.numel()


@torch.no_grad()
def picture(a: VQModel, b: VQModel, names: tuple[str, str], paths: list, side: int = 256):
    """Each image (centre crop of at most ``side`` px) beside its reconstruction by ``a`` and by ``b``."""
    rows = []
    for path in paths:
        crop = centre_crop(load_rgb(path), a.config.downsample, side)
        pixels = pil_to_pixels(crop)[None]
        panels = [(path.name, crop)]
        for name, vq in zip(names, (a, b), strict=True):
            panels.append((name, pixels_to_pil(vq.decode(vq.encode(pixels))[0])))
        rows.append(comparison(panels))
    return stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="a tokenizer folder (pure.vq.VQModel.save_pretrained)")
    parser.add_argument("new", help="another of the same vocabulary size")
    parser.add_argument("folders", nargs="+", help="image folders to encode")
    parser.add_argument("--limit", type=int, default=0, help="the first N images of each folder (0: all)")
    parser.add_argument("--picture", help="PNG to draw reconstructions by both tokenizers into")
    parser.add_argument("--picture-images", type=int, default=3, help="images in the picture (default 3)")
    args = parser.parse_args(argv)
    old, new = VQModel.from_pretrained(args.old).eval(), VQModel.from_pretrained(args.new).eval()
    if old.config.codebook_size != new.config.codebook_size:
        parser.error(f"vocabularies differ: {old.config.codebook_size} vs {new.config.codebook_size} codes")
    for folder in args.folders:
        paths = list_images(folder)[: args.limit or None]
        share, positions = agreement(old, new, paths)
        print(f"{folder}: {share:.1%} of {positions} codes equal ({len(paths)} images)")
    if args.picture:
        paths = list_images(args.folders[0])[: args.picture_images]
        picture(old, new, (f"old: {args.old}", f"new: {args.new}"), paths).save(args.picture)
        print(f"wrote {args.picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Carry a model's image vocabulary over to another tokenizer of the same size, before tuning on its codes.

    .venv/bin/python recipes/pure_tiny/remap_codes.py --model examples/pure-tiny \
        --vq outputs/pure_tiny_v2/vq_joint/vq --out outputs/pure_tiny_v2/newcodes/init \
        --fit data/pure_tiny_v2/sources/train data/pure_tiny_v2/sources/train/scenes --limit 500 \
        --check data/pure_tiny_v2/sources/holdout

A tokenizer trained on from another (recipes/pure_tiny/vq_v2_joint.yaml) keeps the vocabulary's size but not
its meaning: after 3000 steps 6% of the hold-out's codes were the same. Both tokenizers encode the ``--fit``
images (vq_code_agreement.py's ``code_pairs``: whole, centre-cropped to a multiple of 8 px, at most 512 px a
side); ``P(old i | new j)`` counts how often new code j sits where old code i did. Each new code's input
embedding and output row become the ``P(i | j)``-weighted mean of the old codes' rows (a code the fit images
never produce keeps its row), so the model starts out reading and writing the new codes roughly as it did the
old ones. ``--check`` prints, on other images, the share of positions whose old code is the most likely one
under the map, beside the share of equal codes. ``--out`` is the model folder (config, text tokenizer,
weights, the new ``vq/``), written whole or not at all.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from vq_code_agreement import code_pairs  # this folder's: both tokenizers' codes of the same images

from pure.imageio import list_images
from pure.tokenizer import PureTokenizer
from pure.vq import VQModel

ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # the tables indexed by vocabulary id


def co_occurrence(old_codes: torch.Tensor, new_codes: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size)`` counts: row = new code, column = old code at the same position."""
    return torch.bincount(new_codes * size + old_codes, minlength=size * size).view(size, size).double()


def transition(counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``counts`` normalised to ``P(old | new)``; a new code never seen maps to its own index."""
    seen = counts.sum(1, keepdim=True)
    return torch.where(seen > 0, counts / seen.clamp_min(1), torch.eye(len(counts), dtype=counts.dtype))


def remap_rows(weights: dict[str, torch.Tensor], mix: torch.Tensor, code_to_id: torch.Tensor) -> None:
    """In place: the image rows of ``ROWS`` become ``mix @ old image rows`` (row j of ``mix``: new code j)."""
    for name in ROWS:
        table = weights[name]
        old_rows = table[code_to_id].double()
        table[code_to_id] = (mix @ old_rows).to(table.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="model folder (config.json, tokenizer.json, weights, vq/)"
    )
    parser.add_argument("--vq", required=True, help="the new tokenizer's folder, of the same vocabulary size")
    parser.add_argument("--out", required=True, help="new model folder (must not exist)")
    parser.add_argument("--fit", nargs="+", required=True, help="image folders the map is counted on")
    parser.add_argument("--check", nargs="*", default=[], help="other image folders to report the map on")
    parser.add_argument("--limit", type=int, default=0, help="the first N images of each folder (0: all)")
    args = parser.parse_args(argv)
    model, out = Path(args.model), Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; choose another --out or remove it")
    old, new = VQModel.from_pretrained(model / "vq").eval(), VQModel.from_pretrained(args.vq).eval()
    size = old.config.codebook_size
    if new.config.codebook_size != size:
        parser.error(f"vocabularies differ: {size} vs {new.config.codebook_size} codes")
    code_to_id = PureTokenizer.from_checkpoint(model).vocab.code_to_id

    def folder_codes(folders: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [code_pairs(old, new, list_images(f)[: args.limit or None]) for f in folders]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    old_codes, new_codes = folder_codes(args.fit)
    counts = co_occurrence(old_codes, new_codes, size)
    mix = transition(counts)
    equal = float((old_codes == new_codes).double().mean())
    mapped = int((counts.sum(1) > 0).sum())
    print(f"fit: {old_codes.numel()} positions, {equal:.1%} codes equal; {mapped} new codes mapped")
    for folder in args.check:
        o, n = folder_codes([folder])
        equal, kept = float((o == n).double().mean()), float((mix.argmax(1)[n] == o).double().mean())
        print(f"check {folder}: {equal:.1%} codes equal, {kept:.1%} recovered by the map")

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(model / name, staging / name)
    weights = load_file(model / "model.safetensors")
    remap_rows(weights, mix, code_to_id)
    save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(args.vq, staging / "vq")
    staging.rename(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pure.train.synthetic CHECKPOINT OUTDIR``: shards of random-code conversations.

For the tiny CPU recipe and the tests: real sequences (built by :mod:`pure.sequence` with the
checkpoint's tokenizer) whose LQ and HQ codes are random, so the whole training path runs without
images or a VQ. Real training data comes from the data-preparation pipeline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pure.data.shards import ShardExample, write_shard
from pure.model import load_config
from pure.sequence import LATENT_PER_GRID, SequenceFormat, degradation_text
from pure.tokenizer import PureTokenizer

CAPTIONS = ("A red barn in a green field.", "A cat sleeping on a sofa.", "Boats in a small harbour.")
LEVELS = ("small", "medium", "large")


def synthetic_examples(fmt: SequenceFormat, n: int, latent: int = 8, seed: int = 0) -> list[ShardExample]:
    """``n`` conversations with ``latent x latent`` random LQ and HQ codes and varied answer text."""
    g = torch.Generator().manual_seed(seed)
    k = fmt.vocab.codebook_size
    examples = []
    for i in range(n):
        lq = torch.randint(0, k, (latent, latent), generator=g)
        hq = torch.randint(0, k, (latent, latent), generator=g)
        blur, noise = LEVELS[i % 3], LEVELS[(i // 3) % 3]
        text = fmt.answer_text(degradation_text(blur, noise), CAPTIONS[i % len(CAPTIONS)] + " " * (i % 4))
        ids, labels = fmt.training_example(lq, text, hq)
        examples.append(ShardExample.from_training_example(f"synthetic/{i:06d}", ids, labels))
    return examples


def write_synthetic_shards(
    checkpoint: str | Path,
    folder: str | Path,
    n: int = 64,
    per_shard: int = 32,
    latent: int = 8,
    seed: int = 0,
) -> Path:
    """Write ``n`` synthetic examples as shards of ``per_shard`` under ``folder`` (a shard set)."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    tokenizer = PureTokenizer.from_checkpoint(checkpoint, load_config(checkpoint))
    if latent % LATENT_PER_GRID:
        raise ValueError(f"latent must be a multiple of {LATENT_PER_GRID}; got {latent}")
    examples = synthetic_examples(SequenceFormat(tokenizer), n, latent, seed)
    for s, start in enumerate(range(0, n, per_shard)):
        write_shard(examples[start : start + per_shard], folder / f"shard-{s:05d}")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pure.train.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder whose tokenizer builds the sequences")
    p.add_argument("outdir", help="shard-set folder to create")
    p.add_argument("-n", type=int, default=64, help="number of examples (default 64)")
    p.add_argument("--latent", type=int, default=8, help="latent grid side of both images (default 8)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from pure.train.engine import MissingPackageError, require_packages

    try:
        require_packages({"datasets": "writes the shards"})
    except MissingPackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_synthetic_shards(args.checkpoint, args.outdir, n=args.n, latent=args.latent, seed=args.seed)
    print(f"wrote {args.n} synthetic examples to {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pure.make_random_checkpoint OUTDIR``: a tiny *random* PURE checkpoint for tests and demos.

The folder has the layout ``python -m pure.infer --model`` expects of any checkpoint::

    config.json  model.safetensors  tokenizer.json  vq/config.json  vq/model.safetensors  README.md

Its weights are random: it runs every code path in seconds on a CPU and restores nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import ChameleonConfig

from pure.model import PureForConditionalGeneration
from pure.tokenizer import PureTokenizer, build_byte_tokenizer
from pure.vocab import PureVocab
from pure.vq import VQConfig, VQModel

TINY_VQ = VQConfig(
    codebook_size=64, base_channels=32, channel_mult=(1, 1, 1, 2), z_channels=32, num_res_blocks=1
)
README = """# Tiny random PURE checkpoint

Made by `python -m pure.make_random_checkpoint` (seed {seed}). **The weights are random**: this checkpoint
exercises the whole pipeline (tokenizers, sequence format, decoding, colour fix, CLI) in seconds on a CPU,
but its "restorations" are noise. Use it for tests and demos only.

- language model: Chameleon architecture, hidden {hidden}, {layers} layers, {heads} heads, vocabulary {vocab}
- VQ: LlamaGen-style, codebook {codes} x {dim}, {ds}x downsampling
"""


def tiny_config(
    tokenizer: PureTokenizer, hidden: int = 64, layers: int = 2, heads: int = 4
) -> ChameleonConfig:
    v = tokenizer.vocab
    return ChameleonConfig(
        vocab_size=v.size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=16384,
        bos_token_id=v.bos,
        pad_token_id=v.pad,
        eos_token_id=v.eot,
        vocabulary_map=tokenizer.tokenizer.get_vocab(with_added_tokens=True),
        # Chameleon's own VQGAN is never built (PureForConditionalGeneration drops it); keep it tiny.
        vq_config={
            "base_channels": 32,
            "channel_multiplier": [1],
            "num_res_blocks": 1,
            "latent_channels": 32,
        },
    )


def make_random_checkpoint(folder: str | Path, seed: int = 0, vq_config: VQConfig = TINY_VQ) -> Path:
    """Write a tiny random checkpoint folder (atomically: it appears complete or not at all)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty")
    torch.manual_seed(seed)
    text = build_byte_tokenizer(vq_config.codebook_size)
    tokenizer = PureTokenizer(text, PureVocab.from_names(text.get_vocab(with_added_tokens=True)))
    config = tiny_config(tokenizer)
    model = PureForConditionalGeneration(config)
    vq = VQModel(vq_config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as tmp:
        staging = Path(tmp) / "checkpoint"
        model.save_pretrained(staging)
        tokenizer.save(staging / "tokenizer.json")
        vq.save_pretrained(staging / "vq")
        (staging / "README.md").write_text(
            README.format(
                seed=seed,
                hidden=config.hidden_size,
                layers=config.num_hidden_layers,
                heads=config.num_attention_heads,
                vocab=config.vocab_size,
                codes=vq_config.codebook_size,
                dim=vq_config.codebook_embed_dim,
                ds=vq_config.downsample,
            )
        )
        if folder.exists():
            folder.rmdir()
        shutil.move(staging, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pure.make_random_checkpoint",
        description="Write a tiny checkpoint with RANDOM weights (model, VQ and tokenizer in one folder that "
        "`python -m pure.infer --model` accepts) for tests and demos. It restores nothing.",
    )
    p.add_argument("outdir", help="folder to create (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = p.parse_args(argv)
    try:
        folder = make_random_checkpoint(args.outdir, args.seed)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a tiny random checkpoint to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pure.make_random_checkpoint OUTDIR``: a PURE checkpoint whose language model is *random*.

The folder has the layout ``python -m pure.infer --model`` expects of any checkpoint::

    config.json  model.safetensors  tokenizer.json  vq/config.json  vq/model.safetensors  README.md

By default everything is tiny and random (a byte-level tokenizer, a random VQ): it runs every code path in
seconds on a CPU and restores nothing. With ``--vq`` (a trained VQ folder), ``--captions`` (texts to learn
a BPE tokenizer from) and the size options it is the starting point of a model trained from scratch
(PURE-tiny, ``recipes/pure_tiny/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import ChameleonConfig

from pure.model import PureForConditionalGeneration
from pure.restorer import DEFAULT_IMAGE_SIZE, IMAGE_SIZE_KEY
from pure.sequence import DEGRADATION_LEVELS, INSTRUCTION, degradation_text
from pure.tokenizer import PureTokenizer, build_byte_tokenizer, train_bpe_tokenizer
from pure.vocab import PureVocab
from pure.vq import VQConfig, VQModel

TINY_VQ = VQConfig(
    codebook_size=64, base_channels=32, channel_mult=(1, 1, 1, 2), z_channels=32, num_res_blocks=1
)
TEXT_VOCAB_SIZE = 512  # text ids of a learned BPE tokenizer: bytes (256) plus merges of a small corpus
README = """# Random PURE checkpoint

Made by `python -m pure.make_random_checkpoint` (seed {seed}). **The language model's weights are random**:
this checkpoint exercises the whole pipeline (tokenizers, sequence format, decoding, colour fix, CLI), but
its "restorations" are noise until it is trained. Use it for tests, demos and as a training start.

- language model: Chameleon architecture, hidden {hidden}, {layers} layers, {heads} heads, vocabulary {vocab}
- VQ: LlamaGen-style, codebook {codes} x {dim}, {ds}x downsampling
"""


def tiny_config(
    tokenizer: PureTokenizer,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    image_size: int | None = None,
) -> ChameleonConfig:
    """A small Chameleon config around ``tokenizer``; ``image_size`` records the native size it is
    trained at (absent: PURE's 512). The MLP is ``2 * hidden`` wide unless ``intermediate`` says."""
    v = tokenizer.vocab
    extra = {} if image_size is None else {IMAGE_SIZE_KEY: image_size}
    return ChameleonConfig(
        vocab_size=v.size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
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
        **extra,
    )


def tokenizer_texts(captions: str | Path) -> list[str]:
    """What a from-scratch tokenizer must encode well: the instruction, every degradation sentence and
    the captions of a JSONL file (``{"caption": ...}`` per line, as ``pure.data.sample_images`` writes)."""
    texts = [INSTRUCTION] + [degradation_text(b, n) for b in DEGRADATION_LEVELS for n in DEGRADATION_LEVELS]
    with open(captions, encoding="utf-8") as handle:
        texts += [json.loads(line)["caption"] for line in handle if line.strip()]
    return texts


def make_random_checkpoint(
    folder: str | Path,
    seed: int = 0,
    vq_config: VQConfig = TINY_VQ,
    *,
    vq: str | Path | None = None,
    captions: str | Path | None = None,
    text_vocab_size: int = TEXT_VOCAB_SIZE,
    tokenizer: str | Path | None = None,
    **model_size,
) -> Path:
    """Write a checkpoint folder with a random language model (atomically: complete or absent).

    ``vq``: a trained VQ folder to use (default: a random VQ of ``vq_config``). ``captions``: learn a BPE
    tokenizer of ``text_vocab_size`` text ids from these captions (default: the byte-level tokenizer).
    ``tokenizer``: copy this one instead (a checkpoint folder or its ``tokenizer.json``), byte for byte, e.g.
    the one shards were pretokenised with: a BPE learnt again from the same captions can differ.
    ``model_size``: :func:`tiny_config`'s ``hidden``, ``layers``, ``heads``, ``intermediate``, ``image_size``.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty")
    torch.manual_seed(seed)
    trained_vq = VQModel.from_pretrained(vq) if vq is not None else None  # draws no random numbers
    if trained_vq is not None:
        vq_config = trained_vq.config
    if tokenizer is not None:
        if captions is not None:
            raise ValueError("give a tokenizer to copy or captions to learn one from, not both")
        given = Path(tokenizer)
        tokenizer_file = given / "tokenizer.json" if given.is_dir() else given
        text_tokenizer = (
            PureTokenizer.from_checkpoint(given) if given.is_dir() else PureTokenizer.from_file(given)
        )
        if text_tokenizer.vocab.codebook_size != vq_config.codebook_size:
            raise ValueError(
                f"{tokenizer_file} names {text_tokenizer.vocab.codebook_size} image tokens but the VQ has "
                f"{vq_config.codebook_size} codes"
            )
    else:
        if captions is not None:
            text = train_bpe_tokenizer(tokenizer_texts(captions), text_vocab_size, vq_config.codebook_size)
        else:
            text = build_byte_tokenizer(vq_config.codebook_size)
        tokenizer_file = None
        text_tokenizer = PureTokenizer(text, PureVocab.from_names(text.get_vocab(with_added_tokens=True)))
    config = tiny_config(text_tokenizer, **model_size)
    model = PureForConditionalGeneration(config)
    image_tokenizer = trained_vq or VQModel(vq_config)  # after the LM: the same seed gives the same LM
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as tmp:
        staging = Path(tmp) / "checkpoint"
        model.save_pretrained(staging)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        else:
            text_tokenizer.save(staging / "tokenizer.json")
        image_tokenizer.save_pretrained(staging / "vq")
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
    p.add_argument("--vq", help="a trained VQ folder (pure.train_vq's vq/) instead of a random tiny VQ")
    p.add_argument("--captions", help="JSONL of captions: learn a BPE text tokenizer (default: bytes)")
    p.add_argument(
        "--tokenizer",
        help="copy this text tokenizer instead (a checkpoint folder or tokenizer.json), e.g. the one shards "
        "were pretokenised with: a BPE learnt again from the same captions can differ",
    )
    p.add_argument(
        "--text-vocab",
        type=int,
        default=TEXT_VOCAB_SIZE,
        help=f"text ids of the BPE tokenizer (default {TEXT_VOCAB_SIZE})",
    )
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--intermediate", type=int, help="MLP width (default 2 x hidden)")
    p.add_argument(
        "--image-size",
        type=int,
        help=f"native image size the model is trained at (default {DEFAULT_IMAGE_SIZE})",
    )
    args = p.parse_args(argv)
    try:
        folder = make_random_checkpoint(
            args.outdir,
            args.seed,
            vq=args.vq,
            captions=args.captions,
            text_vocab_size=args.text_vocab,
            tokenizer=args.tokenizer,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate=args.intermediate,
            image_size=args.image_size,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a tiny random checkpoint to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

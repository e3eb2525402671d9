"""Text tokenizer: the checkpoint's ``tokenizer.json`` (a ``tokenizers.Tokenizer``) plus its vocabulary."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pure.vocab import (
    BOI_NAME,
    BOS_NAME,
    EOI_NAME,
    EOT_NAME,
    IMAGE_TOKEN_PREFIX,
    MAX_GRID,
    NEWLINE_NAME,
    PAD_NAME,
    PureVocab,
    grid_token_name,
    image_token_name,
)


class PureTokenizer:
    """Encodes/decodes the text runs of a conversation; image blocks are built by :mod:`pure.sequence`."""

    def __init__(self, tokenizer: Tokenizer, vocab: PureVocab):
        self.tokenizer = tokenizer
        self.vocab = vocab

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        vocabulary_map: Mapping[str, int] | None = None,
        vocab_size: int | None = None,
    ) -> PureTokenizer:
        """Load ``tokenizer.json``. The image-token names come from the tokenizer itself or, when it has
        none (the Hub copy of some checkpoints), from the model config's ``vocabulary_map``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        tokenizer = Tokenizer.from_file(os.fspath(path))
        names = tokenizer.get_vocab(with_added_tokens=True)
        if vocabulary_map and not any(n.startswith(IMAGE_TOKEN_PREFIX) for n in names):
            names = {**vocabulary_map, **names}
        return cls(tokenizer, PureVocab.from_names(names, vocab_size))

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike, config=None) -> PureTokenizer:
        """A checkpoint folder's ``tokenizer.json``, with the ``vocabulary_map`` and ``vocab_size`` of its
        model: ``config`` (the loaded model config) or else the folder's ``config.json``."""
        folder = Path(folder)
        if config is None:
            path = folder / "config.json"
            raw = json.loads(path.read_text()) if path.is_file() else {}
            vocabulary_map, vocab_size = raw.get("vocabulary_map"), raw.get("vocab_size")
        else:
            vocabulary_map, vocab_size = config.vocabulary_map, config.vocab_size
        return cls.from_file(folder / "tokenizer.json", vocabulary_map, vocab_size)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS or any other special token."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(os.fspath(path))


def build_byte_tokenizer(codebook_size: int, max_grid: int = 32) -> Tokenizer:
    """A small byte-level tokenizer with PURE's special-token names, for tests and tiny models.

    Layout (mirrors PURE: image ids split over two blocks, so the mapping code cannot assume an
    affine form): ``<s> <pad> </s> <unk>``, codes ``[0, K/2)``, the image-structure and turn tokens,
    grid tokens ``0..max_grid``, the 256 byte symbols, then codes ``[K/2, K)``.
    """
    names = [BOS_NAME, PAD_NAME, "</s>", "<unk>"]
    half = codebook_size // 2
    names += [image_token_name(c) for c in range(half)]
    specials = [EOI_NAME, BOI_NAME, EOT_NAME, NEWLINE_NAME] + [
        grid_token_name(n) for n in range(max_grid + 1)
    ]
    names += specials
    names += sorted(pre_tokenizers.ByteLevel.alphabet())  # a set: sort for reproducible ids
    names += [image_token_name(c) for c in range(half, codebook_size)]
    vocab = {name: i for i, name in enumerate(names)}

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS_NAME, PAD_NAME, "</s>", "<unk>", *specials])
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], text_vocab_size: int, codebook_size: int, max_grid: int = MAX_GRID
) -> Tokenizer:
    """A byte-level BPE tokenizer learned from ``texts``, with PURE's special and image token names.

    For models trained from scratch (PURE-tiny): ``text_vocab_size`` ids of text (the 256 byte symbols
    plus learned merges), after ``<s> <pad> </s> <unk>``, the image-structure and turn tokens, grid tokens
    ``0..max_grid`` and the image tokens of codes ``[0, codebook_size)``. Training is deterministic for the
    same texts.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if text_vocab_size < len(alphabet):
        raise ValueError(f"text_vocab_size must be at least the {len(alphabet)} byte symbols")
    specials = [BOS_NAME, PAD_NAME, "</s>", "<unk>", EOI_NAME, BOI_NAME, EOT_NAME, NEWLINE_NAME]
    specials += [grid_token_name(n) for n in range(max_grid + 1)]
    specials += [image_token_name(c) for c in range(codebook_size)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + text_vocab_size,
        special_tokens=specials,
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer

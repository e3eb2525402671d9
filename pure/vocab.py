"""The one home of every special token and of the VQ code <-> vocabulary id mapping.

Ids are never written as literals: they are looked up by *name* in the tokenizer's vocabulary, so the
same code serves PURE's 73,728-entry vocabulary and the tiny vocabularies that tests build.

Words: ``codes`` are VQ codebook indices in ``[0, codebook_size)``; ``image_ids`` are those codes mapped
into the language model's vocabulary. Image tokens are the vocabulary entries named ``IMGIMG<digits>Z``
where the digits are spelled with the letters A..J (Chameleon's convention, which PURE extends to 16,384
codes spread over two id blocks). The mapping is built from those names, never assumed affine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

IMAGE_TOKEN_PREFIX = "IMGIMG"

BOS_NAME = "<s>"
PAD_NAME = "<pad>"
BOI_NAME = "<racm3:break>"  # start of an image block
EOI_NAME = "<eoss>"  # end of an image block
EOT_NAME = "<reserved08706>"  # end of every conversation turn; the generation EOS
NEWLINE_NAME = "<reserved08799>"  # ends every latent row of an image block
_GRID_BASE = 8800  # `<reserved{8800 + n:05d}>` is the token for "n grid cells"
MAX_GRID = 128  # grid tokens looked up (4096 px a side); later reserved names are not grid tokens
_SPECIAL_NAMES = (BOS_NAME, PAD_NAME, BOI_NAME, EOI_NAME, EOT_NAME, NEWLINE_NAME)


def grid_token_name(n: int) -> str:
    """Name of the token that says "n grid cells" (height or width of an image block)."""
    return f"<reserved{_GRID_BASE + n:05d}>"


def image_token_name(code: int) -> str:
    """Name of the vocabulary entry for VQ code ``code`` (digits spelled A..J, then a final ``Z``)."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def _code_from_name(name: str) -> int:
    spelled = name[len(IMAGE_TOKEN_PREFIX) : -1]
    if not spelled or any(not "A" <= c <= "J" for c in spelled):
        raise ValueError(f"image token name {name!r} does not spell a code with the letters A..J")
    return int("".join(chr(ord(c) - ord("A") + ord("0")) for c in spelled))


@dataclass(frozen=True, eq=False)
class PureVocab:
    """Special token ids and the code <-> id tables of one vocabulary.

    Attributes:
        size: number of ids the model's embedding/head has (``config.vocab_size``).
        grid_ids: ``grid_ids[n]`` is the id of the token for ``n`` grid cells.
        code_to_id: ``(codebook_size,)`` int64, the id of every VQ code.
        id_to_code: ``(size,)`` int64, the code of every id, ``-1`` for ids that are not image tokens.
    """

    size: int
    bos: int
    pad: int
    boi: int
    eoi: int
    eot: int
    newline: int
    grid_ids: tuple[int, ...]
    code_to_id: torch.Tensor
    id_to_code: torch.Tensor

    @classmethod
    def from_names(cls, name_to_id: Mapping[str, int], size: int | None = None) -> PureVocab:
        """Build the tables from a ``{token name: id}`` mapping (a tokenizer's vocabulary).

        ``size`` defaults to ``max(id) + 1``; pass ``config.vocab_size`` when the model has more rows.
        """
        size = max(name_to_id.values()) + 1 if size is None else size

        def lookup(name: str) -> int:
            if name not in name_to_id:
                raise ValueError(
                    f"the tokenizer has no {name!r} token; is this a PURE/Chameleon tokenizer? "
                    "(PURE needs its tokenizer.json, or Lumina-mGPT's text_tokenizer.json)"
                )
            return name_to_id[name]

        pairs = sorted(
            (_code_from_name(name), idx)
            for name, idx in name_to_id.items()
            if name.startswith(IMAGE_TOKEN_PREFIX)
        )
        if not pairs:
            raise ValueError(
                f"the tokenizer has no {IMAGE_TOKEN_PREFIX}... image tokens; pass the tokenizer file that "
                "names them (PURE: text_tokenizer.json) or a config.json with a vocabulary_map"
            )
        codes = [c for c, _ in pairs]
        if codes != list(range(len(codes))):
            raise ValueError(
                f"image token names must spell each code 0..{len(codes) - 1} exactly once; "
                f"got {len(codes)} names covering {len(set(codes))} distinct codes up to {codes[-1]}"
            )
        code_to_id = torch.tensor([i for _, i in pairs], dtype=torch.long)
        if code_to_id.unique().numel() != len(codes):
            raise ValueError("several image token names share one id; the code <-> id mapping must be 1:1")

        grid_ids = []
        while len(grid_ids) <= MAX_GRID and grid_token_name(len(grid_ids)) in name_to_id:
            grid_ids.append(name_to_id[grid_token_name(len(grid_ids))])
        if not grid_ids:
            raise ValueError(f"the tokenizer has no grid-size tokens ({grid_token_name(0)}, ...)")
        largest = max(int(code_to_id.max()), *grid_ids, *(lookup(n) for n in _SPECIAL_NAMES))
        if largest >= size:
            raise ValueError(f"token id {largest} is outside the vocabulary of {size} ids")
        id_to_code = torch.full((size,), -1, dtype=torch.long)
        id_to_code[code_to_id] = torch.arange(len(codes))

        return cls(
            size=size,
            bos=lookup(BOS_NAME),
            pad=lookup(PAD_NAME),
            boi=lookup(BOI_NAME),
            eoi=lookup(EOI_NAME),
            eot=lookup(EOT_NAME),
            newline=lookup(NEWLINE_NAME),
            grid_ids=tuple(grid_ids),
            code_to_id=code_to_id,
            id_to_code=id_to_code,
        )

    @property
    def codebook_size(self) -> int:
        return self.code_to_id.numel()

    @property
    def max_grid(self) -> int:
        """Largest grid count that has a token."""
        return len(self.grid_ids) - 1

    def grid_token(self, n: int) -> int:
        if not 0 < n <= self.max_grid:
            raise ValueError(f"grid count must be in 1..{self.max_grid}; got {n}")
        return self.grid_ids[n]

    def grid_count(self, token_id: int) -> int | None:
        """Inverse of :meth:`grid_token`; ``None`` when ``token_id`` is not a grid token."""
        try:
            return self.grid_ids.index(int(token_id))
        except ValueError:
            return None

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (any shape, int) -> vocabulary ids (same shape, int64, same device)."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must be in [0, {self.codebook_size}); got [{codes.min()}, {codes.max()}]"
            )
        return self.code_to_id.to(codes.device)[codes.long()]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (any shape) -> VQ codes; raises if any id is not an image token."""
        codes = self.id_to_code.to(ids.device)[ids.long()]
        if codes.numel() and int(codes.min()) < 0:
            bad = ids[codes < 0][:5].tolist()
            raise ValueError(f"ids {bad} are not image tokens")
        return codes

    def image_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(size,)`` bool, True for image-token ids."""
        return (self.id_to_code >= 0).to(device)

    def inside_image_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(size,)`` bool, True for ids that only belong inside an image block: codes, row newline,
        grid tokens and the end-of-image token (the start-of-image token is how text hands over)."""
        mask = self.id_to_code >= 0
        mask[[self.eoi, self.newline, *self.grid_ids]] = True
        return mask.to(device)

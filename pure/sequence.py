"""The conversation layout, built and parsed in one place (data prep, training and inference all use it).

One single-turn conversation (spec 1.2-1.7)::

    <s> "Perceive ... image. " [LQ image block] <eot>                          prompt (no loss)
    "Medium blur, small noise. The image features ... " [HQ image block] <eot>  answer (supervised)

An image block of ``h x w`` latent codes (``h``, ``w`` multiples of :data:`LATENT_PER_GRID`)::

    <boi> <grid h/4> <grid w/4>  (w image ids, <newline>) x h  <eoi>

Height comes before width. There are no role names and no system prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pure.tokenizer import PureTokenizer

INSTRUCTION = (
    "Perceive the degradation level, understand the image content, and restore the high-quality image."
)
LATENT_PER_GRID = 4  # one grid token counts 32 px = 4 latents of the 8x VQ
IGNORE_INDEX = -100
DEGRADATION_LEVELS = ("small", "medium", "large")
_DEGRADATION_RE = re.compile(r"^\s*([A-Za-z]+ blur, [A-Za-z]+ noise\.)\s*")


def degradation_text(blur: str, noise: str) -> str:
    """The Perceive answer, e.g. ``degradation_text("medium", "small") == "Medium blur, small noise."``."""
    for name, level in (("blur", blur), ("noise", noise)):
        if level.lower() not in DEGRADATION_LEVELS:
            raise ValueError(f"{name} level must be one of {DEGRADATION_LEVELS}; got {level!r}")
    return f"{blur.capitalize()} blur, {noise.lower()} noise."


def split_answer_text(text: str) -> tuple[str | None, str]:
    """``"Medium blur, small noise. A lion ..."`` -> ``("Medium blur, small noise.", "A lion ...")``.

    The degradation is ``None`` when the text does not start with the "<x> blur, <y> noise." sentence.
    """
    match = _DEGRADATION_RE.match(text)
    if match is None:
        return None, text.strip()
    return match.group(1), text[match.end() :].strip()


class MalformedImageError(ValueError):
    """A generated image block is truncated or does not follow the layout."""


@dataclass
class ParsedAnswer:
    """A parsed generation. ``codes`` is ``(h, w)`` int64, or ``None`` with ``error`` saying why."""

    text: str
    degradation: str | None
    caption: str
    codes: torch.Tensor | None
    error: str | None = None


class SequenceFormat:
    """Builds prompt and training sequences and parses generations for one tokenizer."""

    def __init__(self, tokenizer: PureTokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        v = self.vocab
        added = tokenizer.tokenizer.get_added_tokens_decoder()
        # every id that is not plain text (image codes aside): the tokenizer's special tokens and PURE's
        special = {i for i, token in added.items() if token.special}
        self.special_ids = frozenset(special | {v.bos, v.pad, v.eot, v.boi, v.eoi, v.newline, *v.grid_ids})

    # -- building ---------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Plain text -> ids; refuses text that spells special tokens (it would forge the layout)."""
        ids = self.tokenizer.encode(text)
        image = self.vocab.image_mask()
        if any(i in self.special_ids or image[i] for i in ids):
            raise ValueError(f"text must not contain special-token strings: {text[:80]!r}")
        return ids

    def grid_tokens(self, h: int, w: int) -> list[int]:
        """``[<boi>, <grid h>, <grid w>]`` for an ``h x w`` latent grid."""
        for name, n in (("height", h), ("width", w)):
            if n <= 0 or n % LATENT_PER_GRID:
                raise ValueError(f"latent {name} must be a positive multiple of {LATENT_PER_GRID}; got {n}")
        v = self.vocab
        return [v.boi, v.grid_token(h // LATENT_PER_GRID), v.grid_token(w // LATENT_PER_GRID)]

    @staticmethod
    def image_block_length(h: int, w: int) -> int:
        """Tokens in the block of an ``h x w`` latent grid: start, 2 grid tokens, rows with newlines, end."""
        return 3 + h * (w + 1) + 1

    def image_block(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``(h, w)`` -> the image block, 1-D int64 of :meth:`image_block_length` tokens."""
        if codes.ndim != 2:
            raise ValueError(f"codes must be (h, w); got shape {tuple(codes.shape)}")
        h, w = codes.shape
        ids = self.vocab.codes_to_ids(codes.cpu())
        newline = torch.full((h, 1), self.vocab.newline, dtype=torch.long)
        body = torch.cat([ids, newline], dim=1).flatten()  # (h*(w+1),)
        head = torch.tensor(self.grid_tokens(h, w))
        return torch.cat([head, body, torch.tensor([self.vocab.eoi])])

    def prompt_ids(self, lq_codes: torch.Tensor, instruction: str = INSTRUCTION) -> torch.Tensor:
        """``<s> instruction LQ-block <eot>`` as 1-D int64; the answer is generated after it."""
        text = torch.tensor([self.vocab.bos, *self.encode_text(instruction + " ")])
        return torch.cat([text, self.image_block(lq_codes), torch.tensor([self.vocab.eot])])

    @staticmethod
    def answer_text(degradation: str | None, caption: str | None) -> str:
        """The answer's text run as trained: ``"<degradation> <caption> "`` (the image follows)."""
        return " ".join(t.strip() for t in (degradation, caption) if t and t.strip()) + " "

    def training_example(
        self, lq_codes: torch.Tensor, answer_text: str, hq_codes: torch.Tensor, instruction: str = INSTRUCTION
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced sequence and labels (spec 1.7).

        Labels are ``-100`` over the prompt (BOS, instruction, LQ block, its ``<eot>``) and equal to the
        input ids over the answer text, the whole HQ block and the final ``<eot>``. The model shifts.
        """
        prompt = self.prompt_ids(lq_codes, instruction)
        answer = torch.cat(
            [
                torch.tensor(self.encode_text(answer_text), dtype=torch.long),
                self.image_block(hq_codes),
                torch.tensor([self.vocab.eot]),
            ]
        )
        input_ids = torch.cat([prompt, answer])
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer])
        return input_ids, labels

    @staticmethod
    def labels_from_prompt_length(input_ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """The labels of :meth:`training_example` from its ids and prompt length (what shards store)."""
        labels = input_ids.clone().long()
        labels[:prompt_length] = IGNORE_INDEX
        return labels

    def supervised_parts(
        self, input_ids: torch.Tensor, prompt_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks ``(text, image)`` over a training sequence's positions: ``image`` covers the
        answer's image block (``<boi>`` .. ``<eoi>``), ``text`` the rest of the answer (its text and the
        final ``<eot>``). Together they are exactly the supervised positions."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        answer = positions >= prompt_length
        boi = (input_ids == self.vocab.boi) & answer
        eoi = (input_ids == self.vocab.eoi) & answer
        started = boi.long().cumsum(-1) > 0
        ended = (eoi.long().cumsum(-1) - eoi.long()) > 0  # the <eoi> itself is still inside
        image = started & ~ended
        return answer & ~image, image

    # -- parsing ----------------------------------------------------------------------------------------

    def parse_image_block(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """An image block (starting at ``<boi>``; anything after ``<eoi>`` is ignored) -> codes ``(h, w)``.

        Raises :class:`MalformedImageError` saying what is wrong (truncated, bad grid tokens, a missing
        newline, a non-image token among the codes, no end token).
        """
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        v = self.vocab
        if ids.numel() == 0 or int(ids[0]) != v.boi:
            raise MalformedImageError("image block does not start with the start-of-image token")
        if ids.numel() < 3:
            raise MalformedImageError(
                f"image block truncated after {ids.numel()} tokens: no grid-size tokens"
            )
        grid_h, grid_w = v.grid_count(int(ids[1])), v.grid_count(int(ids[2]))
        if not grid_h or not grid_w:
            raise MalformedImageError(f"image block has invalid grid-size tokens {ids[1:3].tolist()}")
        h, w = grid_h * LATENT_PER_GRID, grid_w * LATENT_PER_GRID
        n_body = h * (w + 1)
        body = ids[3 : 3 + n_body]
        if body.numel() < n_body:
            rows = body.numel() // (w + 1)
            raise MalformedImageError(
                f"image block truncated: {body.numel()} of {n_body} body tokens ({rows} of {h} rows complete)"
            )
        grid = body.view(h, w + 1)
        if not bool((grid[:, w] == v.newline).all()):
            raise MalformedImageError("image block rows are not terminated by the row-newline token")
        if ids.numel() <= 3 + n_body or int(ids[3 + n_body]) != v.eoi:
            raise MalformedImageError("image block has no end-of-image token after the last row")
        try:
            return v.ids_to_codes(grid[:, :w])
        except ValueError as err:
            raise MalformedImageError(f"image block holds non-image tokens: {err}") from None

    def parse_answer(self, ids: Sequence[int] | torch.Tensor, strict: bool = False) -> ParsedAnswer:
        """Generated answer ids -> degradation text, caption and image codes.

        Text runs until the first ``<boi>`` (or ``<eot>`` when there is no image); a trailing ``<eot>``
        is dropped. A missing or malformed image yields ``codes=None`` and ``error`` (or raises if strict).
        """
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        v = self.vocab
        starts = (ids == v.boi).nonzero().flatten()
        text_end = int(starts[0]) if starts.numel() else ids.numel()
        text_ids = ids[:text_end]
        eot = (text_ids == v.eot).nonzero().flatten()
        if eot.numel():
            text_ids = text_ids[: int(eot[0])]
        text = self.tokenizer.decode(text_ids.tolist())
        degradation, caption = split_answer_text(text)
        codes, error = None, None
        if not starts.numel():
            error = "the answer has no image block"
        else:
            try:
                codes = self.parse_image_block(ids[text_end:])
            except MalformedImageError as err:
                error = str(err)
        if error and strict:
            raise MalformedImageError(error)
        return ParsedAnswer(
            text=text.strip(), degradation=degradation, caption=caption, codes=codes, error=error
        )

"""Logits processors and token selection for PURE's decoding (spec 4.1-4.4).

Order per image token: classifier-free guidance -> structural constraint -> entropy top-k -> temperature
-> sample. The entropy that sets k is measured after guidance and constraints, before temperature.

Every processor follows transformers' contract ``__call__(input_ids[B, T], scores[B, V]) -> scores``:
rows are independent, masks are built once per device, ``scores`` is never written in place, and
nothing syncs with the host, so they plug into ``model.generate`` as well as into :mod:`pure.engine`.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from pure.sequence import LATENT_PER_GRID
from pure.vocab import PureVocab

ENTROPY_CLAMP = 10.0  # nats; entropies above this all get max_k
ENTROPY_CENTER = 5.0  # nats; the sigmoid's midpoint: k = (min_k + max_k) / 2 here


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``. PURE's default 0.8 interpolates toward the unconditional
    image prior rather than extrapolating away from it; 1.0 is the conditional model alone."""
    return uncond + scale * (cond - uncond)


def entropy_top_k(
    scores: torch.Tensor, min_k: int = 1, max_k: int = 2000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic top-k: ``k = round(min_k + (max_k - min_k) * sigmoid(clamp(H, 0, 10) - 5))``.

    ``H = -sum(p * log(p + 1e-10))`` in nats over the full distribution ``p = softmax(scores)``.
    Confident tokens (flat regions) get a small k, uncertain ones (texture) a large one. Logits below
    the k-th largest are set to ``-inf`` (ties with the k-th are kept).

    Returns ``(filtered scores (B, V), entropy (B,))``.
    """
    probs = scores.float().softmax(dim=-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1)  # (B,)
    weight = torch.sigmoid(entropy.clamp(0.0, ENTROPY_CLAMP) - ENTROPY_CENTER)
    k = torch.round(min_k + (max_k - min_k) * weight).long().clamp(min_k, max_k)
    top = min(max_k, scores.shape[-1])
    k = k.clamp(max=top)
    kth = scores.topk(top, dim=-1).values.gather(-1, (k - 1)[:, None])  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf")), entropy


class EntropyTopKLogitsWarper(LogitsProcessor):
    """transformers-compatible wrapper of :func:`entropy_top_k` (PURE's image-token sampler)."""

    def __init__(self, min_k: int = 1, max_k: int = 2000):
        if not isinstance(min_k, int) or min_k < 1:
            raise ValueError(f"min_k must be an integer >= 1; got {min_k!r}")
        if not isinstance(max_k, int) or max_k < min_k:
            raise ValueError(f"max_k must be an integer >= min_k ({min_k}); got {max_k!r}")
        self.min_k, self.max_k = min_k, max_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return entropy_top_k(scores, self.min_k, self.max_k)[0]


class TopKLogitsWarper(LogitsProcessor):
    """Static top-k (text tokens). ``k = 1`` is greedy."""

    def __init__(self, top_k: int):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1; got {top_k!r}")
        self.top_k = top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


class ImageGridConstraintLogitsProcessor(LogitsProcessor):
    """Keeps every row's answer on PURE's grammar, reading each row's state from its own ``input_ids``.

    * Text (no open image block): tokens that only belong inside an image are forbidden.
    * After ``<boi>``: the height then width grid tokens of the requested ``height x width`` latent grid
      are forced; then a newline is forced after every ``width`` codes, ``<eoi>`` after ``height`` rows,
      and every other position may only be an image code.

    Args:
        vocab: the vocabulary's special ids.
        height, width: latent grid of the image to generate (multiples of 4; 64 x 64 for 512 px).
    """

    def __init__(self, vocab: PureVocab, height: int, width: int):
        for name, n in (("height", height), ("width", width)):
            if n <= 0 or n % LATENT_PER_GRID:
                raise ValueError(f"latent {name} must be a positive multiple of {LATENT_PER_GRID}; got {n}")
        self.vocab = vocab
        self.height, self.width = height, width
        self.grid_h = vocab.grid_token(height // LATENT_PER_GRID)
        self.grid_w = vocab.grid_token(width // LATENT_PER_GRID)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image-code mask, text-allowed mask, vocabulary ids), built once per device."""
        if device not in self._tables:
            ids = torch.arange(self.vocab.size, device=device)
            self._tables[device] = (self.vocab.image_mask(device), ~self.vocab.inside_image_mask(device), ids)
        return self._tables[device]

    def forced_tokens(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: ``(in_image (B,) bool, forced (B,) id or -1 where an image code is to be sampled)``."""
        v, w = self.vocab, self.width
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_boi = torch.where(input_ids == v.boi, positions, -1).amax(dim=1)  # (B,)
        last_eoi = torch.where(input_ids == v.eoi, positions, -1).amax(dim=1)
        in_image = last_boi > last_eoi
        after = input_ids.shape[1] - 1 - last_boi  # tokens generated since <boi>
        body = after - 2  # index of the next token inside the rows
        forced = torch.full_like(after, -1)
        forced = torch.where((body + 1) % (w + 1) == 0, v.newline, forced)
        forced = torch.where(body == self.height * (w + 1), v.eoi, forced)
        forced = torch.where(after == 1, self.grid_w, forced)
        forced = torch.where(after == 0, self.grid_h, forced)
        return in_image, forced

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        image_mask, text_mask, vocab_ids = self._device_tables(scores.device)
        in_image, forced = self.forced_tokens(input_ids)
        image_allowed = torch.where(
            (forced >= 0)[:, None], vocab_ids[None] == forced[:, None], image_mask[None]
        )  # (B, V)
        allowed = torch.where(in_image[:, None], image_allowed, text_mask[None])
        return scores.masked_fill(~allowed, float("-inf"))


def sample_tokens(
    scores: torch.Tensor, temperature: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """One token per row from ``softmax(scores / temperature)``; ``temperature == 0`` is greedy.

    Each row draws its noise from its own generator (an exponential race, equivalent to a multinomial
    draw), so a row's tokens do not depend on which other rows share the batch.
    """
    if temperature == 0:
        return scores.argmax(dim=-1)
    if generators is None or len(generators) != scores.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    probs = (scores.float() / temperature).softmax(dim=-1)
    noise = torch.stack(
        [torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g) for g in generators]
    )  # (B, V), Exp(1)
    return (probs / noise).argmax(dim=-1)

"""Logits processors and token selection for PURE's decoding (spec 4.1-4.4).

Order per image token: classifier-free guidance -> structural constraint -> entropy top-k -> temperature
-> sample. The entropy that sets k is measured after guidance and constraints, before temperature.

Every processor follows transformers' contract ``__call__(input_ids[B, T], scores[B, V]) -> scores``:
rows are independent, masks are built once per device, ``scores`` is never written in place, and
nothing syncs with the host, so they plug into ``model.generate`` as well as into :mod:`pure.decoding.loop`.
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
    entropy, k, top = _entropy_k(scores, min_k, max_k)
    kth = scores.topk(top, dim=-1).values.gather(-1, (k - 1)[:, None])  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf")), entropy


def _entropy_k(scores: torch.Tensor, min_k: int, max_k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(entropy (B,), k (B,) int64, top)`` of :func:`entropy_top_k`; ``top = min(max_k, V)`` bounds k."""
    probs = scores.float().softmax(dim=-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1)  # (B,)
    weight = torch.sigmoid(entropy.clamp(0.0, ENTROPY_CLAMP) - ENTROPY_CENTER)
    top = min(max_k, scores.shape[-1])
    k = torch.round(min_k + (max_k - min_k) * weight).long().clamp(min_k, top)  # all `top` if min_k > top
    return entropy, k, top


def entropy_top_k_draw(
    scores: torch.Tensor, min_k: int, max_k: int, temperature: float, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PURE's image-token sampler in one pass: :func:`entropy_top_k`, temperature, then a draw.

    The same law as ``sample_tokens(entropy_top_k(scores)[0], temperature, ...)``, computed on the
    ``min(max_k, V)`` largest scores only (nothing else can be kept): the kept scores, in descending
    order, are tempered and one ``uniform`` in ``(0, 1)`` per row picks a token by inverse CDF. Equal
    scores and uniforms give equal tokens, which is how decoders that share the noise agree. Ties with
    the k-th score are kept as far as they fall among the ``max_k`` largest.

    Args:
        scores: ``(B, V)`` (``-inf`` for forbidden ids; at least one finite per row).
        uniform: ``(B,)`` in ``(0, 1)``, e.g. from :func:`keyed_uniform`. Unused when greedy.

    Returns ``(index (B,) into V, entropy (B,))``; ``temperature == 0`` is the argmax.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    entropy, k, top = _entropy_k(scores, min_k, max_k)
    if temperature == 0:
        return scores.argmax(dim=-1), entropy
    values, index = scores.float().topk(top, dim=-1)  # descending
    kept = values >= values.gather(-1, (k - 1)[:, None])  # (B, top): a leading run
    weights = torch.where(kept, ((values - values[:, :1]) / temperature).exp(), 0.0)
    cdf = weights.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)  # first cdf > u * total
    # u * total may round up to total: stay on the last token of positive weight (they lead, descending)
    pick = torch.minimum(pick, (weights > 0).sum(dim=-1, keepdim=True) - 1)
    return index.gather(-1, pick)[:, 0], entropy


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
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Built once per device: ``(allowed (kinds, V) bool, forced id (kinds,), kind of each body index
        from -2 to n_body + 1 (n_body + 4,), text-allowed mask (V,))``.

        Kinds of position: 0 image code, 1 newline, 2 ``<eoi>``, 3 height token, 4 width token.
        """
        if device not in self._tables:
            v, w = self.vocab, self.width
            n_body = self.height * (w + 1)
            body = torch.arange(-2, n_body + 2, device=device)
            kind = torch.zeros_like(body)
            kind[(body + 1) % (w + 1) == 0] = 1
            kind[body == n_body] = 2
            kind[0], kind[1], kind[-1] = 3, 4, 0  # the grid tokens; past <eoi>: codes (see allowed_at)
            forced = torch.tensor([-1, v.newline, v.eoi, self.grid_h, self.grid_w], device=device)
            ids = torch.arange(v.size, device=device)
            allowed = torch.cat([v.image_mask(device)[None], ids[None] == forced[1:, None]])  # (5, V)
            self._tables[device] = (allowed, forced, kind, ~v.inside_image_mask(device))
        return self._tables[device]

    def _kind(self, body: torch.Tensor) -> torch.Tensor:
        # a gather, not kind[body]: indexing with a 0-d tensor would read its value on the host
        kind = self._device_tables(body.device)[2]
        index = (body + 2).clamp(0, kind.numel() - 1)
        return kind.gather(0, index.flatten()).view(body.shape)

    def forced_at(self, body: torch.Tensor) -> torch.Tensor:
        """The token forced at each body index (any shape, int), ``-1`` where an image code is sampled.

        Body index ``i`` is the ``i``-th token after ``<boi> <grid h> <grid w>``: ``-2`` and ``-1`` are the
        two grid tokens, ``h * (w + 1)`` is ``<eoi>``. Indices past ``<eoi>`` (a speculative window may
        run past the end; those positions are discarded) get the image codes.
        """
        kind = self._kind(body)
        return self._device_tables(body.device)[1].gather(0, kind.flatten()).view(kind.shape)

    def allowed_at(self, body: torch.Tensor) -> torch.Tensor:
        """``(*body.shape, V)`` bool: the ids allowed at each body index (see :meth:`forced_at`).

        The image-phase mechanism of :meth:`__call__`: two table lookups, no scan of the sequence, no host
        sync. (:mod:`pure.decoding.loop` and :mod:`pure.decoding.jacobi` score only the image codes and take
        :meth:`forced_at`'s tokens where the grammar forces one, which is the same constraint.)
        """
        allowed, kind = self._device_tables(body.device)[0], self._kind(body)
        return allowed.index_select(0, kind.flatten()).view(*kind.shape, -1)

    def body_index(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, read from the ids: ``(in_image (B,) bool, body index (B,) of the next token)``."""
        v = self.vocab
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_boi = torch.where(input_ids == v.boi, positions, -1).amax(dim=1)  # (B,)
        last_eoi = torch.where(input_ids == v.eoi, positions, -1).amax(dim=1)
        after = input_ids.shape[1] - 1 - last_boi  # tokens generated since <boi>
        return last_boi > last_eoi, after - 2

    def forced_tokens(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: ``(in_image (B,) bool, forced (B,) id or -1 where an image code is to be sampled)``."""
        in_image, body = self.body_index(input_ids)
        return in_image, self.forced_at(body)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        text_mask = self._device_tables(scores.device)[3]
        in_image, body = self.body_index(input_ids.to(scores.device))
        allowed = torch.where(in_image[:, None], self.allowed_at(body), text_mask[None])  # (B, V)
        return scores.masked_fill(~allowed, float("-inf"))


def sample_tokens(
    scores: torch.Tensor, temperature: float, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """One token per row from ``softmax(scores / temperature)``; ``temperature == 0`` is greedy.

    Each row draws its noise from its own generator (an exponential race, equivalent to a multinomial
    draw), so a row's tokens do not depend on which other rows share the batch.
    """
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if temperature == 0:
        return scores.argmax(dim=-1)
    if generators is None or len(generators) != scores.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    probs = (scores.float() / temperature).softmax(dim=-1)
    noise = torch.stack(
        [torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g) for g in generators]
    )  # (B, V), Exp(1)
    return (probs / noise).argmax(dim=-1)


# -- counter-based noise ---------------------------------------------------------------------------------
# The image phase draws its randomness from a hash of (row key, counter, vocabulary index) instead of
# stepping one torch.Generator per row: a pure function of tensors, so the whole per-token step can be
# captured in a CUDA graph (a replayed graph cannot advance a list of Python-side generators), a row's
# noise cannot depend on its neighbours in the batch, and one key per row is drawn from the caller's
# generator, so the same seed still gives the same output.

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive indices over the 32-bit range
_FOLD32 = 0x2C1B3C6D  # odd, below 2**30


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (Wellons' hash-prospector ``[16 21f0aaad 15 735a2d97 15]``) on int64
    tensors holding values below 2**33. Both multipliers are below 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def noise_keys(
    generators: list[torch.Generator] | None, batch: int, device: torch.device | str
) -> torch.Tensor:
    """``(B, 2)`` int64 keys in ``[0, 2**32)``, one draw from each row's generator (zeros without any).

    Drawing on the generator's own device keeps this free of host syncs on CUDA.
    """
    if generators is None:
        return torch.zeros((batch, 2), dtype=torch.long, device=device)
    if len(generators) != batch:
        raise ValueError(f"need one torch.Generator per row: got {len(generators)} for {batch} rows")
    keys = [torch.randint(0, 2**32, (2,), generator=g, device=g.device) for g in generators]
    return torch.stack([k.to(device) for k in keys])


def keyed_uniform(keys: torch.Tensor, counter: tuple[torch.Tensor | int, ...], n: int) -> torch.Tensor:
    """Uniform noise in ``(0, 1)``, shape ``(*S, n)``, a pure function of each row's key and counter.

    Args:
        keys: ``(B, 2)`` from :func:`noise_keys`.
        counter: ints, or int64 tensors in ``[0, 2**29)`` shaped ``(1 or B, ...)`` or 0-d (a stream id,
            a step, a window slot ...); they broadcast to ``S = (B, ...)``. Distinct counters give
            independent noise.
        n: values per counter (the vocabulary size, or 1).
    """
    ndim = max([1] + [c.ndim for c in counter if torch.is_tensor(c)])
    k0, k1 = keys.reshape(-1, *[1] * (ndim - 1), 2).unbind(-1)  # (B, 1, ...)
    h = k0
    for c in counter:  # an injective fold for counters below 2**29 (an odd multiplier mod 2**32)
        h = (h * _FOLD32 + c) & _MASK32  # broadcasts to S
    h = _mix32(h ^ k1)
    index = (torch.arange(n, device=keys.device) * _GOLDEN32) & _MASK32
    return _unit_interval(_mix32(h[..., None] + index))  # (*S, n); a 33-bit sum fits the multiplies


def _unit_interval(x: torch.Tensor) -> torch.Tensor:
    """32-bit integers -> float32 strictly inside (0, 1): the top 23 bits, centred. (With 24 bits the
    largest value would round to 1.0 in float32, and -log(1.0) = -0.0 breaks the exponential race.)"""
    return ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))

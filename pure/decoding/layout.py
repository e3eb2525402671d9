"""The cache layout: where every row's tokens, and its guidance twin's, live in the KV cache, and what each
query sees. Every layout choice of the decode loop is made here.

Classifier-free guidance runs each row's unconditional context (its "twin": the image block only, positions
restarting at 0, as in PURE's standard path) in the same batched forward. Two layouts
(:data:`GUIDANCE_LAYOUTS`, the default first):

* ``"shared"``: one cache row per image. The twin's image tokens sit in its row's cache, interleaved with the
  row's own (slot owners: 0 context, 1 row, 2 twin), and the mask keeps the two contexts apart. No slot is
  allocated for nothing, the prompt runs once, and a step reads each live slot once: at 512 px the 7B model
  fits 22 GB in bf16, 16 GB with int8 weights (``python -m pure.bench --arch 7b``).
* ``"rows"``: a cache row per twin (rows cond0, twin0, cond1, ...). The twin mirrors its row through the text
  phase and forgets the prompt and text when the image starts, but its row keeps their slots (3 GB more at
  7B/512 px). A causal LM other than :class:`~pure.model.PureForConditionalGeneration` needs this layout
  unless it runs sdpa (it gets 2-D masks through its forward).

Masks: a :class:`~pure.model.PureForConditionalGeneration` gets boolean ``(R, 1, q, slots)`` masks over the
cache's first ``slots`` slots, which its decode attention reads (:mod:`pure.decoding.attention`): the slots
in use when eager, the whole capacity when a compiled step needs one shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StaticCache

from pure.decoding.sampling import classifier_free_guidance

GUIDANCE_LAYOUTS = ("shared", "rows")


@dataclass
class DecodeState:
    """What the phases share. Cache and mask rows are cond0, twin0, cond1, twin1, ... under guidance in
    the "rows" layout; one row per prompt in the "shared" layout (the twin lives in ``owner == 2`` slots)."""

    seq: torch.Tensor  # (B, capacity) ids of the cond rows; `length` columns are in use until the image
    mask: torch.Tensor  # (R, capacity) bool: which slots of every cache row hold a token
    cache: object  # a transformers Cache
    next_pos: torch.Tensor  # (R,) position of each row's next token
    twins: int  # cache rows per prompt: 2 with guidance in the "rows" layout, else 1
    fixed_width: bool = False  # masks span the whole capacity (compiled image steps' one shape)
    length: int = 0  # cache slots in use
    logits: torch.Tensor | None = None  # (R, keep, V) fp32, from the last forward
    passes: int = 0
    image_fed: int = 0  # image-block tokens fed per image (a twin's not counted), padding included
    block_start: int = 0  # index of <boi> in `seq`
    owner: torch.Tensor | None = None  # "shared" layout: (B, capacity) int8, 0 context, 1 row, 2 twin
    twin_pos: torch.Tensor | None = None  # "shared" layout: (B,) position of the twin's next token
    pair_owner: torch.Tensor | None = None  # "shared" layout: (2,) int8 [1, 2], a row's token then its twin's
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # the model's rotary tables for every position
    # row-parallel decoding (pure.decoding.rows): the body index of every slot's token (-1: before the
    # body), which orders attention instead of the slots; the position of body index 0 per cache row (and
    # per twin in the "shared" layout)
    slot_body: torch.Tensor | None = None  # like `mask`
    body_pos: torch.Tensor | None = None  # like `next_pos`
    twin_body_pos: torch.Tensor | None = None  # like `twin_pos`
    # the grid's width and the row lag: what a body index sees of the rows above (CacheLayout.start_rows)
    row_width: int = 0
    row_lag: int = 0


def staircase(key: torch.Tensor, query: torch.Tensor, width: int, lag: int) -> torch.Tensor:
    """Whether the token at body index ``query`` sees the one at body index ``key`` (broadcast; ``-1``: a
    token before the body, seen by all) when a ``width``-code grid is decoded with row lag ``lag``
    (:mod:`pure.decoding.rows`): it sees what precedes it in raster order, except, ``k`` rows up, the codes
    more than ``k * lag`` columns to its right. That is what exists when row-parallel decoding feeds it, so
    the staircase is that decoding's model whatever order the tokens are decided in (speculative row fronts,
    :mod:`pure.decoding.fronts`, decide them faster). A row's newline counts as column -1 of the row below
    (what it is fed to predict); ``lag > width`` is plain raster order."""
    ordered = key <= query
    if lag > width:
        return ordered
    key_row, key_col = _row_and_column(key, width)
    query_row, query_col = _row_and_column(query, width)
    return ordered & ((key < 0) | (key_col <= query_col + (query_row - key_row) * lag))


def _row_and_column(body: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Body index -> (grid row, column) as the staircase counts them: a code's own place; column -1 of the
    next row for a newline (it is fed to predict that row's first code)."""
    return torch.div(body + 1, width + 1, rounding_mode="floor"), (body + 1) % (width + 1) - 1


class RollbackStaticCache(StaticCache):
    """transformers' :class:`StaticCache` that can drop its newest tokens: ``crop(-n)``.

    A static layer writes at its ``cumulative_length``; rolling back moves that counter back. The stale
    keys and values behind it are masked out by the decoder and overwritten by the next write: nothing
    is reallocated or copied, so the cache keeps its addresses (capturable) and its memory.
    """

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens (a negative count, as ``DynamicCache.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove; got {tokens_to_remove}")
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.sub_(-tokens_to_remove)

    def move(self, source: torch.Tensor, start: int) -> None:
        """Copy the keys and values of slots ``source`` (a 1-D index) to slots ``start, start + 1, ...`` in
        place (the tensors keep their addresses); every row the same."""
        for layer in self.layers:
            if layer.is_initialized:
                for kv in (layer.keys, layer.values):
                    kv[:, :, start : start + source.numel()] = kv.index_select(2, source)


class CacheLayout:
    """One of :data:`GUIDANCE_LAYOUTS` for a decode with guidance scale ``cfg_scale`` (1 = none: one row per
    image either way). ``decode_masks``: the model takes 4-D boolean masks (a
    :class:`~pure.model.PureForConditionalGeneration`); else it gets the 2-D mask of its forward."""

    def __init__(self, name: str, cfg_scale: float, decode_masks: bool):
        if name not in GUIDANCE_LAYOUTS:
            raise ValueError(f"guidance_layout must be one of {GUIDANCE_LAYOUTS}; got {name!r}")
        self.cfg_scale = cfg_scale
        self.shared = name == "shared" and cfg_scale != 1.0
        self.twins = 2 if cfg_scale != 1.0 and not self.shared else 1
        self.decode_masks = decode_masks

    # -- allocation -----------------------------------------------------------------------------------------

    def capacity(self, prompt: int, answer: int, block: int, ahead: int) -> int:
        """Slots per cache row for ``prompt`` tokens, an ``answer`` of text and image block, and ``ahead``
        slots a speculative window writes past what it keeps."""
        if self.shared:  # the twin's image tokens (and its window) beside the row's
            return prompt + answer + ahead + block + ahead
        return prompt + answer + ahead

    def new_state(self, prompts, capacity: int, cache, pad: int, fixed_width: bool) -> DecodeState:
        """An empty state for ``prompts`` ``(B, T)``, the prompts written into ``seq``."""
        batch, device = prompts.shape[0], prompts.device
        rows = batch * self.twins
        state = DecodeState(
            seq=torch.full((batch, capacity), pad, dtype=torch.long, device=device),
            mask=torch.zeros((rows, capacity), dtype=torch.bool, device=device),
            cache=cache,
            next_pos=torch.zeros(rows, dtype=torch.long, device=device),
            twins=self.twins,
            fixed_width=fixed_width,
        )
        if self.shared:
            state.owner = torch.zeros((batch, capacity), dtype=torch.int8, device=device)
            state.twin_pos = torch.zeros(batch, dtype=torch.long, device=device)
            state.pair_owner = torch.tensor([1, 2], dtype=torch.int8, device=device)
        state.seq[:, : prompts.shape[1]] = prompts
        return state

    # -- appending tokens -----------------------------------------------------------------------------------

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, q)`` tokens of the cond rows -> the ``(R, q)`` of every cache row (twins get the same)."""
        return ids.repeat_interleave(self.twins, dim=0)

    def append(self, state: DecodeState, q: int, live: torch.Tensor | None = None):
        """Append ``q`` tokens to every cache row at its next positions (prompt and text: twins mirror their
        row). ``live`` (R,) marks rows whose tokens count (others are masked holes that do not advance their
        positions). Returns the forward's ``(positions (R, q), attention mask)``."""
        device = state.mask.device
        live = torch.ones(state.mask.shape[0], dtype=torch.long, device=device) if live is None else live
        state.mask[:, state.length : state.length + q] = live[:, None]
        positions = state.next_pos[:, None] + torch.arange(q, device=device)
        state.length += q
        state.next_pos += live * q
        return positions, self.attention_mask(state, q)

    def start_image(self, state: DecodeState, head: torch.Tensor):
        """The forward inputs of ``<boi> <grid h> <grid w>`` (``head`` (3,)) for every row; from here on a
        twin sees only its image block, at positions from 0."""
        state.block_start = state.length
        state.seq[:, state.length : state.length + 3] = head
        if state.twins == 2:
            state.mask[1::2] = False  # the unconditional twin forgets the prompt and the text ...
            state.next_pos[1::2] = 0  # ... and its image block starts at position 0
        return self.image_inputs(state, head.expand(state.seq.shape[0], -1))

    def image_inputs(self, state: DecodeState, tokens: torch.Tensor):
        """Append image tokens ``(B, q)`` to every row and its twin; advance the state.

        Returns the forward's ``(ids, positions, attention mask)``: ``(R, q)`` ids in the "rows" layout,
        ``(B, 2q)`` cond/twin-interleaved ids in the "shared" one.
        """
        q, device = tokens.shape[1], tokens.device
        state.image_fed += q
        if not self.shared:
            positions, mask = self.append(state, q)
            return self.rows_of(tokens), positions, mask
        steps = torch.arange(q, device=device)
        start, end = state.length, state.length + 2 * q
        positions = torch.stack([state.next_pos[:, None] + steps, state.twin_pos[:, None] + steps], dim=2)
        state.mask[:, start:end] = True
        state.owner[:, start:end] = state.pair_owner.repeat(q)
        state.length = end
        state.next_pos += q
        state.twin_pos += q
        return tokens.repeat_interleave(2, dim=1), positions.flatten(1), self._shared_mask(state, 2 * q)

    def start_rows(self, state: DecodeState, width: int, lag: int) -> None:
        """After :meth:`start_image`: image tokens are appended by :meth:`body_inputs` from here on, at any
        body index, and attention follows body (raster) order rather than slot order, cut to the staircase
        of a ``width``-code grid decoded with row lag ``lag`` (:func:`staircase`)."""
        state.slot_body = torch.full_like(state.mask, -1, dtype=torch.long)
        state.row_width, state.row_lag = width, lag
        state.body_pos = state.next_pos.clone()
        if self.shared:
            state.twin_body_pos = state.twin_pos.clone()

    def body_inputs(self, state: DecodeState, tokens: torch.Tensor, index: torch.Tensor):
        """Append image tokens ``(B, q)`` at body indices ``index`` ``(q,)`` (any order, any gaps) to every
        row and its twin, at their raster positions; each query sees the filled slots of its context whose
        body index is not above its own. Returns the forward's ``(ids, positions, attention mask)`` as
        :meth:`image_inputs` does."""
        q = index.numel()
        state.image_fed += q
        start = state.length
        if self.shared:
            end = start + 2 * q
            state.owner[:, start:end] = state.pair_owner.repeat(q)
            state.slot_body[:, start:end] = index.repeat_interleave(2)
            pos = torch.stack([state.body_pos[:, None] + index, state.twin_body_pos[:, None] + index], dim=2)
            ids, positions = tokens.repeat_interleave(2, dim=1), pos.flatten(1)
            state.twin_pos += q
        else:
            end = start + q
            state.slot_body[:, start:end] = index
            ids, positions = self.rows_of(tokens), state.body_pos[:, None] + index
        state.mask[:, start:end] = True
        state.length = end
        state.next_pos += q  # as image_inputs: what rollback takes back
        mask = (
            self._shared_mask(state, end - start) if self.shared else self.attention_mask(state, end - start)
        )
        return ids, positions, mask

    def keep(self, state: DecodeState, fed: int, kept: torch.Tensor) -> None:
        """Of the newest ``fed`` image tokens of every row (appended by :meth:`body_inputs`), keep those at
        ``kept`` (ascending indices into them, the same for every row) and forget the others: the kept
        tokens' keys and values, slots' body indices and owners move down to the first slots of the block,
        in order, and the rest is rolled back. What speculative row fronts keep of a forward
        (:mod:`pure.decoding.fronts`): the accepted tokens of every row, scattered among the rejected."""
        pair = 2 if self.shared else 1
        start = state.length - pair * fed
        slots = (kept[:, None] * pair + torch.arange(pair, device=kept.device)).flatten()  # a token's pair
        if slots.numel():
            source = start + slots
            target = slice(start, start + slots.numel())
            state.cache.move(source, start)
            state.slot_body[:, target] = state.slot_body[:, source]
            if self.shared:
                state.owner[:, target] = state.owner[:, source]
        self.rollback(state, fed - kept.numel())

    def rollback(self, state: DecodeState, tokens: int) -> None:
        """Forget the newest ``tokens`` image tokens of every row and twin (cache, mask, positions)."""
        if tokens == 0:
            return
        slots = 2 * tokens if self.shared else tokens
        state.cache.crop(-slots)
        state.length -= slots
        state.mask[:, state.length : state.length + slots] = False
        state.next_pos -= tokens
        if self.shared:
            state.owner[:, state.length : state.length + slots] = 0
            state.twin_pos -= tokens

    # -- masks ----------------------------------------------------------------------------------------------

    def mask(self, state: DecodeState) -> torch.Tensor:
        """The 2-D mask of the slots a forward's attention reads: the whole capacity when the shapes must
        stay fixed, else the slots in use, so that the attention reads the live cache only."""
        return state.mask if state.fixed_width else state.mask[:, : state.length]

    def attention_mask(self, state: DecodeState, q: int) -> torch.Tensor:
        """The mask of a forward whose ``q`` queries are the last ``q`` filled slots: boolean ``(R, 1, q,
        slots)`` for decode masks (transformers would otherwise rebuild it from the 2-D mask at every
        token), else the 2-D mask."""
        mask = self.mask(state)
        if not self.decode_masks:
            return mask
        if q == 1 and state.slot_body is None:  # one query sees every filled slot: a view, nothing to build
            return mask[:, None, None, :]
        return (mask[:, None] & self._causal(state, q, mask.shape[1]))[:, None]

    @staticmethod
    def _causal(state: DecodeState, q: int, slots: int) -> torch.Tensor:
        """``(q, slots)`` or ``(rows, q, slots)``: which of the first ``slots`` slots precede each of the last
        ``q`` filled slots: in slot order, or in body order once row-parallel decoding has started."""
        if state.slot_body is not None:
            body = state.slot_body[:, :slots]
            query = state.slot_body[:, state.length - q : state.length]
            return staircase(body[:, None, :], query[:, :, None], state.row_width, state.row_lag)
        query_slot = torch.arange(state.length - q, state.length, device=state.mask.device)
        return torch.arange(slots, device=state.mask.device) <= query_slot[:, None]

    def _shared_mask(self, state: DecodeState, q: int) -> torch.Tensor:
        """(B, 1, q, slots) mask of the last ``q`` slots' queries in the "shared" layout: a row's tokens
        see the context and the row's image tokens, a twin's tokens only the twin's; both causally."""
        mask = self.mask(state)  # (B, slots)
        slots = mask.shape[1]
        owner = state.owner[:, :slots]
        sees_row = mask & (owner <= 1)  # (B, slots): context and the row's image tokens
        sees_twin = mask & (owner == 2)
        query_owner = state.owner[:, state.length - q : state.length]  # (B, q)
        allowed = torch.where((query_owner == 1)[..., None], sees_row[:, None], sees_twin[:, None])
        allowed &= self._causal(state, q, slots)  # (B, q, slots)
        return allowed[:, None]

    # -- reading the logits ---------------------------------------------------------------------------------

    def text_logits(self, state: DecodeState) -> torch.Tensor:
        """Text is conditional only: the cond rows' next-token logits (B, V)."""
        return state.logits[:: state.twins, -1]

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Image-phase logits of a forward (R, k, V) -> guided scores (B, n, V) of its n image tokens (V: the
        vocabulary, or the K image codes).

        "rows": R = 2B rows cond0, twin0, ...; "shared": k = 2n positions cond, twin, cond, twin, ...
        """
        if self.cfg_scale == 1.0:
            return logits
        if self.shared:
            logits = logits.view(logits.shape[0], -1, 2, logits.shape[-1])  # (B, n, cond/twin, V)
            return classifier_free_guidance(logits[:, :, 0], logits[:, :, 1], self.cfg_scale)
        logits = logits.view(-1, 2, *logits.shape[1:])  # (B, cond/twin, n, V)
        return classifier_free_guidance(logits[:, 0], logits[:, 1], self.cfg_scale)

"""The decode loop: Perceive and Understand (text), then REstore (the image block), for a batch of prompts.

Phases, in the order :meth:`RestorationDecoder.generate` runs them:

1. prefill: the cache is allocated (:mod:`pure.decoding.layout`: where each row and its guidance twin live)
   and the prompts run;
2. text: greedy (or top-k) text until each row emits ``<boi>``; user-given degradation/caption text is
   forced instead of generated. Rows that finish early wait with masked "hole" tokens, so the batch stays
   in one KV cache and every row's result is independent of its neighbours;
3. image start: ``<boi> <grid h> <grid w>``; from here on each row's twin sees only its image block;
4. image: every row generates the same grid in lock step, one token per forward, or several with
   speculative Jacobi decoding (:mod:`pure.decoding.jacobi`, lossless) or row-parallel decoding
   (:mod:`pure.decoding.rows`, lossy, opt-in; :mod:`pure.decoding.fronts` with speculative windows per row):
   variants the loop calls for this phase.

The per-token image step (forward, guidance, constraint, entropy top-k, temperature, sampling) is one
function of tensors with no host synchronisation. It scores the image codes only (16,384 of PURE's 73,728
ids: the LM head's matmul and every step after it shrink 4.5x), the grammar's newlines and ``<eoi>`` come
from a table by body index, one counter-based uniform per token draws it
(:func:`pure.decoding.sampling.entropy_top_k_draw`, :func:`pure.decoding.sampling.keyed_uniform`), the KV
cache is static. ``compile=True`` captures it in CUDA graphs on CUDA (:mod:`pure.decoding.capture`); the
model's attention reads the live cache only, whatever attention it was loaded with
(:mod:`pure.decoding.attention`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from pure.decoding.attention import decoding_attention
from pure.decoding.capture import (
    capture_cuda_graphs,
    check_compile,
    mark_static,
    owning_outputs,
    synchronize,
    uses_cuda_graphs,
)
from pure.decoding.config import SamplingConfig, TextPrior
from pure.decoding.fronts import RowFrontsDecoding
from pure.decoding.jacobi import JacobiDecoding
from pure.decoding.layout import GUIDANCE_LAYOUTS, CacheLayout, DecodeState, RollbackStaticCache
from pure.decoding.rows import RowParallelDecoding
from pure.decoding.sampling import (
    ImageGridConstraintLogitsProcessor,
    TopKLogitsWarper,
    entropy_top_k_draw,
    keyed_uniform,
    noise_keys,
    sample_tokens,
)
from pure.model import PureForConditionalGeneration
from pure.sequence import LATENT_PER_GRID, SequenceFormat

TOKEN_STREAM = 0  # counter-based noise stream of the one-token image step (pure.decoding.jacobi uses others)
CAPACITY_ALIGN = 256  # compiled steps' cache capacities are multiples of this (and of flex attention's block)
CAPACITY_GROWTH = 1.5  # ... and grow by at least this factor, so that recompiles stay few


class ImageCodes(NamedTuple):
    """What the image step scores: the image codes' ids, and their LM-head rows if the model can use them."""

    ids: torch.Tensor  # (K,) the id of every code
    head: torch.Tensor | None  # (K, hidden) rows of the LM head's weight, or None
    index: torch.Tensor  # (V,) the code of every id, -1 for ids that are not image codes


@dataclass
class DecodeOutput:
    answer_ids: list[torch.Tensor]  # per row: text, image block, <eot>
    entropy: torch.Tensor  # (B, h, w) nats, per image code
    forward_passes: int  # all of them: prompt, text, image
    seconds: dict[str, float] = field(default_factory=dict)
    image_forward_passes: int = 0  # those of the image block: <boi> <grid h> <grid w>, then the body
    image_tokens_fed: int = 0  # by those forwards, per image: what they compute (padding included)
    text_cut: list[bool] = field(default_factory=list)  # per row: its text reached max_text_tokens


# "Medium blur, small noise." is about 8 tokens; with a user caption, the model's own degradation sentence
# is cut here if it has not ended by then, so the caption is always used.
DEGRADATION_TOKEN_BUDGET = 32


class _TextRow:
    """Host-side state of one row during the text phase."""

    def __init__(self, fmt: SequenceFormat, prior: TextPrior):
        self.fmt = fmt
        self.tokens: list[int] = []
        self.pending: list[int] = []  # forced tokens, fed before anything is generated
        self.caption_after_sentence: list[int] = []  # forced once the degradation sentence has ended
        self.done = False
        self.cut = False  # the text reached max_tokens and <boi> was forced after it
        if prior.degradation and prior.caption:
            answer = fmt.answer_text(prior.degradation, prior.caption)
            self.pending = [*fmt.encode_text(answer), fmt.vocab.boi]
        elif prior.degradation:
            self.pending = fmt.encode_text(prior.degradation.strip())
        elif prior.caption:
            self.caption_after_sentence = [*fmt.encode_text(f" {prior.caption.strip()} "), fmt.vocab.boi]

    @property
    def forced_length(self) -> int:
        return len(self.pending) + len(self.caption_after_sentence)

    def choose(self, proposed: int, max_tokens: int) -> int:
        boi = self.fmt.vocab.boi
        if self.caption_after_sentence and (proposed == boi or len(self.tokens) >= DEGRADATION_TOKEN_BUDGET):
            # the model ended (or never finished) its degradation sentence: the user's caption goes in now
            self.pending, self.caption_after_sentence = self.caption_after_sentence, []
        if self.pending:
            token = self.pending.pop(0)
        else:  # a runaway caption hands over to the image anyway
            self.cut = len(self.tokens) >= max_tokens
            token = self.fmt.vocab.boi if self.cut else proposed
        if token == self.fmt.vocab.boi:
            self.done = True
        else:
            self.tokens.append(token)
            if self.caption_after_sentence and "." in self.fmt.tokenizer.decode(self.tokens):
                self.pending, self.caption_after_sentence = self.caption_after_sentence, []
        return token


class _TokenCounter:
    """Stands in for the image-row bar: reports each increment of rows as image tokens to a callback."""

    def __init__(self, callback: Callable[[int], None], tokens_per_row: int):
        self.callback = callback
        self.tokens_per_row = tokens_per_row

    def update(self, rows: int) -> None:
        if rows:
            self.callback(rows * self.tokens_per_row)


class RestorationDecoder:
    """Generates PURE answers (text + image block) for prompts of equal length.

    Args:
        model: a :class:`pure.model.PureForConditionalGeneration` (any causal LM returning fp32 logits).
        fmt: the sequence format of the model's tokenizer.
        sampling: decoding settings; ``jacobi_window > 0`` decodes the image by speculative Jacobi decoding
            (:class:`~pure.decoding.jacobi.JacobiDecoding`: the same distribution, the same tokens under
            greedy decoding, fewer forwards); ``row_lag > 0`` by row-parallel decoding
            (:class:`~pure.decoding.rows.RowParallelDecoding`: several grid rows per forward, an
            approximation; needs a :class:`~pure.model.PureForConditionalGeneration`); both by row-parallel
            decoding with speculative fronts (:class:`~pure.decoding.fronts.RowFrontsDecoding`: the same
            approximation in fewer forwards).
        compile: capture the per-token image step. ``True``: ``torch.compile(mode="reduce-overhead")``
            (CUDA graphs) when the model is on CUDA; elsewhere a no-op (a CPU has no graphs to replay
            and compiling costs more than a tiny model's decode). A backend name (``"inductor"``,
            ``"eager"``, ...) compiles with that backend on any device, as one graph (``fullgraph``).
            The computation is the same (fused kernels may round the last bits differently).
        guidance_layout: one of :data:`~pure.decoding.layout.GUIDANCE_LAYOUTS` (:mod:`pure.decoding.layout`):
            ``"shared"`` (default) or ``"rows"``. Same outputs either way.
    """

    def __init__(
        self,
        model,
        fmt: SequenceFormat,
        sampling: SamplingConfig | None = None,
        compile: bool | str = False,
        guidance_layout: str = GUIDANCE_LAYOUTS[0],
    ):
        check_compile(compile)
        self.model = model
        self.fmt = fmt
        self.sampling = sampling or SamplingConfig()
        self.compile = compile
        # PureForConditionalGeneration.decode takes a 4-D boolean mask, which the loop keeps up to date at
        # the cost of a view per token, and runs its own attention whatever the model was loaded with; any
        # other causal LM gets the 2-D mask through its forward, and must take it as sdpa or eager do.
        self._use_decode = isinstance(model, PureForConditionalGeneration)
        self.layout = CacheLayout(guidance_layout, self.sampling.cfg_scale, self._use_decode)
        attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if not self._use_decode and attention not in (("sdpa",) if self.layout.shared else ("sdpa", "eager")):
            raise ValueError(
                f"{type(model).__name__} gets a static cache's mask through its forward, which {attention!r} "
                "attention does not take: load it with attn_implementation='sdpa' (the 'shared' guidance "
                "layout's 4-D mask needs sdpa; a PureForConditionalGeneration decodes with any attention)"
            )
        window, lag = self.sampling.jacobi_window, self.sampling.row_lag
        self.speculative = JacobiDecoding(self, window) if window and not lag else None
        self.row_parallel: RowParallelDecoding | RowFrontsDecoding | None = None
        if lag:
            fronts = RowFrontsDecoding(self, lag, window) if window else None
            self.row_parallel = fronts or RowParallelDecoding(self, lag)
        self._compiled: dict[str, Callable] = {}
        # Made once per decoder and kept (static inputs of a CUDA graph): the image codes' LM-head rows
        # and the rotary tables; the cache capacity compiled steps are specialised on, and how often it grew.
        self._codes: ImageCodes | None = None
        self._codes_key: tuple | None = None
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capacity = 0
        self.recompiles = 0

    # -- the model, compiled or not -------------------------------------------------------------------------

    def _make_cache(self, capacity: int):
        """A static cache that a speculative window can roll back (one more counter move: free otherwise)."""
        return RollbackStaticCache(config=self.model.config, max_cache_len=capacity)

    def _compiles(self, device: torch.device) -> bool:
        """Whether the image step runs compiled on ``device`` (then with one shape per cache capacity)."""
        return uses_cuda_graphs(self.compile, device) or isinstance(self.compile, str)

    def _compiled_fn(self, fn: Callable, device: torch.device) -> Callable:
        """The step function ``fn`` (a bound method: this decoder's or its speculative variant's), compiled
        as ``self.compile`` asks (see the class docstring), once per decoder."""
        if not self._compiles(device):
            return fn
        if fn.__name__ not in self._compiled:
            if uses_cuda_graphs(self.compile, device):
                self._compiled[fn.__name__] = owning_outputs(capture_cuda_graphs(fn))
            else:
                compiled = torch.compile(fn, backend=self.compile, fullgraph=True, dynamic=False)
                self._compiled[fn.__name__] = compiled
        return self._compiled[fn.__name__]

    def _capacity_for(self, need: int) -> int:
        """The cache capacity of a compiled decode needing ``need`` slots. Compiled steps specialise on it, so
        a decoder keeps its largest capacity for anything that fits and grows it geometrically when it must:
        a run of ever longer texts or larger images recompiles a handful of times, and says so before
        dynamo's recompile limit would silently send the step back to eager."""
        if need <= self._capacity:
            return self._capacity
        grown = max(need, int(self._capacity * CAPACITY_GROWTH))
        capacity = -(-grown // CAPACITY_ALIGN) * CAPACITY_ALIGN
        if self._capacity:
            self.recompiles += 1
            limit = torch._dynamo.config.recompile_limit
            if self.recompiles >= limit:
                warnings.warn(
                    f"the compiled image step has been recompiled {self.recompiles} times for growing cache "
                    f"capacities (now {capacity} slots); past torch._dynamo.config.recompile_limit ({limit}) "
                    "it runs eagerly: decode the largest images and texts first, or raise the limit",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self._capacity = capacity
        return capacity

    def _feed(
        self, state: DecodeState, ids: torch.Tensor, live: torch.Tensor | None = None, keep: int = 1
    ) -> None:
        """Append ``ids`` (R, q) to every cache row at its next positions (``live``: see
        :meth:`CacheLayout.append`) and run the model on them: next-token logits (R, keep, V) in
        ``state.logits`` (fp32)."""
        positions, mask = self.layout.append(state, ids.shape[1], live)
        state.logits = self._forward(ids, positions, mask, state.cache, keep, state.rotary)
        state.passes += 1

    def _forward(
        self, ids, positions, mask, cache, keep: int, rotary=None, codes: ImageCodes | None = None
    ) -> torch.Tensor:
        """The model on ``ids`` (R, q) at ``positions`` (R, q) -> fp32 logits (R, keep, V), or (R, keep, K)
        over the image codes only when ``codes`` is given. ``rotary``: ``DecodeState.rotary``."""
        if self._use_decode:
            head = None if codes is None else codes.head
            return self.model.decode(ids, positions, mask, cache, keep, head, rotary)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        logits = out.logits.float()
        return logits if codes is None else logits.index_select(-1, codes.ids)

    def guided_scores(self, state: DecodeState, position: int = -1) -> torch.Tensor:
        """Next-token scores (B, V) of the cond rows, combined with their twins' under guidance."""
        return self.layout.guide(state.logits)[:, position]

    # -- the phases -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: torch.Tensor,
        height: int,
        width: int,
        priors: list[TextPrior] | None = None,
        generators: list[torch.Generator] | None = None,
        progress: bool | Callable[[int], None] = False,
    ) -> DecodeOutput:
        """Decode one answer per prompt.

        Args:
            prompts: ``(B, T)`` int64 prompt ids (:meth:`SequenceFormat.prompt_ids`), on the model's device.
            height, width: latent grid of the output image (64 x 64 for 512 px).
            priors: per-row forced text (default: none).
            generators: one ``torch.Generator`` per row on the model's device (needed unless greedy).
            progress: ``True`` shows a bar over image rows; a callable is called instead with each increment
                of image tokens decoded (all rows together, a grid row at a time), for a caller's own bar.
        """
        rows = [_TextRow(self.fmt, p) for p in (priors or [TextPrior() for _ in range(prompts.shape[0])])]
        out = self._decode(prompts, height, width, rows, generators, progress)
        out.text_cut = [row.cut for row in rows]
        return out

    @torch.inference_mode()
    def generate_image(
        self,
        prompts: torch.Tensor,
        height: int,
        width: int,
        generators: list[torch.Generator] | None = None,
        progress: bool | Callable[[int], None] = False,
    ) -> DecodeOutput:
        """Only the image block, after prompts that already hold the answer's text (no text phase).

        ``answer_ids`` are then the image block and ``<eot>``. Arguments as :meth:`generate`.
        """
        return self._decode(prompts, height, width, None, generators, progress)

    @torch.inference_mode()
    def describe(
        self,
        prompts: torch.Tensor,
        priors: list[TextPrior] | None = None,
        generators: list[torch.Generator] | None = None,
    ) -> list[list[int]]:
        """Only Perceive and Understand: each row's answer text ids (up to its ``<boi>``), no image."""
        rows = [_TextRow(self.fmt, p) for p in (priors or [TextPrior() for _ in range(prompts.shape[0])])]
        # Only the constraint's text-phase mask is used here, so any grid will do.
        constraint = ImageGridConstraintLogitsProcessor(self.fmt.vocab, LATENT_PER_GRID, LATENT_PER_GRID)
        budget = self.sampling.max_text_tokens + max(r.forced_length for r in rows)
        with self._attention_scope():
            state = self._prefill(prompts, budget, 0, 0)
            self._text_phase(state, rows, constraint, generators)
        return [row.tokens for row in rows]

    def _attention_scope(self) -> contextlib.AbstractContextManager:
        """A whole decode runs the decode attention (:mod:`pure.decoding.attention`), so that a compiled
        step never sees the model's attention setting change."""
        return decoding_attention(self.model) if self._use_decode else contextlib.nullcontext()

    def _decode(self, prompts, height, width, rows, generators, progress) -> DecodeOutput:
        with self._attention_scope():
            return self._decode_phases(prompts, height, width, rows, generators, progress)

    def _decode_phases(self, prompts, height, width, rows, generators, progress) -> DecodeOutput:
        batch = prompts.shape[0]
        if self.sampling.temperature > 0 and (generators is None or len(generators) != batch):
            raise ValueError(f"sampling (temperature > 0) needs one torch.Generator per row ({batch})")
        constraint = ImageGridConstraintLogitsProcessor(self.fmt.vocab, height, width)
        block_len = self.fmt.image_block_length(height, width)
        device = prompts.device
        synchronize(device)
        start = time.perf_counter()
        text_budget = (
            0 if rows is None else self.sampling.max_text_tokens + max(r.forced_length for r in rows)
        )
        state = self._prefill(prompts, text_budget + block_len, block_len, self._ahead(height, width))
        if rows is not None:
            self._text_phase(state, rows, constraint, generators)
        synchronize(device)
        text_done = time.perf_counter()
        passes_before_image = state.passes
        self._start_image(state, height, width)
        entropy = torch.zeros((batch, height, width), device=prompts.device)
        if callable(progress):
            self._image_phase(state, constraint, generators, entropy, _TokenCounter(progress, batch * width))
        else:
            with tqdm(total=height, desc="image rows", unit="row", disable=not progress, leave=False) as bar:
                self._image_phase(state, constraint, generators, entropy, bar)
        synchronize(device)
        image_done = time.perf_counter()

        eot = torch.tensor([self.fmt.vocab.eot])
        block = state.seq[:, state.block_start : state.block_start + block_len].cpu()
        answers = [
            torch.cat([torch.tensor([] if rows is None else rows[i].tokens, dtype=torch.long), block[i], eot])
            for i in range(batch)
        ]
        seconds = {"text": text_done - start, "image": image_done - text_done}
        image_passes = state.passes - passes_before_image
        return DecodeOutput(answers, entropy.cpu(), state.passes, seconds, image_passes, state.image_fed)

    def _ahead(self, height: int, width: int) -> int:
        """Slots an image variant writes past what it keeps (a Jacobi window, a padded set of rows)."""
        if self.speculative:
            return self.speculative.window
        return self.row_parallel.ahead(height, width) if self.row_parallel else 0

    def _prefill(
        self, prompts: torch.Tensor, answer_budget: int, block_len: int, ahead: int = 0
    ) -> DecodeState:
        """Allocate the sequence, mask and cache for the prompt and ``answer_budget`` more tokens (in the
        layout's form) and ``ahead`` slots (:meth:`_ahead`), and run the prompts: once per image in the
        "shared" layout, once per cache row in the "rows" one (the twin mirrors its row until the image
        starts)."""
        device = prompts.device
        capacity = self.layout.capacity(prompts.shape[1], answer_budget, block_len, ahead)
        if self._compiles(device):  # compiled steps specialise on the cache's shape
            capacity = self._capacity_for(capacity)
        cache = self._make_cache(capacity)
        # the prompt and the text (never compiled) attend the live slots; another LM's forward reads the
        # static cache whole
        fixed_width = not self._use_decode
        state = self.layout.new_state(prompts, capacity, cache, self.fmt.vocab.pad, fixed_width)
        if self._use_decode:  # a lookup per forward instead of the rotary embedding's computation
            state.rotary = self._rotary_tables(capacity, device)
        self._feed(state, self.layout.rows_of(prompts))
        return state

    def _text_phase(self, state, rows, constraint, generators) -> None:
        """Perceive + Understand: text until every row has emitted ``<boi>`` (not yet fed)."""
        s, v = self.sampling, self.fmt.vocab
        text_top_k = TopKLogitsWarper(s.text_top_k)
        batch, device = len(rows), state.seq.device
        not_text = self._not_text(state.logits.shape[-1], device)
        while True:
            scores = constraint(state.seq[:, : state.length], self.layout.text_logits(state))
            scores = scores.masked_fill(not_text, float("-inf"))
            proposed = scores.argmax(-1)
            if s.text_top_k > 1:  # only rows still writing draw noise, so rows stay independent
                todo = [i for i, row in enumerate(rows) if not row.done]
                scores = text_top_k(state.seq[todo, : state.length], scores[todo])
                proposed[todo] = sample_tokens(scores, s.temperature, [generators[i] for i in todo])
            proposed = proposed.tolist()
            feed = torch.full((batch,), v.pad, dtype=torch.long)
            live = torch.zeros(batch, dtype=torch.long)
            for i, row in enumerate(rows):
                if not row.done:
                    token = row.choose(proposed[i], s.max_text_tokens)
                    if token != v.boi:
                        feed[i], live[i] = token, 1
            if not live.any():
                return
            state.seq[:, state.length] = feed.to(device)
            self._feed(
                state, self.layout.rows_of(feed.to(device)[:, None]), self.layout.rows_of(live.to(device))
            )

    def _not_text(self, size: int, device: torch.device) -> torch.Tensor:
        """(size,) bool: the special tokens an answer's text never holds (end of turn: the answer must reach
        its image; ``<s>``, ``<pad>``, a tokenizer's reserved ids, ...): all but ``<boi>``, which ends it."""
        ids = [i for i in self.fmt.special_ids if i != self.fmt.vocab.boi and i < size]
        mask = torch.zeros(size, dtype=torch.bool, device=device)
        mask[ids] = True
        return mask

    def _start_image(self, state: DecodeState, height: int, width: int) -> None:
        """Feed ``<boi> <grid h> <grid w>`` to every row; the twins now see only their image block."""
        head = torch.tensor(self.fmt.grid_tokens(height, width), device=state.seq.device)
        ids, positions, mask = self.layout.start_image(state, head)
        keep = 2 if self.layout.shared else 1  # the last position of the row, and of its twin
        state.logits = self._forward(ids, positions, mask, state.cache, keep, state.rotary)
        state.passes += 1
        if self._compiles(state.seq.device):  # the image steps' masks take one shape: the whole capacity
            state.fixed_width = True

    def _image_codes(self, device: torch.device) -> ImageCodes:
        """The image codes' ids and (for :class:`PureForConditionalGeneration`) a copy of their LM-head rows
        (128 MiB for the 7B model): made once and kept, as static inputs of the compiled step, until the
        device or the weights change."""
        weight = self.model.lm_head.weight if self._use_decode else None
        key = (device, None if weight is None else (weight.data_ptr(), weight._version))
        if self._codes_key != key:
            ids, index = self.fmt.vocab.code_to_id.to(device), self.fmt.vocab.id_to_code.to(device)
            head = None if weight is None else weight.detach().index_select(0, ids)
            self._codes, self._codes_key = ImageCodes(*mark_static(ids, head, index)), key
        return self._codes

    def _rotary_tables(self, capacity: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's rotary tables for positions ``0 .. capacity - 1`` at least: made when a decode needs
        more positions or another device, else the kept (static) ones."""
        kept = self._rotary
        if kept is None or kept[0].shape[0] < capacity or kept[0].device != device:
            tables = self.model.rotary_tables(capacity, device)
            self._rotary = kept = None if tables is None else mark_static(*tables)
        return kept

    def _first_image_token(
        self, state, codes: ImageCodes, constraint, keys
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Body index 0 of every row, from the logits of the ``<boi> <grid h> <grid w>`` forward: how both
        image phases (one token at a time, Jacobi windows) start. Returns (token id (B,), entropy (B,))."""
        scores = self.guided_scores(state).index_select(-1, codes.ids)
        forced = constraint.forced_at(torch.zeros((), dtype=torch.long, device=keys.device))
        return self._select(scores, codes.ids, forced, self._image_noise(keys, 1)[:, 0])

    def _image_noise(self, keys: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, n)``: the uniform that draws body index ``i`` of each row, for all ``i`` at once."""
        return keyed_uniform(keys, (TOKEN_STREAM, torch.arange(n, device=keys.device)[None]), 1)[..., 0]

    def _select(
        self, scores: torch.Tensor, codes: torch.Tensor, forced: torch.Tensor, uniform: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided scores (B, K) over the image codes ``codes`` (K,) -> (token id (B,), entropy (B,)).

        Entropy top-k, temperature and the draw by ``uniform`` (B,) (:func:`entropy_top_k_draw`); the
        structural constraint is that only codes are scored, or the token ``forced`` (0-d, ``-1`` for none)
        is taken: a newline or ``<eoi>``.
        """
        s = self.sampling
        index, entropy = entropy_top_k_draw(scores, s.min_k, s.max_k, s.temperature, uniform)
        return torch.where(forced >= 0, forced, codes[index]), entropy

    def _decode_step(self, ids, positions, mask, cache, rotary, codes: ImageCodes, forced, uniform):
        """The per-token image step: forward the ids of one image token (logits of the image codes only),
        guidance, then :meth:`_select`. Tensors in, tensors out, no host sync: what ``compile`` captures.
        """
        logits = self._forward(ids, positions, mask, cache, ids.shape[1], rotary, codes)
        scores = self.layout.guide(logits)[:, -1]
        return self._select(scores, codes.ids, forced, uniform)

    def _image_phase(self, state, constraint, generators, entropy, bar) -> None:
        """REstore, a token per forward (or by a variant's windows or sets of rows): guidance, constraint,
        entropy top-k, temperature, sampling."""
        variant = self.speculative or self.row_parallel
        if variant is not None:
            variant.image_phase(state, constraint, generators, entropy, bar)
            return
        height, width = entropy.shape[1:]
        n_body = height * (width + 1)
        device = state.seq.device
        keys = noise_keys(generators if self.sampling.temperature > 0 else None, entropy.shape[0], device)
        forced = constraint.forced_at(torch.arange(n_body + 1, device=device))  # (n_body + 1,)
        uniform = self._image_noise(keys, n_body + 1)  # (B, n_body + 1)
        codes = self._image_codes(device)
        step = self._compiled_fn(self._decode_step, device)
        token, step_entropy = self._first_image_token(state, codes, constraint, keys)
        base = state.block_start + 3  # body index 0 in `seq`
        for i in range(n_body + 1):
            state.seq[:, base + i] = token
            row, col = divmod(i, width + 1)
            if row < height and col < width:
                entropy[:, row, col] = step_entropy
            elif col == width:
                bar.update(1)
            if i == n_body:  # <eoi>: nothing left to predict
                return
            ids, positions, mask = self.layout.image_inputs(state, token[:, None])
            token, step_entropy = step(
                ids, positions, mask, state.cache, state.rotary, codes, forced[i + 1], uniform[:, i + 1]
            )
            state.passes += 1

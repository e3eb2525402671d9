"""The decode loop: Perceive and Understand (text), then REstore (the image block), for a batch of prompts.

Text phase: greedy (or top-k) text until each row emits ``<boi>``; user-given degradation/caption text is
forced instead of generated. Rows that finish early wait with masked "hole" tokens, so the batch stays
in one KV cache and every row's result is independent of its neighbours.

Image phase: every row then generates the same grid in lock step. Classifier-free guidance runs the
unconditional context in the same batched forward: each row has a twin that sees only the image block
(``<boi>``, grid tokens, codes so far) with positions restarting at 0, as in PURE's standard path. Two
cache layouts (``guidance_layout``): ``"shared"`` (default) puts the twin's tokens in its row's cache,
interleaved with the row's image tokens, and separates the two contexts with the mask: no slot is
allocated for nothing, the prompt runs once, and a step's attention reads each live slot once (the 7B
model at 512 px fits 22 GB in bf16, 16 GB with int8 weights: ``python -m pure.bench --arch 7b``);
``"rows"`` gives each twin its own cache row, which also holds slots for the prompt and text the twin
never attends (3 GB more at 7B/512).

The per-token image step (forward, guidance, constraint, entropy top-k, temperature, sampling) is one
function of tensors with no host synchronisation. It scores the image codes only (16,384 of PURE's 73,728
ids: the LM head's matmul and every step after it shrink 4.5x), the grammar's newlines and ``<eoi>`` come
from a table by body index, one counter-based uniform per token draws it (:func:`pure.sampling.
entropy_top_k_draw`, :func:`pure.sampling.keyed_uniform`), the KV cache is static. ``compile=True`` captures
it with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on CUDA; see :class:`RestorationDecoder`.
:mod:`pure.jacobi` replaces the image phase with speculative Jacobi decoding.
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
from transformers import StaticCache

from pure.decoding.attention import decoding_attention
from pure.model import PureForConditionalGeneration
from pure.sampling import (
    EntropyTopKLogitsWarper,
    ImageGridConstraintLogitsProcessor,
    TopKLogitsWarper,
    classifier_free_guidance,
    entropy_top_k_draw,
    keyed_uniform,
    noise_keys,
    sample_tokens,
)
from pure.sequence import LATENT_PER_GRID, SequenceFormat

TOKEN_STREAM = 0  # counter-based noise stream of the one-token image step (pure.jacobi uses others)
CAPACITY_ALIGN = 256  # compiled steps' cache capacities are multiples of this (and of flex attention's block)
CAPACITY_GROWTH = 1.5  # ... and grow by at least this factor, so that recompiles stay few
GUIDANCE_LAYOUTS = ("shared", "rows")  # the default first: where a guidance twin's tokens live (module doc)


@dataclass
class SamplingConfig:
    """Decoding settings. Defaults are the PURE README's (spec 4.1)."""

    cfg_scale: float = 0.8
    temperature: float = 0.9
    min_k: int = 1
    max_k: int = 2000
    text_top_k: int = 1
    # the answer text's tokens (degradation sentence and caption) before <boi> is forced: PURE's captions are
    # LLaVA's, which pure.data.captions caps at 512 tokens, after a sentence of about 8; 768 leaves room for a
    # tokenizer that splits finer, for ~6% more KV cache slots at 512 px than 256 took
    max_text_tokens: int = 768
    jacobi_window: int = 0  # speculative Jacobi decoding of the image: window size; 0 = one token per forward

    def __post_init__(self) -> None:
        # `not x >= 0` also rejects NaN
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance); got {self.cfg_scale}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if self.text_top_k < 1:
            raise ValueError(f"text_top_k must be >= 1 (1 = greedy text); got {self.text_top_k}")
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1; got {self.max_text_tokens}")
        if self.jacobi_window != 0 and self.jacobi_window < 2:
            raise ValueError(
                f"jacobi_window must be 0 (off) or >= 2 (16 is the default); got {self.jacobi_window}"
            )
        EntropyTopKLogitsWarper(self.min_k, self.max_k)  # validates
        TopKLogitsWarper(self.text_top_k)


class ImageCodes(NamedTuple):
    """What the image step scores: the image codes' ids, and their LM-head rows if the model can use them."""

    ids: torch.Tensor  # (K,) the id of every code
    head: torch.Tensor | None  # (K, hidden) rows of the LM head's weight, or None
    index: torch.Tensor  # (V,) the code of every id, -1 for ids that are not image codes


@dataclass
class TextPrior:
    """Text to force instead of generating it (steering); ``None`` lets the model write it."""

    degradation: str | None = None
    caption: str | None = None


@dataclass
class DecodeOutput:
    answer_ids: list[torch.Tensor]  # per row: text, image block, <eot>
    entropy: torch.Tensor  # (B, h, w) nats, per image code
    forward_passes: int  # all of them: prompt, text, image
    seconds: dict[str, float] = field(default_factory=dict)
    image_forward_passes: int = 0  # those of the image block: <boi> <grid h> <grid w>, then the body
    text_cut: list[bool] = field(default_factory=list)  # per row: its text reached max_text_tokens


@dataclass
class DecodeState:
    """What the phases share. Cache and mask rows are cond0, twin0, cond1, twin1, ... under guidance in
    the "rows" layout; one row per prompt in the "shared" layout (the twin lives in ``owner == 2`` slots)."""

    seq: torch.Tensor  # (B, capacity) ids of the cond rows; `length` columns are in use until the image
    mask: torch.Tensor  # (R, capacity) bool: which slots of every cache row hold a token
    cache: object  # a transformers Cache
    next_pos: torch.Tensor  # (R,) position of each row's next token
    twins: int  # cache rows per prompt: 2 with guidance in the "rows" layout, else 1
    length: int = 0  # cache slots in use
    logits: torch.Tensor | None = None  # (R, keep, V) fp32, from the last forward
    passes: int = 0
    block_start: int = 0  # index of <boi> in `seq`
    owner: torch.Tensor | None = None  # "shared" layout: (B, capacity) int8, 0 context, 1 row, 2 twin
    twin_pos: torch.Tensor | None = None  # "shared" layout: (B,) position of the twin's next token
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # the model's rotary tables for every position
    static_shapes: bool = False  # masks span the whole capacity (a compiled step's one shape)
    pair_owner: torch.Tensor | None = None  # "shared" layout: (2,) int8 [1, 2], a row's token then its twin's


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


def uses_cuda_graphs(compile: bool | str, device: torch.device) -> bool:
    """``compile=True`` captures the image step in CUDA graphs on CUDA (elsewhere it is a no-op)."""
    return compile is True and device.type == "cuda"


def capture_cuda_graphs(fn: Callable) -> Callable:
    """``fn`` compiled for CUDA-graph replay. A replay writes its outputs into the same memory as the previous
    replay: see :func:`owning_outputs`."""
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def owning_outputs(step: Callable) -> Callable:
    """A CUDA-graph step whose outputs the caller owns: each call tells cudagraph trees that a new step
    begins (the previous replay's outputs may be overwritten) and copies the new outputs out, so that a
    loop can carry them into the next call (Jacobi's drafts and their distributions do)."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = step(*args)
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)

    return call


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures the work (CUDA runs
    asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_compile(compile: bool | str) -> None:
    """Refuse a ``compile`` setting that is neither a bool nor a ``torch.compile`` backend's name, now
    rather than at the first image."""
    if isinstance(compile, bool):
        return
    backends = torch.compiler.list_backends(exclude_tags=())
    if compile not in backends:
        raise ValueError(
            f"compile must be True, False or a torch.compile backend ({', '.join(backends)}); got {compile!r}"
        )


def make_decoder(
    model,
    fmt: SequenceFormat,
    sampling: SamplingConfig | None = None,
    compile: bool | str = False,
    guidance_layout: str = GUIDANCE_LAYOUTS[0],
) -> RestorationDecoder:
    """The decoder ``sampling`` asks for: speculative Jacobi decoding when ``jacobi_window > 0``, else the
    one-token loop. Both give the same distribution (the same tokens under greedy decoding)."""
    sampling = sampling or SamplingConfig()
    if sampling.jacobi_window:
        from pure.jacobi import JacobiRestorationDecoder  # pure.jacobi builds on this module

        return JacobiRestorationDecoder(model, fmt, sampling, compile, guidance_layout=guidance_layout)
    return RestorationDecoder(model, fmt, sampling, compile, guidance_layout)


class RestorationDecoder:
    """Generates PURE answers (text + image block) for prompts of equal length.

    Args:
        model: a :class:`pure.model.PureForConditionalGeneration` (any causal LM returning fp32 logits).
        fmt: the sequence format of the model's tokenizer.
        sampling: decoding settings.
        compile: capture the per-token image step. ``True``: ``torch.compile(mode="reduce-overhead")``
            (CUDA graphs) when the model is on CUDA; elsewhere a no-op (a CPU has no graphs to replay
            and compiling costs more than a tiny model's decode). A backend name (``"inductor"``,
            ``"eager"``, ...) compiles with that backend on any device, as one graph (``fullgraph``).
            The computation is the same (fused kernels may round the last bits differently).
        guidance_layout: ``"shared"`` (default: twins inside their row's cache, separated by the mask) or
            ``"rows"`` (a cache row per twin: more memory; a model other than PureForConditionalGeneration
            needs it unless it runs sdpa). Same outputs either way.
    """

    static_cache = True  # preallocated KV cache; the mask always spans its whole capacity

    def __init__(
        self,
        model,
        fmt: SequenceFormat,
        sampling: SamplingConfig | None = None,
        compile: bool | str = False,
        guidance_layout: str = GUIDANCE_LAYOUTS[0],
    ):
        if guidance_layout not in GUIDANCE_LAYOUTS:
            raise ValueError(f"guidance_layout must be one of {GUIDANCE_LAYOUTS}; got {guidance_layout!r}")
        check_compile(compile)
        self.model = model
        self.fmt = fmt
        self.sampling = sampling or SamplingConfig()
        self.compile = compile
        self.shared = guidance_layout == "shared" and self.sampling.cfg_scale != 1.0
        self._compiled: dict[str, object] = {}
        # PureForConditionalGeneration.decode takes a 4-D boolean mask, which the loop keeps up to date at
        # the cost of a view per token, and runs its own attention whatever the model was loaded with; any
        # other causal LM gets the 2-D mask through its forward, and must take it as sdpa or eager do.
        self._use_decode = isinstance(model, PureForConditionalGeneration)
        attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if not self._use_decode and attention not in (("sdpa",) if self.shared else ("sdpa", "eager")):
            raise ValueError(
                f"{type(model).__name__} gets a static cache's mask through its forward, which {attention!r} "
                "attention does not take: load it with attn_implementation='sdpa' (the 'shared' guidance "
                "layout's 4-D mask needs sdpa; a PureForConditionalGeneration decodes with any attention)"
            )
        # Made once per decoder and kept (static inputs of a CUDA graph): the image codes' LM-head rows
        # and the rotary tables; the cache capacity compiled steps are specialised on, and how often it grew.
        self._codes: ImageCodes | None = None
        self._codes_key: tuple | None = None
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capacity = 0
        self.recompiles = 0

    def _make_cache(self, capacity: int):
        return StaticCache(config=self.model.config, max_cache_len=capacity)

    def _compiles(self, device: torch.device) -> bool:
        """Whether the image step runs compiled on ``device`` (then with one shape per cache capacity)."""
        return uses_cuda_graphs(self.compile, device) or isinstance(self.compile, str)

    def _compiled_fn(self, name: str, device: torch.device):
        """The bound method ``name``, compiled as ``self.compile`` asks (see the class docstring)."""
        fn = getattr(self, name)
        if not self._compiles(device):
            return fn
        if name not in self._compiled:
            if uses_cuda_graphs(self.compile, device):
                self._compiled[name] = owning_outputs(capture_cuda_graphs(fn))
            else:
                self._compiled[name] = torch.compile(fn, backend=self.compile, fullgraph=True, dynamic=False)
        return self._compiled[name]

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
        """Append ``ids`` (R, q) to every row at its next positions and run the model on them.

        ``live`` (R,) marks rows whose tokens count (others are masked holes that do not advance their
        positions). Leaves next-token logits (R, keep, V) in ``state.logits`` (fp32).
        """
        q = ids.shape[1]
        live = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device) if live is None else live
        state.mask[:, state.length : state.length + q] = live[:, None]
        positions = state.next_pos[:, None] + torch.arange(q, device=ids.device)
        state.length += q
        mask = self._attention_mask(state, q)
        state.logits = self._forward(ids, positions, mask, state.cache, keep, state.rotary)
        state.next_pos += live * q
        state.passes += 1

    def _mask(self, state: DecodeState) -> torch.Tensor:
        """The 2-D mask of the slots a forward's attention reads: the whole capacity when the shapes must
        stay fixed (a compiled step, or a static cache given to another LM's forward), else the slots in use,
        so that the attention reads the live cache only (:mod:`pure.decoding.attention`)."""
        fixed = state.static_shapes or (self.static_cache and not self._use_decode)
        return state.mask if fixed else state.mask[:, : state.length]

    def _attention_mask(self, state: DecodeState, q: int) -> torch.Tensor:
        """The mask of a forward whose ``q`` queries are the last ``q`` filled slots: boolean ``(R, 1, q,
        slots)`` for :meth:`pure.model.PureForConditionalGeneration.decode` (transformers would otherwise
        rebuild it from the 2-D mask at every token), else the 2-D mask."""
        mask = self._mask(state)
        if not self._use_decode:
            return mask
        if q == 1:  # one query sees every filled slot: a view, nothing to build
            return mask[:, None, None, :]
        query_slot = torch.arange(state.length - q, state.length, device=mask.device)
        causal = torch.arange(mask.shape[1], device=mask.device) <= query_slot[:, None]  # (q, slots)
        return (mask[:, None] & causal)[:, None]

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

    def _guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Image-phase logits of a forward (R, k, V) -> guided scores (B, n, V) of its n image tokens (V: the
        vocabulary, or the K image codes).

        "rows": R = 2B rows cond0, twin0, ...; "shared": k = 2n positions cond, twin, cond, twin, ...
        """
        if self.sampling.cfg_scale == 1.0:
            return logits
        if self.shared:
            logits = logits.view(logits.shape[0], -1, 2, logits.shape[-1])  # (B, n, cond/twin, V)
            return classifier_free_guidance(logits[:, :, 0], logits[:, :, 1], self.sampling.cfg_scale)
        logits = logits.view(-1, 2, *logits.shape[1:])  # (B, cond/twin, n, V)
        return classifier_free_guidance(logits[:, 0], logits[:, 1], self.sampling.cfg_scale)

    def guided_scores(self, state: DecodeState, position: int = -1) -> torch.Tensor:
        """Next-token scores (B, V) of the cond rows, combined with their twins' under guidance."""
        return self._guide(state.logits)[:, position]

    def _image_inputs(self, state: DecodeState, tokens: torch.Tensor):
        """Append image tokens ``(B, q)`` to every row and its twin; advance the state.

        Returns the forward's ``(ids, positions, attention mask)``: ``(R, q)`` ids in the "rows" layout,
        ``(B, 2q)`` cond/twin-interleaved ids and a ``(B, 1, 2q, capacity)`` mask in the "shared" one.
        """
        q, device = tokens.shape[1], tokens.device
        steps = torch.arange(q, device=device)
        if not self.shared:
            positions = state.next_pos[:, None] + steps
            state.mask[:, state.length : state.length + q] = True
            state.length += q
            state.next_pos += q
            return tokens.repeat_interleave(state.twins, dim=0), positions, self._attention_mask(state, q)
        start, end = state.length, state.length + 2 * q
        positions = torch.stack([state.next_pos[:, None] + steps, state.twin_pos[:, None] + steps], dim=2)
        state.mask[:, start:end] = True
        state.owner[:, start:end] = state.pair_owner.repeat(q)
        state.length = end
        state.next_pos += q
        state.twin_pos += q
        return tokens.repeat_interleave(2, dim=1), positions.flatten(1), self._shared_mask(state, 2 * q)

    def _shared_mask(self, state: DecodeState, q: int) -> torch.Tensor:
        """(B, 1, q, capacity) mask of the last ``q`` slots' queries in the "shared" layout: a row's tokens
        see the context and the row's image tokens, a twin's tokens only the twin's; both causally."""
        mask = self._mask(state)  # (B, slots)
        slots, device = mask.shape[1], mask.device
        owner = state.owner[:, :slots]
        sees_row = mask & (owner <= 1)  # (B, slots): context and the row's image tokens
        sees_twin = mask & (owner == 2)
        query_owner = state.owner[:, state.length - q : state.length]  # (B, q)
        allowed = torch.where((query_owner == 1)[..., None], sees_row[:, None], sees_twin[:, None])
        query_slot = torch.arange(state.length - q, state.length, device=device)
        allowed &= torch.arange(slots, device=device) <= query_slot[:, None]  # (B, q, slots)
        return allowed[:, None]

    def _rollback(self, state: DecodeState, tokens: int) -> None:
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
            state = self._prefill(prompts, budget, 0)
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
        state = self._prefill(prompts, text_budget + block_len, block_len)
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
        return DecodeOutput(answers, entropy.cpu(), state.passes, seconds, state.passes - passes_before_image)

    def _prefill(self, prompts: torch.Tensor, answer_budget: int, block_len: int) -> DecodeState:
        """Allocate the sequence, mask and cache for the prompt and ``answer_budget`` more tokens, and run
        the prompts.

        With guidance every row has an unconditional twin. In the "rows" layout (rows: cond0, twin0, cond1,
        ...) the twin mirrors its row through the text phase (a batched duplicate) and is cut off from the
        prompt and text when the image starts, so one static cache serves the whole decode. In the
        "shared" layout the prompt runs once and the twin first appears at the image start.
        """
        batch, prompt_len = prompts.shape
        device, pad = prompts.device, self.fmt.vocab.pad
        twins = 2 if self.sampling.cfg_scale != 1.0 and not self.shared else 1
        capacity = prompt_len + answer_budget + self._extra_capacity()
        if self.shared:  # the twin's image tokens (and speculative window) sit beside the row's
            capacity += block_len + self._extra_capacity()
        static_shapes = self._compiles(device)
        if static_shapes:  # compiled steps specialise on the cache's shape
            capacity = self._capacity_for(capacity)
        state = DecodeState(
            seq=torch.full((batch, capacity), pad, dtype=torch.long, device=device),
            mask=torch.zeros((batch * twins, capacity), dtype=torch.bool, device=device),
            cache=self._make_cache(capacity),
            next_pos=torch.zeros(batch * twins, dtype=torch.long, device=device),
            twins=twins,
            static_shapes=static_shapes,
        )
        if self.shared:
            state.owner = torch.zeros((batch, capacity), dtype=torch.int8, device=device)
            state.twin_pos = torch.zeros(batch, dtype=torch.long, device=device)
            state.pair_owner = torch.tensor([1, 2], dtype=torch.int8, device=device)
        if self._use_decode:  # a lookup per forward instead of the rotary embedding's computation
            state.rotary = self._rotary_tables(capacity, device)
        state.seq[:, :prompt_len] = prompts
        self._feed(state, prompts.repeat_interleave(twins, dim=0))
        return state

    def _extra_capacity(self) -> int:
        """Cache slots beyond the answer (a speculative window writes ahead of what it keeps)."""
        return 0

    def _text_phase(self, state, rows, constraint, generators) -> None:
        """Perceive + Understand: text until every row has emitted ``<boi>`` (not yet fed)."""
        s, v = self.sampling, self.fmt.vocab
        text_top_k = TopKLogitsWarper(s.text_top_k)
        batch, device = len(rows), state.seq.device
        not_text = self._not_text(state.logits.shape[-1], device)
        while True:
            scores = constraint(state.seq[:, : state.length], self._text_logits(state))
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
            twins = state.twins
            self._feed(
                state,
                feed.to(device).repeat_interleave(twins)[:, None],
                live.to(device).repeat_interleave(twins),
            )

    def _not_text(self, size: int, device: torch.device) -> torch.Tensor:
        """(size,) bool: the special tokens an answer's text never holds (end of turn: the answer must reach
        its image; ``<s>``, ``<pad>``, a tokenizer's reserved ids, ...): all but ``<boi>``, which ends it."""
        ids = [i for i in self.fmt.special_ids if i != self.fmt.vocab.boi and i < size]
        mask = torch.zeros(size, dtype=torch.bool, device=device)
        mask[ids] = True
        return mask

    @staticmethod
    def _text_logits(state: DecodeState) -> torch.Tensor:
        """Text is conditional only: the cond rows' logits (B, V)."""
        return state.logits[:: state.twins, -1]

    def _start_image(self, state: DecodeState, height: int, width: int) -> None:
        """Feed ``<boi> <grid h> <grid w>`` to every row; the twins now see only their image block."""
        head = torch.tensor(self.fmt.grid_tokens(height, width), device=state.seq.device)
        state.block_start = state.length
        state.seq[:, state.length : state.length + 3] = head
        if self.shared:  # the twin starts here, at position 0, in slots of its own
            ids, positions, mask = self._image_inputs(state, head.expand(state.seq.shape[0], -1))
            state.logits = self._forward(ids, positions, mask, state.cache, ids.shape[1], state.rotary)
            state.passes += 1
            return
        if state.twins == 2:
            state.mask[1::2] = False  # the unconditional twin forgets the prompt and the text ...
            state.next_pos[1::2] = 0  # ... and its image block starts at position 0
        self._feed(state, head.expand(state.mask.shape[0], -1))

    def _image_codes(self, device: torch.device) -> ImageCodes:
        """The image codes' ids and (for :class:`PureForConditionalGeneration`) a copy of their LM-head rows
        (128 MiB for the 7B model): made once and kept, as static inputs of the compiled step, until the
        device or the weights change."""
        weight = self.model.lm_head.weight if self._use_decode else None
        key = (device, None if weight is None else (weight.data_ptr(), weight._version))
        if self._codes_key != key:
            ids, index = self.fmt.vocab.code_to_id.to(device), self.fmt.vocab.id_to_code.to(device)
            head = None if weight is None else weight.detach().index_select(0, ids)
            self._codes, self._codes_key = ImageCodes(*_static(ids, head, index)), key
        return self._codes

    def _rotary_tables(self, capacity: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's rotary tables for positions ``0 .. capacity - 1`` at least: made when a decode needs
        more positions or another device, else the kept (static) ones."""
        kept = self._rotary
        if kept is None or kept[0].shape[0] < capacity or kept[0].device != device:
            tables = self.model.rotary_tables(capacity, device)
            self._rotary = kept = None if tables is None else _static(*tables)
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
        scores = self._guide(logits)[:, -1]
        return self._select(scores, codes.ids, forced, uniform)

    def _image_phase(self, state, constraint, generators, entropy, bar) -> None:
        """REstore, a token per forward: guidance, constraint, entropy top-k, temperature, sampling."""
        height, width = entropy.shape[1:]
        n_body = height * (width + 1)
        device = state.seq.device
        keys = noise_keys(generators if self.sampling.temperature > 0 else None, entropy.shape[0], device)
        forced = constraint.forced_at(torch.arange(n_body + 1, device=device))  # (n_body + 1,)
        uniform = self._image_noise(keys, n_body + 1)  # (B, n_body + 1)
        codes = self._image_codes(device)
        step = self._compiled_fn("_decode_step", device)
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
            ids, positions, mask = self._image_inputs(state, token[:, None])
            token, step_entropy = step(
                ids, positions, mask, state.cache, state.rotary, codes, forced[i + 1], uniform[:, i + 1]
            )
            state.passes += 1


def _static(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` marked as static inputs: a CUDA-graph replay reads them where they are instead of copying
    them into its own memory first."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t)
    return tensors

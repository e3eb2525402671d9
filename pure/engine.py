"""The decode loop: Perceive and Understand (text), then REstore (the image block), for a batch of prompts.

Text phase: greedy (or top-k) text until each row emits ``<boi>``; user-given degradation/caption text is
forced instead of generated. Rows that finish early wait with masked "hole" tokens, so the batch stays
in one KV cache and every row's result is independent of its neighbours.

Image phase: every row then generates the same grid in lock step. Classifier-free guidance runs the
unconditional rows in the same batched forward: each row is duplicated and its copy sees only the image
block (``<boi>``, grid tokens, codes so far) with positions restarting at 0, as in PURE's standard path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import StaticCache

from pure.sampling import (
    EntropyTopKLogitsWarper,
    ImageGridConstraintLogitsProcessor,
    TopKLogitsWarper,
    classifier_free_guidance,
    entropy_top_k,
    sample_tokens,
)
from pure.sequence import SequenceFormat


@dataclass
class SamplingConfig:
    """Decoding settings. Defaults are the PURE README's (spec 4.1)."""

    cfg_scale: float = 0.8
    temperature: float = 0.9
    min_k: int = 1
    max_k: int = 2000
    text_top_k: int = 1
    max_text_tokens: int = 256

    def __post_init__(self) -> None:
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance); got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1; got {self.max_text_tokens}")
        EntropyTopKLogitsWarper(self.min_k, self.max_k)  # validates
        TopKLogitsWarper(self.text_top_k)


@dataclass
class TextPrior:
    """Text to force instead of generating it (steering); ``None`` lets the model write it."""

    degradation: str | None = None
    caption: str | None = None


@dataclass
class DecodeOutput:
    answer_ids: list[torch.Tensor]  # per row: text, image block, <eot>
    entropy: torch.Tensor  # (B, h, w) nats, per image code
    forward_passes: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class DecodeState:
    """What the phases share. Cache and mask rows are cond0, twin0, cond1, twin1, ... under guidance."""

    seq: torch.Tensor  # (B, capacity) ids of the cond rows; `length` columns are in use
    mask: torch.Tensor  # (R, capacity) attention mask of every cache row
    cache: object  # a transformers Cache
    next_pos: torch.Tensor  # (R,) position of each row's next token
    twins: int  # 2 with guidance (each row has an unconditional twin), else 1
    length: int = 0
    logits: torch.Tensor | None = None  # (R, keep, V) fp32, from the last forward
    passes: int = 0


class _TextRow:
    """Host-side state of one row during the text phase."""

    def __init__(self, fmt: SequenceFormat, prior: TextPrior):
        self.fmt = fmt
        self.tokens: list[int] = []
        self.pending: list[int] = []  # forced tokens, fed before anything is generated
        self.caption_after_sentence: list[int] = []  # forced once the degradation sentence has ended
        self.done = False
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
        if self.pending:
            token = self.pending.pop(0)
        else:  # a runaway caption hands over to the image anyway
            token = proposed if len(self.tokens) < max_tokens else self.fmt.vocab.boi
        if token == self.fmt.vocab.boi:
            self.done = True
        else:
            self.tokens.append(token)
            if self.caption_after_sentence and "." in self.fmt.tokenizer.decode(self.tokens):
                self.pending, self.caption_after_sentence = self.caption_after_sentence, []
        return token


class RestorationDecoder:
    """Generates PURE answers (text + image block) for prompts of equal length.

    Args:
        model: a :class:`pure.model.PureForConditionalGeneration` (any causal LM returning fp32 logits).
        fmt: the sequence format of the model's tokenizer.
        sampling: decoding settings.
    """

    static_cache = True  # preallocated KV cache; the mask always spans its whole capacity

    def __init__(self, model, fmt: SequenceFormat, sampling: SamplingConfig | None = None):
        self.model = model
        self.fmt = fmt
        self.sampling = sampling or SamplingConfig()

    def _make_cache(self, capacity: int):
        return StaticCache(config=self.model.config, max_cache_len=capacity)

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
        mask = state.mask if self.static_cache else state.mask[:, : state.length]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=state.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        state.logits = out.logits.float()
        state.next_pos += live * q
        state.passes += 1

    def guided_scores(self, state: DecodeState, position: int = -1) -> torch.Tensor:
        """Next-token scores (B, V) of the cond rows, combined with their twins' under guidance."""
        logits = state.logits[:, position]
        if state.twins == 1:
            return logits
        logits = logits.view(-1, 2, logits.shape[-1])  # (B, cond/twin, V)
        return classifier_free_guidance(logits[:, 0], logits[:, 1], self.sampling.cfg_scale)

    @torch.inference_mode()
    def generate(
        self,
        prompts: torch.Tensor,
        height: int,
        width: int,
        priors: list[TextPrior] | None = None,
        generators: list[torch.Generator] | None = None,
        progress: bool = False,
    ) -> DecodeOutput:
        """Decode one answer per prompt.

        Args:
            prompts: ``(B, T)`` int64 prompt ids (:meth:`SequenceFormat.prompt_ids`), on the model's device.
            height, width: latent grid of the output image (64 x 64 for 512 px).
            priors: per-row forced text (default: none).
            generators: one ``torch.Generator`` per row on the model's device (needed unless greedy).
        """
        batch = prompts.shape[0]
        rows = [_TextRow(self.fmt, p) for p in (priors or [TextPrior() for _ in range(batch)])]
        constraint = ImageGridConstraintLogitsProcessor(self.fmt.vocab, height, width)
        start = time.perf_counter()
        state = self._prefill(prompts, rows, self.fmt.image_block_length(height, width))
        self._text_phase(state, rows, constraint, generators)
        text_done = time.perf_counter()
        self._start_image(state, height, width)
        entropy = torch.zeros((batch, height, width), device=prompts.device)
        with tqdm(total=height, desc="image rows", unit="row", disable=not progress, leave=False) as bar:
            self._image_phase(state, constraint, generators, entropy, bar)
        image_done = time.perf_counter()

        block_len = self.fmt.image_block_length(height, width)
        eot = torch.tensor([self.fmt.vocab.eot])
        answers = [
            torch.cat(
                [
                    torch.tensor(row.tokens, dtype=torch.long),
                    state.seq[i, state.length - block_len : state.length].cpu(),
                    eot,
                ]
            )
            for i, row in enumerate(rows)
        ]
        seconds = {"text": text_done - start, "image": image_done - text_done}
        return DecodeOutput(answers, entropy.cpu(), state.passes, seconds)

    def _prefill(self, prompts: torch.Tensor, rows: list[_TextRow], block_len: int) -> DecodeState:
        """Allocate the sequence, mask and cache for the whole answer and run the prompts.

        With guidance every row has an unconditional twin (rows: cond0, twin0, cond1, ...). The twin mirrors
        its row through the text phase (a batched duplicate that costs little) and is cut off from the
        prompt and text when the image starts, so one static cache serves the whole decode.
        """
        batch, prompt_len = prompts.shape
        device, pad = prompts.device, self.fmt.vocab.pad
        twins = 2 if self.sampling.cfg_scale != 1.0 else 1
        capacity = prompt_len + self.sampling.max_text_tokens + max(r.forced_length for r in rows) + block_len
        state = DecodeState(
            seq=torch.full((batch, capacity), pad, dtype=torch.long, device=device),
            mask=torch.zeros((batch * twins, capacity), dtype=torch.long, device=device),
            cache=self._make_cache(capacity),
            next_pos=torch.zeros(batch * twins, dtype=torch.long, device=device),
            twins=twins,
        )
        state.seq[:, :prompt_len] = prompts
        self._feed(state, prompts.repeat_interleave(twins, dim=0))
        return state

    def _text_phase(self, state, rows, constraint, generators) -> None:
        """Perceive + Understand: text until every row has emitted ``<boi>`` (not yet fed)."""
        s, v = self.sampling, self.fmt.vocab
        text_top_k = TopKLogitsWarper(s.text_top_k)
        batch, device = len(rows), state.seq.device
        while True:
            scores = constraint(state.seq[:, : state.length], self._text_logits(state))
            scores[:, v.eot] = float("-inf")  # a restorer's answer must reach its image
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

    @staticmethod
    def _text_logits(state: DecodeState) -> torch.Tensor:
        """Text is conditional only: the cond rows' logits (B, V)."""
        return state.logits[:: state.twins, -1]

    def _start_image(self, state: DecodeState, height: int, width: int) -> None:
        """Feed ``<boi> <grid h> <grid w>`` to every row; the twins now see only their image block."""
        head = torch.tensor(self.fmt.grid_tokens(height, width), device=state.seq.device)
        state.seq[:, state.length : state.length + 3] = head
        if state.twins == 2:
            state.mask[1::2] = 0  # the unconditional twin forgets the prompt and the text ...
            state.next_pos[1::2] = 0  # ... and its image block starts at position 0
        self._feed(state, head.expand(state.mask.shape[0], -1))

    def _image_phase(self, state, constraint, generators, entropy, bar) -> None:
        """REstore, a token per forward: guidance, constraint, entropy top-k, temperature, sampling."""
        s = self.sampling
        height, width = entropy.shape[1:]
        n_body = height * (width + 1)
        for step in range(n_body + 1):
            scores = constraint(state.seq[:, : state.length], self.guided_scores(state))
            scores, step_entropy = entropy_top_k(scores, s.min_k, s.max_k)
            token = sample_tokens(scores, s.temperature, generators)  # (B,)
            state.seq[:, state.length] = token
            row, col = divmod(step, width + 1)
            if row < height and col < width:
                entropy[:, row, col] = step_entropy
            elif col == width:
                bar.update(1)
            if step == n_body:  # <eoi>: nothing left to predict
                state.length += 1
                return
            self._feed(state, token.repeat_interleave(state.twins)[:, None])

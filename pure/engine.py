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

    def __init__(self, model, fmt: SequenceFormat, sampling: SamplingConfig | None = None):
        self.model = model
        self.fmt = fmt
        self.sampling = sampling or SamplingConfig()

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """Feed ``ids`` (R, q) at ``positions`` (R, q); returns next-token logits (R, V) in fp32."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

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
        s, v, fmt = self.sampling, self.fmt.vocab, self.fmt
        batch, prompt_len = prompts.shape
        device = prompts.device
        priors = priors or [TextPrior() for _ in range(batch)]
        rows = [_TextRow(fmt, p) for p in priors]
        block_len = fmt.image_block_length(height, width)
        capacity = prompt_len + s.max_text_tokens + max(r.forced_length for r in rows) + block_len
        constraint = ImageGridConstraintLogitsProcessor(v, height, width)
        text_top_k = TopKLogitsWarper(s.text_top_k)
        timer = {"start": time.perf_counter()}

        # With guidance every row has an unconditional twin (rows: cond0, uncond0, cond1, ...). The twin
        # mirrors its row through the text phase (a cheap, batched duplicate) and is cut off from the
        # prompt and text when the image starts, so one static cache serves the whole decode.
        guided = s.cfg_scale != 1.0
        twins = 2 if guided else 1
        n_rows = batch * twins
        # Preallocated sequence (cond rows, for the constraint), attention mask and KV cache.
        seq = torch.full((batch, capacity), v.pad, dtype=torch.long, device=device)
        mask = torch.zeros((n_rows, capacity), dtype=torch.long, device=device)
        seq[:, :prompt_len], mask[:, :prompt_len] = prompts, 1
        length = prompt_len
        cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        positions = torch.arange(prompt_len, device=device).expand(n_rows, -1)
        logits = self._forward(prompts.repeat_interleave(twins, dim=0), mask, positions, cache)[::twins]
        next_pos = torch.full((n_rows,), prompt_len, dtype=torch.long, device=device)
        passes = 1

        # -- Perceive + Understand: text until every row has emitted <boi> -----------------------------
        while True:
            scores = constraint(seq[:, :length], logits)
            scores[:, v.eot] = float("-inf")  # a restorer's answer must reach its image
            proposed = scores.argmax(-1)
            if s.text_top_k > 1:  # only rows still writing draw noise, so rows stay independent
                todo = [i for i, row in enumerate(rows) if not row.done]
                scores = text_top_k(seq[todo, :length], scores[todo])
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
                break
            feed, live = feed.to(device), live.to(device)
            seq[:, length] = feed
            feed, live = feed.repeat_interleave(twins), live.repeat_interleave(twins)
            mask[:, length] = live
            length += 1
            logits = self._forward(feed[:, None], mask, next_pos[:, None], cache)[::twins]
            next_pos += live
            passes += 1
        timer["text"] = time.perf_counter()

        # -- REstore: the image block, cond (+ uncond) rows in one forward ----------------------------
        head = torch.tensor(fmt.grid_tokens(height, width), device=device)  # <boi> <grid h> <grid w>
        seq[:, length : length + 3] = head
        if guided:
            mask[1::2] = 0  # the unconditional twin forgets the prompt and the text ...
            next_pos[1::2] = 0  # ... and its image block starts at position 0
        mask[:, length : length + 3] = 1
        positions = next_pos[:, None] + torch.arange(3, device=device)
        logits = self._forward(head.expand(n_rows, -1), mask, positions, cache)
        next_pos += 3
        length += 3
        passes += 1

        entropy = torch.zeros((batch, height, width), device=device)
        n_body = height * (width + 1)
        bar = tqdm(total=height, desc="image rows", unit="row", disable=not progress, leave=False)
        for step in range(n_body + 1):
            if guided:
                logits = logits.view(batch, 2, -1)
                logits = classifier_free_guidance(logits[:, 0], logits[:, 1], s.cfg_scale)
            scores = constraint(seq[:, :length], logits)
            scores, step_entropy = entropy_top_k(scores, s.min_k, s.max_k)
            token = sample_tokens(scores, s.temperature, generators)  # (B,)
            seq[:, length] = token
            row, col = divmod(step, width + 1)
            if col < width and row < height:
                entropy[:, row, col] = step_entropy
            elif col == width:
                bar.update(1)
            length += 1
            if step == n_body:  # <eoi>: nothing left to predict
                break
            mask[:, length - 1] = 1
            logits = self._forward(token.repeat_interleave(twins)[:, None], mask, next_pos[:, None], cache)
            next_pos += 1
            passes += 1
        bar.close()
        timer["image"] = time.perf_counter()

        image_start = length - block_len
        answers = []
        for i, row in enumerate(rows):
            block = seq[i, image_start:length].cpu()
            answers.append(
                torch.cat([torch.tensor(row.tokens, dtype=torch.long), block, torch.tensor([v.eot])])
            )
        seconds = {"text": timer["text"] - timer["start"], "image": timer["image"] - timer["text"]}
        return DecodeOutput(answer_ids=answers, entropy=entropy.cpu(), forward_passes=passes, seconds=seconds)

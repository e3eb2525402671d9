"""Speculative Jacobi decoding (SJD) of the image block: several tokens per forward, same distribution.

Each iteration feeds a window of ``W`` tokens to every row: the last committed token and ``W - 1``
proposals for the next body positions. One forward gives the target distribution at every window
position; drafts are verified left to right by speculative sampling and the first rejected one is
replaced by a sample from the residual distribution, so every token keeps exactly the law of the
one-token loop (:class:`pure.decoding.loop.RestorationDecoder`). What differs from PURE's original SJD path
(spec 4.5, 8.1):

* the window is anchored at the output image (it starts after ``<boi> <grid h> <grid w>`` and ends at
  ``<eoi>``), not at an offset from the prompt;
* drafts and targets range over the full image-code vocabulary (all the tokenizer's image ids), and only
  over it: as in the one-token step, the window's logits are those of the codes (the LM head's rows of
  the codes), and the grammar's newline and ``<eoi>`` positions, found from their body index
  (:meth:`ImageGridConstraintLogitsProcessor.forced_at`), get the forced token as their draft and are
  always accepted;
* entropy top-k is computed per position, not from the window's mean entropy: the target at each
  position is the one-token loop's distribution, which is what makes the scheme lossless;
* guidance uses the one-token loop's definition, in the same batched forward (twins get the same window
  tokens at their own positions);
* the KV cache is rolled back with the cache's ``crop``.

Acceptance: a draft ``x`` proposed with distribution ``q`` is accepted with probability
``min(1, p(x) / q(x))`` where ``p`` is the fully processed target (guidance, constraint, entropy top-k,
temperature). Fresh drafts are uniform random image codes, or the LQ image's codes at the same grid
positions (``jacobi_drafts="input"``: a restoration's LQ image is tokenised at the output's size, so its
code is a guess at the output's); either way they are treated as given tokens (``q`` one-hot, so
``x`` is accepted with probability ``p(x)``); drafts recycled from the previous iteration's predictions
carry the distribution they were sampled from. On rejection the token is drawn from
``normalize(max(0, p - q))``; when every draft is accepted a bonus token is drawn from the last position.

Coupled drafts (``jacobi_coupled``, the default; MC-SJD, arXiv 2510.24211): behind the first rejection, a
slot's next draft is its current draft kept with probability ``min(1, p(x) / q(x))``, else a sample from
``normalize(max(0, p - q))``: a maximal coupling of ``q`` and ``p``, so the new draft's law is still ``p``
(the next window verifies it against ``q' = p``, as before), but it stays the same from one iteration to the
next as often as two such laws allow, instead of being drawn afresh, and later windows accept longer prefixes.
Under greedy decoding (temperature 0) a draft is accepted iff it is the argmax, and the output equals
the one-token loop's exactly.

Batches: rows accept different numbers of drafts. Every row advances by the smallest number of tokens
decided in any row (at least one), so the cache keeps one length; a row that decided more keeps its
extra tokens as fixed (already decided) proposals that the next window feeds and accepts as they are.
Each row's tokens keep their law, and under greedy decoding a batched row equals the same row decoded
alone; under sampling a row's random stream depends on how far its neighbours got, so batched and single
runs are different (equally distributed) samples.

Cost: one host sync per iteration (how many tokens were committed, to crop the cache), none per token.
The window's causal mask is built by the decoder (transformers' sdpa mask builder, which the model's
plain forward would run, reads the mask of a multi-token query on the host in eager mode). The window
step itself has fixed shapes (the last windows are padded past ``<eoi>``), so ``compile`` can capture it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pure.decoding.sampling import (
    ImageGridConstraintLogitsProcessor,
    entropy_top_k,
    keyed_uniform,
    noise_keys,
)

if TYPE_CHECKING:
    from pure.decoding.loop import RestorationDecoder

DEFAULT_WINDOW = 16
# Counter-based noise streams (pure.decoding.loop.TOKEN_STREAM is 0).
DRAFT_STREAM, ACCEPT_STREAM, SAMPLE_STREAM = 1, 2, 3


class JacobiDecoding:
    """Speculative Jacobi decoding of a :class:`~pure.decoding.loop.RestorationDecoder`'s image phase (module
    docstring): the decoder calls :meth:`image_phase` instead of its one-token loop when its sampling
    settings ask for a window (``SamplingConfig.jacobi_window``).

    Args:
        decoder: the decoder whose forward, layout, guidance and sampling it uses.
        window: tokens fed per forward, >= 2 (16 is the default of ``pure.infer --jacobi``).
    """

    def __init__(self, decoder: RestorationDecoder, window: int = DEFAULT_WINDOW):
        if window < 2:
            raise ValueError(f"the Jacobi window must be >= 2 tokens; got {window}")
        self.decoder = decoder
        self.window = window  # the cache also holds this many slots ahead (the padded last windows)

    def window_step(
        self, ids, positions, mask, cache, rotary, codes, forced, keys, iteration, drafts, q, fixed
    ):
        """Forward a window and verify its drafts. No host sync; fixed shapes (what ``compile`` captures).

        Args:
            ids, positions, mask: from :meth:`_image_inputs` for the last committed token and the
                ``W - 1`` drafts. cache, rotary: the state's. codes: the image codes (targets, drafts and
                residuals range over them). forced: ``(W,)`` the token the grammar forces at each window
                position (a newline, ``<eoi>``), ``-1`` where a code is drawn.
            keys: ``(B, 2)`` noise keys. iteration: 0-d int64, the noise counter of this iteration.
            drafts: ``(B, W-1)`` ids. q: ``(B, W-1, K)`` their draft distributions over the codes (``None``
                when greedy).
            fixed: ``(B, W-1)`` drafts accepted without test (already decided, or forced by the grammar).

        Returns:
            ``tokens (B, W)`` ids: position ``i < accepted`` holds the accepted draft, ``accepted`` the
            corrected or bonus token, later positions a prediction sampled from a wrong prefix;
            ``accepted (B,)``; ``probs (B, W, K)`` the targets (``None`` when greedy); ``entropy (B, W)``.
        """
        d = self.decoder
        # (R, W, K) code logits, or (B, 2W, K) in the "shared" layout
        logits = d._forward(ids, positions, mask, cache, ids.shape[1], rotary, codes)
        slots = torch.arange(drafts.shape[1] + 1, device=ids.device)[None]
        guided = d.layout.guide(logits)
        return verify_drafts(d, guided, codes, forced, keys, iteration, slots, drafts, q, fixed)[:4]

    @staticmethod
    def _committed(decided: torch.Tensor, left: int) -> int:
        """Tokens every row commits: the fewest any row decided, at most ``left``. The one host sync of an
        iteration (the cache is cropped by it)."""
        return min(int(decided.min()), left)

    def image_phase(self, state, constraint: ImageGridConstraintLogitsProcessor, generators, entropy, bar):
        """REstore, up to ``window`` tokens per forward (module docstring)."""
        d = self.decoder
        s = d.sampling
        batch, height, width = entropy.shape
        total = height * (width + 1) + 1  # body tokens, <eoi> included
        w_len, device = self.window, state.seq.device
        greedy = s.temperature == 0
        keys = noise_keys(None if greedy else generators, batch, device)
        body_ids = torch.arange(total + w_len, device=device)
        codes = d._image_codes(device)
        code_ids, n_codes = codes.ids, codes.ids.numel()
        step = d._compiled_fn(self.window_step, device)

        tokens = torch.empty((batch, total), dtype=torch.long, device=device)
        entropies = torch.zeros((batch, total), device=device)
        # The first token comes from the <boi> <grid h> <grid w> forward, exactly as in the one-token loop.
        first, first_entropy = d._first_image_token(state, codes, constraint, keys)
        tokens[:, 0], entropies[:, 0] = first, first_entropy
        last, done, iteration = first, 1, 0
        counter = torch.zeros((), dtype=torch.long, device=device)  # iteration, on the device
        # Proposals for body indices done, done + 1, ...: ids, draft distributions, fixed flags.
        proposed = torch.empty((batch, 0), dtype=torch.long, device=device)
        proposed_q = None if greedy else torch.empty((batch, 0, n_codes), device=device)
        proposed_fixed = torch.empty((batch, 0), dtype=torch.bool, device=device)
        rows_done = 0
        guess = input_guess(d, state, height, width) if s.jacobi_drafts == "input" else None
        while done < total:
            n_drafts = w_len - 1
            missing = n_drafts - proposed.shape[1]
            if missing > 0:  # fresh drafts, taken as given (q one-hot): random codes, or the input's
                slots = torch.arange(missing, device=device)[None]
                u = keyed_uniform(keys, (DRAFT_STREAM, iteration, slots), 1)
                fresh_codes = (u[..., 0] * n_codes).long().clamp_max(n_codes - 1)
                if guess is not None:
                    at = (done + proposed.shape[1] + slots).clamp_max(guess.shape[1] - 1)  # body indices
                    known = guess.gather(1, at.expand(batch, -1))  # the input's code there, or -1
                    fresh_codes = torch.where(known >= 0, known, fresh_codes)
                fresh = code_ids[fresh_codes]
                proposed = torch.cat([proposed, fresh], dim=1)
                proposed_fixed = torch.cat([proposed_fixed, torch.zeros_like(fresh, dtype=torch.bool)], dim=1)
                if not greedy:
                    one_hot = torch.nn.functional.one_hot(fresh_codes, n_codes).float()
                    proposed_q = torch.cat([proposed_q, one_hot], dim=1)
            body = body_ids[done - 1 : done - 1 + w_len] + 1  # body index predicted at each position
            forced = constraint.forced_at(body)  # (W,) the grammar's newlines and <eoi>
            drafts = torch.where(forced[:-1] >= 0, forced[:-1], proposed)
            fixed = proposed_fixed | (forced[:-1] >= 0)

            ids, positions, mask = d.layout.image_inputs(state, torch.cat([last[:, None], drafts], dim=1))
            state.passes += 1
            out, accepted, probs, step_entropy = step(
                ids,
                positions,
                mask,
                state.cache,
                state.rotary,
                codes,
                forced,
                keys,
                counter,
                drafts,
                proposed_q,
                fixed,
            )
            decided = accepted + 1  # (B,) accepted drafts and the corrected/bonus token
            commit = self._committed(decided, total - done)
            tokens[:, done : done + commit] = out[:, :commit]
            entropies[:, done : done + commit] = step_entropy[:, :commit]
            d.layout.rollback(state, w_len - commit)  # keep the last committed token and those before it

            proposed = out[:, commit:]
            proposed_fixed = torch.arange(commit, w_len, device=device)[None] < decided[:, None]
            if not greedy:
                proposed_q = probs[:, commit:]
            last = out[:, commit - 1]
            done += commit
            iteration += 1
            counter += 1
            rows_now = min(done // (width + 1), height)
            bar.update(rows_now - rows_done)
            rows_done = rows_now

        state.seq[:, state.block_start + 3 : state.block_start + 3 + total] = tokens
        codes = entropies[:, : total - 1].view(batch, height, width + 1)[:, :, :width]
        entropy.copy_(codes)


def verify_drafts(d: RestorationDecoder, guided, codes, forced, keys, iteration, slots, drafts, q, fixed):
    """Verify windows of drafts against the targets of one forward (module docstring). No host sync.

    Args:
        d: the decoder (its sampling settings). guided: ``(N, W, K)`` guided code scores at every window
            position. codes: the image codes. forced: ``(W,)`` the grammar's token at each position, ``-1``
            where a code is drawn. keys: ``(N, 2)`` noise keys. iteration: the noise counter of this
            forward. slots: ``(1 or N, W)`` noise counters of the window positions (distinct per window of a
            row). drafts: ``(N, W-1)`` ids. q: ``(N, W-1, K)`` their draft distributions (``None`` when
            greedy). fixed: ``(N, W-1)`` drafts accepted without test.

    Returns:
        ``tokens (N, W)`` ids: position ``i < accepted`` holds the accepted draft, ``accepted`` the corrected
        or bonus token, later positions a prediction sampled from a wrong prefix (the next drafts);
        ``accepted (N,)``; ``probs (N, W, K)`` the targets (``None`` when greedy); ``entropy (N, W)``;
        ``predicted (N, W)``: every position's next draft, law ``probs`` (a position before ``accepted``
        that is not decided after all, as in :mod:`pure.decoding.fronts`, proposes this, not its draft).
    """
    s = d.sampling
    batch, width = drafts.shape[0], drafts.shape[1] + 1
    scores, entropy = entropy_top_k(guided.flatten(0, 1), s.min_k, s.max_k)  # per position
    scores, entropy = scores.view(batch, width, -1), entropy.view(batch, width)

    def as_ids(index: torch.Tensor) -> torch.Tensor:  # (N, W) code indices -> ids, or the forced token
        return torch.where(forced >= 0, forced, codes.ids[index])

    if s.temperature == 0:
        probs = None
        best = as_ids(scores.argmax(dim=-1))  # (N, W)
        ok = fixed | (drafts == best[:, :-1])
        predicted = corrected = best
    else:
        probs = (scores / s.temperature).softmax(dim=-1)  # (N, W, K)
        draft_codes = codes.index[drafts].clamp_min(0)[..., None]  # forced drafts are fixed: any code
        p_x = probs[:, :-1].gather(-1, draft_codes)[..., 0]  # (N, W-1)
        q_x = q.gather(-1, draft_codes)[..., 0]
        coin = keyed_uniform(keys, (ACCEPT_STREAM, iteration, slots[:, :-1]), 1)[..., 0]
        ok = fixed | (coin * q_x < p_x)  # probability min(1, p(x) / q(x))
        residual = (probs[:, :-1] - q).clamp_min(0.0)  # (N, W-1, K)
        # p == q leaves nothing (and cannot reject, up to rounding): fall back to p
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs[:, :-1])
        # A slot keeps at most one of its corrected and predicted tokens: they can share the noise.
        noise = -torch.log(keyed_uniform(keys, (SAMPLE_STREAM, iteration, slots), probs.shape[-1]))
        predicted = (probs / noise).argmax(dim=-1)  # (N, W) exponential races
        corrected = (residual / noise[:, :-1]).argmax(dim=-1)  # (N, W-1)
        if s.jacobi_coupled:  # the next draft of a slot: this one, coupled maximally (module docstring)
            kept = torch.where(ok, draft_codes[..., 0], corrected)
            predicted = torch.cat([kept, predicted[:, -1:]], dim=1)
        corrected = torch.cat([corrected, predicted[:, -1:]], dim=1)  # the bonus at the last slot
        predicted, corrected = as_ids(predicted), as_ids(corrected)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (N,) leading accepted drafts
    at = torch.arange(width, device=drafts.device)[None]
    drafts_w = torch.cat([drafts, drafts[:, -1:]], dim=1)  # (N, W); the pad column is never chosen
    tokens = torch.where(
        at < accepted[:, None],
        drafts_w,
        torch.where(at == accepted[:, None], corrected, predicted),
    )
    return tokens, accepted, probs, entropy, predicted


def input_guess(d: RestorationDecoder, state, height: int, width: int) -> torch.Tensor:
    """``(B, h * (w + 1) + 1)``: per row, the code of the prompt's LQ image at each body index of the
    output (-1 at newlines, ``<eoi>``, and for every index of a row whose LQ grid is not ``h x w``). In a
    restoration the LQ image is upsampled to the output's size before it is tokenised, so each of its
    codes is a guess at the output's code at the same place. Device ops only."""
    v, seq = d.fmt.vocab, state.seq[:, : state.block_start]
    n_body = height * (width + 1)
    start = (seq == v.boi).int().argmax(dim=1)  # (B,) the prompt's first image block
    offsets = torch.arange(3 + n_body, device=seq.device)
    block = seq.gather(1, (start[:, None] + offsets).clamp_max(seq.shape[1] - 1))  # <boi> <h> <w> body
    _, grid_h, grid_w = d.fmt.grid_tokens(height, width)
    same_grid = (block[:, 0] == v.boi) & (block[:, 1] == grid_h) & (block[:, 2] == grid_w)
    codes = d._image_codes(seq.device).index[block[:, 3:]]  # (B, n_body) code or -1
    codes = torch.where(same_grid[:, None], codes, -1)
    return torch.cat([codes, torch.full_like(codes[:, :1], -1)], dim=1)  # <eoi>

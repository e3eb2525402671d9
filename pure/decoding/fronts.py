"""Row-parallel decoding with speculative row fronts: several rows per forward, several codes per row.

Row-parallel decoding with lag ``L`` (:mod:`pure.decoding.rows`) is an autoregressive model with a fixed
attention pattern, the staircase (:func:`pure.decoding.layout.staircase`): a code sees what precedes it in
raster order except, ``k`` rows up, the codes more than ``k * L`` columns to its right, which is what exists
when that decoding feeds it. Any order that decides each code after everything it sees therefore gives the
same image, and this one decides them in fewer forwards. Each forward feeds every row that can advance a
window (its "front"): the row's last decided token and up to ``W - 1`` drafts of its next codes, as far as
the forward holds the row above (a token fed at column ``x`` sees it up to column ``x + L``), that row's
drafts included (:func:`fronts`). Each front's drafts are verified as speculative Jacobi decoding verifies
its window (:func:`pure.decoding.jacobi.verify_drafts`: speculative sampling, coupled drafts, fresh drafts
random or the LQ image's codes, a batch's rows advancing together with their extra decided tokens kept as
fixed drafts). Then, top down, a front decides only the tokens whose context held: those that saw none of
the row above's rejected drafts (:func:`valid`). So the decoding is lossless with respect to row-parallel
decoding at the same lag: the same image under greedy decoding, the same distribution under sampling. It is
exactly as lossy as that decoding against the one-token loop (``L >= w`` is the one-token image).

Forwards: row-parallel decoding advances every row by one code per forward, so the last row ends after
``(h - 1) L + w`` forwards. Here a front advances by its accepted drafts plus one, and the rows below keep
up with it when their own drafts hold: with right drafts, the whole image in one forward.

The cache: a forward appends the fronts' tokens, packed (no padding between fronts); what a front decides
from (its first token and the accepted drafts) moves down over the rest
(:meth:`pure.decoding.layout.CacheLayout.keep`), and the rest is rolled back. One host sync per forward.

Compiled, every forward of one shape would feed a window for every row (64 x 16 positions at 512 px), and a
7B forward that long is compute-bound, several times the cost of the memory-bound forward a few fronts need.
So a compiled forward pads its tokens to a power of two, at least :data:`MIN_FED` (:func:`padded`), and
verifies that many windows at most: a handful of shapes, each forward under twice what it feeds (or
:data:`MIN_FED`, which costs a 7B forward nothing: ``python -m pure.bench --arch 7b`` prints the roofline).

Windows are padded as well: to the window (compiled) or to one more than the longest front (eager). A front
of ``m < W`` tokens then always verifies, at its last position, the draft after its last fed token (a fixed
draft there, decided before, is kept), so padding changes no token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from pure.decoding.capture import allowing_shapes
from pure.decoding.jacobi import DRAFT_STREAM, input_guess, verify_drafts
from pure.decoding.rows import check_row_decoding, effective_lag
from pure.decoding.sampling import ImageGridConstraintLogitsProcessor, keyed_uniform, noise_keys

if TYPE_CHECKING:
    from pure.decoding.loop import RestorationDecoder

MIN_FED = 16  # compiled forwards feed at least this (a 7B forward on an H200 costs one read up to ~70-120)


def padded(tokens: int) -> int:
    """The tokens a compiled forward feeds to hold ``tokens``: the next power of two, at least
    :data:`MIN_FED`. Its shape (with the windows it verifies, :func:`padded_windows`)."""
    return max(MIN_FED, power_of_two(tokens))


def padded_windows(tokens: int, height: int) -> int:
    """The windows a compiled forward of ``tokens`` (:func:`padded`) verifies: one per token it feeds, at most
    one per grid row (rounded up to a power of two)."""
    return min(tokens, power_of_two(height))


def power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fronts(decided: list[int], width: int, lag: int, window: int) -> list[tuple[int, int]]:
    """The fronts of a forward: ``(row, tokens fed)`` for every row that can advance, given the tokens
    ``decided`` so far in each row (a prefix of its ``width`` codes and newline, :func:`row_tokens`).

    A row feeds ``m`` tokens, its last decided one (column ``decided[r] - 1``) and ``m - 1`` drafts, to
    decide its next ``m``: at most ``window``, at most what it has left, and only tokens whose view of the
    row above (up to ``lag`` columns to their right) this forward holds, in the cache or fed to it, drafts
    included (:func:`valid`; what a rejected draft above spoils is sorted out after the forward). A row's
    last code is fed too, to predict its newline (the grammar's), for the rows below to see; not the last
    row's (nothing sees it)."""
    out, above = [], None
    for row, done in enumerate(decided):
        room = min(window, row_tokens(row, len(decided), width) - done)
        if above is not None:
            room = min(room, valid(above, done - 1, room, width, lag))
        if room >= 1:
            out.append((row, room))
        above = done - 2 + max(room, 0)  # the last column of the row that this forward holds
    return out


def valid(above: int, first: int, m: int, width: int, lag: int) -> int:
    """Of ``m`` tokens fed from column ``first`` on, how many lead with a context that exists, when the row
    above is held up to column ``above``: the token at column ``x`` sees that row up to ``min(x + lag,
    width - 1)``."""
    if above >= width - 1:
        return m
    return max(0, min(m, above - lag - first + 1))


def schedule(
    height: int, width: int, lag: int, window: int, accepted: Callable[[int, int], int]
) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """The forwards of fronts without a model: each front of ``m`` tokens in row ``row`` has
    ``accepted(row, m)`` of its drafts accepted (0 to ``m - 1``) and commits as
    :meth:`RowFrontsDecoding.image_phase` commits. Returns each forward's fronts, and the tokens decided in
    each row at the end (all of them). What ``python -m pure.bench --arch 7b`` projects from."""
    decided, forwards = [1] + [0] * (height - 1), []
    while active := fronts(decided, width, lag, window):
        forwards.append(active)
        for _, row, m, held in committing(decided, active, width, lag):
            decided[row] += min(accepted(row, m) + 1, held)
    return forwards, decided


def committing(
    decided: list[int], active: list[tuple[int, int]], width: int, lag: int
) -> Iterator[tuple[int, int, int, int]]:
    """After a forward of the fronts ``active``, top down: ``(front, row, m, held)`` for each, where ``held``
    of its ``m`` tokens lead with a view of the row above that held (:func:`valid`: it saw none of that row's
    drafts left undecided). The caller adds the tokens the front decides, at most ``held``, to
    ``decided[row]`` before taking the next."""
    above, by_row = None, {row: (f, m) for f, (row, m) in enumerate(active)}
    for row in range(len(decided)):
        if row in by_row:
            f, m = by_row[row]
            yield f, row, m, m if above is None else valid(above, decided[row] - 1, m, width, lag)
        above = decided[row] - 2  # the row's decided tokens but its last, which a forward feeds again


def row_tokens(row: int, height: int, width: int) -> int:
    """The tokens a row decides: its codes and, but for the last row, its newline (:func:`fronts`)."""
    return width + (row < height - 1)


class RowFrontsDecoding:
    """Row-parallel decoding with speculative fronts (module docstring): the decoder calls
    :meth:`image_phase` when its sampling settings ask for both a row lag and a Jacobi window.

    Args:
        decoder: the decoder whose forward, layout, guidance and sampling it uses; its model must take 4-D
            masks (a :class:`~pure.model.PureForConditionalGeneration`).
        lag: codes a row must have before the next row starts, >= 1.
        window: tokens a front feeds per forward at most, >= 2.
    """

    def __init__(self, decoder: RestorationDecoder, lag: int, window: int):
        check_row_decoding(decoder, lag)
        if window < 2:
            raise ValueError(f"the Jacobi window must be >= 2 tokens; got {window}")
        self.decoder = decoder
        self.lag = lag
        self.window = window

    def ahead(self, height: int, width: int) -> int:
        """Cache slots a forward writes past what it keeps: a window for every row (with right drafts, all
        rows advance in the same forward), padded as a compiled forward pads it."""
        return padded(height * self.window)

    def shapes(self, height: int) -> int:
        """The input shapes of a compiled forward for an image ``height`` rows high: one per power of two
        from :data:`MIN_FED` tokens to a window for every row (:func:`padded`)."""
        return (padded(height * self.window) // MIN_FED).bit_length()

    def front_step(
        self,
        ids,
        positions,
        mask,
        cache,
        rotary,
        codes,
        unpack,
        forced,
        keys,
        iteration,
        slots,
        drafts,
        q,
        fixed,
    ):
        """Forward the fronts' packed tokens and verify each front's drafts. No host sync; fixed shapes for
        ``T`` tokens and ``F`` windows of ``W`` (what ``compile`` captures).

        ``unpack``: ``(F * W,)`` the fed token at each window position (any, where a window is shorter);
        ``forced``, ``slots``: ``(B * F, W)`` the grammar's token at each target (``-1``: a code) and noise
        counters; ``drafts``, ``fixed``: ``(B * F, W - 1)``; ``q``: ``(B * F, W - 1, K)`` or ``None``; the
        windows of a batch row's fronts are consecutive. Returns
        :func:`~pure.decoding.jacobi.verify_drafts`'s, per window."""
        d = self.decoder
        logits = d._forward(ids, positions, mask, cache, ids.shape[1], rotary, codes)
        guided = d.layout.guide(logits)[:, unpack]  # (B, F * W, K)
        windows, span = drafts.shape[0], drafts.shape[1] + 1
        guided = guided.reshape(windows, span, guided.shape[-1])
        keys = keys.repeat_interleave(windows // keys.shape[0], dim=0)
        return verify_drafts(d, guided, codes, forced, keys, iteration, slots, drafts, q, fixed)

    def image_phase(self, state, constraint: ImageGridConstraintLogitsProcessor, generators, entropy, bar):
        """REstore, by fronts of rows (module docstring)."""
        d = self.decoder
        s = d.sampling
        batch, height, width = entropy.shape
        n_body, w_len = height * (width + 1), self.window
        device = state.seq.device
        greedy = s.temperature == 0
        keys = noise_keys(None if greedy else generators, batch, device)
        codes = d._image_codes(device)
        code_ids, n_codes = codes.ids, codes.ids.numel()
        step = d._compiled_fn(self.front_step, device)
        lag = effective_lag(self.lag, width)
        compiled = d._compiles(device)
        if compiled:
            step = allowing_shapes(step, self.shapes(height))
        guess = input_guess(d, state, height, width) if s.jacobi_drafts == "input" else None
        at = torch.arange(w_len, device=device)

        grammar = constraint.forced_at(torch.arange(n_body + 1, device=device))  # newlines, <eoi>; -1: codes
        body = grammar[None].repeat(batch, 1)
        entropies = torch.zeros((batch, n_body + 1), device=device)
        body[:, 0], entropies[:, 0] = d._first_image_token(state, codes, constraint, keys)
        d.layout.start_rows(state, width, lag)
        decided = [1] + [0] * (height - 1)  # tokens decided in each grid row (a prefix of its codes, newline)
        # per grid row, proposals for its next codes: ids, draft distributions, fixed (already decided)
        proposed = [torch.empty((batch, 0), dtype=torch.long, device=device) for _ in range(height)]
        proposed_q = [
            None if greedy else torch.empty((batch, 0, n_codes), device=device) for _ in range(height)
        ]
        proposed_fixed = [torch.empty((batch, 0), dtype=torch.bool, device=device) for _ in range(height)]
        counter = torch.zeros((), dtype=torch.long, device=device)  # the forward, on the device
        iteration, rows_done = 0, 0
        while rows_done < height:
            active = fronts(decided, width, lag, w_len)
            n_fed = sum(m for _, m in active)
            if compiled:  # a few shapes (module docstring)
                n_tokens = padded(n_fed)
                n_fronts, span = padded_windows(n_tokens, height), w_len
            else:  # the fronts' tokens; windows one longer than the longest front (module docstring)
                n_tokens, n_fronts, span = n_fed, len(active), min(w_len, 1 + max(m for _, m in active))
            index = torch.full((n_fronts, span), n_body, dtype=torch.long, device=device)  # padding
            pack = torch.zeros(n_tokens, dtype=torch.long, device=device)  # the window position fed there
            unpack = torch.zeros(n_fronts * span, dtype=torch.long, device=device)
            offsets = list(accumulate((m for _, m in active), initial=0))  # a front's first token among them
            first_ids = code_ids[0].expand(batch, n_fronts).clone()  # padding: any code
            drafts = code_ids[0].expand(batch, n_fronts, span - 1).clone()
            fixed = torch.zeros((batch, n_fronts, span - 1), dtype=torch.bool, device=device)
            q = None if greedy else torch.ones((batch, n_fronts, span - 1, n_codes), device=device) / n_codes
            front_rows = torch.arange(height, height + n_fronts, device=device)  # padding: unused counters
            for f, (row, m) in enumerate(active):
                start = row * (width + 1) + decided[row] - 1  # body index of the last decided token
                self._top_up(
                    proposed, proposed_q, proposed_fixed, row, start, keys, iteration, guess, code_ids
                )
                index[f, :m] = start + at[:m]
                o = offsets[f]
                pack[o : o + m] = f * span + at[:m]
                unpack[f * span : f * span + m] = o + at[:m]
                first_ids[:, f] = body[:, start]
                drafts[:, f] = proposed[row][:, : span - 1]
                fixed[:, f] = proposed_fixed[row][:, : span - 1]
                if not greedy:
                    q[:, f] = proposed_q[row][:, : span - 1]
                front_rows[f] = row
            forced = grammar[(index + 1).clamp_max(n_body)]  # (F, W) at the targets: a row's newline
            drafts = torch.where(forced[:, :-1] >= 0, forced[:, :-1], drafts)  # always accepted
            fixed |= forced[:, :-1] >= 0
            fed = torch.cat([first_ids[..., None], drafts], dim=2)  # (B, F, W)
            packed = index.flatten()[pack].masked_fill(torch.arange(n_tokens, device=device) >= n_fed, n_body)
            ids, positions, mask = d.layout.body_inputs(state, fed.flatten(1)[:, pack], packed)
            slots = (front_rows[:, None] * w_len + at[:span]).repeat(batch, 1)  # (B * F, span)
            out, accepted, probs, step_entropy, predicted = step(
                ids,
                positions,
                mask,
                state.cache,
                state.rotary,
                codes,
                unpack,
                forced.repeat(batch, 1),
                keys,
                counter,
                slots,
                drafts.flatten(0, 1),
                None if greedy else q.flatten(0, 1),
                fixed.flatten(0, 1),
            )
            state.passes += 1
            out, accepted = out.view(batch, n_fronts, span), accepted.view(batch, n_fronts)
            predicted = predicted.view(batch, n_fronts, span)
            step_entropy = step_entropy.view(batch, n_fronts, span)
            if not greedy:
                probs = probs.view(batch, n_fronts, span, n_codes)
            # Per front, top down: its accepted drafts and one more token are decided, within the tokens it
            # was fed for and those whose context held (the row above's drafts it saw may be rejected)
            accepted_host = self._read(accepted)
            kept = []
            for f, row, m, held in committing(decided, active, width, lag):
                start = row * (width + 1) + decided[row] - 1  # body index of the row's first fed token
                c = min(min(a[f] + 1, held) for a in accepted_host)  # every batch row commits alike ...
                body[:, start + 1 : start + 1 + c] = out[:, f, :c]
                entropies[:, start + 1 : start + 1 + c] = step_entropy[:, f, :c]
                decided[row] += c
                # the rest of its window proposes the next tokens, then the proposals it was not fed
                left = torch.arange(c, m, device=device)[None]
                fixed_left = left < (accepted[:, f, None] + 1).clamp_max(held)  # ... what a row decided more
                drafts_left = torch.where(fixed_left, out[:, f, c:m], predicted[:, f, c:m])
                proposed[row] = torch.cat([drafts_left, proposed[row][:, m:]], dim=1)
                proposed_fixed[row] = torch.cat([fixed_left, proposed_fixed[row][:, m:]], dim=1)
                if not greedy:
                    proposed_q[row] = torch.cat([probs[:, f, c:m], proposed_q[row][:, m:]], dim=1)
                kept.append(offsets[f] + at[:c])  # its first token and the accepted drafts
                if decided[row] == row_tokens(row, height, width):
                    rows_done += 1
                    bar.update(1)
            d.layout.keep(state, n_tokens, torch.cat(kept))
            iteration += 1
            counter += 1
        state.seq[:, state.block_start + 3 : state.block_start + 3 + n_body + 1] = body
        entropy.copy_(entropies[:, :n_body].view(batch, height, width + 1)[:, :, :width])

    @staticmethod
    def _read(accepted: torch.Tensor) -> list[list[int]]:
        """``(B, F)`` accepted drafts per batch row and front, on the host: the one host sync of a forward
        (what a front commits decides what the cache keeps and what the next forward feeds)."""
        return accepted.tolist()

    def _top_up(self, proposed, proposed_q, proposed_fixed, row, start, keys, iteration, guess, code_ids):
        """Fill row ``row``'s proposals to ``W - 1`` with fresh drafts, taken as given (``q`` one-hot):
        random codes, or the input's code at the same place. ``start``: the body index of the row's last
        decided token (the drafts are for the body indices after it)."""
        have = proposed[row].shape[1]
        missing = self.window - 1 - have
        if missing <= 0:
            return
        batch, device, n_codes = proposed[row].shape[0], code_ids.device, code_ids.numel()
        slots = row * self.window + torch.arange(missing, device=device)[None]
        u = keyed_uniform(keys, (DRAFT_STREAM, iteration, slots), 1)
        fresh_codes = (u[..., 0] * n_codes).long().clamp_max(n_codes - 1)
        if guess is not None:
            at = (start + 1 + have + torch.arange(missing, device=device)[None]).clamp_max(guess.shape[1] - 1)
            known = guess.gather(1, at.expand(batch, -1))  # the input's code there, or -1
            fresh_codes = torch.where(known >= 0, known, fresh_codes)
        fresh = code_ids[fresh_codes]
        proposed[row] = torch.cat([proposed[row], fresh], dim=1)
        proposed_fixed[row] = torch.cat(
            [proposed_fixed[row], torch.zeros_like(fresh, dtype=torch.bool)], dim=1
        )
        if proposed_q[row] is not None:
            one_hot = torch.nn.functional.one_hot(fresh_codes, n_codes).float()
            proposed_q[row] = torch.cat([proposed_q[row], one_hot], dim=1)

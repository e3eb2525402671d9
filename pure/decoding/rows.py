"""Row-parallel decoding of the image block (opt-in, lossy): several grid rows advance in one forward.

"Next-set" decoding in the manner of ZipAR (ICML 2025): an image code depends mostly on its spatial
neighbours, so row ``r + 1`` need not wait for row ``r`` to end. With a lag of ``L`` codes, code ``c`` of row
``r`` is decided at step ``r * L + c``: row ``r + 1`` starts once row ``r`` has ``L`` codes, and every
forward feeds one token per active row. The passes of an ``h x w`` grid fall from ``h * (w + 1)`` to
``(h - 1) * L + w``, the ``<boi> <grid h> <grid w>`` forward included (64x64 at 512 px: 4,161 -> 63 L + 64;
316 at L = 4).

What each forward holds, per active row: the row's last decided token, at its raster position, to predict
the row's next code. A row starts from the newline that ends the row above (known in advance: the grammar
puts it there), fed at its raster position while that row is still being written. Every token attends to
the tokens that precede it in raster order and exist: the prompt, the text, the rows above as far as they
have got, its own row so far (tokens fed in the same forward included); the rest is masked. So the
approximation is only this: a code, and the keys and values it leaves in the cache, were computed without
the part of the rows above that did not exist yet. Positions are the raster ones, so the model sees its
training positions. Everything else is the one-token loop's: guidance from the twin in the same forward,
entropy top-k, temperature, the grammar's newlines and ``<eoi>``, and the same keyed uniform per body index.

Exact cases (tests): ``L >= w`` gives the one-token loop's tokens (at ``L = w`` a row's newline is fed in the
forward that feeds the row's last code, which it sees), in ``h * w`` passes instead of ``h * (w + 1)``.

Shapes: the number of active rows varies along the grid (it ramps up, holds ``~(w + 1) / L``, ramps down).
A compiled step needs one shape: every forward is then padded to the largest set with tokens that see
everything and that nothing sees, and the cache is rolled back over them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pure.decoding.sampling import ImageGridConstraintLogitsProcessor, noise_keys

if TYPE_CHECKING:
    from pure.decoding.loop import RestorationDecoder


def effective_lag(lag: int, width: int) -> int:
    """A lag past ``w + 1`` only adds empty steps: ``L = w + 1`` is already the one-token order."""
    if lag < 1:
        raise ValueError(f"the row lag must be >= 1 code; got {lag}")
    return min(lag, width + 1)


def row_schedule(height: int, width: int, lag: int) -> list[tuple[int, int, int]]:
    """The forwards after ``<boi> <grid h> <grid w>`` (whose forward decides body index 0): per step ``t``,
    ``(t, first row, last row)``, the grid rows that advance. Row ``r``'s code ``c`` is decided at step
    ``r * lag + c``; the step feeds each of those rows the token before its target in raster order, body
    index ``r * (w + 1) + t - r * lag - 1`` (:func:`fed_indices`), which predicts the next. Body index
    ``r * (w + 1) + c`` is code ``c`` of row ``r`` (``c = w``: its newline, fed to start row ``r + 1``). The
    last row's last code, at step ``(h - 1) * lag + w - 1``, is the last target (a newline follows it)."""
    lag = effective_lag(lag, width)
    return [
        (t, max(0, -(-(t - width) // lag)), min(height - 1, t // lag))
        for t in range(1, (height - 1) * lag + width)
    ]


def fed_indices(t: int, first: int, last: int, width: int, lag: int) -> list[int]:
    """The body indices step ``(t, first, last)`` of :func:`row_schedule` feeds (host ints; the decode makes
    them on the device)."""
    lag = effective_lag(lag, width)
    return [r * (width + 1 - lag) + t - 1 for r in range(first, last + 1)]


def check_row_decoding(decoder: RestorationDecoder, lag: int) -> None:
    """What any row-parallel decoding needs (this module's, :mod:`pure.decoding.fronts`'): a lag of at least
    one code and a model that takes 4-D masks."""
    if lag < 1:
        raise ValueError(f"the row lag must be >= 1 code; got {lag}")
    if not decoder._use_decode:
        raise ValueError(
            f"row-parallel decoding needs a PureForConditionalGeneration (4-D masks in raster order); "
            f"got {type(decoder.model).__name__}"
        )


class RowParallelDecoding:
    """Row-parallel decoding of a :class:`~pure.decoding.loop.RestorationDecoder`'s image phase (module
    docstring): the decoder calls :meth:`image_phase` instead of its one-token loop when its sampling
    settings ask for a row lag (``SamplingConfig.row_lag``).

    Args:
        decoder: the decoder whose forward, layout, guidance and sampling it uses; its model must take 4-D
            masks (a :class:`~pure.model.PureForConditionalGeneration`).
        lag: codes a row must have before the next row starts, >= 1.
    """

    def __init__(self, decoder: RestorationDecoder, lag: int):
        check_row_decoding(decoder, lag)
        self.decoder = decoder
        self.lag = lag

    def ahead(self, height: int, width: int) -> int:
        """Cache slots a step may write past what it keeps: the padding of a compiled step's forwards."""
        return max((last - first + 1 for _, first, last in row_schedule(height, width, self.lag)), default=1)

    def rows_step(self, ids, positions, mask, cache, rotary, codes, forced, uniform):
        """Forward one token per active row and draw each row's next code. No host sync (what ``compile``
        captures). ``forced``, ``uniform``: ``(B, q)`` the grammar's token (``-1`` for none) and the uniform
        at every target. Returns ``(tokens (B, q), entropy (B, q))``."""
        d = self.decoder
        logits = d._forward(ids, positions, mask, cache, ids.shape[1], rotary, codes)
        scores = d.layout.guide(logits)  # (B, q, K)
        batch, q = scores.shape[:2]
        tokens, entropy = d._select(scores.flatten(0, 1), codes.ids, forced.flatten(), uniform.flatten())
        return tokens.view(batch, q), entropy.view(batch, q)

    def image_phase(self, state, constraint: ImageGridConstraintLogitsProcessor, generators, entropy, bar):
        """REstore, one token per active row per forward (module docstring)."""
        d = self.decoder
        batch, height, width = entropy.shape
        n_body = height * (width + 1)
        device = state.seq.device
        keys = noise_keys(generators if d.sampling.temperature > 0 else None, batch, device)
        forced = constraint.forced_at(torch.arange(n_body + 1, device=device))  # (n_body + 1,)
        uniform = d._image_noise(keys, n_body + 1)  # (B, n_body + 1): the one-token loop's draws
        codes = d._image_codes(device)
        compiled = d._compiles(device)
        step = d._compiled_fn(self.rows_step, device)
        schedule = row_schedule(height, width, self.lag)
        lag = effective_lag(self.lag, width)
        pad_to = self.ahead(height, width) if compiled else 0
        rows = torch.arange(max(pad_to, height), device=device)

        body = forced[None].repeat(batch, 1)  # (B, n_body + 1): the grammar's tokens now, codes as decided
        entropies = torch.zeros((batch, n_body + 1), device=device)
        body[:, 0], entropies[:, 0] = d._first_image_token(state, codes, constraint, keys)
        d.layout.start_rows(state, width, lag)
        rows_done = 0
        for t, first, last in schedule:
            fed = last - first + 1
            # the fed body indices (raster order), made on the device; a compiled step's padding comes last
            # and sits after everything (it sees all, nothing sees it) until the rollback below
            r = rows[: pad_to or fed] + first
            index = torch.where(r <= last, r * (width + 1 - lag) + t - 1, n_body)
            ids, positions, mask = d.layout.body_inputs(state, body[:, index], index)
            target = (index + 1).clamp_max(n_body)
            token, step_entropy = step(
                ids,
                positions,
                mask,
                state.cache,
                state.rotary,
                codes,
                forced[target].expand(batch, -1),
                uniform[:, target],
            )
            state.passes += 1
            real = target[:fed]
            body[:, real], entropies[:, real] = token[:, :fed], step_entropy[:, :fed]
            d.layout.rollback(state, index.numel() - fed)
            if t - first * lag == width - 1:  # the first row's last code: that row is done
                bar.update(1)
                rows_done += 1
        bar.update(height - rows_done)  # (a one-code-wide grid's first row ends with the header)
        state.seq[:, state.block_start + 3 : state.block_start + 3 + n_body + 1] = body
        entropy.copy_(entropies[:, :n_body].view(batch, height, width + 1)[:, :, :width])

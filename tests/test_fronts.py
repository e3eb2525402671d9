"""Row-parallel decoding with speculative fronts (issue 17, pure.decoding.fronts): the staircase it shares
with row-parallel decoding, the fronts a forward holds, the cache it keeps, and the claim: the same image as
row-parallel decoding at the same lag under greedy decoding, the same distribution under sampling, in fewer
forwards."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from test_jacobi import two_sample_p_values

from pure.decoding import fronts as fronts_module
from pure.decoding.fronts import fronts, schedule, valid
from pure.decoding.layout import staircase
from pure.decoding.loop import RestorationDecoder, SamplingConfig
from pure.decoding.rows import fed_indices, row_schedule
from pure.infer import build_parser, sampling_config

H, W = 4, 8  # latent grid of the generated image


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts_for(fmt, n: int, side: int | None = None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (side, side) if side else (H, W)
    codes = [torch.randint(fmt.vocab.codebook_size, shape, generator=gen) for _ in range(n)]
    return torch.stack([fmt.prompt_ids(c, instruction="Restore.") for c in codes])


def decode(model, fmt, prompts, seeds=(3, 4, 5), layout="shared", compile=False, **sampling):
    decoder = RestorationDecoder(
        model, fmt, SamplingConfig(**sampling), compile=compile, guidance_layout=layout
    )
    gens = [torch.Generator().manual_seed(s) for s in seeds[: prompts.shape[0]]]
    return decoder.generate_image(prompts, H, W, generators=gens)


# -- the staircase and the fronts ----------------------------------------------------------------------------


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_the_staircase_is_what_row_parallel_decoding_has_fed(lag):
    """For every token row-parallel decoding feeds, the body indices it sees by the staircase are exactly
    those fed up to and including its forward that precede it in raster order."""
    fed_by = {}  # body index -> step that feeds it (the header's <grid w> feeds body index 0 at step 0)
    for t, first, last in row_schedule(H, W, lag):
        for i in fed_indices(t, first, last, W, lag):
            fed_by[i] = t
    body = torch.arange(H * (W + 1))
    for i, t in fed_by.items():
        sees = staircase(body, torch.tensor(i), W, lag)
        existing = torch.tensor([j in fed_by and fed_by[j] <= t and j <= i for j in body.tolist()])
        assert torch.equal(sees[: max(fed_by) + 1], existing[: max(fed_by) + 1]), i
    assert staircase(torch.tensor(-1), torch.tensor(0), W, lag)  # the prompt: seen by all
    assert torch.equal(staircase(body[:, None], body, W, W + 1), body[:, None] <= body)  # raster order


def test_fronts_reach_no_further_than_the_row_above_is_held():
    """A token fed at column x sees the row above up to x + lag: what the forward holds of it, drafts
    included (its last decided token is fed only if that row has a front; otherwise the cache ends one
    before it)."""
    lag = 2
    # the first row a whole window (columns 0-3 held); the second row's newline input (column -1) and two
    # drafts reach column 3; the third row's newline input reaches column 1, which the second row holds
    assert fronts([1, 0, 0, 0], W, lag, 4) == [(0, 4), (1, 3), (2, 1)]
    # the second row cannot advance (column 2 would see the first row's column 4, a draft not fed); the
    # third row sees the second row's cache (columns 0-1), not its last decided code (column 2)
    assert fronts([3, 3, 0, 0], W, lag, 2) == [(0, 2), (2, 1)]
    # a finished row above: no limit; a row's newline is fed its last code, the last row's is not
    assert fronts([W + 1, W, 2, 2], W, lag, 16) == [(1, 1), (2, W + 1 - 2), (3, W - 2)]
    assert fronts([W + 1, W + 1, W + 1, W - 1], W, lag, 16) == [(3, 1)]
    assert fronts([W + 1, W + 1, W + 1, W], W, lag, 16) == []
    # how many of a front's tokens had their context, once the row above is decided up to a column
    assert valid(5, 3, 4, W, lag) == 1 and valid(4, 3, 4, W, lag) == 0 and valid(W - 1, 3, 4, W, lag) == 4
    # a lag past the width: every row waits for the one above to finish
    assert fronts([1, 0, 0, 0], W, W + 1, 4) == [(0, 4)]


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_fronts_with_any_acceptance_finish_every_row(lag):
    """Decodes with random acceptance, committed as the decoder commits (no more than the context held),
    always have a front until every row is done, and end with every code and newline decided."""
    height, width, window = 12, 8, 5
    gen, most = random.Random(lag), 0
    for _ in range(100):
        forwards, decided = schedule(height, width, lag, window, lambda row, m: gen.randint(0, m - 1))
        assert decided == [width + 1] * (height - 1) + [width]
        most = max(most, *map(len, forwards))
    assert most > width // lag + 1  # more rows at once than row-parallel decoding ever has


@pytest.mark.parametrize(("height", "width", "lag", "window"), [(4, 8, 1, 5), (12, 8, 3, 2), (64, 64, 4, 16)])
def test_fronts_accepting_nothing_take_row_parallel_forwards_and_everything_far_fewer(
    height, width, lag, window
):
    """The schedule without a model (what the 7B projection counts): with every draft rejected, a front
    advances one code per forward, as row-parallel decoding does; with every draft accepted, a window."""
    rejected, _ = schedule(height, width, lag, window, lambda row, m: 0)
    assert len(rejected) == len(list(row_schedule(height, width, lag)))
    accepted, _ = schedule(height, width, lag, window, lambda row, m: m - 1)
    assert len(accepted) <= -(-(width + 1) // (window - 1)) + height


# -- the claim ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize("lag", [1, 2, 3])
@pytest.mark.parametrize("window", [2, 5])
def test_greedy_fronts_give_the_row_parallel_image_in_fewer_forwards(
    tiny_restorer, tiny_format, layout, lag, window
):
    model, prompts = tiny_restorer.model, prompts_for(tiny_format, 2)
    rows = decode(model, tiny_format, prompts, layout=layout, temperature=0.0, row_lag=lag)
    both = decode(
        model, tiny_format, prompts, layout=layout, temperature=0.0, row_lag=lag, jacobi_window=window
    )
    assert all(torch.equal(a, b) for a, b in zip(rows.answer_ids, both.answer_ids, strict=True))
    assert torch.allclose(rows.entropy, both.entropy, atol=1e-3)  # other batch shapes: other roundings
    assert both.image_forward_passes <= rows.image_forward_passes


def test_a_lag_of_the_width_is_the_one_token_image_by_windows(tiny_restorer, tiny_format):
    model, prompts = tiny_restorer.model, prompts_for(tiny_format, 2, seed=1)
    one = decode(model, tiny_format, prompts, temperature=0.0)
    both = decode(model, tiny_format, prompts, temperature=0.0, row_lag=W + 1, jacobi_window=4)
    assert all(torch.equal(a, b) for a, b in zip(one.answer_ids, both.answer_ids, strict=True))


def test_with_right_drafts_the_image_takes_one_forward(tiny_restorer, tiny_format, monkeypatch):
    """Drafts that are the row-parallel image (an oracle in place of the LQ image's codes) are all accepted,
    each row's on the context of the row above's drafts: with windows as wide as a row, every row in the
    forward after the header's, against row-parallel decoding's (h - 1) L + w."""
    model, prompts = tiny_restorer.model, prompts_for(tiny_format, 2)
    rows = decode(model, tiny_format, prompts, temperature=0.0, row_lag=2)
    codes = RestorationDecoder(model, tiny_format)._image_codes(prompts.device).index
    oracle = torch.stack([codes[a[3 : 3 + H * (W + 1) + 1]] for a in rows.answer_ids])  # -1: grammar's
    monkeypatch.setattr(fronts_module, "input_guess", lambda *args: oracle)
    both = decode(
        model, tiny_format, prompts, temperature=0.0, row_lag=2, jacobi_window=W + 1, jacobi_drafts="input"
    )
    assert all(torch.equal(a, b) for a, b in zip(rows.answer_ids, both.answer_ids, strict=True))
    assert rows.image_forward_passes == (H - 1) * 2 + W
    assert both.image_forward_passes == 2


@pytest.mark.slow
def test_sampled_fronts_keep_row_parallel_decodings_distribution(sharp_model, tiny_format):
    """400 images of 4x4 codes by row-parallel decoding at lag 1 against 400 by fronts (batched: rows at
    different acceptance; coupled drafts from the input): no per-position or neighbour-pair chi-square test
    rejects at a family-wise 1% level (Bonferroni over 31 tests; the same statistic rejects a mild change of
    temperature: tests/test_jacobi.py). Fixed seeds: deterministic."""
    fmt, n, side = tiny_format, 400, 4
    prompt = prompts_for(fmt, 1, side)
    sampling = SamplingConfig(max_text_tokens=1, cfg_scale=0.8, temperature=0.9, row_lag=1)

    def codes(settings, seeds):
        decoder = RestorationDecoder(sharp_model, fmt, settings)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        result = decoder.generate_image(prompt.expand(len(seeds), -1), side, side, generators=gens)
        return torch.stack(
            [fmt.parse_answer(a, strict=True).codes.flatten() for a in result.answer_ids]
        ).numpy()

    rows = codes(sampling, list(range(n)))
    both = codes(replace(sampling, jacobi_window=4, jacobi_drafts="input"), list(range(10**6, 10**6 + n)))
    p_values = two_sample_p_values(rows, both)
    assert p_values.min() > 0.01 / 31, p_values.min()


# -- the cache, compiled, wiring -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_the_compiled_step_is_one_graph_with_the_eager_tokens(tiny_restorer, tiny_format, layout):
    model, prompts = tiny_restorer.model, prompts_for(tiny_format, 2)
    settings = {"temperature": 0.9, "row_lag": 2, "jacobi_window": 3, "layout": layout}
    eager = decode(model, tiny_format, prompts, **settings)
    compiled = decode(model, tiny_format, prompts, compile="eager", **settings)
    assert all(torch.equal(a, b) for a, b in zip(eager.answer_ids, compiled.answer_ids, strict=True))
    assert compiled.image_forward_passes == eager.image_forward_passes


def test_row_lag_with_jacobi_is_fronts(tiny_restorer, tiny_format):
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, SamplingConfig(row_lag=2, jacobi_window=6))
    assert decoder.speculative is None
    assert (decoder.row_parallel.lag, decoder.row_parallel.window) == (2, 6)
    assert sampling_config(row_lag=2, jacobi_window=6).row_lag == 2
    args = build_parser().parse_args(["--input", "x.png", "--row-lag", "2", "--jacobi"])
    assert (args.row_lag, args.jacobi) == (2, 16)


@pytest.mark.parametrize(("lag", "window"), [(1, 3), (1, 5), (2, 6)])
def test_padding_changes_no_token(tiny_restorer, tiny_format, monkeypatch, lag, window):
    """Sampled, four images: windows padded as a compiled forward pads them (to the window, more windows)
    give the eager tokens. (They did not when eager windows were as long as the longest front: its last
    position tested no draft, a longer window's did.)"""
    settings = SamplingConfig(temperature=0.9, row_lag=lag, jacobi_window=window)
    prompts = prompts_for(tiny_format, 4)

    def run():
        decoder = RestorationDecoder(tiny_restorer.model, tiny_format, settings, guidance_layout="shared")
        gens = [torch.Generator().manual_seed(s) for s in range(3, 7)]
        return decoder.generate_image(prompts, H, W, generators=gens).answer_ids

    eager = run()
    monkeypatch.setattr(RestorationDecoder, "_compiles", lambda self, device: True)  # padded, not compiled
    monkeypatch.setattr(RestorationDecoder, "_compiled_fn", lambda self, fn, device: fn)
    assert all(torch.equal(a, b) for a, b in zip(eager, run(), strict=True))


# -- what a forward feeds ------------------------------------------------------------------------------------


def fed_per_forward(model, fmt, monkeypatch, compile, **sampling):
    """Decode two images; per forward, the tokens its fronts feed and the tokens the forward holds."""
    decoder = RestorationDecoder(
        model, fmt, SamplingConfig(**sampling), compile=compile, guidance_layout="shared"
    )
    needed, held = [], []
    body_inputs = decoder.layout.body_inputs

    def spy_fronts(*args):
        active = fronts(*args)
        needed.append(sum(m for _, m in active))
        return active

    def spy_inputs(state, tokens, index):
        held.append(index.numel())
        return body_inputs(state, tokens, index)

    monkeypatch.setattr(fronts_module, "fronts", spy_fronts)
    monkeypatch.setattr(decoder.layout, "body_inputs", spy_inputs)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    result = decoder.generate_image(prompts_for(fmt, 2), H, W, generators=gens)
    return needed, held, result, decoder


def test_padding_is_to_a_power_of_two_and_at_most_a_window_per_row():
    assert [fronts_module.padded(n) for n in (1, 16, 17, 32, 33, 1000)] == [16, 16, 32, 32, 64, 1024]
    assert [fronts_module.padded_windows(t, 5) for t in (16, 32)] == [8, 8]
    assert fronts_module.padded_windows(16, 64) == 16


def test_an_eager_forward_feeds_its_fronts_tokens_and_nothing_else(tiny_restorer, tiny_format, monkeypatch):
    needed, held, result, _ = fed_per_forward(
        tiny_restorer.model, tiny_format, monkeypatch, False, temperature=0.9, row_lag=1, jacobi_window=5
    )
    assert held == needed
    assert result.image_tokens_fed == 3 + sum(held)  # the header, then the fronts
    assert len(set(needed)) > 1  # fronts of several lengths: the test would see padding


def test_a_compiled_forward_feeds_a_few_shapes_past_the_recompile_limit(
    tiny_restorer, tiny_format, monkeypatch
):
    """Compiled, a forward holds its fronts' tokens padded to a power of two (here from 2 on: several shapes
    for a 4 x 8 image), never twice what they need; dynamo compiles each shape, past a limit of one
    compilation per step (fullgraph: an error), and the image is the eager one."""
    torch._dynamo.reset()  # forget the compilations of other tests
    monkeypatch.setattr(fronts_module, "MIN_FED", 2)
    settings = {"temperature": 0.9, "row_lag": 1, "jacobi_window": 5}
    with torch._dynamo.config.patch(recompile_limit=1):
        needed, held, compiled, decoder = fed_per_forward(
            tiny_restorer.model, tiny_format, monkeypatch, "eager", **settings
        )
    assert all(n <= h < 2 * n and h & (h - 1) == 0 for n, h in zip(needed, held, strict=True))
    assert 1 < len(set(held)) <= decoder.row_parallel.shapes(H)
    eager = decode(tiny_restorer.model, tiny_format, prompts_for(tiny_format, 2), seeds=(3, 4), **settings)
    assert all(torch.equal(a, b) for a, b in zip(eager.answer_ids, compiled.answer_ids, strict=True))

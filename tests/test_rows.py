"""Row-parallel decoding (issue 17.2, pure.decoding.rows): the schedule, the masks in raster order, and the
exact cases (a lag of the grid's width or more is the one-token loop, token for token)."""

from __future__ import annotations

import pytest
import torch

from pure.decoding.loop import RestorationDecoder, SamplingConfig
from pure.decoding.rows import fed_indices, row_schedule
from pure.infer import build_parser, sampling_config

H, W = 4, 8  # latent grid of the generated image (multiples of 4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts_for(fmt, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randint(fmt.vocab.codebook_size, (H, W), generator=gen) for _ in range(n)]
    return torch.stack([fmt.prompt_ids(c, instruction="Restore.") for c in codes])


def decode(decoder, prompts, seeds=(3, 4, 5)):
    gens = [torch.Generator().manual_seed(s) for s in seeds[: prompts.shape[0]]]
    return decoder.generate_image(prompts, H, W, generators=gens)


def decided_at(height: int, width: int, lag: int) -> dict[int, int]:
    """Body index -> the step whose forward decides it (0: the header's)."""
    steps = {0: 0}
    for t, first, last in row_schedule(height, width, lag):
        for i in fed_indices(t, first, last, width, lag):
            assert i + 1 not in steps, f"body index {i + 1} decided twice"
            steps[i + 1] = t
    return steps


# -- the schedule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lag", [1, 2, 3, W, W + 1, 50])
def test_every_code_is_decided_once_after_the_tokens_it_is_fed(lag):
    steps = decided_at(H, W, lag)
    codes = {r * (W + 1) + c for r in range(H) for c in range(W)}
    newlines = {r * (W + 1) + W for r in range(H)}
    # every code once; newlines only as the targets of a row's last code (fed for its keys and values)
    assert codes <= steps.keys() and steps.keys() <= codes | newlines
    lag_ = min(lag, W + 1)
    for r in range(H):
        for c in range(W):
            assert steps[r * (W + 1) + c] == r * lag_ + c
    for t, first, last in row_schedule(H, W, lag):
        for i in fed_indices(t, first, last, W, lag):
            # what is fed was decided before (a newline is the grammar's: known), and is fed once
            assert i in newlines or steps[i] < t
    fed = [i for t, f, la in row_schedule(H, W, lag) for i in fed_indices(t, f, la, W, lag)]
    assert len(fed) == len(set(fed))
    assert len(row_schedule(H, W, lag)) + 1 == (H - 1) * lag_ + W  # forwards of the image, header included


def test_a_lag_past_the_width_is_the_one_token_order():
    schedule = row_schedule(H, W, W + 1)
    assert all(first == last for _, first, last in schedule)
    fed = [i for t, f, la in schedule for i in fed_indices(t, f, la, W, W + 1)]
    assert fed == list(range(H * (W + 1) - 2))  # all but the last code and newline, in order
    assert row_schedule(H, W, 99) == schedule


def test_passes_of_a_512px_grid():
    """The issue's arithmetic: ~64 L + 64 forwards instead of 4,161 (64x64 codes at 512 px)."""
    for lag in (1, 2, 4, 8):
        assert len(row_schedule(64, 64, lag)) + 1 == 63 * lag + 64
    assert max(la - f + 1 for _, f, la in row_schedule(64, 64, 4)) == 17  # rows at once: ~(w + 1) / L
    with pytest.raises(ValueError, match="row lag"):
        row_schedule(64, 64, 0)


# -- the exact cases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("lag", [W, W + 1])
def test_a_lag_of_the_width_or_more_gives_the_one_token_image(
    tiny_restorer, tiny_format, layout, temperature, lag
):
    """At L = w + 1 every forward is the one-token loop's; at L = w a row's newline is fed beside the row's
    last code, which it sees: the same context either way, so the same tokens (sampling draws the same
    keyed uniforms by body index), in fewer forwards."""
    model = tiny_restorer.model
    sampling = SamplingConfig(temperature=temperature, cfg_scale=0.8)
    prompts = prompts_for(tiny_format, 2)
    one = decode(RestorationDecoder(model, tiny_format, sampling, guidance_layout=layout), prompts)
    rows = decode(
        RestorationDecoder(
            model, tiny_format, SamplingConfig(**{**vars(sampling), "row_lag": lag}), guidance_layout=layout
        ),
        prompts,
    )
    assert all(torch.equal(a, b) for a, b in zip(one.answer_ids, rows.answer_ids, strict=True))
    assert torch.allclose(one.entropy, rows.entropy, atol=1e-5)
    assert one.image_forward_passes == H * (W + 1) + 1
    assert rows.image_forward_passes == (H - 1) * min(lag, W + 1) + W
    # what they compute: the header, then one token per forward / per active row (every code once)
    assert one.image_tokens_fed == 3 + H * (W + 1)
    assert rows.image_tokens_fed == 3 + sum(last - first + 1 for _, first, last in row_schedule(H, W, lag))


def test_a_short_lag_is_an_approximation_in_fewer_forwards(tiny_restorer, tiny_format):
    model = tiny_restorer.model
    prompts = prompts_for(tiny_format, 2)
    one = decode(RestorationDecoder(model, tiny_format, SamplingConfig(temperature=0.0)), prompts)
    rows = decode(RestorationDecoder(model, tiny_format, SamplingConfig(temperature=0.0, row_lag=2)), prompts)
    assert rows.image_forward_passes == (H - 1) * 2 + W < one.image_forward_passes
    vocab = tiny_format.vocab
    for answer, reference in zip(rows.answer_ids, one.answer_ids, strict=True):
        block = answer[:-1]  # <boi> <h> <w> body <eoi>, then <eot>
        assert block.shape == reference[:-1].shape and answer[-1] == vocab.eot
        body = block[3:-1].view(H, W + 1)
        assert (body[:, W] == vocab.newline).all() and block[-1] == vocab.eoi
        assert (vocab.id_to_code[body[:, :W]] >= 0).all()
        assert torch.equal(body[0], reference[3 : 3 + W + 1])  # row 0 sees everything before it: exact
    # the later rows' codes were computed without the ends of the rows above: not the one-token image
    assert not all(torch.equal(a, b) for a, b in zip(one.answer_ids, rows.answer_ids, strict=True))


# -- the masks ----------------------------------------------------------------------------------------------


class Recorder:
    """The decoder's forwards: every call's positions and 4-D mask (eager: slots are appended in order)."""

    def __init__(self, decoder):
        self.calls = []
        forward = decoder._forward

        def record(ids, positions, mask, cache, keep, rotary=None, codes=None):
            self.calls.append((positions.clone(), mask.clone()))
            return forward(ids, positions, mask, cache, keep, rotary, codes)

        decoder._forward = record


@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize("lag", [1, 2])
def test_each_token_sees_what_precedes_it_in_raster_order_and_exists(tiny_restorer, tiny_format, layout, lag):
    """From the header on, a query sees exactly the filled slots of its own context (a row: the prompt and
    its image; a twin: its image block) whose position is not above its own; a twin never sees the prompt.
    Checked against the slots' positions as the forwards appended them."""
    sampling = SamplingConfig(temperature=0.9, cfg_scale=0.8, row_lag=lag)
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, sampling, guidance_layout=layout)
    recorder = Recorder(decoder)
    prompts = prompts_for(tiny_format, 2)
    decode(decoder, prompts)
    (prefill_pos, _), *image_calls = recorder.calls
    rows = prefill_pos.shape[0]
    twins = layout == "rows"  # cache rows cond0, twin0, cond1, twin1
    slot_pos = [list(prefill_pos[r].tolist()) for r in range(rows)]
    # context of every slot: 0 prompt, 1 the row's image, 2 the twin's image
    slot_ctx = [[0] * prefill_pos.shape[1] for _ in range(rows)]
    several = 0
    for positions, mask in image_calls:
        q = positions.shape[1]
        for r in range(rows):
            ctx = [2 if r % 2 else 1] * q if twins else [1, 2] * (q // 2)
            slot_pos[r] += positions[r].tolist()
            slot_ctx[r] += ctx
        for r in range(rows):
            n = len(slot_pos[r])
            pos = torch.tensor(slot_pos[r])
            ctx = torch.tensor(slot_ctx[r])
            for j in range(q):
                query_ctx, query_pos = ctx[n - q + j], pos[n - q + j]
                visible = (ctx == query_ctx) | ((ctx == 0) & (query_ctx == 1))
                expected = visible & (pos <= query_pos)
                assert torch.equal(mask[r, 0, j, :n], expected), (r, j)
        several += q > (1 if twins else 2)
    assert several > 0  # forwards that held several rows were checked
    # image positions are the raster ones: the cond row's body is one contiguous run after the header, all
    # but the last code and newline (only the grammar's tokens follow them)
    body = [p for p, c in zip(slot_pos[0], slot_ctx[0], strict=True) if c == 1][3:]
    assert sorted(body) == list(range(body[0], body[0] + H * (W + 1) - 2))


# -- wiring -------------------------------------------------------------------------------------------------


def test_row_lag_is_validated(tiny_restorer, tiny_format):
    with pytest.raises(ValueError, match="row_lag must be 0"):
        SamplingConfig(row_lag=-1)
    with pytest.raises(ValueError, match="--row-lag must be 0"):
        sampling_config(row_lag=-2)
    args = build_parser().parse_args(["--input", "x.png", "--row-lag", "4"])
    assert args.row_lag == 4
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, SamplingConfig(row_lag=3))
    assert decoder.row_parallel.lag == 3 and decoder.speculative is None


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_the_compiled_step_is_one_graph_with_padded_sets_of_rows(tiny_restorer, tiny_format, layout):
    """Compiled (one shape: every forward padded to the most rows at once, the padding rolled back), the
    step traces as one graph (``fullgraph``) and gives the eager tokens."""
    sampling = SamplingConfig(temperature=0.9, row_lag=2)
    model, prompts = tiny_restorer.model, prompts_for(tiny_format, 2)
    eager = decode(RestorationDecoder(model, tiny_format, sampling, guidance_layout=layout), prompts)
    decoder = RestorationDecoder(model, tiny_format, sampling, compile="eager", guidance_layout=layout)
    compiled = decode(decoder, prompts)
    assert all(torch.equal(a, b) for a, b in zip(eager.answer_ids, compiled.answer_ids, strict=True))
    assert compiled.image_forward_passes == eager.image_forward_passes
    assert decoder.row_parallel.ahead(H, W) == 4  # all four rows at once at lag 2 (8 codes wide)
    assert compiled.image_tokens_fed == 3 + 4 * (compiled.image_forward_passes - 1) > eager.image_tokens_fed

"""Fast decoding (issue 6): the capturable one-token image step and speculative Jacobi decoding.

The one-token engine is checked against a deliberately simple reference loop (whole-sequence forwards, no
cache, the scanning logits processors); speculative Jacobi decoding against the engine: token for token
under greedy decoding, and by a two-sample test of the per-position token distributions under sampling.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency
from transformers import DynamicCache

from pure.decoding.jacobi import JacobiDecoding, input_guess
from pure.decoding.layout import DecodeState, RollbackStaticCache
from pure.decoding.loop import TOKEN_STREAM, RestorationDecoder, SamplingConfig
from pure.decoding.sampling import (
    ImageGridConstraintLogitsProcessor,
    classifier_free_guidance,
    entropy_top_k,
    entropy_top_k_draw,
    keyed_uniform,
    noise_keys,
)

H, W = 8, 4  # latent grid of the generated image (most tests)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are far too small to split over threads; on a shared machine the threads'
    barriers make them 10x slower. One thread for this module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts_for(fmt, n: int, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """``n`` prompts with different random LQ codes (rows then accept different numbers of drafts)."""
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randint(fmt.vocab.codebook_size, (h, w), generator=gen) for _ in range(n)]
    return torch.stack([fmt.prompt_ids(c, instruction="Restore.") for c in codes])


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def decode(decoder, prompts, h=H, w=W, seeds=None):
    seeds = range(prompts.shape[0]) if seeds is None else seeds
    return decoder.generate(prompts, h, w, generators=generators(seeds))


# -- counter-based noise --------------------------------------------------------------------------------


def test_keyed_noise_is_a_pure_function_of_row_key_and_counter():
    keys = noise_keys(generators([0, 1, 2]), 3, "cpu")
    assert keys.shape == (3, 2) and torch.equal(keys, noise_keys(generators([0, 1, 2]), 3, "cpu"))
    u = keyed_uniform(keys, (7, torch.tensor(5)), 100)
    assert u.shape == (3, 100) and (u > 0).all() and (u < 1).all()
    # a row's noise does not depend on the other rows, and counters give different noise
    assert torch.equal(u[1:2], keyed_uniform(keys[1:2], (7, torch.tensor(5)), 100))
    assert not torch.equal(u, keyed_uniform(keys, (7, torch.tensor(6)), 100))
    assert not torch.equal(u, keyed_uniform(keys, (8, torch.tensor(5)), 100))
    assert not torch.equal(u[0], u[1])
    # tensor counters broadcast against the rows: (1, S) slots
    window = keyed_uniform(keys, (7, torch.arange(4)[None]), 10)
    assert window.shape == (3, 4, 10)
    assert torch.equal(window[:, 2], keyed_uniform(keys, (7, 2), 10))
    with pytest.raises(ValueError, match=r"one torch\.Generator per row"):
        noise_keys(generators([0]), 2, "cpu")


def test_keyed_noise_never_reaches_0_or_1():
    from pure.decoding.sampling import _unit_interval

    extremes = _unit_interval(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1]))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert (-torch.log(extremes) > 0).all()  # Exp(1) noise is never 0: the race never divides by 0


def test_keyed_noise_is_uniform_and_samples_the_distribution():
    keys = noise_keys(generators([3]), 1, "cpu")
    u = keyed_uniform(keys, (0, torch.arange(400)[None]), 500).flatten()  # 200,000 values
    counts = torch.histc(u, bins=50, min=0, max=1)
    expected = u.numel() / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90  # 49 degrees of freedom: p ~ 3e-4
    # consecutive indices and consecutive counters are not correlated
    grid = u.view(400, 500)
    assert (
        abs(float(torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]))[0, 1])) < 0.01
    )
    assert abs(float(torch.corrcoef(torch.stack([grid[:-1].flatten(), grid[1:].flatten()]))[0, 1])) < 0.01

    # the engine's draw with keyed uniforms, one per step, samples the distribution
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    uniform = keyed_uniform(keys, (1, torch.arange(20000)[None]), 1).flatten()
    tokens, _ = entropy_top_k_draw(probs.log().expand(20000, -1), 1, 2000, 1.0, uniform)
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.012)  # ~3.5 standard errors


# -- the constraint by body index -----------------------------------------------------------------------


def test_allowed_at_is_the_constraint_of_the_scanning_processor(tiny_format):
    v = tiny_format.vocab
    constraint = ImageGridConstraintLogitsProcessor(v, H, W)
    codes = torch.randint(v.codebook_size, (H, W), generator=torch.Generator().manual_seed(0))
    block = tiny_format.image_block(codes).tolist()
    head = prompts_for(tiny_format, 1)[0].tolist() + tiny_format.encode_text("A cat. ")
    n_body = H * (W + 1)
    bodies = torch.arange(-2, n_body + 1)
    window = constraint.allowed_at(bodies)  # all positions at once, as a Jacobi window
    assert window.shape == (n_body + 3, v.size)
    for i, body in enumerate(bodies.tolist()):
        prefix = head + block[: 3 + body]  # <boi> and the tokens before this body index
        scanned = torch.isfinite(constraint(torch.tensor([prefix]), torch.zeros(1, v.size)))[0]
        assert torch.equal(window[i], scanned), f"body index {body}"
        assert torch.equal(constraint.allowed_at(torch.tensor(body)), scanned)
        forced = int(constraint.forced_at(torch.tensor(body)))
        assert (forced == -1) == (int(scanned.sum()) == v.codebook_size)
        assert forced == -1 or bool(scanned[forced])
    # past <eoi> (a padded speculative window): image codes, never an error
    assert torch.equal(constraint.allowed_at(torch.tensor(n_body + 5)), v.image_mask())


# -- the one-token engine ---------------------------------------------------------------------------------


def reference_image(model, fmt, prefix: torch.Tensor, h, w, sampling: SamplingConfig, keys) -> torch.Tensor:
    """The image phase as plainly as possible: whole-sequence forwards without a cache, the unconditional
    context rebuilt from the image block alone (positions from 0), the scanning constraint processor."""
    constraint = ImageGridConstraintLogitsProcessor(fmt.vocab, h, w)
    cond = prefix[None]  # (1, T): prompt, text, <boi> <grid h> <grid w>
    block = cond[:, -3:]
    tokens = []
    for body in range(h * (w + 1) + 1):
        scores = model(input_ids=cond).logits[:, -1].float()
        if sampling.cfg_scale != 1.0:
            uncond = model(input_ids=block).logits[:, -1].float()
            scores = classifier_free_guidance(scores, uncond, sampling.cfg_scale)
        scores = constraint(cond, scores)  # over the whole vocabulary
        uniform = keyed_uniform(keys, (TOKEN_STREAM, body), 1)[:, 0]
        s = sampling
        token, _ = entropy_top_k_draw(scores, s.min_k, s.max_k, s.temperature, uniform)
        tokens.append(int(token))
        cond = torch.cat([cond, token[:, None]], dim=1)
        block = torch.cat([block, token[:, None]], dim=1)
    return torch.tensor(tokens)


@pytest.mark.parametrize(
    "cfg_scale, temperature", [(1.0, 0.0), (0.8, 0.0), (1.0, 0.9), (0.8, 0.9), (3.0, 1.0)]
)
def test_engine_equals_a_straightforward_loop(tiny_restorer, tiny_format, cfg_scale, temperature):
    model, fmt = tiny_restorer.model, tiny_format
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, max_text_tokens=3)
    prompts = prompts_for(fmt, 2)
    out = decode(RestorationDecoder(model, fmt, sampling), prompts, seeds=[5, 6])
    keys = noise_keys(generators([5, 6]), 2, "cpu")  # greedy text does not touch the generators
    block_len = fmt.image_block_length(H, W)
    with torch.inference_mode():
        for i, answer in enumerate(out.answer_ids):
            text = answer[: len(answer) - block_len - 1]
            head = answer[len(text) : len(text) + 3]
            expected = reference_image(
                model, fmt, torch.cat([prompts[i], text, head]), H, W, sampling, keys[i : i + 1]
            )
            assert torch.equal(answer[len(text) + 3 : -1], expected)


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_compiled_step_is_one_graph_with_the_same_outputs(tiny_restorer, tiny_format, layout):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model, fmt = tiny_restorer.model, tiny_format
    sampling = SamplingConfig(max_text_tokens=3)
    prompts = prompts_for(fmt, 2)
    eager = decode(RestorationDecoder(model, fmt, sampling), prompts)
    for _ in range(2):  # a second decoder reuses the compiled graph
        compiled = decode(RestorationDecoder(model, fmt, sampling, "eager", layout), prompts)
        assert all(torch.equal(a, b) for a, b in zip(eager.answer_ids, compiled.answer_ids, strict=True))
    assert counters["stats"]["unique_graphs"] == 1  # fullgraph: no break; no recompilation per token
    assert not counters["graph_break"]
    # compile=True is CUDA graphs; on a CPU it is the eager step
    decoder = RestorationDecoder(model, fmt, compile=True)
    assert decoder._compiled_fn(decoder._decode_step, torch.device("cpu")) == decoder._decode_step


def meta_state(decoder, fmt, capacity: int, length: int) -> DecodeState:
    meta = torch.device("meta")
    rows = 2 if decoder.sampling.cfg_scale != 1.0 else 1
    return DecodeState(
        seq=torch.zeros(1, capacity, dtype=torch.long, device=meta),
        mask=torch.zeros(rows, capacity, dtype=torch.bool, device=meta),
        cache=decoder._make_cache(capacity),
        next_pos=torch.zeros(rows, dtype=torch.long, device=meta),
        twins=rows,
        length=length,
        logits=torch.zeros(rows, 1, fmt.vocab.size, device=meta),
        rotary=decoder.model.rotary_tables(capacity, meta),
    )


def test_image_phase_never_syncs_with_the_host(tiny_restorer, tiny_format, monkeypatch):
    """Meta tensors have no values: any .item(), .tolist() or data-dependent branch in the image phase
    (forward, guidance, constraint, entropy top-k, temperature, sampling) would raise."""
    model = copy.deepcopy(tiny_restorer.model).to("meta")
    monkeypatch.setattr(  # generators cannot live on the meta device; keys can
        "pure.decoding.loop.noise_keys",
        lambda gens, batch, device: torch.zeros(batch, 2, dtype=torch.long, device=device),
    )
    sampling = SamplingConfig(temperature=0.9, cfg_scale=0.8)
    decoder = RestorationDecoder(model, tiny_format, sampling, guidance_layout="rows")
    state = meta_state(decoder, tiny_format, capacity=100, length=40)
    constraint = ImageGridConstraintLogitsProcessor(tiny_format.vocab, H, W)
    entropy = torch.zeros(1, H, W, device="meta")

    class Bar:
        def update(self, n):
            pass

    with torch.inference_mode():
        decoder._image_phase(state, constraint, [None], entropy, Bar())
    assert state.passes == H * (W + 1) and state.length == 40 + H * (W + 1)  # <eoi> is never fed


def test_jacobi_window_step_never_syncs_with_the_host(tiny_restorer, tiny_format):
    """The window step: the forward of a multi-token query (its causal mask built by the decoder, not by
    transformers, whose sdpa mask builder reads such a mask on the host in eager mode), guidance,
    per-position constraint and entropy top-k, the acceptance test, residual and bonus sampling."""
    model = copy.deepcopy(tiny_restorer.model).to("meta")
    decoder = RestorationDecoder(
        model, tiny_format, SamplingConfig(temperature=0.9, jacobi_window=6), guidance_layout="rows"
    )
    state = meta_state(decoder, tiny_format, capacity=100, length=40)
    meta, v = torch.device("meta"), tiny_format.vocab
    with torch.inference_mode():
        tokens, accepted, probs, _ = decoder.speculative.window_step(
            torch.zeros(2, 6, dtype=torch.long, device=meta),
            torch.zeros(2, 6, dtype=torch.long, device=meta),
            decoder.layout.attention_mask(state, 6),
            state.cache,
            state.rotary,
            decoder._image_codes(meta),
            ImageGridConstraintLogitsProcessor(v, H, W).forced_at(torch.arange(6, device=meta)),
            torch.zeros(1, 2, dtype=torch.long, device=meta),
            torch.tensor(0, device=meta),
            torch.zeros(1, 5, dtype=torch.long, device=meta),
            torch.zeros(1, 5, v.codebook_size, device=meta),
            torch.zeros(1, 5, dtype=torch.bool, device=meta),
        )
    assert tokens.shape == (1, 6) and accepted.shape == (1,) and probs.shape == (1, 6, v.codebook_size)


# -- the "shared" guidance layout ---------------------------------------------------------------------------


class CacheRecorder:
    """Wraps a decoder's ``_make_cache`` and the model's forward to see what a decode allocates and runs."""

    def __init__(self, decoder, monkeypatch):
        self.caches, self.batch_sizes = [], []
        make = decoder._make_cache
        forward = decoder._forward

        def record_cache(capacity):
            self.caches.append(make(capacity))
            return self.caches[-1]

        def record_forward(ids, *args):
            self.batch_sizes.append(ids.shape[0])
            return forward(ids, *args)

        monkeypatch.setattr(decoder, "_make_cache", record_cache)
        monkeypatch.setattr(decoder, "_forward", record_forward)

    def kv_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for c in self.caches for x in c.layers for t in (x.keys, x.values)
        )


@pytest.mark.parametrize("jacobi", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_shared_layout_same_tokens_less_cache(tiny_restorer, tiny_format, monkeypatch, jacobi, temperature):
    model, fmt = tiny_restorer.model, tiny_format
    sampling = SamplingConfig(
        max_text_tokens=3, cfg_scale=0.8, temperature=temperature, jacobi_window=6 * jacobi
    )
    prompts = prompts_for(fmt, 2, 8, 8)
    rows, shared = (
        RestorationDecoder(model, fmt, sampling, guidance_layout="rows"),
        RestorationDecoder(model, fmt, sampling, guidance_layout="shared"),
    )
    seen_rows, seen_shared = CacheRecorder(rows, monkeypatch), CacheRecorder(shared, monkeypatch)
    a, b = decode(rows, prompts, 8, 8), decode(shared, prompts, 8, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.answer_ids, b.answer_ids, strict=True))
    assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert a.forward_passes == b.forward_passes
    # the twins' prompt and text slots are gone, and the prompt runs once per image, not twice
    saved = prompts.shape[1] + sampling.max_text_tokens  # slots per image: the twin's prompt and text
    slot_bytes = seen_rows.kv_bytes() // (4 * seen_rows.caches[0].layers[0].max_cache_len)
    assert seen_rows.kv_bytes() - seen_shared.kv_bytes() == 2 * saved * slot_bytes
    assert seen_rows.batch_sizes[0] == 4 and seen_shared.batch_sizes == [2] * len(seen_shared.batch_sizes)


def test_another_lm_needs_an_attention_that_takes_a_static_cache_s_mask(tiny_format):
    """A PureForConditionalGeneration decodes with its own attention whatever it was loaded with
    (tests/test_gpu_paths.py); any other causal LM gets the static cache's mask through its forward, which
    flash-attention would read as left padding, and the "shared" layout's 4-D mask, which only sdpa takes."""
    from types import SimpleNamespace

    def lm(attention):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))

    for layout in ("rows", "shared"):
        with pytest.raises(ValueError, match="sdpa"):
            RestorationDecoder(lm("flash_attention_2"), tiny_format, SamplingConfig(), guidance_layout=layout)
    with pytest.raises(ValueError, match="sdpa"):
        RestorationDecoder(lm("eager"), tiny_format, SamplingConfig(), guidance_layout="shared")
    RestorationDecoder(lm("eager"), tiny_format, SamplingConfig(), guidance_layout="rows")
    RestorationDecoder(lm("sdpa"), tiny_format, SamplingConfig(), guidance_layout="shared")
    RestorationDecoder(
        lm("eager"), tiny_format, SamplingConfig(cfg_scale=1.0), guidance_layout="shared"
    )  # no twin
    with pytest.raises(ValueError, match="guidance_layout"):
        RestorationDecoder(lm("sdpa"), tiny_format, guidance_layout="columns")


# -- speculative Jacobi decoding: greedy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, w, window, cfg_scale", [(8, 4, 16, 0.8), (4, 8, 2, 1.0), (8, 8, 5, 0.8), (4, 4, 16, 3.0)]
)
def test_jacobi_greedy_equals_the_one_token_loop(tiny_restorer, tiny_format, h, w, window, cfg_scale):
    model, fmt = tiny_restorer.model, tiny_format
    sampling = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, max_text_tokens=3)
    prompts = prompts_for(fmt, 3, h, w, seed=window)
    one = decode(RestorationDecoder(model, fmt, sampling), prompts, h, w)
    jacobi = decode(RestorationDecoder(model, fmt, replace(sampling, jacobi_window=window)), prompts, h, w)
    for a, b in zip(one.answer_ids, jacobi.answer_ids, strict=True):
        assert torch.equal(a, b)
        assert fmt.parse_answer(b, strict=True).codes.shape == (h, w)
    assert torch.allclose(one.entropy, jacobi.entropy, atol=1e-4)
    assert jacobi.image_forward_passes < one.image_forward_passes == 1 + h * (w + 1)
    # batched rows (which accept different numbers of drafts) equal the same rows decoded alone
    for i in range(3):
        single = decode(
            RestorationDecoder(model, fmt, replace(sampling, jacobi_window=window)), prompts[i : i + 1], h, w
        )
        assert torch.equal(single.answer_ids[0], jacobi.answer_ids[i])


def test_jacobi_rolls_back_a_dynamic_cache_too(tiny_restorer, tiny_format):
    class DynamicJacobi(RestorationDecoder):
        def _make_cache(self, capacity):
            return DynamicCache(config=self.model.config)

    model, fmt = tiny_restorer.model, tiny_format
    sampling = SamplingConfig(temperature=0.0, max_text_tokens=3)
    prompts = prompts_for(fmt, 2, seed=3)
    one = decode(RestorationDecoder(model, fmt, sampling), prompts)
    dynamic = decode(DynamicJacobi(model, fmt, replace(sampling, jacobi_window=6)), prompts)
    assert all(torch.equal(a, b) for a, b in zip(one.answer_ids, dynamic.answer_ids, strict=True))


def test_rollback_static_cache_crop(tiny_restorer):
    cache = RollbackStaticCache(config=tiny_restorer.model.config, max_cache_len=20)
    model = tiny_restorer.model
    with torch.inference_mode():
        model(input_ids=torch.ones(1, 7, dtype=torch.long), past_key_values=cache, use_cache=True)
    assert int(cache.get_seq_length()) == 7
    cache.crop(-3)
    assert int(cache.get_seq_length()) == 4
    cache.crop(0)
    assert int(cache.get_seq_length()) == 4
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)


def test_jacobi_is_reproducible_and_wired(tiny_restorer, tiny_format):
    model, fmt = tiny_restorer.model, tiny_format
    sampling = SamplingConfig(max_text_tokens=3, jacobi_window=8)
    decoder = RestorationDecoder(model, fmt, sampling)
    assert isinstance(decoder.speculative, JacobiDecoding) and decoder.speculative.window == 8
    assert RestorationDecoder(model, fmt, SamplingConfig()).speculative is None
    prompts = prompts_for(fmt, 2)
    first, again = decode(decoder, prompts), decode(decoder, prompts)
    assert all(torch.equal(a, b) for a, b in zip(first.answer_ids, again.answer_ids, strict=True))
    assert not torch.equal(first.answer_ids[0], decode(decoder, prompts, seeds=[7, 8]).answer_ids[0])
    for answer in first.answer_ids:
        fmt.parse_answer(answer, strict=True)
    with pytest.raises(ValueError, match="jacobi_window"):
        SamplingConfig(jacobi_window=1)
    with pytest.raises(ValueError, match=r"torch\.Generator per row"):
        decoder.generate(prompts, H, W, generators=None)


def test_restorer_and_cli_take_a_jacobi_window(tiny_restorer):
    from PIL import Image

    from pure.infer import build_parser

    image = Image.new("RGB", (32, 32), (120, 80, 40))
    kwargs = {"size": 32, "temperature": 0.0, "max_text_tokens": 3, "color_fix": False}
    plain = tiny_restorer.restore(image, **kwargs)
    fast = tiny_restorer.restore(image, jacobi_window=4, **kwargs)
    assert torch.equal(plain.codes, fast.codes) and fast.settings["jacobi_window"] == 4
    assert fast.timings["forward_passes"] < plain.timings["forward_passes"]
    assert build_parser().parse_args(["--input", "x.png"]).jacobi is None  # not given: the checkpoint's (0)
    assert tiny_restorer.sampling.jacobi_window == 0
    assert build_parser().parse_args(["--input", "x.png", "--jacobi"]).jacobi == 16
    assert build_parser().parse_args(["--jacobi", "4", "--input", "x.png"]).jacobi == 4


# -- speculative Jacobi decoding: sampling is lossless ----------------------------------------------------


def stub_window(tiny_format, monkeypatch, logits: torch.Tensor, sampling: SamplingConfig):
    """A Jacobi decoder whose forward returns ``logits`` (R, W, V) whatever it is fed (the image codes'
    columns when it is asked for those)."""
    sampling = replace(sampling, jacobi_window=logits.shape[1])
    decoder = RestorationDecoder(None, tiny_format, sampling, guidance_layout="rows")

    def forward(ids, positions, mask, cache, keep, rotary=None, codes=None):
        out = logits if codes is None else logits.index_select(-1, codes.ids)
        return out.expand(ids.shape[0], -1, -1)

    monkeypatch.setattr(decoder, "_forward", forward)
    return decoder


def window_step(decoder, tiny_format, batch, drafts, q, fixed=None, body=None, seed=0):
    width = drafts.shape[1] + 1
    rows = batch * (2 if decoder.sampling.cfg_scale != 1.0 else 1)
    keys = noise_keys(generators(range(seed, seed + batch)), batch, "cpu")
    return decoder.speculative.window_step(
        torch.zeros(rows, width, dtype=torch.long),
        None,  # positions, mask, cache, rotary: the stubbed forward takes none
        None,
        None,
        None,
        decoder._image_codes("cpu"),
        ImageGridConstraintLogitsProcessor(tiny_format.vocab, H, W).forced_at(
            torch.arange(width) if body is None else body
        ),
        keys,
        torch.tensor(0),
        drafts,
        q,
        torch.zeros_like(drafts, dtype=torch.bool) if fixed is None else fixed,
    )


def test_window_targets_are_the_one_token_distributions_per_position(tiny_format, monkeypatch):
    """Each window position gets the one-token step's processing, its own entropy top-k included (the
    original's window-mean entropy would give every position the same k)."""
    v, width = tiny_format.vocab, 6
    gen = torch.Generator().manual_seed(0)
    sharpness = torch.tensor([0.1, 30.0, 1.0, 100.0, 3.0, 0.3])[None, :, None]
    logits = torch.randn(2, width, v.size, generator=gen) * sharpness  # cond and twin rows
    sampling = SamplingConfig(cfg_scale=0.8, temperature=0.9, max_k=40)
    decoder = stub_window(tiny_format, monkeypatch, logits, sampling)
    body = torch.arange(width) + 2  # body 4 is a forced newline (width 4)
    drafts = v.code_to_id[torch.zeros(1, width - 1, dtype=torch.long)]
    q = torch.nn.functional.one_hot(torch.zeros(1, width - 1, dtype=torch.long), v.codebook_size).float()
    tokens, _, probs, entropy = window_step(decoder, tiny_format, 1, drafts, q, body=body)
    constraint = ImageGridConstraintLogitsProcessor(v, H, W)
    ks = set()
    for i in range(width):
        if int(constraint.forced_at(body[i])) >= 0:  # the grammar's newline: the token, not a target
            assert int(tokens[0, i]) == int(constraint.forced_at(body[i]))
            continue
        scores = classifier_free_guidance(logits[0, i], logits[1, i], 0.8)[None]  # the one-token way:
        scores = scores.masked_fill(~constraint.allowed_at(body[i]), float("-inf"))  # whole vocabulary
        scores, h = entropy_top_k(scores, sampling.min_k, sampling.max_k)
        expected = (scores / 0.9).softmax(-1)[0]
        assert torch.allclose(probs[0, i], expected[v.code_to_id], atol=1e-6)  # targets over the codes
        assert expected[~v.image_mask()].sum() == 0
        assert torch.allclose(entropy[0, i], h[0])
        ks.add(int((probs[0, i] > 0).sum()))
    assert len(ks) >= 3  # the positions really have different k


@pytest.mark.parametrize("draft_kind", ["recycled", "random"])
def test_speculative_step_outputs_follow_the_target(tiny_format, monkeypatch, draft_kind):
    """10,000 rows verify drafts against a fixed target: the token at the first window position (the
    accepted draft or the residual sample) and, where that draft was accepted, at the second (accepted or
    bonus) are distributed as the target. Drafts come from a distribution unlike the target, so many are
    rejected: a wrong residual would show here."""
    v, n = tiny_format.vocab, 10_000
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, v.size, generator=gen) * 3.0
    sampling = SamplingConfig(cfg_scale=1.0, temperature=1.0, min_k=v.size, max_k=v.size)  # no top-k cut
    decoder = stub_window(tiny_format, monkeypatch, logits, sampling)
    codes = v.code_to_id
    target = logits[0].masked_fill(~v.image_mask(), float("-inf")).softmax(-1)  # (3, V)
    if draft_kind == "recycled":  # drafts sampled from a flatter, shifted distribution q
        q = (torch.randn(2, codes.numel(), generator=gen) * 1.5).softmax(-1)  # (2, K)
        drafts = codes[
            torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(2)], 1)
        ]
        q = q[None].expand(n, -1, -1)
    else:  # uniform random codes taken as given: q one-hot
        picked = torch.randint(codes.numel(), (n, 2), generator=gen)
        drafts, q = codes[picked], torch.nn.functional.one_hot(picked, codes.numel()).float()
    tokens, accepted, _, _ = window_step(decoder, tiny_format, n, drafts, q)
    assert (accepted == 0).sum() > 100 and (accepted >= 1).sum() > 100  # both branches are exercised

    def check(sample, p):
        counts = torch.bincount(sample, minlength=v.size)
        assert counts[~v.image_mask()].sum() == 0
        expected = p * sample.numel()
        keep = expected >= 5
        table = np.stack([counts[keep].numpy(), expected[keep].numpy()])
        chi2 = float((((counts - expected)[keep]) ** 2 / expected[keep]).sum())
        dof = int(keep.sum()) - 1
        from scipy.stats import chi2 as chi2_dist

        assert chi2_dist.sf(chi2, dof) > 1e-3, (chi2, dof, table.shape)

    check(tokens[:, 0], target[0])
    check(tokens[accepted >= 1, 1], target[1])
    # Behind a rejection the slot's next draft (coupled to this one: MC-SJD) still has the target's law, and
    # keeps this draft as often as a maximal coupling can: P = sum(min(q, p)), not sum(q * p) as when drawn
    # afresh.
    behind = accepted == 0
    check(tokens[behind, 1], target[1])
    p1 = target[1][codes]
    q1 = q[0, 1] if draft_kind == "recycled" else torch.full_like(p1, 1 / codes.numel())
    kept = (tokens[behind, 1] == drafts[behind, 1]).float().mean()
    maximal = torch.minimum(q1, p1).sum() if draft_kind == "recycled" else (p1 / codes.numel()).sum()
    assert abs(kept - maximal) < 4 * (maximal * (1 - maximal) / behind.sum()).sqrt()
    assert draft_kind == "random" or kept > 2 * (q1 * p1).sum()


def two_sample_p_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chi-square two-sample tests, ``a`` and ``b`` ``(n, positions)`` codes: one per position (the
    marginal) and one per pair of neighbours (the joint, which a wrong conditional would shift).
    Categories seen fewer than 10 times in both samples together are pooled."""

    def p_value(xa, xb):
        values, inverse = np.unique(np.concatenate([xa, xb]), return_inverse=True)
        ca = np.bincount(inverse[: len(xa)], minlength=len(values))
        cb = np.bincount(inverse[len(xa) :], minlength=len(values))
        big = ca + cb >= 10
        table = np.stack([np.append(ca[big], ca[~big].sum()), np.append(cb[big], cb[~big].sum())])
        table = table[:, table.sum(axis=0) > 0]
        return chi2_contingency(table)[1] if table.shape[1] > 1 else 1.0

    marginals = [p_value(a[:, i], b[:, i]) for i in range(a.shape[1])]
    pairs = [
        p_value(a[:, i] * 4096 + a[:, i + 1], b[:, i] * 4096 + b[:, i + 1]) for i in range(a.shape[1] - 1)
    ]
    return np.array(marginals + pairs)


@pytest.mark.slow
def test_jacobi_sampling_keeps_the_token_distribution(sharp_model, tiny_format):
    """400 images of 4x4 codes from the one-token loop vs 400 from SJD (batched, coupled drafts from the
    input: rows at different acceptance; and in batches of 4, random uncoupled drafts): no per-position or
    neighbour-pair test rejects at a family-wise 1% level (Bonferroni over 31 tests). The same test does
    reject a mild change of the distribution (temperature 0.9 -> 1.1), so it is not blind. Fixed seeds:
    deterministic."""
    fmt, n = tiny_format, 400
    prompt = prompts_for(fmt, 1, 4, 4)
    sampling = SamplingConfig(max_text_tokens=1, cfg_scale=0.8, temperature=0.9)

    def codes(decoder, seeds, batch):
        out = []
        for start in range(0, len(seeds), batch):
            chunk = seeds[start : start + batch]
            result = decode(decoder, prompt.expand(len(chunk), -1), 4, 4, seeds=chunk)
            out += [fmt.parse_answer(a, strict=True).codes.flatten() for a in result.answer_ids]
        return torch.stack(out).numpy()

    one = codes(RestorationDecoder(sharp_model, fmt, sampling), list(range(n)), n)
    jacobi = RestorationDecoder(sharp_model, fmt, replace(sampling, jacobi_window=16, jacobi_drafts="input"))
    level = 0.01 / 31
    p_batched = two_sample_p_values(one, codes(jacobi, list(range(3 * 10**6, 3 * 10**6 + n)), n))
    uncoupled = replace(sampling, jacobi_window=16, jacobi_coupled=False)
    random_drafts = RestorationDecoder(sharp_model, fmt, uncoupled)
    p_small = two_sample_p_values(one, codes(random_drafts, list(range(2 * 10**6, 2 * 10**6 + n)), 4))
    assert p_batched.min() > level, p_batched.min()
    assert p_small.min() > level, p_small.min()
    hotter = SamplingConfig(max_text_tokens=1, cfg_scale=0.8, temperature=1.1)
    hot = codes(RestorationDecoder(sharp_model, fmt, hotter), list(range(3 * 10**6, 3 * 10**6 + n)), n)
    p_hot = two_sample_p_values(one, hot)
    assert p_hot.min() < level


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_drafts_from_the_input_are_its_codes_and_change_nothing_but_speed(
    tiny_restorer, tiny_format, temperature
):
    """Fresh drafts from the LQ image: each body index gets the prompt's code at the same grid position
    (none where the grids differ); greedy tokens stay the one-token loop's. (How many more are accepted is
    a property of a trained model: the README's measurement on PURE-tiny.)"""
    model, fmt = tiny_restorer.model, tiny_format
    prompts = prompts_for(fmt, 2, seed=1)
    sampling = SamplingConfig(
        temperature=temperature, max_text_tokens=3, jacobi_window=6, jacobi_drafts="input"
    )
    decoder = RestorationDecoder(model, fmt, sampling)
    state = decoder._prefill(
        prompts, fmt.image_block_length(H, W), fmt.image_block_length(H, W), decoder._ahead(H, W)
    )
    decoder._start_image(state, H, W)
    guess = input_guess(decoder, state, H, W)
    lq = fmt.parse_image_block(prompts[0, prompts[0].tolist().index(fmt.vocab.boi) :].tolist())
    expected = torch.cat([lq, torch.full((H, 1), -1)], dim=1).flatten()  # codes, -1 at each newline
    assert torch.equal(guess[0, :-1], expected) and guess[0, -1] == -1
    assert (input_guess(decoder, state, H // 2, W) == -1).all()  # another grid: no guess

    one = decode(RestorationDecoder(model, fmt, replace(sampling, jacobi_window=0)), prompts)
    from_input = decode(decoder, prompts)
    if temperature == 0:  # (sampling: test_jacobi_sampling_keeps_the_token_distribution runs these drafts)
        assert all(torch.equal(a, b) for a, b in zip(one.answer_ids, from_input.answer_ids, strict=True))
    assert from_input.image_forward_passes < one.image_forward_passes

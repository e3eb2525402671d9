"""Tests for pure.decoding.sampling on hand-made score tensors.

Entropies are recomputed here in float64 from the spec formula (section 4.4); k values are checked
against the spec's table, and the grammar constraint against the layout of section 4.3.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from pure.decoding.sampling import (
    EntropyTopKLogitsWarper,
    ImageGridConstraintLogitsProcessor,
    TopKLogitsWarper,
    classifier_free_guidance,
    entropy_top_k,
    entropy_top_k_draw,
    sample_tokens,
)

V = 20000  # large enough for k up to 2000 to be visible


def spec_k(entropy: float, min_k: int = 1, max_k: int = 2000) -> tuple[int, float]:
    """``(k, unrounded k)`` from spec 4.4: round(min_k + (max_k - min_k) * sigmoid(clamp(H, 0, 10) - 5))."""
    h = min(max(entropy, 0.0), 10.0)
    raw = min_k + (max_k - min_k) / (1.0 + math.exp(-(h - 5.0)))
    return min(max(round(raw), min_k), max_k), raw


def entropy64(scores: torch.Tensor) -> torch.Tensor:
    """Spec 4.4 entropy in float64: H = -sum p log(p + 1e-10), p = softmax(scores), in nats."""
    p = scores.double().softmax(dim=-1)
    return -(p * torch.log(p + 1e-10)).sum(dim=-1)


def geometric_scores(rate: float, n: int = V, seed: int = 0) -> torch.Tensor:
    """(1, n) float32 logits ``-rate * i`` at shuffled positions: all values distinct, so no ties."""
    logits = -rate * torch.arange(n, dtype=torch.float64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return logits[perm].float()[None]


def scores_with_entropy(target: float, n: int = V) -> torch.Tensor:
    """Geometric logits whose float64 entropy is ``target`` (bisection on the decay rate)."""
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = 1e-9, 50.0  # entropy decreases with the rate; it does not depend on the order
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if float(entropy64(-mid * i)) > target:
            lo = mid
        else:
            hi = mid
    return geometric_scores(math.sqrt(lo * hi), n)


def n_finite(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores).sum(dim=-1).tolist()


# -- the formula itself -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, k", [(0, 14), (1, 37), (2, 96), (3, 239), (4, 539), (6, 1462), (7, 1762), (8, 1905), (10, 1987)]
)
def test_spec_table_matches_the_spec_formula(h, k):
    # guards this file's helper: the spec's table (section 4.4) and its formula agree
    assert spec_k(h)[0] == k


# -- entropy top-k -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, k", [(1, 37), (2, 96), (3, 239), (4, 539), (6, 1462), (7, 1762), (8, 1905)])
def test_entropy_top_k_table_points(target, k):
    scores = scores_with_entropy(target)
    h = float(entropy64(scores)[0])
    assert abs(h - target) < 1e-5
    assert spec_k(h)[0] == k
    out, entropy = entropy_top_k(scores)
    assert abs(float(entropy[0]) - h) < 1e-4
    assert n_finite(out) == [k]
    # the kept ones are the k largest, unchanged
    top = scores[0].topk(k).indices
    assert torch.isfinite(out[0, top]).all()
    assert torch.equal(out[0, top], scores[0, top])


@pytest.mark.parametrize("rate", [1e-6, 3e-4, 1.2e-3, 4e-3, 0.02, 0.1, 0.5, 2.0])
def test_entropy_top_k_matches_the_formula(rate):
    scores = geometric_scores(rate, seed=int(rate * 1e6) % 1000)
    h = float(entropy64(scores)[0])
    k, raw = spec_k(h)
    assert abs(raw - math.floor(raw) - 0.5) > 0.02, "test design: k must not sit on a rounding edge"
    out, entropy = entropy_top_k(scores)
    assert abs(float(entropy[0]) - h) < 1e-4
    assert n_finite(out) == [k]
    assert torch.equal(EntropyTopKLogitsWarper()(torch.zeros(1, 1, dtype=torch.long), scores), out)


def test_zero_entropy_keeps_14_when_enough_distinct_values_exist():
    # one dominant logit, the others finite, distinct and ~e^-200 below: H = 0 -> k = 14
    scores = -200.0 - torch.arange(V, dtype=torch.float32)
    scores[0] = 0.0
    scores = scores[torch.randperm(V, generator=torch.Generator().manual_seed(1))][None]
    out, entropy = entropy_top_k(scores)
    assert abs(float(entropy[0])) < 1e-6
    assert n_finite(out) == [14]
    # a one-hot row has a single finite value: nothing else can be kept
    one_hot = torch.full((1, V), float("-inf"))
    one_hot[0, 123] = 2.5
    out, entropy = entropy_top_k(one_hot)
    assert n_finite(out) == [1]
    assert out[0, 123] == 2.5


def test_entropy_above_the_clamp_keeps_1987():
    scores = geometric_scores(1e-7, n=30000)  # H ~ ln(30000) = 10.3 > 10
    h = float(entropy64(scores)[0])
    assert h > 10
    out, entropy = entropy_top_k(scores)
    assert abs(float(entropy[0]) - h) < 1e-4
    assert n_finite(out) == [1987]


def test_uniform_support_has_entropy_ln_n():
    for n in (1, 2, 50, 1000, 16384):
        scores = torch.full((1, V), float("-inf"))
        scores[0, :n] = 0.7
        out, entropy = entropy_top_k(scores)
        assert abs(float(entropy[0]) - math.log(n)) < 1e-4
        assert torch.equal(out, scores)  # ties with the k-th are kept: all n, nothing else


def test_fewer_finite_values_than_k_keeps_them_all():
    scores = torch.full((1, V), float("-inf"))
    scores[0, 100:110] = torch.arange(10, dtype=torch.float32) * 0.01  # H ~ ln 10 -> k ~ 170
    out, _ = entropy_top_k(scores)
    assert torch.equal(out, scores)


def test_vocab_smaller_than_max_k():
    scores = geometric_scores(1e-3, n=100)  # H ~ ln 100 -> k ~ 800 > 100
    out, _ = entropy_top_k(scores)
    assert torch.equal(out, scores)


def test_custom_min_max_k():
    scores = geometric_scores(3e-4)
    h = float(entropy64(scores)[0])
    k, _ = spec_k(h, min_k=5, max_k=50)
    out, _ = entropy_top_k(scores, min_k=5, max_k=50)
    assert n_finite(out) == [k]
    out = EntropyTopKLogitsWarper(min_k=5, max_k=50)(torch.zeros(1, 1, dtype=torch.long), scores)
    assert n_finite(out) == [k]


def test_entropy_is_measured_on_the_scores_given_not_tempered():
    assert "temperature" not in inspect.signature(EntropyTopKLogitsWarper).parameters
    assert "temperature" not in inspect.signature(entropy_top_k).parameters
    scores = geometric_scores(2e-3)
    _, entropy = entropy_top_k(scores)
    assert abs(float(entropy[0]) - float(entropy64(scores)[0])) < 1e-4
    assert abs(float(entropy[0]) - float(entropy64(scores / 0.9)[0])) > 1e-2


@pytest.mark.parametrize(
    "kwargs",
    [{"min_k": 0}, {"min_k": -3}, {"min_k": 1.5}, {"max_k": 0}, {"min_k": 5, "max_k": 4}, {"max_k": "10"}],
)
def test_entropy_warper_invalid_args(kwargs):
    with pytest.raises(ValueError):
        EntropyTopKLogitsWarper(**kwargs)


def test_entropy_top_k_does_not_modify_its_input():
    scores = geometric_scores(1e-3)
    before = scores.clone()
    entropy_top_k(scores)
    EntropyTopKLogitsWarper()(torch.zeros(1, 1, dtype=torch.long), scores)
    assert torch.equal(scores, before)


def test_entropy_top_k_rows_are_independent():
    rows = [geometric_scores(r, seed=i) for i, r in enumerate((2.0, 4e-3, 1e-6))]
    batch = torch.cat(rows)
    out, entropy = entropy_top_k(batch)
    assert len(set(n_finite(out))) == 3  # the three rows really get different k
    for i, row in enumerate(rows):
        out_i, entropy_i = entropy_top_k(row)
        assert torch.equal(out[i : i + 1], out_i)
        assert abs(float(entropy[i]) - float(entropy_i[0])) < 1e-6


# -- the engine's one-pass draw -----------------------------------------------------------------------


def draw_on_a_grid(scores: torch.Tensor, temperature: float, n: int = 20000, **k) -> torch.Tensor:
    """Tokens drawn by ``entropy_top_k_draw`` from one row of scores at ``n`` evenly spaced uniforms."""
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    tokens, _ = entropy_top_k_draw(
        scores.expand(n, -1), k.get("min_k", 1), k.get("max_k", 2000), temperature, uniform
    )
    return tokens


@pytest.mark.parametrize("rate, temperature", [(2.0, 0.9), (0.05, 1.0), (0.01, 0.7), (1e-4, 1.3)])
def test_draw_is_the_inverse_cdf_of_the_filtered_tempered_distribution(rate, temperature):
    # over evenly spaced uniforms every token's share is its probability, to within one grid step
    scores = geometric_scores(rate, n=3000, seed=3)
    filtered, _ = entropy_top_k(scores)
    expected = (filtered.double() / temperature).softmax(dim=-1)[0]
    n = 20000
    freq = torch.bincount(draw_on_a_grid(scores, temperature, n), minlength=3000).double() / n
    assert (freq[expected == 0] == 0).all()  # nothing outside the entropy top-k
    assert (freq - expected).abs().max() <= 1.5 / n
    # the uniform orders the kept tokens by descending score: the smallest uniforms take the argmax
    assert int(draw_on_a_grid(scores, temperature, n)[0]) == int(scores.argmax())


def test_draw_greedy_entropy_and_rows():
    rows = torch.cat([geometric_scores(r, n=3000, seed=i) for i, r in enumerate((2.0, 4e-3, 1e-6))])
    uniform = torch.tensor([0.3, 0.6, 0.9])
    tokens, entropy = entropy_top_k_draw(rows, 1, 2000, 0.0, uniform)
    assert torch.equal(tokens, rows.argmax(dim=-1))
    assert torch.equal(entropy, entropy_top_k(rows)[1])
    sampled, _ = entropy_top_k_draw(rows, 1, 2000, 0.9, uniform)
    for i in range(3):  # a row's token depends on its scores and uniform only
        alone, _ = entropy_top_k_draw(rows[i : i + 1], 1, 2000, 0.9, uniform[i : i + 1])
        assert int(alone) == int(sampled[i])
    with pytest.raises(ValueError, match="temperature"):
        entropy_top_k_draw(rows, 1, 2000, float("nan"), uniform)


def test_draw_never_takes_a_token_outside_the_top_k():
    # a uniform that rounds u * total up to total must not run past the kept tokens
    scores = geometric_scores(2.0, n=500)  # peaked: k = 22, of which the last ones weigh nothing in fp32
    top = torch.isfinite(entropy_top_k(scores)[0][0]).nonzero()[:, 0]
    assert len(top) == 22
    for u in (1.0 - 2**-24, 1.0, 0.999999):
        token, _ = entropy_top_k_draw(scores, 1, 2000, 1.0, torch.tensor([u]))
        assert int(token) in top.tolist()
    one_hot = torch.full((1, 500), float("-inf"))  # a single finite score: it is always the token
    one_hot[0, 77] = 0.0
    for u in (1e-7, 0.5, 1.0):
        assert int(entropy_top_k_draw(one_hot, 1, 2000, 0.9, torch.tensor([u]))[0]) == 77


# -- static top-k --------------------------------------------------------------------------------------


def test_top_k_basics():
    ninf = float("-inf")
    ids = torch.zeros(2, 1, dtype=torch.long)
    scores = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, -2.0]])
    before = scores.clone()
    out = TopKLogitsWarper(2)(ids, scores)
    assert out.tolist() == [[ninf, 5.0, ninf, 4.0, ninf], [ninf, ninf, 2.0, 1.0, ninf]]
    assert torch.equal(scores, before)
    assert TopKLogitsWarper(1)(ids, scores).argmax(-1).tolist() == [1, 2]
    assert n_finite(TopKLogitsWarper(1)(ids, scores)) == [1, 1]
    assert torch.equal(TopKLogitsWarper(10)(ids, scores), scores)  # k > V keeps all
    ties = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert TopKLogitsWarper(1)(ids[:1], ties).tolist() == [[ninf, 3.0, 3.0, ninf]]


@pytest.mark.parametrize("k", [0, -1, 2.0, None, "3"])
def test_top_k_invalid_args(k):
    with pytest.raises(ValueError):
        TopKLogitsWarper(k)


# -- image grid constraint -----------------------------------------------------------------------------

GH, GW = 8, 4  # latent grid generated in these tests


@pytest.fixture(scope="module")
def constraint(tiny_vocab):
    return ImageGridConstraintLogitsProcessor(tiny_vocab, height=GH, width=GW)


@pytest.fixture(scope="module")
def prompt(tiny_format):
    lq = (torch.arange(GH * GW) * 5 % tiny_format.vocab.codebook_size).view(GH, GW)
    return tiny_format.prompt_ids(lq, instruction="Restore.").tolist()


def allowed_after(proc, vocab, ids: list[int]) -> set[int]:
    out = proc(torch.tensor([ids]), torch.zeros(1, vocab.size))
    return set(torch.isfinite(out[0]).nonzero().flatten().tolist())


def text_allowed(vocab) -> set[int]:
    forbidden = set(vocab.code_to_id.tolist()) | {vocab.eoi, vocab.newline} | set(vocab.grid_ids)
    return set(range(vocab.size)) - forbidden


def test_text_state_allows_everything_but_image_internals(constraint, tiny_vocab, tiny_format, prompt):
    v = tiny_vocab
    expected = text_allowed(v)
    assert v.boi in expected and v.eot in expected
    assert len(expected) == v.size - v.codebook_size - 2 - len(v.grid_ids)
    # no image at all; right after the prompt's closed LQ block; inside the answer text
    assert allowed_after(constraint, v, [v.bos, *tiny_format.encode_text("Hi")]) == expected
    assert allowed_after(constraint, v, prompt) == expected
    answer = tiny_format.encode_text("Small blur, small noise. A cat. ")
    assert allowed_after(constraint, v, prompt + answer) == expected


def test_grid_tokens_are_forced_height_first(constraint, tiny_vocab, tiny_format, prompt):
    v = tiny_vocab
    seq = prompt + tiny_format.encode_text("A cat. ") + [v.boi]
    assert allowed_after(constraint, v, seq) == {v.grid_token(GH // 4)}
    assert allowed_after(constraint, v, [*seq, v.grid_token(GH // 4)]) == {v.grid_token(GW // 4)}
    assert v.grid_token(GH // 4) != v.grid_token(GW // 4)


def test_body_positions(constraint, tiny_vocab, tiny_format, prompt):
    v = tiny_vocab
    codes = (torch.arange(GH * GW) * 3 % v.codebook_size).view(GH, GW)
    block = tiny_format.image_block(codes).tolist()
    head = prompt + tiny_format.encode_text("A cat. ")
    image_ids = set(v.code_to_id.tolist())
    n_body = GH * (GW + 1)
    for n in range(n_body + 1):  # n body tokens generated so far
        p = n + 1  # 1-based position of the token to generate (spec 4.3)
        if p % (GW + 1) == 0:
            expected = {v.newline}
        elif p == (GW + 1) * GH + 1:
            expected = {v.eoi}
        else:
            expected = image_ids
        got = allowed_after(constraint, v, head + block[: 3 + n])
        assert got == expected, f"after {n} body tokens"
        assert block[3 + n] in got  # the real block is always allowed
    # the block is closed: back to text
    assert allowed_after(constraint, v, head + block) == text_allowed(v)


def test_second_image_in_the_answer_is_constrained_again(constraint, tiny_vocab, tiny_format, prompt):
    v = tiny_vocab
    block = tiny_format.image_block(torch.zeros(GH, GW, dtype=torch.long)).tolist()
    seq = prompt + block + tiny_format.encode_text("x") + [v.boi]
    assert allowed_after(constraint, v, seq) == {v.grid_token(GH // 4)}


def test_constraint_batch_equals_single_and_keeps_values(constraint, tiny_vocab, tiny_format, prompt):
    v = tiny_vocab
    block = tiny_format.image_block(torch.ones(GH, GW, dtype=torch.long)).tolist()
    head = prompt + tiny_format.encode_text("A cat. ")
    rows = [
        prompt,  # text
        head + block[:1],  # after <boi>
        head + block[:2],  # after the height token
        head + block[: 3 + GW],  # newline due
        head + block[: 3 + GW + 3],  # code due
        head + block[:-1],  # <eoi> due
        head + block,  # text again
    ]
    width = max(map(len, rows))
    padded = torch.tensor([[v.pad] * (width - len(r)) + r for r in rows])  # left padding
    scores = torch.randn(len(rows), v.size, generator=torch.Generator().manual_seed(0))
    before = scores.clone()
    out = constraint(padded, scores)
    assert torch.equal(scores, before)  # not in place
    assert out.shape == scores.shape
    for i, row in enumerate(rows):
        single = constraint(torch.tensor([row]), scores[i : i + 1])
        assert torch.equal(out[i : i + 1], single), f"row {i}"
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], scores[kept])  # allowed logits are untouched
    assert n_finite(out) == [
        len(text_allowed(v)),
        1,
        1,
        1,
        v.codebook_size,
        1,
        len(text_allowed(v)),
    ]


def test_constraint_runs_on_the_meta_device(constraint, tiny_vocab, prompt):
    # meta tensors have no values: any .item()/host sync would raise
    ids = torch.tensor([[*prompt, tiny_vocab.boi]], device="meta")
    scores = torch.empty(1, tiny_vocab.size, device="meta")
    out = constraint(ids, scores)
    assert out.device.type == "meta"
    assert out.shape == (1, tiny_vocab.size)


@pytest.mark.parametrize("h, w", [(6, 4), (8, 0), (0, 8), (8, 2), (4 * 33, 4)])
def test_constraint_invalid_grid(tiny_vocab, h, w):
    with pytest.raises(ValueError):
        ImageGridConstraintLogitsProcessor(tiny_vocab, height=h, width=w)


# -- classifier-free guidance ----------------------------------------------------------------------------


def test_classifier_free_guidance_formula():
    cond = torch.tensor([[1.0, 2.0, -3.0, 0.5]])
    uncond = torch.tensor([[0.5, -1.0, 4.0, 0.25]])
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)
    expected = torch.tensor([[0.9, 1.4, -1.6, 0.45]])  # 0.8 c + 0.2 u by hand
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.8), expected, rtol=0, atol=1e-6)
    expected3 = torch.tensor([[2.0, 8.0, -17.0, 1.0]])  # 3 c - 2 u: extrapolation
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), expected3, rtol=0, atol=1e-6)
    c64, u64 = cond.double(), uncond.double()
    torch.testing.assert_close(
        classifier_free_guidance(c64, u64, 0.8), 0.8 * c64 + 0.2 * u64, rtol=0, atol=1e-12
    )


# -- sampling ----------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    scores = torch.tensor([[0.1, 3.0, -1.0], [2.0, 1.0, 1.5], [float("-inf"), float("-inf"), 0.0]])
    assert sample_tokens(scores, 0, None).tolist() == [1, 0, 2]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample_tokens(scores, 0.0, gens).tolist() == [1, 0, 2]


def test_forced_row_always_returns_its_id():
    scores = torch.full((2, 50), float("-inf"))
    scores[0, 17] = -3.0
    scores[1, 49] = 100.0
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    for _ in range(300):
        assert sample_tokens(scores, 0.9, gens).tolist() == [17, 49]


def test_same_seed_same_tokens():
    scores = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))

    def draw():
        gens = [torch.Generator().manual_seed(123), torch.Generator().manual_seed(456)]
        return torch.stack([sample_tokens(scores, 1.0, gens) for _ in range(20)])

    first, second = draw(), draw()
    assert torch.equal(first, second)
    assert first.unique().numel() > 3  # it is really random


def test_rows_do_not_depend_on_batch_composition():
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    seeds = [11, 22, 33]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = torch.stack([sample_tokens(scores, 0.9, gens) for _ in range(25)])  # (25, 3)
    for i, s in enumerate(seeds):
        g = [torch.Generator().manual_seed(s)]
        alone = torch.stack([sample_tokens(scores[i : i + 1], 0.9, g) for _ in range(25)])[:, 0]
        assert torch.equal(batched[:, i], alone)


def test_empirical_distribution_matches_softmax():
    logits = [0.5, -1.0, 2.0, 0.0, 1.0]
    temperature = 0.7
    z = [math.exp(x / temperature) for x in logits]
    p = [x / sum(z) for x in z]  # by hand, float64
    rows, steps = 200, 100  # 20000 draws
    scores = torch.tensor([logits]).expand(rows, -1)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(rows)]
    draws = torch.cat([sample_tokens(scores, temperature, gens) for _ in range(steps)])
    counts = torch.bincount(draws, minlength=5).tolist()
    n = rows * steps
    chi2 = sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, p, strict=True))
    assert chi2 < 20.5, (counts, [n * q for q in p])  # 4 dof: p ~ 4e-4
    for c, q in zip(counts, p, strict=True):
        assert abs(c / n - q) < 0.015


def test_sampling_needs_one_generator_per_row():
    scores = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="Generator"):
        sample_tokens(scores, 0.9, None)
    with pytest.raises(ValueError, match="Generator"):
        sample_tokens(scores, 0.9, [torch.Generator()])


@pytest.mark.parametrize("temperature", [-0.9, float("nan")])
def test_sample_tokens_rejects_negative_or_nan_temperature(temperature):
    scores = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(scores, temperature, [torch.Generator().manual_seed(0)])

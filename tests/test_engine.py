"""The decode loop on a scripted model (phases, forcing, guidance context) and on the tiny random model."""

from types import SimpleNamespace

import pytest
import torch

from pure.decoding.loop import RestorationDecoder, SamplingConfig, TextPrior

H, W = 8, 4  # latent grid of the generated image in these tests


class ScriptedModel:
    """Stands in for the LM: wants to write ``text`` then ``<boi>``, then prefers ``cond_code`` when the row
    sees the prompt and ``uncond_code`` when it does not (an unconditional twin). Records every call."""

    def __init__(self, config, fmt, text, cond_code=3, uncond_code=5, boi_after_text=True):
        self.config, self.fmt, self.vocab = config, fmt, fmt.vocab
        self.script = fmt.encode_text(text) + ([self.vocab.boi] if boi_after_text else [])
        self.cond_code, self.uncond_code = cond_code, uncond_code
        self.calls = []
        self.written = 0  # text tokens the cond row of batch 0 has been fed

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        rows = input_ids.shape[0]
        logits = torch.zeros(rows, 1, self.vocab.size)
        sees_prompt = attention_mask[:, 0] == 1  # (R,) the twin's mask drops the prompt
        for r in range(rows):
            if len(self.calls) - 1 < len(self.script):  # text phase: follow the script
                logits[r, 0, self.script[len(self.calls) - 1]] = 10.0
            code = self.cond_code if sees_prompt[r] else self.uncond_code
            logits[r, 0, self.vocab.code_to_id[code]] += 5.0
            logits[r, 0, self.vocab.newline] += 1.0  # the constraint must overrule this at code positions
        return SimpleNamespace(logits=logits)


@pytest.fixture
def prompt(tiny_format):
    return tiny_format.prompt_ids(torch.zeros(H, W, dtype=torch.long))[None]


def decode(model, fmt, prompt, **sampling):
    # the scripted model tells a twin by its 2-D mask: a cache row per twin
    decoder = RestorationDecoder(
        model, fmt, SamplingConfig(**{"temperature": 0.0, **sampling}), guidance_layout="rows"
    )
    return decoder.generate(prompt, H, W, generators=None)


def test_text_then_forced_grid_then_image(tiny_restorer, tiny_format, prompt):
    text = "Medium blur, small noise. A cat."
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, text)
    out = decode(model, tiny_format, prompt, cfg_scale=1.0)
    parsed = tiny_format.parse_answer(out.answer_ids[0], strict=True)
    assert (parsed.degradation, parsed.caption) == ("Medium blur, small noise.", "A cat.")
    assert parsed.codes.shape == (H, W)
    assert (parsed.codes == model.cond_code).all()  # newline preference overruled at code positions
    assert out.answer_ids[0][-1] == tiny_format.vocab.eot
    n_text = len(tiny_format.encode_text(text))
    # prefill + one pass per text token + the <boi><grid h><grid w> pass + one per body token
    assert out.forward_passes == 1 + n_text + 1 + H * (W + 1)
    grid_pass = model.calls[1 + n_text][0]
    assert grid_pass[0].tolist() == tiny_format.grid_tokens(H, W)


def test_guidance_twin_sees_only_the_image_block(tiny_restorer, tiny_format, prompt):
    text = "Small blur, large noise. A dog."
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, text)
    n_text = len(tiny_format.encode_text(text))
    out = decode(model, tiny_format, prompt, cfg_scale=0.8)

    ids, mask, positions = model.calls[1 + n_text]  # the pass that feeds <boi><grid h><grid w>
    start = prompt.shape[1] + n_text
    assert ids.shape == (2, 3)
    assert mask[0, :start].all() and not mask[1, :start].any()  # twin: no prompt, no text
    assert mask[:, start : start + 3].all()
    assert positions[0].tolist() == [start, start + 1, start + 2]
    assert positions[1].tolist() == [0, 1, 2]  # positions restart for the unconditional twin
    # Guidance: cond prefers 3 (+5), uncond prefers 5 (+5): 0.8 * cond + 0.2 * uncond keeps 3.
    codes = tiny_format.parse_answer(out.answer_ids[0], strict=True).codes
    assert (codes == 3).all()


def test_low_guidance_follows_the_unconditional_twin(tiny_restorer, tiny_format, prompt):
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, "Small blur, small noise. A.")
    out = decode(model, tiny_format, prompt, cfg_scale=0.2)
    codes = tiny_format.parse_answer(out.answer_ids[0], strict=True).codes
    assert (codes == 5).all()  # 0.2 * cond + 0.8 * uncond prefers the twin's code


def test_runaway_text_hands_over_to_the_image(tiny_restorer, tiny_format, prompt):
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, "x" * 50, boi_after_text=False)
    out = decode(model, tiny_format, prompt, cfg_scale=1.0, max_text_tokens=10)
    parsed = tiny_format.parse_answer(out.answer_ids[0], strict=True)
    assert parsed.text == "x" * 10
    assert parsed.codes.shape == (H, W)


def test_text_never_holds_special_tokens(tiny_restorer, tiny_format, prompt):
    v = tiny_format.vocab
    end_of_sequence = tiny_format.tokenizer.tokenizer.token_to_id("</s>")  # special in the tokenizer only
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, "A cat.", boi_after_text=False)
    model.script += [v.pad, v.bos, v.eot, end_of_sequence, v.boi]  # what a random model might write
    out = decode(model, tiny_format, prompt, cfg_scale=1.0)
    answer = out.answer_ids[0].tolist()
    text = answer[: answer.index(v.boi)]
    assert not set(text) & tiny_format.special_ids
    parsed = tiny_format.parse_answer(answer, strict=True)
    assert parsed.text.startswith("A cat.") and parsed.codes.shape == (H, W)


def test_forced_text_overrides_the_model(tiny_restorer, tiny_format, prompt):
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, "Large blur, large noise. A car.")
    decoder = RestorationDecoder(model, tiny_format, SamplingConfig(temperature=0.0, cfg_scale=1.0))
    both = TextPrior("Small blur, medium noise.", "A red brick wall.")
    caption_only = TextPrior(caption="A red brick wall.")
    out = decoder.generate(torch.cat([prompt] * 2), H, W, priors=[both, caption_only])
    first, second = (tiny_format.parse_answer(a, strict=True) for a in out.answer_ids)
    assert (first.degradation, first.caption) == ("Small blur, medium noise.", "A red brick wall.")
    # caption only: the model writes its degradation sentence, then the user's caption follows
    assert (second.degradation, second.caption) == ("Large blur, large noise.", "A red brick wall.")


def test_tiny_model_reproducible_and_batch_independent(tiny_restorer, tiny_format, prompt):
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, SamplingConfig(max_text_tokens=8))

    def run(prompts, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return decoder.generate(prompts, H, W, generators=gens).answer_ids

    single_0, single_1 = run(prompt, [0])[0], run(prompt, [1])[0]
    again_0 = run(prompt, [0])[0]
    batch = run(torch.cat([prompt, prompt]), [0, 1])
    assert torch.equal(single_0, again_0)
    assert not torch.equal(single_0, single_1)
    assert torch.equal(batch[0], single_0) and torch.equal(batch[1], single_1)


def test_entropy_map_matches_codes_grid(tiny_restorer, tiny_format, prompt):
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, SamplingConfig(max_text_tokens=4))
    out = decoder.generate(prompt, H, W, generators=[torch.Generator().manual_seed(0)])
    assert out.entropy.shape == (1, H, W)
    codebook = tiny_format.vocab.codebook_size
    # image-only support after the constraint: 0 < H <= ln(codebook size)
    assert (out.entropy > 0).all() and (out.entropy <= torch.log(torch.tensor(codebook)) + 1e-4).all()


@pytest.mark.parametrize(
    "bad", [{"cfg_scale": -1}, {"temperature": -0.1}, {"max_k": 0}, {"text_top_k": 0}, {"max_text_tokens": 0}]
)
def test_sampling_config_validation(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


@pytest.mark.parametrize(
    "text, boi_after_text",
    [("x" * 60, False), ("Medium blur", True)],
    ids=["never-ends-its-sentence", "starts-the-image-early"],
)
def test_caption_alone_is_always_fed_to_the_model(tiny_restorer, tiny_format, prompt, text, boi_after_text):
    model = ScriptedModel(tiny_restorer.model.config, tiny_format, text, boi_after_text=boi_after_text)
    decoder = RestorationDecoder(model, tiny_format, SamplingConfig(temperature=0.0, cfg_scale=1.0))
    out = decoder.generate(prompt, H, W, priors=[TextPrior(caption="A red brick wall.")])
    parsed = tiny_format.parse_answer(out.answer_ids[0], strict=True)
    assert parsed.text.endswith(" A red brick wall.")
    caption_ids = tiny_format.encode_text(" A red brick wall. ")
    boi = out.answer_ids[0].tolist().index(tiny_format.vocab.boi)
    assert out.answer_ids[0][boi - len(caption_ids) : boi].tolist() == caption_ids


def test_model_decode_is_the_forward(tiny_restorer, tiny_format):
    """The engine's forward (pure.model's `decode`): the model's logits (up to rounding: the final norm
    runs on the kept positions only), from a 2-D mask, or from the 4-D one the engine builds with a cache."""
    from transformers import StaticCache

    model = tiny_restorer.model
    ids = torch.randint(model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.bool)
    positions = torch.arange(7).expand(2, -1)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=3).logits
        assert torch.allclose(model.decode(ids, positions, mask, None, 3), expected, atol=1e-5)
        cache = StaticCache(config=model.config, max_cache_len=10)
        slots = torch.arange(10)
        causal = slots <= slots[:7, None]  # (7, 10): the 4-D mask's causal part, 3 free slots
        logits = model.decode(
            ids, positions, (causal & (slots < 7))[None, None].expand(2, -1, -1, -1), cache, 3
        )
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-5)
    # the image step's logits: the LM head's rows of the image codes only, the same values
    codes = tiny_format.vocab.code_to_id
    with torch.inference_mode():
        head = model.lm_head.weight.index_select(0, codes)
        code_logits = model.decode(ids, positions, mask, None, 3, head)
    assert code_logits.shape == (2, 3, len(codes))
    assert torch.allclose(code_logits, expected[..., codes], atol=1e-5)

"""Tests for pure.sequence: image block layout, prompt and training sequences, parsing and its errors.

The byte tokenizer has no merges, so an ASCII text of n characters is exactly n ids: lengths below are
derived from ``len(text)``, not from running the encoder.
"""

from __future__ import annotations

import re

import pytest
import torch

from pure.sequence import (
    IGNORE_INDEX,
    INSTRUCTION,
    MalformedImageError,
    SequenceFormat,
    degradation_text,
    split_answer_text,
)
from pure.tokenizer import PureTokenizer, build_byte_tokenizer
from pure.vocab import PureVocab, image_token_name

K = 64
H, W = 8, 4  # latent grid of the LQ test image: 2 x 1 grid cells
BLOCK_LEN = 3 + H * (W + 1) + 1  # 44
ANSWER = "Medium blur, small noise. A red barn in a field. "


@pytest.fixture(scope="module")
def byte_tokenizer():
    return build_byte_tokenizer(K)


@pytest.fixture(scope="module")
def fmt(byte_tokenizer) -> SequenceFormat:
    vocab = PureVocab.from_names(byte_tokenizer.get_vocab(with_added_tokens=True))
    return SequenceFormat(PureTokenizer(byte_tokenizer, vocab))


def _codes(h: int, w: int, offset: int = 0) -> torch.Tensor:
    """A code grid that visits both id blocks of the tiny vocabulary."""
    return ((torch.arange(h * w) * 7 + offset) % K).view(h, w)


def _good_answer(fmt: SequenceFormat, text: str = "A cat. ") -> list[int]:
    return [*fmt.encode_text(text), *fmt.image_block(_codes(H, W)).tolist(), fmt.vocab.eot]


# -- image block ---------------------------------------------------------------------------------------


def test_image_block_layout(fmt, byte_tokenizer):
    v = fmt.vocab
    codes = _codes(H, W)
    block = fmt.image_block(codes)
    assert block.dtype == torch.int64
    assert block.shape == (BLOCK_LEN,) == (44,)
    assert fmt.image_block_length(H, W) == 44
    # height grid first, then width: 8 latents = 2 grid cells, 4 latents = 1
    assert block[:3].tolist() == [v.boi, v.grid_token(2), v.grid_token(1)]
    assert block[1] == byte_tokenizer.token_to_id("<reserved08802>")
    assert block[2] == byte_tokenizer.token_to_id("<reserved08801>")
    for r in range(H):
        row = block[3 + r * (W + 1) : 3 + (r + 1) * (W + 1)].tolist()
        expected = [byte_tokenizer.token_to_id(image_token_name(int(c))) for c in codes[r]]
        assert row == [*expected, v.newline]
    assert block[-1] == v.eoi
    assert int((block == v.newline).sum()) == H
    assert int((block == v.boi).sum()) == 1
    assert int((block == v.eoi).sum()) == 1


def test_image_block_length_for_512px():
    assert SequenceFormat.image_block_length(64, 64) == 4164  # spec 1.4


def test_image_block_rejects_bad_codes(fmt):
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        fmt.image_block(torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must be in"):
        fmt.image_block(torch.full((4, 4), K))
    with pytest.raises(ValueError, match="multiple of 4"):
        fmt.image_block(torch.zeros(6, 4, dtype=torch.long))


def test_grid_tokens(fmt):
    v = fmt.vocab
    assert fmt.grid_tokens(8, 4) == [v.boi, v.grid_token(2), v.grid_token(1)]
    assert fmt.grid_tokens(64, 128) == [v.boi, v.grid_token(16), v.grid_token(32)]


@pytest.mark.parametrize("h, w", [(6, 4), (4, 6), (0, 4), (4, 0), (-4, 4), (8, 5), (1, 1)])
def test_grid_tokens_refuse_non_multiples_of_4(fmt, h, w):
    with pytest.raises(ValueError, match="positive multiple of 4"):
        fmt.grid_tokens(h, w)


def test_grid_tokens_refuse_grids_without_a_token(fmt):
    with pytest.raises(ValueError, match="grid count"):
        fmt.grid_tokens(4 * 33, 4)  # the tiny tokenizer has grid tokens up to 32


# -- prompt and training example -----------------------------------------------------------------------


def test_prompt_ids(fmt, byte_tokenizer):
    v = fmt.vocab
    lq = _codes(H, W)
    prompt = fmt.prompt_ids(lq)
    n_text = len(INSTRUCTION) + 1  # one id per ASCII character, plus the space before the image
    assert prompt.dtype == torch.int64
    assert prompt.shape == (1 + n_text + BLOCK_LEN + 1,)
    assert prompt[0] == v.bos
    assert prompt[-1] == v.eot
    assert int((prompt == v.boi).sum()) == 1
    assert int((prompt == v.eoi).sum()) == 1
    assert int((prompt == v.bos).sum()) == 1
    assert int((prompt == v.eot).sum()) == 1
    assert byte_tokenizer.decode(prompt[1 : 1 + n_text].tolist()) == INSTRUCTION + " "
    assert torch.equal(prompt[1 + n_text : -1], fmt.image_block(lq))


def test_training_example_labels(fmt):
    v = fmt.vocab
    lq, hq = _codes(H, W), _codes(8, 8, offset=3)
    hq_block_len = 3 + 8 * 9 + 1  # 76
    input_ids, labels = fmt.training_example(lq, ANSWER, hq)
    prompt_len = 1 + (len(INSTRUCTION) + 1) + BLOCK_LEN + 1
    n_answer_text = len(ANSWER)
    assert input_ids.shape == labels.shape == (prompt_len + n_answer_text + hq_block_len + 1,)
    assert labels.dtype == torch.int64
    assert torch.equal(input_ids[:prompt_len], fmt.prompt_ids(lq))
    # no loss over BOS, instruction, LQ block and the human turn's <eot>
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    assert labels[prompt_len] != IGNORE_INDEX
    # answer text, the whole HQ block and the final <eot> are supervised as themselves
    assert torch.equal(labels[prompt_len:], input_ids[prompt_len:])
    assert int((labels != IGNORE_INDEX).sum()) == n_answer_text + hq_block_len + 1
    assert input_ids[prompt_len - 1] == v.eot
    assert input_ids[prompt_len + n_answer_text] == v.boi
    assert torch.equal(
        input_ids[prompt_len + n_answer_text : -1], fmt.image_block(hq)
    )  # the HQ block, start to end
    assert input_ids[-1] == v.eot
    assert int((labels == v.eot).sum()) == 1  # the human <eot> is not a label


def test_build_parse_round_trip(fmt):
    lq, hq = _codes(H, W), _codes(8, 8, offset=5)
    input_ids, labels = fmt.training_example(lq, ANSWER, hq)
    answer = input_ids[labels != IGNORE_INDEX]
    parsed = fmt.parse_answer(answer, strict=True)
    assert parsed.error is None
    assert torch.equal(parsed.codes, hq)
    assert parsed.codes.dtype == torch.int64
    assert parsed.degradation == "Medium blur, small noise."
    assert parsed.caption == "A red barn in a field."
    assert parsed.text == "Medium blur, small noise. A red barn in a field."
    # the LQ block parses back too (anything after its <eoi> is ignored)
    start = int((input_ids == fmt.vocab.boi).nonzero()[0])
    assert torch.equal(fmt.parse_image_block(input_ids[start:]), lq)
    # plain lists are accepted
    assert torch.equal(fmt.parse_image_block(fmt.image_block(hq).tolist()), hq)


def test_answer_text_round_trip(fmt):
    text = fmt.answer_text("Large blur, medium noise.", "  A dog on a beach.  ")
    assert text == "Large blur, medium noise. A dog on a beach. "
    assert fmt.answer_text(None, "A dog.") == "A dog. "
    ids = [*fmt.encode_text(text), *fmt.image_block(_codes(4, 4)).tolist(), fmt.vocab.eot]
    parsed = fmt.parse_answer(ids)
    assert (parsed.degradation, parsed.caption) == ("Large blur, medium noise.", "A dog on a beach.")
    assert torch.equal(parsed.codes, _codes(4, 4))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Medium blur, small noise. A lion.", ("Medium blur, small noise.", "A lion.")),
        (
            "  Large blur, large noise.   Trees and a lake.  ",
            ("Large blur, large noise.", "Trees and a lake."),
        ),
        ("Small blur, medium noise.", ("Small blur, medium noise.", "")),
        ("A lion in the grass. ", (None, "A lion in the grass.")),
        ("A lion. Medium blur, small noise.", (None, "A lion. Medium blur, small noise.")),
        ("Medium blur small noise. A lion.", (None, "Medium blur small noise. A lion.")),
        ("", (None, "")),
    ],
)
def test_split_answer_text(text, expected):
    assert split_answer_text(text) == expected


def test_degradation_text():
    assert degradation_text("medium", "small") == "Medium blur, small noise."
    assert degradation_text("LARGE", "Small") == "Large blur, small noise."
    assert degradation_text("small", "large") == "Small blur, large noise."
    with pytest.raises(ValueError, match="blur"):
        degradation_text("huge", "small")
    with pytest.raises(ValueError, match="noise"):
        degradation_text("small", "none")


# -- parse errors ----------------------------------------------------------------------------------------


def _truncated(fmt):
    ids = _good_answer(fmt)
    start = ids.index(fmt.vocab.boi)
    return ids[: start + 3 + 2 * (W + 1) + 2]  # 2 full rows and 2 codes of the third


def _without_eoi(fmt):
    ids = _good_answer(fmt)
    return [i for i in ids if i != fmt.vocab.eoi]


def _eoi_replaced(fmt):
    ids = _good_answer(fmt)
    return [fmt.vocab.eot if i == fmt.vocab.eoi else i for i in ids]


def _wrong_newline(fmt):
    ids = _good_answer(fmt)
    start = ids.index(fmt.vocab.boi)
    ids[start + 3 + 3 * (W + 1) + W] = int(fmt.vocab.code_to_id[0])  # row 3 has no newline
    return ids


def _text_in_grid(fmt):
    ids = _good_answer(fmt)
    start = ids.index(fmt.vocab.boi)
    ids[start + 3 + 1 * (W + 1) + 2] = fmt.encode_text("x")[0]
    return ids


def _bad_grid_token(fmt):
    ids = _good_answer(fmt)
    start = ids.index(fmt.vocab.boi)
    ids[start + 1] = fmt.encode_text("x")[0]
    return ids


def _zero_grid_token(fmt):
    ids = _good_answer(fmt)
    start = ids.index(fmt.vocab.boi)
    ids[start + 2] = fmt.vocab.grid_ids[0]
    return ids


def _no_image(fmt):
    return [*fmt.encode_text("A cat. "), fmt.vocab.eot]


def _only_boi(fmt):
    return [*fmt.encode_text("A cat. "), fmt.vocab.boi, fmt.vocab.grid_token(2)]


PARSE_ERRORS = [
    (_truncated, r"12 of 40 body tokens \(2 of 8 rows"),
    (_without_eoi, "no end-of-image"),
    (_eoi_replaced, "no end-of-image"),
    (_wrong_newline, "newline"),
    (_text_in_grid, "non-image"),
    (_bad_grid_token, "grid-size"),
    (_zero_grid_token, "grid-size"),
    (_no_image, "no image block"),
    (_only_boi, "no grid-size tokens"),
]


@pytest.mark.parametrize("make, message", PARSE_ERRORS, ids=[m.__name__ for m, _ in PARSE_ERRORS])
def test_parse_errors_are_reported(fmt, make, message):
    ids = make(fmt)
    parsed = fmt.parse_answer(ids)
    assert parsed.codes is None
    assert parsed.error is not None
    assert re.search(message, parsed.error), parsed.error
    assert parsed.caption == "A cat."  # the text survives a broken image
    with pytest.raises(MalformedImageError, match=message):
        fmt.parse_answer(ids, strict=True)


def test_parse_image_block_requires_a_start_token(fmt):
    block = fmt.image_block(_codes(H, W)).tolist()
    with pytest.raises(MalformedImageError, match="start-of-image"):
        fmt.parse_image_block(block[1:])
    with pytest.raises(MalformedImageError, match="start-of-image"):
        fmt.parse_image_block([])
    assert issubclass(MalformedImageError, ValueError)


def test_parse_answer_stops_text_at_eot_without_image(fmt):
    ids = [*fmt.encode_text("Small blur, small noise. A cat. "), fmt.vocab.eot, *fmt.encode_text("junk")]
    parsed = fmt.parse_answer(ids)
    assert parsed.degradation == "Small blur, small noise."
    assert parsed.caption == "A cat."
    assert parsed.codes is None


# -- encode_text ----------------------------------------------------------------------------------------


def test_encode_text_plain(fmt, byte_tokenizer):
    ids = fmt.encode_text("hello world")
    assert len(ids) == len("hello world")
    assert byte_tokenizer.decode(ids) == "hello world"
    assert fmt.vocab.bos not in ids


@pytest.mark.parametrize(
    "special",
    ["<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>", "<reserved08801>", "<s>", "<pad>"],
)
def test_encode_text_refuses_special_token_strings(fmt, special):
    with pytest.raises(ValueError, match="special-token"):
        fmt.encode_text(f"A cat {special} on a mat.")
    with pytest.raises(ValueError, match="special-token"):
        fmt.training_example(_codes(H, W), f"A cat {special}. ", _codes(H, W))

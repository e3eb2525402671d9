"""Tests for pure.vocab: special ids by name, the code <-> id tables, grid tokens, masks, validation.

Expected ids are derived by hand from the documented layouts (``build_byte_tokenizer``'s docstring and
PURE_SPEC section 1.1/1.5), or looked up independently through the tokenizer's own ``token_to_id``.
"""

from __future__ import annotations

import pytest
import torch

from pure.tokenizer import build_byte_tokenizer
from pure.vocab import (
    BOI_NAME,
    BOS_NAME,
    EOI_NAME,
    EOT_NAME,
    NEWLINE_NAME,
    PAD_NAME,
    PureVocab,
    _code_from_name,
    grid_token_name,
    image_token_name,
)

K = 64  # codebook of the tiny tokenizer
MAX_GRID = 32  # build_byte_tokenizer's default


@pytest.fixture(scope="module")
def byte_tokenizer():
    return build_byte_tokenizer(K)


@pytest.fixture(scope="module")
def vocab(byte_tokenizer) -> PureVocab:
    return PureVocab.from_names(byte_tokenizer.get_vocab(with_added_tokens=True))


def _minimal_names(n_codes: int = 4, n_grid: int = 3) -> dict[str, int]:
    """A small valid name map: specials at 0..5, codes at 10.., grid tokens at 100.."""
    names = {BOS_NAME: 0, PAD_NAME: 1, EOI_NAME: 2, BOI_NAME: 3, EOT_NAME: 4, NEWLINE_NAME: 5}
    names.update({image_token_name(c): 10 + c for c in range(n_codes)})
    names.update({grid_token_name(n): 100 + n for n in range(n_grid)})
    return names


# -- the tiny tokenizer's vocabulary ----------------------------------------------------------------------


def test_tiny_layout_by_hand(vocab):
    # <s> <pad> </s> <unk> | codes 0..31 | <eoss> <racm3:break> <reserved08706> <reserved08799>
    # | grid 0..32 | 256 bytes | codes 32..63
    assert vocab.size == 4 + 32 + 4 + 33 + 256 + 32 == 361
    assert vocab.codebook_size == K
    assert (vocab.bos, vocab.pad) == (0, 1)
    assert (vocab.eoi, vocab.boi, vocab.eot, vocab.newline) == (36, 37, 38, 39)
    assert vocab.grid_ids == tuple(range(40, 73))
    expected = [c + 4 if c < 32 else 329 + (c - 32) for c in range(K)]
    assert vocab.code_to_id.tolist() == expected


def test_fixture_vocab_is_the_byte_vocab(tiny_vocab, vocab):
    # the checkpoint fixture's tokenizer round-trips through tokenizer.json to the same tables
    assert tiny_vocab.size == vocab.size
    assert torch.equal(tiny_vocab.code_to_id, vocab.code_to_id)
    assert torch.equal(tiny_vocab.id_to_code, vocab.id_to_code)


def test_code_id_bijection(vocab, byte_tokenizer):
    codes = torch.arange(K)
    ids = vocab.codes_to_ids(codes)
    assert ids.dtype == torch.int64
    assert ids.unique().numel() == K  # distinct
    assert torch.equal(vocab.ids_to_codes(ids), codes)  # inverse
    for c in range(K):  # each id is the one the tokenizer gives the code's name
        assert int(ids[c]) == byte_tokenizer.token_to_id(image_token_name(c))
    # every other id maps to -1
    not_image = torch.ones(vocab.size, dtype=torch.bool)
    not_image[ids] = False
    assert (vocab.id_to_code[not_image] == -1).all()
    assert int(not_image.sum()) == vocab.size - K


def test_split_blocks_are_not_affine(vocab):
    ids = vocab.codes_to_ids(torch.tensor([K // 2 - 1, K // 2]))
    assert int(ids[1]) - int(ids[0]) != 1
    assert ids.tolist() == [35, 329]


def test_codes_to_ids_keeps_shape_and_rejects_out_of_range(vocab):
    codes = torch.tensor([[0, 31, 32], [63, 5, 40]], dtype=torch.int32)
    ids = vocab.codes_to_ids(codes)
    assert ids.shape == (2, 3)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[4, 35, 329], [360, 9, 337]]
    assert torch.equal(vocab.ids_to_codes(ids), codes.long())
    for bad in ([-1], [K], [0, K + 10]):
        with pytest.raises(ValueError, match="codes must be in"):
            vocab.codes_to_ids(torch.tensor(bad))
    assert vocab.codes_to_ids(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_ids_to_codes_rejects_non_image_ids(vocab):
    for bad in (vocab.boi, vocab.eoi, vocab.newline, vocab.bos, vocab.grid_ids[1], 100):
        with pytest.raises(ValueError, match="not image tokens"):
            vocab.ids_to_codes(torch.tensor([4, bad]))


def test_special_ids_resolved_by_name(vocab, byte_tokenizer):
    assert vocab.bos == byte_tokenizer.token_to_id("<s>")
    assert vocab.pad == byte_tokenizer.token_to_id("<pad>")
    assert vocab.boi == byte_tokenizer.token_to_id("<racm3:break>")
    assert vocab.eoi == byte_tokenizer.token_to_id("<eoss>")
    assert vocab.eot == byte_tokenizer.token_to_id("<reserved08706>")
    assert vocab.newline == byte_tokenizer.token_to_id("<reserved08799>")
    for n in range(MAX_GRID + 1):
        assert vocab.grid_ids[n] == byte_tokenizer.token_to_id(f"<reserved{8800 + n:05d}>")


def test_grid_token_and_count_are_inverse(vocab, byte_tokenizer):
    assert vocab.max_grid == MAX_GRID
    for n in range(1, MAX_GRID + 1):
        token = vocab.grid_token(n)
        assert token == byte_tokenizer.token_to_id(f"<reserved{8800 + n:05d}>")
        assert vocab.grid_count(token) == n
        assert vocab.grid_count(torch.tensor(token)) == n
    assert vocab.grid_count(vocab.grid_ids[0]) == 0
    for not_grid in (vocab.boi, vocab.eoi, vocab.newline, 4, 200):
        assert vocab.grid_count(not_grid) is None


@pytest.mark.parametrize("n", [0, -1, MAX_GRID + 1, 1000])
def test_grid_token_range_errors(vocab, n):
    with pytest.raises(ValueError, match=f"1..{MAX_GRID}"):
        vocab.grid_token(n)


def test_image_mask(vocab):
    mask = vocab.image_mask()
    assert mask.shape == (vocab.size,)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == K
    assert set(mask.nonzero().flatten().tolist()) == set(vocab.code_to_id.tolist())
    assert vocab.image_mask("meta").device.type == "meta"


def test_inside_image_mask(vocab):
    mask = vocab.inside_image_mask()
    assert mask.shape == (vocab.size,)
    assert mask[vocab.code_to_id].all()
    assert mask[vocab.eoi] and mask[vocab.newline]
    assert all(bool(mask[g]) for g in vocab.grid_ids)
    assert not mask[vocab.boi]  # the start token is how text hands over to an image
    for outside in (vocab.bos, vocab.pad, vocab.eot, 2, 3, 100):
        assert not mask[outside]
    assert int(mask.sum()) == K + 2 + (MAX_GRID + 1)
    # the image mask is not altered by building the inside mask
    assert int(vocab.image_mask().sum()) == K


# -- a PURE-sized synthetic vocabulary ------------------------------------------------------------------


def _pure_like_names() -> dict[str, int]:
    """Chameleon/PURE ids (spec 1.1): codes 0..8191 at 4..8195, 8192..16383 at 65536..73727."""
    names = {BOS_NAME: 0, PAD_NAME: 1, "</s>": 2, "<unk>": 3, EOI_NAME: 8196, BOI_NAME: 8197}
    names[EOT_NAME] = 8710
    names[NEWLINE_NAME] = 8803
    names.update({f"<reserved{8800 + n:05d}>": 8804 + n for n in range(65)})  # reserved0XXXX <-> XXXX+4
    names.update({image_token_name(c): 4 + c for c in range(8192)})
    names.update({image_token_name(8192 + j): 65536 + j for j in range(8192)})
    return names


def test_pure_like_vocab_gives_the_inferred_affine_form():
    vocab = PureVocab.from_names(_pure_like_names(), size=73728)
    assert vocab.size == 73728
    assert vocab.codebook_size == 16384
    c = torch.arange(16384)
    # two affine pieces: c + 4 below 8192, 65536 + (c - 8192) = c + 57344 above
    expected = torch.where(c < 8192, c + 4, c + (65536 - 8192))
    assert 65536 - 8192 == 57344
    assert torch.equal(vocab.code_to_id, expected)
    assert vocab.code_to_id[0] == 4
    assert vocab.code_to_id[8191] == 8195
    assert vocab.code_to_id[8192] == 65536
    assert vocab.code_to_id[16383] == 73727
    assert (vocab.boi, vocab.eoi, vocab.eot, vocab.newline) == (8197, 8196, 8710, 8803)
    assert vocab.grid_token(16) == 8820  # a 512 px side
    assert vocab.grid_count(8820) == 16
    assert int(vocab.image_mask().sum()) == 16384
    assert vocab.id_to_code[73727] == 16383
    assert vocab.id_to_code[65536] == 8192
    for not_image in (0, 3, 8196, 8197, 8196 + 1, 65535, 8710):
        assert vocab.id_to_code[not_image] == -1
    assert not vocab.inside_image_mask()[8197]


def test_mapping_comes_from_the_names_not_an_affine_formula():
    # codes assigned to ids in reverse order: an affine assumption would get every code wrong
    names = _minimal_names(n_codes=4)
    for c in range(4):
        names[image_token_name(c)] = 13 - c
    vocab = PureVocab.from_names(names)
    assert vocab.code_to_id.tolist() == [13, 12, 11, 10]
    assert vocab.ids_to_codes(torch.tensor([10, 11, 12, 13])).tolist() == [3, 2, 1, 0]


def test_size_defaults_to_max_id_plus_one_and_can_be_larger():
    names = _minimal_names()
    assert PureVocab.from_names(names).size == 103  # grid token 2 at id 102
    big = PureVocab.from_names(names, size=500)
    assert big.size == 500
    assert big.id_to_code.shape == (500,)
    assert big.image_mask().shape == (500,)


# -- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"IMGIMGBY": 50},  # spells 1 with another final character
        {"IMGIMGABZ": 50},  # spells "01" = 1
    ],
)
def test_duplicate_code_is_an_error(extra):
    names = {**_minimal_names(n_codes=4), **extra}
    with pytest.raises(ValueError, match="exactly once"):
        PureVocab.from_names(names)


def test_gap_in_codes_is_an_error():
    names = _minimal_names(n_codes=4)
    del names[image_token_name(2)]
    with pytest.raises(ValueError, match="exactly once"):
        PureVocab.from_names(names)


def test_codes_not_starting_at_zero_is_an_error():
    names = _minimal_names(n_codes=4)
    del names[image_token_name(0)]
    with pytest.raises(ValueError, match="exactly once"):
        PureVocab.from_names(names)


@pytest.mark.parametrize("name", [BOS_NAME, PAD_NAME, BOI_NAME, EOI_NAME, EOT_NAME, NEWLINE_NAME])
def test_missing_special_token_is_an_error(name):
    names = _minimal_names()
    del names[name]
    with pytest.raises(ValueError) as err:
        PureVocab.from_names(names)
    assert name in str(err.value)


def test_missing_grid_tokens_is_an_error():
    names = {k: v for k, v in _minimal_names().items() if not k.startswith("<reserved088")}
    assert grid_token_name(0) not in names
    with pytest.raises(ValueError, match="grid"):
        PureVocab.from_names(names)


def test_no_image_tokens_is_an_error():
    names = {k: v for k, v in _minimal_names().items() if not k.startswith("IMGIMG")}
    with pytest.raises(ValueError, match="IMGIMG"):
        PureVocab.from_names(names)


@pytest.mark.parametrize("bad", ["IMGIMGAKZ", "IMGIMGZ", "IMGIMGabZ", "IMGIMGA1Z", "IMGIMG-Z"])
def test_bad_letters_in_an_image_name_are_an_error(bad):
    names = {**_minimal_names(), bad: 60}
    with pytest.raises(ValueError, match=r"A\.\.J"):
        PureVocab.from_names(names)


def test_image_id_outside_the_vocabulary_is_an_error():
    names = _minimal_names(n_codes=4)  # largest image id 13, largest id 102
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PureVocab.from_names(names, size=13)
    assert PureVocab.from_names(names, size=103).size == 103


def test_special_id_outside_the_vocabulary_is_an_error():
    names = _minimal_names(n_codes=4)  # image ids 10..13 fit in 14, grid ids 100..102 do not
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PureVocab.from_names(names, size=14)


def test_two_codes_on_one_id_is_an_error():
    names = _minimal_names(n_codes=4)
    names[image_token_name(3)] = names[image_token_name(2)]
    with pytest.raises(ValueError):
        PureVocab.from_names(names)


# -- names -----------------------------------------------------------------------------------------------


def test_image_token_name_by_hand():
    assert image_token_name(0) == "IMGIMGAZ"
    assert image_token_name(7) == "IMGIMGHZ"
    assert image_token_name(10) == "IMGIMGBAZ"
    assert image_token_name(8191) == "IMGIMGIBJBZ"
    assert image_token_name(16383) == "IMGIMGBGDIDZ"


def test_name_parser_round_trip():
    for code in [*range(200), 999, 8191, 8192, 12345, 16383]:
        assert _code_from_name(image_token_name(code)) == code
    # the final character is dropped, whatever it is (Chameleon's names end in Z)
    assert _code_from_name("IMGIMGBCDQ") == 123

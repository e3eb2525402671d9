"""The from-scratch pieces of PURE-tiny: the offline image set, the BPE tokenizer, the starting checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pure.data.sample_images import (
    GENERATORS,
    SourceError,
    build_sources,
    load_source,
    main,
    read_sources,
)
from pure.make_random_checkpoint import make_random_checkpoint, tokenizer_texts
from pure.model import load_config
from pure.restorer import PureRestorer
from pure.sequence import INSTRUCTION, SequenceFormat
from pure.tokenizer import PureTokenizer, train_bpe_tokenizer
from pure.vocab import PureVocab
from pure.vq import VQConfig, VQModel

RECIPE_SOURCES = "recipes/pure_tiny/sources.yaml"
SMALL_VQ = VQConfig(
    codebook_size=32, base_channels=32, channel_mult=(1, 1, 1, 1), z_channels=32, num_res_blocks=1
)


def _write_sources(path, entries):
    import yaml

    path.write_text(yaml.safe_dump({"images": entries}))
    return path


def test_recipe_sources_are_valid_with_a_disjoint_holdout():
    entries = read_sources(RECIPE_SOURCES)
    splits = {e["name"]: e["split"] for e in entries}
    assert splits["astronaut"] == "holdout"  # the demo example is a hold-out image
    assert sum(s == "holdout" for s in splits.values()) >= 4
    holdout_sources = {e["source"] for e in entries if e["split"] == "holdout"}
    train_sources = {e["source"] for e in entries if e["split"] == "train"}
    assert not holdout_sources & train_sources


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_drawn_images_are_deterministic_rgb_and_not_flat(kind):
    a, b, c = (load_source(f"generated:{kind}:{seed}") for seed in (3, 3, 4))
    assert a.mode == "RGB" and a.size == (512, 512)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.asarray(a).std() > 10


def test_library_samples_load_as_rgb():
    horse = load_source("skimage:horse")  # boolean grey
    left = load_source("skimage:stereo_motorcycle[0]")  # one image of a tuple
    hopper = load_source("matplotlib:grace_hopper.jpg")
    assert {horse.mode, left.mode, hopper.mode} == {"RGB"}
    assert set(np.unique(np.asarray(horse))) <= {0, 255}
    assert hopper.size == (512, 600)


def test_build_writes_splits_and_captions_atomically(tmp_path):
    sources = _write_sources(
        tmp_path / "s.yaml",
        [
            {"name": "a", "split": "train", "source": "generated:shapes:0", "caption": "Shapes."},
            {"name": "b", "split": "holdout", "source": "skimage:camera", "caption": "A man."},
        ],
    )
    assert main([str(sources), "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "train" / "a.png").mode == "RGB"
    assert (tmp_path / "out" / "holdout" / "b.png").is_file()
    lines = [json.loads(x) for x in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert lines == [{"file": "a.png", "caption": "Shapes."}, {"file": "b.png", "caption": "A man."}]
    with pytest.raises(FileExistsError):
        build_sources(sources, tmp_path / "out")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "split": "test", "source": "skimage:camera", "caption": "x"}, "split"),
        ({"name": "a b", "split": "train", "source": "skimage:camera", "caption": "x"}, "name"),
        ({"name": "a", "split": "train", "source": "skimage:camera", "caption": " "}, "caption"),
        ({"name": "a", "split": "train", "source": "skimage:camera"}, "lacks"),
    ],
)
def test_bad_entries_are_refused_before_anything_is_written(tmp_path, entry, message, capsys):
    sources = _write_sources(tmp_path / "s.yaml", [entry])
    assert main([str(sources), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["skimage:nope", "generated:clouds:1", "web:x.png", "generated:shapes:x"])
def test_unknown_sources_fail_with_the_name(source):
    with pytest.raises(SourceError, match=r"source|sample|generated"):
        load_source(source)


def test_bpe_tokenizer_round_trips_and_names_every_code(tmp_path):
    texts = [INSTRUCTION, "Medium blur, small noise.", "A cat on a mat."] * 3
    tokenizer = train_bpe_tokenizer(texts, text_vocab_size=300, codebook_size=40, max_grid=8)
    assert tokenizer.to_str() == train_bpe_tokenizer(texts, 300, 40, max_grid=8).to_str()
    vocab = PureVocab.from_names(tokenizer.get_vocab(with_added_tokens=True))
    assert vocab.codebook_size == 40
    text = PureTokenizer(tokenizer, vocab)
    ids = text.encode(INSTRUCTION)
    assert text.decode(ids) == INSTRUCTION
    assert len(ids) < len(INSTRUCTION.encode()) // 2  # merges learned from the texts
    assert text.decode(text.encode("naïve 東京")) == "naïve 東京"  # bytes cover any text
    assert not set(ids) & set(vocab.code_to_id.tolist())
    with pytest.raises(ValueError, match="byte symbols"):
        train_bpe_tokenizer(texts, 100, 40)


def test_starting_checkpoint_carries_the_trained_vq_bpe_tokenizer_and_size(tmp_path):
    torch.manual_seed(1)
    VQModel(SMALL_VQ).save_pretrained(tmp_path / "vq")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"file": "a.png", "caption": "A red kite over a beach."}) + "\n")
    assert "A red kite over a beach." in tokenizer_texts(captions)
    folder = make_random_checkpoint(
        tmp_path / "init",
        vq=tmp_path / "vq",
        captions=captions,
        text_vocab_size=300,
        hidden=64,
        image_size=128,
    )
    restorer = PureRestorer.from_pretrained(folder, device="cpu")
    assert restorer.image_size == 128
    assert restorer.vq.config == SMALL_VQ
    original = VQModel.from_pretrained(tmp_path / "vq")
    for key, value in original.state_dict().items():
        assert torch.equal(restorer.vq.state_dict()[key], value)
    fmt = SequenceFormat(restorer.tokenizer)
    assert fmt.encode_text("A red kite") == restorer.tokenizer.encode("A red kite")
    assert restorer.tokenizer.vocab.codebook_size == SMALL_VQ.codebook_size


def test_a_new_model_copies_the_tokenizer_its_shards_were_made_with(tmp_path):
    """Another size on the same shards: the tokenizer is copied byte for byte (the shards' manifest
    records its hash), and with the same seed and size the weights are those of the first model."""
    torch.manual_seed(1)
    VQModel(SMALL_VQ).save_pretrained(tmp_path / "vq")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"file": "a.png", "caption": "A red kite over a beach."}) + "\n")
    size = {"vq": tmp_path / "vq", "text_vocab_size": 300, "hidden": 64, "image_size": 128}
    first = make_random_checkpoint(tmp_path / "first", captions=captions, **size)
    again = make_random_checkpoint(tmp_path / "again", tokenizer=first, **size)
    wider = make_random_checkpoint(
        tmp_path / "wider", tokenizer=first / "tokenizer.json", **{**size, "hidden": 96}
    )
    for folder in (again, wider):
        assert (folder / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert load_config(wider).hidden_size == 96
    with pytest.raises(ValueError, match="not both"):
        make_random_checkpoint(tmp_path / "both", tokenizer=first, captions=captions, **size)
    with pytest.raises(ValueError, match="image tokens but the VQ has"):
        make_random_checkpoint(tmp_path / "other_vq", tokenizer=first, hidden=64)  # the default tiny VQ
    assert not (tmp_path / "both").exists() and not (tmp_path / "other_vq").exists()

"""pure.data.captions with a tiny random LLaVA built here: batching, the content-hash cache, imports."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from pure.data.captions import (
    IMPORT_SOURCE,
    CaptionModelError,
    LlavaCaptioner,
    caption_images,
    file_sha256,
    load_caption_index,
    main,
    read_caption_file,
)
from pure.imageio import list_images

MODEL_NAME = "tiny-llava"


def build_tiny_llava(folder):
    """A random LLaVA (CLIP vision tower + Llama, hidden 32, 2 layers) and its processor, saved to `folder`
    with `save_pretrained` so that the real loading code reads it back."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {name: i for i, name in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    text = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    text.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text.decoder = decoders.ByteLevel()
    text.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=text,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    language = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=language,
        image_token_id=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def captioner(llava_folder):
    return LlavaCaptioner.from_pretrained(llava_folder, device="cpu", max_new_tokens=6)


class Counting:
    """Wraps a captioner and counts the images it is asked to caption."""

    def __init__(self, inner):
        self.inner, self.images, self.calls = inner, 0, 0

    def caption(self, images):
        self.images += len(images)
        self.calls += 1
        return self.inner.caption(images)


def _images(folder, n=4, duplicate=True):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    if duplicate:  # same content as im0 under another name
        (folder / "copy_of_im0.png").write_bytes((folder / "im0.png").read_bytes())
    return list_images(folder)


def _never():
    raise AssertionError("the model must not be loaded")


def test_llava_captions_are_greedy_and_batched_equals_single(captioner):
    g = np.random.default_rng(1)
    images = [Image.fromarray(g.integers(0, 256, (36, 50, 3), dtype=np.uint8)) for _ in range(3)]
    batched = captioner.caption(images)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == [captioner.caption([image])[0] for image in images]
    assert captioner.caption(images) == batched  # greedy: deterministic
    assert captioner.prompt_text() == "USER: <image>\nPlease describe this image in detail. ASSISTANT:"


def test_cache_skips_done_images_and_recomputes_changed_ones(tmp_path, captioner):
    images = _images(tmp_path / "img")
    out = tmp_path / "captions.jsonl"
    counting = Counting(captioner)
    summary = caption_images(images, out, lambda: counting, MODEL_NAME, batch_size=2, progress=False)
    # 5 files, 4 distinct contents: the copy is captioned once, in batches of 2.
    assert counting.images == 4 and counting.calls == 2 and summary["captioned"] == 5
    entries = read_caption_file(out).entries
    assert sorted(e["file"] for e in entries) == sorted(p.name for p in images)
    by_name = {e["file"]: e for e in entries}
    assert by_name["copy_of_im0.png"]["caption"] == by_name["im0.png"]["caption"]
    assert by_name["im1.png"]["sha256"] == file_sha256(tmp_path / "img" / "im1.png")
    assert by_name["im1.png"]["model"] == MODEL_NAME and by_name["im1.png"]["source"] == "model"

    # Second run: nothing to do, the model is not even loaded.
    summary = caption_images(images, out, _never, MODEL_NAME, batch_size=2, progress=False)
    assert summary["cached"] == 5 and summary["captioned"] == 0
    assert read_caption_file(out).entries == entries

    # Changed content: only that image is captioned again; look-ups give the new line.
    Image.new("RGB", (40, 48), (10, 200, 30)).save(tmp_path / "img" / "im2.png")
    counting = Counting(captioner)
    summary = caption_images(images, out, lambda: counting, MODEL_NAME, batch_size=2, progress=False)
    assert counting.images == 1 and summary["cached"] == 4 and summary["captioned"] == 1
    index = load_caption_index(out)
    new_hash = file_sha256(tmp_path / "img" / "im2.png")
    assert index.lookup(new_hash)["file"] == "im2.png" and index.lookup(name="im2.png")["sha256"] == new_hash

    # Another model or prompt is a cache miss.
    counting = Counting(captioner)
    caption_images(images, out, lambda: counting, "other-model", batch_size=8, progress=False)
    assert counting.images == 4


def test_a_torn_last_line_is_dropped_and_redone(tmp_path, captioner):
    images = _images(tmp_path / "img", n=3, duplicate=False)
    out = tmp_path / "captions.jsonl"
    caption_images(images, out, captioner, MODEL_NAME, batch_size=8, progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # killed while appending the last line
    counting = Counting(captioner)
    summary = caption_images(images, out, counting, MODEL_NAME, batch_size=8, progress=False)
    assert counting.images == 1 and summary["cached"] == 2
    parsed = read_caption_file(out)
    assert parsed.torn == [] and len(parsed.entries) == 3
    assert all(line.endswith(b"\n") for line in out.read_bytes().splitlines(keepends=True))
    # A file that is not a caption file is refused, never "repaired".
    other = tmp_path / "records.jsonl"
    other.write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(ValueError, match="not a caption file"):
        caption_images(images, other, _never, MODEL_NAME, progress=False)
    assert other.read_text() == '{"id": 1}\n{"id": 2}\n'


def test_imported_captions_by_name_or_hash_need_no_model(tmp_path):
    images = _images(tmp_path / "img", n=3, duplicate=False)
    imports = tmp_path / "existing.jsonl"
    imports.write_text(
        json.dumps({"file": "some/where/im0.png", "caption": "A red barn."})
        + "\n"
        + json.dumps({"sha256": file_sha256(images[1]), "text": "A cat on a sofa."})
        + "\n"
    )
    out = tmp_path / "captions.jsonl"
    code = main(
        ["--images", str(tmp_path / "img"), "--out", str(out), "--import", str(imports), "--no-model"]
    )
    assert code == 0
    index = load_caption_index(out)
    assert index.lookup(name="im0.png")["caption"] == "A red barn."
    assert index.lookup(file_sha256(images[1]))["caption"] == "A cat on a sofa."
    assert index.lookup(name="im0.png")["source"] == IMPORT_SOURCE
    assert index.lookup(name="im2.png") is None  # neither imported nor captioned: reported missing
    # Imported lines are a cache hit for any model.
    summary = caption_images(images[:2], out, _never, "any-model", progress=False)
    assert summary["cached"] == 2
    # A {file: caption} mapping works too.
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"im2.png": "Boats in a harbour."}))
    summary = caption_images(images, out, _never, "any-model", imported=_read(mapping), progress=False)
    assert summary["imported"] == 1 and load_caption_index(out).lookup(name="im2.png")["caption"].startswith(
        "Boats"
    )


def _read(path):
    from pure.data.captions import read_import_file

    return read_import_file(path)


def test_unreadable_images_are_skipped_and_reported(tmp_path, captioner, capsys):
    images = _images(tmp_path / "img", n=2, duplicate=False)
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "captions.jsonl"
    summary = caption_images([*images, bad], out, captioner, MODEL_NAME, progress=False)
    assert summary["captioned"] == 2
    assert [s["file"] for s in summary["skipped"]] == ["broken.png"]
    assert "not an image file" in summary["skipped"][0]["reason"]


def test_missing_model_offline_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(CaptionModelError) as err:
        LlavaCaptioner.from_pretrained("no-such-org/no-such-llava", device="cpu")
    assert time.perf_counter() - start < 20
    message = str(err.value)
    assert (
        "\n" not in message and "hf download no-such-org/no-such-llava" in message and "--import" in message
    )
    _images(tmp_path / "img", n=1, duplicate=False)
    code = main(
        ["--images", str(tmp_path / "img"), "--out", str(tmp_path / "c.jsonl"), "--model", "no-such-org/x"]
    )
    captured = capsys.readouterr()
    assert code == 1 and captured.err.count("error:") == 1 and "Traceback" not in captured.err

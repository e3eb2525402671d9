"""Tests for pure.model: unmasked fp32 logits, loss, strict loading of PURE-style checkpoints, Hub errors."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import ChameleonForConditionalGeneration

from pure.make_random_checkpoint import tiny_config
from pure.model import (
    ModelLoadError,
    PureForConditionalGeneration,
    default_attn_implementation,
    load_config,
    load_model,
    resolve_checkpoint,
)
from pure.tokenizer import PureTokenizer, build_byte_tokenizer
from pure.vocab import PureVocab

QK_NORM_SUFFIXES = ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")


@pytest.fixture(scope="module")
def tokenizer() -> PureTokenizer:
    text = build_byte_tokenizer(64)
    return PureTokenizer(text, PureVocab.from_names(text.get_vocab(with_added_tokens=True)))


@pytest.fixture(scope="module")
def model(tokenizer) -> PureForConditionalGeneration:
    torch.manual_seed(0)
    model = PureForConditionalGeneration(tiny_config(tokenizer)).eval()
    # QK-norm weights start as ones/zeros, which would hide a wrong expansion: give every layer a random
    # row, shared by all heads (so that a [1, head_dim] copy of row 0 is exact)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(QK_NORM_SUFFIXES):
                param.copy_(torch.randn(1, param.shape[1]).expand_as(param) * 0.5 + name.endswith("weight"))
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.normal_(0.0, 1.0)  # spread the logits so differences show
    return model


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def input_ids(tokenizer) -> torch.Tensor:
    v = tokenizer.vocab
    text = tokenizer.encode("Restore this.")
    codes = v.code_to_id[torch.tensor([0, 5, 40, 63])].tolist()
    row0 = [v.bos, *text, v.boi, v.grid_token(1), v.grid_token(1), *codes]
    row1 = [v.bos, *tokenizer.encode("A different prompt here"), v.eot]
    n = min(len(row0), len(row1))
    return torch.tensor([row0[:n], row1[:n]])


@pytest.fixture(scope="module")
def reference_logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _copy_folder(src: Path, dst: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    if weights is not None:
        save_file({k: t.contiguous() for k, t in weights.items()}, str(dst / "model.safetensors"))
    return dst


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# -- forward -------------------------------------------------------------------------------------------


def test_image_logits_are_not_masked_unlike_upstream(model, tokenizer, input_ids, reference_logits):
    image_ids = tokenizer.vocab.code_to_id
    pure_image = reference_logits[..., image_ids]
    assert torch.isfinite(pure_image).all()
    assert (pure_image > torch.finfo(torch.float32).min).all()
    assert pure_image.std() > 0.1  # real logits, not a constant

    upstream = ChameleonForConditionalGeneration(copy.deepcopy(model.config)).eval()
    result = upstream.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("model.vqmodel.") for k in result.missing_keys)
    up = _logits(upstream, input_ids)
    # upstream sets every image-token logit to the dtype minimum ...
    assert (up[..., image_ids] == torch.finfo(up.dtype).min).all()
    # ... and agrees everywhere else
    other = ~tokenizer.vocab.image_mask()
    torch.testing.assert_close(reference_logits[..., other], up[..., other], rtol=0, atol=1e-6)
    # greedy decoding after <boi><grid><grid> picks an image code with PURE, never with upstream
    assert not tokenizer.vocab.image_mask()[up[0, -1].argmax()]


def test_logits_are_fp32_for_a_bf16_model(model, input_ids, reference_logits):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    logits = _logits(bf16, input_ids)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference_logits, rtol=0.02, atol=0.3)


def test_logits_to_keep(model, input_ids, reference_logits):
    with torch.no_grad():
        last = model(input_ids=input_ids, logits_to_keep=1).logits
        some = model(input_ids=input_ids, logits_to_keep=torch.tensor([0, 2])).logits
        two = model(input_ids=input_ids, logits_to_keep=2).logits
    assert last.shape == (2, 1, reference_logits.shape[-1])
    assert last.dtype == torch.float32
    torch.testing.assert_close(last[:, 0], reference_logits[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, reference_logits[:, -2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(some, reference_logits[:, [0, 2]], rtol=1e-5, atol=1e-5)


def test_loss_is_the_shifted_cross_entropy(model, input_ids, reference_logits):
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, :7] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    # logit t predicts label t + 1; mean over every supervised token of the batch
    logits = reference_logits.double()
    manual = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss.double(), manual, rtol=1e-5, atol=1e-5)
    # an unshifted loss would be different: the test can tell
    unshifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert abs(float(unshifted) - float(manual)) > 1e-3


def test_no_chameleon_vqgan(model):
    assert model.model.vqmodel is None
    assert not any(k.startswith("model.vqmodel.") for k in model.state_dict())


# -- loading -------------------------------------------------------------------------------------------


def test_load_model_round_trip(saved, input_ids, reference_logits):
    loaded = load_model(saved)
    assert isinstance(loaded, PureForConditionalGeneration)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    torch.testing.assert_close(_logits(loaded, input_ids), reference_logits, rtol=0, atol=1e-6)


def test_load_model_in_bf16(saved, input_ids, reference_logits):
    loaded = load_model(saved, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    logits = _logits(loaded, input_ids)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits, rtol=0.02, atol=0.3)


def test_lumina_style_qk_norm_shape_loads(saved, model, tmp_path, input_ids, reference_logits):
    weights = load_file(str(saved / "model.safetensors"))
    n_rewritten = 0
    for key in list(weights):
        if key.endswith(QK_NORM_SUFFIXES):
            assert weights[key].shape == (4, 16)
            assert torch.equal(weights[key], weights[key][:1].expand(4, -1))  # rows equal: exact
            weights[key] = weights[key][:1].clone()  # [1, head_dim], as PURE/Lumina store it
            n_rewritten += 1
    assert n_rewritten == 4 * model.config.num_hidden_layers
    folder = _copy_folder(saved, tmp_path / "lumina", weights)
    loaded = load_model(folder)
    assert loaded.model.layers[0].self_attn.q_norm.weight.shape == (4, 16)
    assert loaded.model.layers[1].self_attn.k_norm.bias.shape == (4, 16)
    torch.testing.assert_close(_logits(loaded, input_ids), reference_logits, rtol=0, atol=1e-6)


def test_extra_vqmodel_keys_are_ignored(saved, tmp_path, input_ids, reference_logits):
    weights = load_file(str(saved / "model.safetensors"))
    weights["model.vqmodel.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    weights["model.vqmodel.quantize.embedding.weight"] = torch.randn(16, 4)
    folder = _copy_folder(saved, tmp_path / "with_vq", weights)
    torch.testing.assert_close(_logits(load_model(folder), input_ids), reference_logits, rtol=0, atol=1e-6)


def test_missing_weight_is_named(saved, tmp_path):
    weights = load_file(str(saved / "model.safetensors"))
    del weights["model.norm.weight"]
    folder = _copy_folder(saved, tmp_path / "missing", weights)
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight"):
        load_model(folder)


def test_unexpected_weight_is_named(saved, tmp_path):
    weights = load_file(str(saved / "model.safetensors"))
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    folder = _copy_folder(saved, tmp_path / "unexpected", weights)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_model(folder)


def test_no_weights_or_no_config(saved, tmp_path):
    folder = _copy_folder(saved, tmp_path / "config_only")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(empty)


def test_sharded_checkpoint_loads(saved, tmp_path, input_ids, reference_logits):
    weights = load_file(str(saved / "model.safetensors"))
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    folder = _copy_folder(saved, tmp_path / "sharded")
    weight_map = {}
    for file, file_keys in halves.items():
        save_file({k: weights[k] for k in file_keys}, str(folder / file))
        weight_map.update(dict.fromkeys(file_keys, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not (folder / "model.safetensors").exists()
    torch.testing.assert_close(_logits(load_model(folder), input_ids), reference_logits, rtol=0, atol=1e-6)


def test_pure_config_keys_load(saved, tmp_path, input_ids, reference_logits):
    raw = json.loads((saved / "config.json").read_text())
    raw.update(
        mask_image_logits=False,
        dropout=0.05,
        z_loss_weight=0.0,
        architectures=["ChameleonXLLMXForConditionalGeneration"],
    )
    folder = tmp_path / "pure_config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(saved / "model.safetensors", folder / "model.safetensors")
    config = load_config(folder)
    assert config.vocab_size == raw["vocab_size"]
    assert config.hidden_size == 64
    assert config.mask_image_logits is False
    assert config.dropout == 0.05
    assert config.z_loss_weight == 0.0
    # the model built from it still never masks image logits
    torch.testing.assert_close(_logits(load_model(folder), input_ids), reference_logits, rtol=0, atol=1e-6)


# -- resolving a checkpoint name -----------------------------------------------------------------------


def test_hub_id_offline_fails_quickly_with_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint("nonwhy/PURE")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "--model" in message
    assert "download" in message
    assert "nonwhy/PURE" in message


@pytest.mark.parametrize("name", ["./nope", "nope", "/definitely/not/here", "a/b/c"])
def test_missing_local_path_is_a_load_error(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not a checkpoint folder"):
        resolve_checkpoint(name)
    assert time.monotonic() - start < 10


def test_a_file_is_not_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").write_text("not a folder")
    with pytest.raises(ModelLoadError):
        resolve_checkpoint("org/model")


def test_local_folder_is_returned_as_is(saved):
    assert resolve_checkpoint(saved) == saved
    assert resolve_checkpoint(str(saved)) == saved


# -- attention implementation --------------------------------------------------------------------------


def test_default_attn_implementation(monkeypatch):
    assert default_attn_implementation("cpu", torch.float32) == "sdpa"
    assert default_attn_implementation("cpu", torch.bfloat16) == "sdpa"
    assert default_attn_implementation(torch.device("cuda"), torch.float32) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    assert default_attn_implementation("cuda", torch.bfloat16) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert default_attn_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert default_attn_implementation("cuda:0", torch.float16) == "flash_attention_2"
    assert default_attn_implementation("cpu", torch.bfloat16) == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_forward_on_cuda(saved, input_ids, reference_logits):
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    loaded = load_model(saved, device="cuda", dtype=torch.bfloat16, attn_implementation=attn)
    assert loaded.config._attn_implementation == attn
    logits = _logits(loaded, input_ids.cuda())
    assert logits.device.type == "cuda"
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.cpu(), reference_logits, rtol=0.02, atol=0.3)

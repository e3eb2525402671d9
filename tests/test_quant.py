"""Weight-only quantisation (pure.quant): refused cleanly without torchao; with it, the decoder's linears are
quantised, the LM head is not, logits stay close, and the engine restores through the quantised model.

torchao is not in `make test`'s environment (installed, transformers imports it in every process and it logs
two warnings to stderr on a CPU build); the tests that need it skip there. Run them with
``bash recipes/quant/test.sh``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pure import quant
from pure.memory import weight_bytes as predicted_weight_bytes

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="no torchao here: bash recipes/quant/test.sh"
)


def test_check_quantize_accepts_none_and_names_the_modes():
    quant.check_quantize(None)
    with pytest.raises(ValueError, match="int8, int4"):
        quant.check_quantize("int3")


def test_without_torchao_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(quant, "torchao_available", lambda: False)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[quant\]" -c constraints\.txt'):
        quant.check_quantize("int8")


def test_cli_without_torchao_is_one_error_line_and_exit_2(cli, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(quant, "torchao_available", lambda: False)
    Image.new("RGB", (16, 16), "gray").save(tmp_path / "lq.png")
    done = cli("--input", str(tmp_path / "lq.png"), "--quantize", "int8")
    assert done.returncode == 2
    assert len(done.error_lines) == 1 and "torchao" in done.error_lines[0] and ".[quant]" in done.stderr
    assert not (tmp_path / "lq_pure.png").exists()


def test_eval_spells_the_same_modes():
    from pure.eval.cli import QUANTIZE_MODES

    assert QUANTIZE_MODES == quant.QUANTIZE_MODES


def test_compare_logits_and_greedy_agreement():
    reference = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])
    same = quant.compare_logits(reference, reference)
    assert same.rel_error == 0 and same.top1 == 1 and abs(same.kl) < 1e-7 and same.positions == 2
    flipped = quant.compare_logits(reference.flip(-1), reference)
    assert flipped.top1 == 0.5 and flipped.kl > 0
    assert quant.greedy_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == (0.75, 2)
    assert quant.greedy_agreement(torch.tensor([1, 2]), torch.tensor([1, 2])) == (1.0, 2)


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_keeps_the_head_and_close_logits(tiny_checkpoint, mode):
    from pure.model import load_model

    model = load_model(tiny_checkpoint)
    quantized = load_model(tiny_checkpoint, quantize=mode)
    layer = quantized.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert type(linear.weight) is not torch.nn.Parameter  # a torchao tensor subclass
    # the engine takes rows of these with index_select: they stay plain tensors
    assert type(quantized.lm_head.weight) is torch.nn.Parameter
    assert type(quantized.model.embed_tokens.weight) is torch.nn.Parameter
    assert quantized.config.pure_quantize == mode

    ids = torch.randint(quantized.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        agreement = quant.compare_logits(quantized(input_ids=ids).logits, model(input_ids=ids).logits)
    bound = 0.05 if mode == "int8" else 0.4  # the random model's logits: int8 ~1e-2, int4 ~1e-1
    assert 0 < agreement.rel_error < bound, agreement.line()


@needs_torchao
def test_stored_bytes_match_the_memory_model(tiny_checkpoint):
    from pure.model import load_model

    quantized = load_model(tiny_checkpoint, dtype=torch.bfloat16, quantize="int8")
    stored = quant.weight_bytes(quantized)
    assert sum(stored.values()) == predicted_weight_bytes(quantized, "int8")
    plain = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert sum(quant.weight_bytes(plain).values()) == predicted_weight_bytes(plain, "bf16")
    assert stored["quantized"] < quant.weight_bytes(plain)["other"] - stored["other"]


@needs_torchao
def test_restorer_restores_through_the_int8_model(tiny_checkpoint):
    from PIL import Image

    from pure.restorer import PureRestorer

    restorer = PureRestorer.from_pretrained(tiny_checkpoint, device="cpu", quantize="int8")
    assert restorer.identity["quantize"] == "int8"
    lq = Image.new("RGB", (16, 16), (120, 60, 30))
    result = restorer.restore(lq, seed=0, size=64, temperature=0.0, max_text_tokens=8)
    again = restorer.restore(lq, seed=0, size=64, temperature=0.0, max_text_tokens=8)
    assert result.codes.shape == (8, 8) and torch.equal(result.codes, again.codes)
    assert result.image.size == (64, 64)


def test_unquantized_identity_has_no_quantize_key(tiny_restorer):
    assert "quantize" not in tiny_restorer.identity


def test_bench_without_torchao_is_one_error_line(monkeypatch, capsys):
    from pure import bench

    monkeypatch.setattr(quant, "torchao_available", lambda: False)
    assert bench.main(["--size", "64", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantize:") and ".[quant]" in err[0]


@needs_torchao
def test_bench_decodes_with_int8_linears(capsys):
    from pure import bench

    argv = ["--size", "64", "--temperature", "0", "--repeats", "1", "--skip", "a", "--quantize", "int8"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "float32, int8 linears" in out and "(b) engine" in out
    assert "greedy: identical image tokens across methods: True" in out  # the engine and Jacobi agree

"""Weight-only quantisation of the decoder's linear layers, through torchao (optional: the ``quant`` extra).

Each step of image decoding reads every weight once, so its time is about the bytes it reads: int8 weights
halve the decoder's bytes (4 bits: a quarter), and the 7B model's weights go from 13.2 GiB (bf16) to about
7.2 GiB (int8). Only the linear layers of the decoder layers are quantised (attention q/k/v/o and the MLP:
6.48 B of the 7.08 B parameters). The token embedding and the LM head stay in the model's dtype: the engine
scores image tokens with a copy of the LM head's rows of the image codes (``lm_head.weight.index_select``,
see :mod:`pure.decoding.loop`), which a quantised tensor does not support; the full head serves the text phase
only, tens of an image's ~4,200 steps.

Modes (:data:`QUANTIZE_MODES`):

* ``"int8"``: per-output-channel symmetric int8 weights, activations in the model's dtype
  (``Int8WeightOnlyConfig``); runs on CPU and CUDA.
* ``"int4"``: 4-bit weights with a scale per group of 128 input weights (64 or 32 where a width needs
  it). On CUDA with bf16, tinygemm's packed layout (``Int4WeightOnlyConfig``, asymmetric, a quarter of the
  bytes); elsewhere symmetric 4-bit values kept in int8 storage (``IntxWeightOnlyConfig``): the numerics of
  4-bit weights, for measuring agreement, not their memory.

:func:`quantize_model` takes a model loaded from the bf16 (or fp32) checkpoint; :func:`pure.model.load_model`
does it layer by layer on the target device, so the device never holds the unquantised decoder.
:func:`compare_logits` and ``python -m pure.quant`` measure what it changes (logits and greedy tokens against
the unquantised model).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

QUANTIZE_MODES = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)  # int4 scales per group of input weights: the largest that fits
INSTALL_HINT = 'pip install -e ".[quant]" -c constraints.txt'


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_quantize(mode: str | None) -> None:
    """Fail before any weight loads: ``mode`` is None or one of :data:`QUANTIZE_MODES`, with torchao there.

    Raises ``ValueError`` with the fix in the message.
    """
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} (or None); got {mode!r}")
    if not torchao_available():
        raise ValueError(
            f"quantize={mode!r} needs torchao, which is not installed: {INSTALL_HINT} "
            "(torchao 0.18 with torch >= 2.11)"
        )


def _import_torchao():
    # torchao logs a warning per CUDA extension it cannot load (none exist on a CPU build); its pure
    # PyTorch paths, the ones used here, work without them.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization as ao

    return ao


def quantization_config(mode: str, device: torch.device | str, dtype: torch.dtype, group_size: int = 128):
    """The torchao config of ``mode`` for weights of ``dtype`` on ``device`` (``group_size``: int4's)."""
    check_quantize(mode)
    ao = _import_torchao()
    if mode == "int8":
        return ao.Int8WeightOnlyConfig()
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16:
        return ao.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    from torchao.quantization.granularity import PerGroup

    return ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def int4_group_size(layers: torch.nn.Module) -> int:
    """The largest of :data:`INT4_GROUP_SIZES` dividing every linear's input width (128 at 7B widths)."""
    widths = {m.in_features for m in layers.modules() if _decoder_linear(m, "")}
    for size in INT4_GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(f"int4 needs linear input widths divisible by 32; this model has {sorted(widths)}")


def _decoder_linear(module: torch.nn.Module, name: str) -> bool:
    return type(module) is torch.nn.Linear


def quantize_model(model, mode: str, device: torch.device | str | None = None):
    """Quantise ``model``'s decoder-layer linears in place (``mode``: ``"int8"`` or ``"int4"``); returns it.

    ``device``: where the model ends up; each linear is moved there just before it is quantised, so a model
    loaded on the CPU reaches the GPU holding at most one unquantised linear there at a time. The embedding,
    norms and LM head follow it unquantised.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    quantize_layers(model.model.layers, mode, device, model.dtype)
    model.to(device)
    model.config.pure_quantize = mode  # travels with the model: save_pretrained would say what it holds
    return model


def quantize_layers(layers: torch.nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantise every ``nn.Linear`` inside ``layers`` in place, moving each to ``device`` first."""
    group_size = int4_group_size(layers) if mode == "int4" else 0
    config = quantization_config(mode, device, dtype, group_size)
    from torchao.quantization import quantize_

    with torch.no_grad():
        quantize_(layers, config, filter_fn=_decoder_linear, device=device)


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's weights as stored: ``{"quantized": ..., "other": ...}`` (tensor subclasses are
    counted by their inner tensors: int data, scales, zero points)."""

    def nbytes(t: torch.Tensor) -> int:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            return t.numel() * t.element_size()
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n)) for n in names)

    out = {"quantized": 0, "other": 0}
    for p in model.parameters():
        out["other" if type(p) in (torch.Tensor, torch.nn.Parameter) else "quantized"] += nbytes(p)
    return out


@dataclass
class Agreement:
    """How a model's logits compare with a reference's at the same positions.

    ``rel_error``: ||logits - reference|| / ||reference|| over all positions; ``max_abs``: the largest
    absolute difference; ``top1``: share of positions whose argmax agrees; ``kl``: mean KL(reference || model)
    of the softmaxed logits, nats; ``positions``: how many positions were compared.
    """

    rel_error: float
    max_abs: float
    top1: float
    kl: float
    positions: int

    def line(self) -> str:
        return (
            f"rel. error {self.rel_error:.2e}, max |diff| {self.max_abs:.3g}, argmax agrees "
            f"{self.top1:.2%}, KL {self.kl:.2e} nats ({self.positions} positions)"
        )


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """:class:`Agreement` of ``logits`` with ``reference``, both ``(..., V)`` (compared in fp32)."""
    a, r = logits.float().flatten(0, -2), reference.float().flatten(0, -2)  # (N, V)
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none")
    return Agreement(
        rel_error=((a - r).norm() / r.norm()).item(),
        max_abs=(a - r).abs().max().item(),
        top1=(a.argmax(-1) == r.argmax(-1)).float().mean().item(),
        kl=kl.sum(-1).mean().item(),
        positions=a.shape[0],
    )


def greedy_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """Greedy decodes compared: (share of equal tokens, tokens before the first difference), over all rows."""
    same = (tokens == reference).flatten()
    first = len(same) if bool(same.all()) else int(same.long().argmin())
    return same.float().mean().item(), first


# -- python -m pure.quant: what quantisation changes, measured on CPU ------------------------------------


def _measure_model(
    name: str,
    model,
    input_ids: torch.Tensor,
    modes: list[str],
    keep: torch.Tensor | None = None,
    print_fn=print,
) -> None:
    """Logits at the positions ``keep`` (bool (T,), default all) of ``input_ids`` (B, T) of bf16 and of each
    quantised mode (from the fp32 and from the bf16 weights) against fp32, and of each mode against bf16
    (what quantising the bf16 checkpoint changes). Only the decoder layers are copied to quantise them: the
    model's embedding and head, most of a wide model's memory, are shared."""
    import copy

    def logits_with_quantized_layers(base, mode: str) -> torch.Tensor:
        layers = base.model.layers
        quantized = copy.deepcopy(layers)
        quantize_layers(quantized, mode, torch.device("cpu"), base.dtype)
        base.model.layers = quantized
        try:
            return base(input_ids=input_ids).logits[:, keep]
        finally:
            base.model.layers = layers

    with torch.inference_mode():
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool) if keep is None else keep
        reference = model(input_ids=input_ids).logits[:, keep]  # (B, kept, V) fp32
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        bf16_logits = bf16(input_ids=input_ids).logits[:, keep]
        print_fn(f"{name}: bf16 vs fp32: {compare_logits(bf16_logits, reference).line()}")
        for mode in modes:
            logits = logits_with_quantized_layers(model, mode)
            print_fn(f"{name}: {mode} of fp32 vs fp32: {compare_logits(logits, reference).line()}")
            logits = logits_with_quantized_layers(bf16, mode)
            print_fn(f"{name}: {mode} of bf16 vs fp32: {compare_logits(logits, reference).line()}")
            print_fn(f"{name}: {mode} of bf16 vs bf16: {compare_logits(logits, bf16_logits).line()}")
        del bf16


def wide_layer_model(layers: int = 1, seed: int = 0):
    """PURE's 7B widths (hidden 4096, MLP 11008, 32 heads, 73,728 ids) with ``layers`` decoder layers and
    random weights, fp32 on the CPU (about 1.2 GB per layer plus 2.4 GB of embedding and head)."""
    from pure.bench import build_arch, build_model

    arch = build_arch("7b")
    arch.config.num_hidden_layers = layers
    arch.dtype = torch.float32
    return build_model(arch, torch.device("cpu"), seed, "sdpa"), arch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pure.quant",
        description="What weight-only quantisation changes, on CPU: the greedy restoration of an image by a "
        "checkpoint (default examples/pure-tiny: its text and codes against the fp32 model's), the logits "
        "along it, and the logits of 7B-width decoder layers with random weights, against fp32 and bf16.",
    )
    p.add_argument("--model", default="examples/pure-tiny", help="checkpoint folder (default PURE-tiny)")
    p.add_argument("--image", default="examples/lq_astronaut_128.png", help="LQ image for the greedy run")
    p.add_argument("--modes", default="int8,int4", help="comma-separated of int8,int4 (default both)")
    p.add_argument("--wide-layers", type=int, default=1, help="7B-width decoder layers (0: skip)")
    p.add_argument("--tokens", type=int, default=64, help="sequence length of the 7B-width comparison")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        for mode in modes:
            check_quantize(mode)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image

    from pure.restorer import PureRestorer
    from pure.vq import pil_to_pixels

    start = time.perf_counter()
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, modes {', '.join(modes)}")
    print(f"{args.model}: greedy restoration of {args.image} (temperature 0, guidance 0.8)")
    image = Image.open(args.image)
    restorer = PureRestorer.from_pretrained(args.model, device="cpu")
    reference = restorer.restore(image, seed=0, temperature=0.0)
    print(f"  fp32: {reference.text!r}")
    for mode in modes:
        quantized = PureRestorer.from_pretrained(args.model, device="cpu", quantize=mode)
        result = quantized.restore(image, seed=0, temperature=0.0)
        share, first = greedy_agreement(result.codes.flatten(), reference.codes.flatten())
        print(
            f"  {mode}: {result.text!r}; image codes equal to fp32's: {share:.2%}, identical for the first "
            f"{first} of {reference.codes.numel()}"
        )
        del quantized

    # the logits along that restoration, teacher-forced: the answer's positions (text, image block, <eot>)
    fmt = restorer.format
    lq_up, _ = restorer.upsample_input(image)
    lq_codes = restorer.vq.encode(pil_to_pixels(lq_up)[None])[0]
    answer = fmt.answer_text(reference.degradation, reference.caption)
    ids, labels = fmt.training_example(lq_codes, answer, reference.codes)
    keep = torch.cat([labels[1:] != -100, torch.tensor([False])])  # positions that predict the answer
    _measure_model(f"{args.model} (its restoration)", restorer.model, ids[None], modes, keep)

    if args.wide_layers:
        wide, arch = wide_layer_model(args.wide_layers)
        vocab = arch.tokenizer.vocab
        # image ids: what the decoder reads and writes for ~4,100 of an image's ~4,200 steps
        codes = torch.randint(
            vocab.codebook_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)
        )
        _measure_model(
            f"7B widths, {args.wide_layers} layer(s), random weights (image ids)",
            wide,
            vocab.code_to_id[codes],
            modes,
        )
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

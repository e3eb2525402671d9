"""Predicted peak device memory of one restoration: weights, KV cache and the largest transients, for each
guidance layout and weight quantisation, from the architecture alone (no GPU, no weights).

The peak of a decode is its resident memory (weights, the restorer's VQ, the static KV cache) plus the
larger of two phases' transients, which never coexist:

* the prefill: the prompt's forward over every cache row at once, per decoder layer the residual stream,
  the normed input and the MLP's gate, up and product (``rows * prompt * (3 hidden + 3 intermediate)``
  values), and the 4-D boolean mask over the cache with the additive copies sdpa makes of it
  (:data:`MASK_BYTES`); attention itself is assumed to run in sdpa's memory-efficient kernel (no
  ``prompt x capacity`` score matrix);
* the image phase: the copy of the LM head's rows of the image codes (:mod:`pure.decoding.loop`), and a Jacobi
  window's fp32 code logits.

Weight-only quantised linears (:mod:`pure.quant`) add, in eager mode, one dequantised weight in the model's
dtype while each of them runs (torchao's int8 matmul casts the int8 weight first); the largest is counted.
What this leaves out is small: rotary tables, sampling tensors, per-step logits (a few MB), and the caching
allocator's own slack (reserved beyond allocated, which ``torch.cuda.max_memory_allocated`` does not show).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

TARGET_GB = {"bf16": 22, "int8": 16}  # issue 15: a 24 GB card in bf16, a 16 GB card with int8 weights
LAYOUTS = ("rows", "shared")
WEIGHT_FORMATS = ("bf16", "int8", "int4")
INT8_ROW_BYTES = 5  # per output channel of an int8 linear: fp32 scale + int8 zero point (torchao 0.18)
INT4_GROUP = 128  # input weights per int4 scale-and-zero pair (two bf16), tinygemm's layout on CUDA
# bytes per element of the prefill's (rows, 1, prompt, slots) mask: the boolean mask, and the additive bf16
# copy sdpa converts it to for its memory-efficient kernel, padded to a multiple of 16 slots (a second copy)
MASK_BYTES = 1 + 2 * 2


def default_layout() -> str:
    """The engine's default guidance layout, read from :class:`pure.decoding.loop.RestorationDecoder`."""
    from pure.decoding.loop import RestorationDecoder

    return inspect.signature(RestorationDecoder.__init__).parameters["guidance_layout"].default


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes of one layout and weight format; ``peak`` is resident + the larger phase."""

    layout: str
    weights_format: str
    weights: int
    vq: int
    kv: int
    prefill: int
    image: int

    @property
    def peak(self) -> int:
        return self.weights + self.vq + self.kv + max(self.prefill, self.image)

    @property
    def target_gb(self) -> float | None:
        return TARGET_GB.get(self.weights_format)

    @property
    def fits(self) -> bool | None:
        return None if self.target_gb is None else self.peak <= self.target_gb * 1e9


def kv_slot_bytes(config) -> int:
    """Bytes of one token slot of one cache row: keys and values of every layer, bf16."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2


def decoder_linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.model.layers.modules() if type(m) is torch.nn.Linear]


def weight_bytes(model, weights_format: str) -> int:
    """Bytes of ``model``'s parameters (a meta-device model will do) with the decoder layers' linears in
    ``weights_format`` (``bf16``, ``int8``, ``int4``: what :func:`pure.quant.quantize_model` quantises) and
    everything else in bf16."""
    linears = decoder_linears(model)
    linear_ids = {id(m.weight) for m in linears}
    other = sum(2 * p.numel() for p in model.parameters() if id(p) not in linear_ids)
    quantized = 0
    for m in linears:
        out_f, in_f = m.weight.shape
        if weights_format == "bf16":
            quantized += 2 * out_f * in_f
        elif weights_format == "int8":
            quantized += out_f * in_f + INT8_ROW_BYTES * out_f
        elif weights_format == "int4":
            quantized += out_f * in_f // 2 + 4 * out_f * (in_f // INT4_GROUP)
        else:
            raise ValueError(
                f"weights_format must be one of {', '.join(WEIGHT_FORMATS)}; got {weights_format!r}"
            )
    return other + quantized


@dataclass(frozen=True)
class DecodeShape:
    """The lengths a decode allocates for: prompt, text reserve and image block (tokens), rows, window."""

    prompt: int
    text: int
    block: int
    batch: int = 1
    guidance: bool = True
    window: int = 0  # Jacobi window (0: one token per forward)

    def cache(self, layout: str) -> tuple[int, int]:
        """``(rows, slots per row)`` of the static cache, as
        :meth:`pure.decoding.loop.RestorationDecoder._prefill` allocates it: in "rows" a row per twin, each
        with room for the prompt, text and block; in "shared" the twin's block beside its row's."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        slots = self.prompt + self.text + self.block + self.window
        if not self.guidance:
            return self.batch, slots
        if layout == "rows":
            return 2 * self.batch, slots
        return self.batch, slots + self.block + self.window

    def prefill_rows(self, layout: str) -> int:
        """Rows the prompt runs over: twins included in "rows" (they mirror the text), once in "shared"."""
        return 2 * self.batch if self.guidance and layout == "rows" else self.batch


def estimate_peak(
    config,
    shape: DecodeShape,
    layout: str,
    weights_format: str,
    codebook: int,
    vq_params: int = 0,
    model=None,
) -> PeakEstimate:
    """:class:`PeakEstimate` of a Chameleon ``config`` decoding ``shape`` (``model``: the same architecture
    on the meta device, built here when not given)."""
    if model is None:
        from pure.model import PureForConditionalGeneration

        with torch.device("meta"):
            model = PureForConditionalGeneration(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    slot = kv_slot_bytes(config)
    rows, slots = shape.cache(layout)
    prefill_rows = shape.prefill_rows(layout)
    dequantized = 0
    if weights_format != "bf16":
        dequantized = max(2 * m.weight.numel() for m in decoder_linears(model))
    activations = prefill_rows * shape.prompt * (3 * hidden + 3 * inter) * 2
    # the prefill attends the live slots, the prompt's, compiled or not (pure.decoding.attention)
    mask = prefill_rows * shape.prompt * shape.prompt * MASK_BYTES
    head_rows = codebook * hidden * 2
    window_logits = 2 * shape.batch * shape.window * codebook * 4
    return PeakEstimate(
        layout=layout,
        weights_format=weights_format,
        weights=weight_bytes(model, weights_format),
        vq=4 * vq_params,  # fp32
        kv=rows * slots * slot,
        prefill=activations + mask + dequantized,
        image=head_rows + window_logits + dequantized,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def peak_table(estimates: list[PeakEstimate], default: str) -> list[str]:
    """The estimates as a text table (GiB columns, peak also in GB) with each target's verdict."""
    header = (
        f"{'layout':<8} {'format':<8} {'weights':>8} {'VQ':>6} {'KV cache':>9} {'prefill':>8} "
        f"{'image':>6} {'peak GiB':>9} {'peak GB':>8}  target"
    )
    lines = [header, "-" * len(header)]
    for e in estimates:
        verdict = "-" if e.fits is None else f"{e.target_gb:g} GB: {'fits' if e.fits else 'does NOT fit'}"
        mark = " (default)" if e.layout == default else ""
        lines.append(
            f"{e.layout:<8} {e.weights_format:<8} {_gib(e.weights):>8} {_gib(e.vq):>6} {_gib(e.kv):>9} "
            f"{_gib(e.prefill):>8} {_gib(e.image):>6} {_gib(e.peak):>9} {e.peak / 1e9:>8.1f}  {verdict}{mark}"
        )
    return lines

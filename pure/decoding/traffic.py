"""Bytes one image step reads from device memory: what sets its time on a GPU, where decoding a 7B model one
token at a time is memory-bound (a step's time is about its bytes over the memory bandwidth).

A step reads the decoder layers' weights, the LM head's rows of the image codes (:mod:`pure.decoding.loop`
scores the codes only) and, in every layer, keys and values of the KV cache. How much of the cache depends on
the attention (:mod:`pure.decoding.attention`) and the guidance layout:

* ``"capacity"``: the whole preallocated cache, every step (sdpa given the static cache's full width, as
  the engine did before it sliced its masks);
* ``"live"``: the slots in use, ``[:length]`` (the eager path: sdpa on a sliced cache). In the "rows"
  layout a guidance twin's row is as long as its conditional row, so the twin reads the prompt's slots it
  never attends;
* ``"blocks"``: the 128-slot blocks that hold a slot some query of the row sees (the compiled path: flex
  attention with a block mask). A twin row reads its image block only.

The ideal is the slots that are attended: per image, prompt + text + image so far for the conditional
context and the image so far for its twin. Embedding lookups, norms, the new token's keys and values, and
logits are a few MB and left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from pure.decoding.attention import KV_BLOCK
from pure.memory import DecodeShape, decoder_linears, kv_slot_bytes, weight_bytes

READS = ("capacity", "live", "blocks")


@dataclass(frozen=True)
class StepTraffic:
    """Mean bytes read per image step over a whole image."""

    layout: str
    weights_format: str
    reads: str
    weights: int  # decoder layers and final norm
    head: int  # the LM head's rows of the image codes
    kv: float  # keys and values, mean over the image's steps
    ideal_kv: float  # the attended slots only

    @property
    def total(self) -> float:
        return self.weights + self.head + self.kv

    @property
    def ideal(self) -> float:
        return self.weights + self.head + self.ideal_kv


def _blocks(start: int, end: int) -> int:
    """Slots in the 128-slot blocks that hold any of the slots ``start .. end - 1``."""
    return 0 if end <= start else (-(-end // KV_BLOCK) - start // KV_BLOCK) * KV_BLOCK


def step_traffic(
    config, model, shape: DecodeShape, layout: str, weights_format: str, codebook: int, reads: str, text: int
) -> StepTraffic:
    """:class:`StepTraffic` of one image step of ``model`` (any device, meta will do) with ``config``, for a
    decode allocated as ``shape`` whose answer text is ``text`` tokens (the cache reserves ``shape.text``)."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}; got {reads!r}")
    hidden = config.hidden_size
    slot = kv_slot_bytes(config)
    table = model.model.embed_tokens.weight.numel() * 2 + model.lm_head.weight.numel() * 2  # bf16, not read
    weights = weight_bytes(model, weights_format) - table
    head = codebook * hidden * 2
    rows, capacity = shape.cache(layout)
    context = shape.prompt + text + 3  # prompt, answer text, <boi> <grid h> <grid w>
    kv = ideal = 0.0
    for t in range(shape.block):  # image tokens already in the cache before step t
        attended = context + t + (3 + t if shape.guidance else 0)
        if reads == "capacity":
            read = rows // shape.batch * capacity
        elif not shape.guidance:
            read = context + t if reads == "live" else _blocks(0, context + t)
        elif layout == "shared":  # the twin's slots interleave with its row's: one row, both contexts
            length = context + 2 * (3 + t)
            read = length if reads == "live" else _blocks(0, length)
        elif reads == "live":  # a twin row is as long as its conditional row
            read = 2 * (context + t)
        else:
            read = _blocks(0, context + t) + _blocks(context - 3, context + t)
        kv += shape.batch * read * slot
        ideal += shape.batch * attended * slot
    return StepTraffic(layout, weights_format, reads, weights, head, kv / shape.block, ideal / shape.block)


def traffic_table(rows: list[StepTraffic], bandwidth: float) -> list[str]:
    """The rows as text (GB per step, ms at ``bandwidth`` bytes/s, and the ratio to the ideal)."""
    header = (
        f"{'layout':<7} {'format':<6} {'reads':<9} {'weights':>7} {'head':>5} {'KV':>6} {'total GB':>8} "
        f"{'ms/step':>7} {'vs ideal':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.layout:<7} {r.weights_format:<6} {r.reads:<9} {r.weights / 1e9:>7.2f} {r.head / 1e9:>5.2f} "
            f"{r.kv / 1e9:>6.2f} {r.total / 1e9:>8.2f} {1e3 * r.total / bandwidth:>7.2f} "
            f"{r.total / r.ideal - 1:>+8.1%}"
        )
    return lines


H200_BANDWIDTH = 4.8e12  # bytes/s, an H200's HBM3e
H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H200 (torchao's int8 weights compute in bf16)


@dataclass(frozen=True)
class ForwardCost:
    """Roofline time of one image forward that feeds ``fed`` tokens per image: reading the step's bytes
    (:class:`StepTraffic`, the same whatever it feeds, up to the new tokens' keys and values) or computing,
    whichever takes longer. Computing is 2 FLOPs per weight of the decoder's linears and image-code head rows,
    and 4 per attended key and channel, for every query position (a guidance twin's too)."""

    traffic: StepTraffic
    linear_flops: float  # per query position: decoder linears and the image codes' head rows
    attention_flops: float  # per query position, over the mean attended context
    positions_per_token: int  # 2 with guidance: a token's twin is a query too
    images: int = 1  # decoded together

    def seconds(self, fed: int, bandwidth: float, flops: float = H200_BF16_FLOPS) -> float:
        return max(self.traffic.total / bandwidth, fed * self._token_flops() / flops)

    def free_tokens(self, bandwidth: float, flops: float = H200_BF16_FLOPS) -> int:
        """The most tokens a forward feeds per image before computing outlasts reading (at peak FLOPs: real
        kernels reach less, so fewer)."""
        return int(self.traffic.total / bandwidth * flops / self._token_flops())

    def _token_flops(self) -> float:  # a token fed to every image of the batch
        return self.images * self.positions_per_token * (self.linear_flops + self.attention_flops)


def forward_cost(config, model, shape: DecodeShape, traffic: StepTraffic, codebook: int) -> ForwardCost:
    """:class:`ForwardCost` of ``model`` (meta will do) with ``config``, decoding ``shape``, whose step reads
    ``traffic``."""
    hidden = config.hidden_size
    linears = sum(m.weight.numel() for m in decoder_linears(model)) + codebook * hidden
    slot = kv_slot_bytes(config)
    attended = traffic.ideal_kv / slot / shape.batch  # per image: its row's context and its twin's
    positions = 2 if shape.guidance else 1
    per_position = attended / positions * config.num_hidden_layers * hidden * 4
    return ForwardCost(traffic, 2.0 * linears, per_position, positions, shape.batch)


def forward_cost_table(costs: list[ForwardCost], fed: list[int], bandwidth: float) -> list[str]:
    """Milliseconds per forward against tokens fed per image, one row per cost."""
    header = f"{'format':<6} " + " ".join(f"{n:>7}" for n in fed) + f" {'free up to':>10}"
    lines = [header, "-" * len(header)]
    for c in costs:
        cells = " ".join(f"{1e3 * c.seconds(n, bandwidth):>7.2f}" for n in fed)
        lines.append(f"{c.traffic.weights_format:<6} {cells} {c.free_tokens(bandwidth):>10}")
    return lines

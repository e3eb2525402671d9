"""``python -m pure.bench``: image decoding speed, side by side, on a random model. See ``--help``.

Three ways to decode the same image block after the same prompt (instruction, LQ image, answer text):

(a) ``model.generate`` with transformers' own classifier-free guidance (``guidance_scale`` with
    ``negative_prompt_ids``: :class:`~transformers.UnbatchedClassifierFreeGuidanceLogitsProcessor` runs the
    unconditional branch as a second, unbatched forward per token, like the original PURE code) plus this
    project's processors (grid constraint, entropy top-k) and transformers' temperature warper;
(b) :class:`pure.decoding.loop.RestorationDecoder`: guidance rows in the same batched forward, a static cache,
    no host sync per token;
(c) the engine with speculative Jacobi decoding (:mod:`pure.decoding.jacobi`).

All three sample the same distribution: transformers' guidance mixes log-softmaxed scores, which differ
from the engine's raw logits by a per-row constant that the softmax removes. The weights are random (no
download): the figures are about speed and memory, not images. ``--arch 7b`` builds Chameleon-7B's
architecture with PURE's 73,728-id vocabulary on the meta device and materialises it in bf16 on the GPU.

``--model DIR`` measures a trained checkpoint instead: forward passes per image of every decoding of the
image, lossless and lossy, and what the lossy ones cost on a hold-out (:mod:`pure.bench_passes`).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from dataclasses import dataclass, replace

import torch
from tokenizers import Tokenizer, models
from transformers import ChameleonConfig, LogitsProcessorList
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from pure.decoding.jacobi import DEFAULT_WINDOW
from pure.decoding.loop import GUIDANCE_LAYOUTS, RestorationDecoder, SamplingConfig
from pure.decoding.sampling import EntropyTopKLogitsWarper, ImageGridConstraintLogitsProcessor
from pure.decoding.traffic import H200_BANDWIDTH
from pure.memory import DecodeShape, default_layout, kv_slot_bytes
from pure.model import PureForConditionalGeneration, default_attn_implementation
from pure.quant import check_quantize
from pure.sequence import LATENT_PER_GRID, SequenceFormat
from pure.tokenizer import PureTokenizer
from pure.vocab import (
    BOI_NAME,
    BOS_NAME,
    EOI_NAME,
    PAD_NAME,
    PureVocab,
    grid_token_name,
    image_token_name,
)

VQ_DOWNSAMPLE = 8  # LlamaGen VQ-8: one code per 8x8 px
PURE_VOCAB = 73_728  # spec 1.5: Chameleon's 65,536 ids + 8,192 more image codes
PURE_CODEBOOK = 16_384
INSTRUCTION_TOKENS = 20  # PURE's instruction in Chameleon's BPE, about
ANSWER_TOKENS = 60  # "Medium blur, small noise. The image features ..." (60-120 in practice)
MAX_GRID = 32  # grid-size tokens named in the synthetic vocabulary (1024 px)


@dataclass
class Arch:
    config: ChameleonConfig
    tokenizer: PureTokenizer
    dtype: torch.dtype


def pure_like_names(vocab_size: int = PURE_VOCAB, codebook: int = PURE_CODEBOOK) -> dict[str, int]:
    """A ``{name: id}`` map laid out like PURE's vocabulary (spec 1.1, 1.5), without its BPE text.

    ``<s> <pad> </s> <unk>``, codes ``[0, K/2)`` at ids ``4..``, ``<eoss> <racm3:break>``, then
    ``<reservedNNNNN>`` for id ``NNNNN + 4`` (so end-of-turn, row newline and grid tokens land on
    PURE's ids), filler text names, and codes ``[K/2, K)`` in the last ``K/2`` ids.
    """
    half = codebook // 2

    def reserved_id(name: str) -> int:  # `<reservedNNNNN>` is id NNNNN + 4 in Chameleon's vocabulary
        return int(name.removeprefix("<reserved").removesuffix(">")) + 4

    names = {BOS_NAME: 0, PAD_NAME: 1, "</s>": 2, "<unk>": 3}
    names.update({image_token_name(c): 4 + c for c in range(half)})
    names[EOI_NAME], names[BOI_NAME] = 4 + half, 5 + half
    last_reserved = reserved_id(grid_token_name(MAX_GRID))
    names.update({f"<reserved{i - 4:05d}>": i for i in range(names[BOI_NAME] + 1, last_reserved + 1)})
    names.update({f"text{i}": i for i in range(last_reserved + 1, vocab_size - half)})
    names.update({image_token_name(c): vocab_size - half + (c - half) for c in range(half, codebook)})
    return names


def build_arch(arch: str) -> Arch:
    """The model configuration and vocabulary of ``tiny`` (the tests' model) or ``7b``."""
    if arch == "tiny":
        from pure.make_random_checkpoint import TINY_VQ, tiny_config
        from pure.tokenizer import build_byte_tokenizer

        text = build_byte_tokenizer(TINY_VQ.codebook_size)
        tokenizer = PureTokenizer(text, PureVocab.from_names(text.get_vocab(with_added_tokens=True)))
        return Arch(tiny_config(tokenizer), tokenizer, torch.float32)
    names = pure_like_names()
    vocab = PureVocab.from_names(names, PURE_VOCAB)
    text = Tokenizer(models.WordLevel(vocab=names, unk_token="<unk>"))  # names only: no text to encode
    config = ChameleonConfig(
        vocab_size=PURE_VOCAB,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=11776,
        bos_token_id=vocab.bos,
        pad_token_id=vocab.pad,
        eos_token_id=vocab.eot,
        vocabulary_map=names,
        vq_config={
            "base_channels": 32,
            "channel_multiplier": [1],
            "num_res_blocks": 1,
            "latent_channels": 32,
        },
    )
    return Arch(config, PureTokenizer(text, vocab), torch.bfloat16)


def build_model(
    arch: Arch, device: torch.device, seed: int, attn: str | None = None
) -> PureForConditionalGeneration:
    """Random weights, built on the meta device and materialised on ``device`` (one copy, no download).
    ``attn``: the attention implementation (default: flash-attention 2 on CUDA when installed, else sdpa)."""
    arch.config._attn_implementation = attn or default_attn_implementation(device, arch.dtype)
    with torch.device("meta"):
        model = PureForConditionalGeneration(arch.config).to(arch.dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, arch.config.initializer_range, generator=generator)
    model.model.rotary_emb = ChameleonRotaryEmbedding(arch.config).to(device)
    return model.eval().requires_grad_(False)


def synthetic_prompt(
    fmt: SequenceFormat, h: int, w: int, gen: torch.Generator, answer_tokens: int = ANSWER_TOKENS
) -> torch.Tensor:
    """``<s>`` instruction, random ``h x w`` LQ block, ``<eot>``, ``answer_tokens`` of answer text (random
    text ids): 1-D int64."""
    v = fmt.vocab
    text_ids = (~v.inside_image_mask() & ~v.image_mask()).nonzero().flatten()
    text_ids = text_ids[~torch.isin(text_ids, torch.tensor([v.bos, v.pad, v.eot, v.boi]))]

    def text(n: int) -> torch.Tensor:
        return text_ids[torch.randint(len(text_ids), (n,), generator=gen)]

    lq = torch.randint(v.codebook_size, (h, w), generator=gen)
    bos, eot = torch.tensor([v.bos]), torch.tensor([v.eot])
    return torch.cat([bos, text(INSTRUCTION_TOKENS), fmt.image_block(lq), eot, text(answer_tokens)])


class PassCounter:
    """Counts the model's forward calls and remembers every KV cache it returned or, for an engine
    (whose forwards are ``model.decode`` calls, which module hooks do not see), allocated (to size them)."""

    def __init__(self, model, decoder: RestorationDecoder | None = None):
        self.calls = 0
        self.caches: dict[int, object] = {}
        self.handle = model.register_forward_hook(self)
        self.decoder = decoder
        if decoder is not None:
            make_cache = decoder._make_cache

            def record(capacity: int):
                cache = make_cache(capacity)
                self.caches[id(cache)] = cache
                return cache

            decoder._make_cache = record

    def __call__(self, module, args, output):
        self.calls += 1
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self.caches[id(cache)] = cache

    def cache_bytes(self) -> int:
        total = 0
        for cache in self.caches.values():
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    def close(self) -> None:
        self.handle.remove()
        if self.decoder is not None:
            del self.decoder._make_cache  # the class's method again


@dataclass
class Result:
    name: str
    seconds: float
    steps: int  # image tokens per row
    batch: int
    passes: int
    peak_bytes: int | None
    kv_bytes: int
    tokens: torch.Tensor  # (B, steps) the image tokens after the grid tokens

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


def run_generate(model, fmt, prompts, h, w, s: SamplingConfig, seed: int) -> tuple[torch.Tensor, None]:
    """(a): transformers' generate with its unbatched guidance and the project's processors."""
    v = fmt.vocab
    head = torch.tensor(fmt.grid_tokens(h, w), device=prompts.device).expand(prompts.shape[0], -1)
    steps = h * (w + 1) + 1
    torch.manual_seed(seed)  # generate samples from the global generator
    sample = s.temperature > 0
    out = model.generate(
        torch.cat([prompts, head], dim=1),
        attention_mask=torch.ones_like(prompts[:, :1]).expand(-1, prompts.shape[1] + 3),
        logits_processor=LogitsProcessorList(
            [ImageGridConstraintLogitsProcessor(v, h, w), EntropyTopKLogitsWarper(s.min_k, s.max_k)]
        ),
        guidance_scale=s.cfg_scale,
        negative_prompt_ids=head,  # the unconditional context: the image block alone (spec 4.2)
        do_sample=sample,
        # transformers' default top-k 50 would cut the entropy top-k's k
        **({"temperature": s.temperature, "top_k": 0, "top_p": 1.0} if sample else {}),
        max_new_tokens=steps,  # <eot> cannot end it early: the constraint forbids it inside the image
        eos_token_id=v.eot,
        pad_token_id=v.pad,
    )
    return out[:, -steps:], None  # passes: counted by the model's forward hook


def measure(name: str, fn, model, device: torch.device, steps: int, batch: int, decoder=None) -> Result:
    counter = PassCounter(model, decoder)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        tokens, passes = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        counter.close()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    passes = counter.calls if passes is None else passes  # the engine counts its own
    return Result(name, seconds, steps, batch, passes, peak, counter.cache_bytes(), tokens.cpu())


STEP_EVENT = "pure::image_step"
_NOT_KERNELS = ("aten::empty", "aten::resolve_", "aten::lift", "aten::detach", "aten::result_type")


def _is_kernel(name: str) -> bool:
    """Whether a profiler event launches work on a device: inductor's generated kernels, and aten operators
    that compute (not views, allocations or metadata)."""
    if "cpp_fused" in name or "triton_" in name:
        return True
    if not name.startswith("aten::") or name.startswith(_NOT_KERNELS):
        return False
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return True
    schema = packet.default._schema if "default" in packet.overloads() else None
    returns = [] if schema is None else schema.returns
    return not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write)


def kernels_per_step(decoder: RestorationDecoder, run) -> float:
    """Kernels launched per image step of ``run()`` (a decode by ``decoder``), counted with the profiler on
    the host: each step call is wrapped in a :data:`STEP_EVENT` range and the outermost compute operators
    and generated kernels inside it are counted (an operator's own sub-operators are one launch of it)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    compiled_fn = decoder._compiled_fn

    def marked(fn, device):
        step = compiled_fn(fn, device)

        def call(*args):
            with record_function(STEP_EVENT):
                return step(*args)

        return call

    decoder._compiled_fn = marked
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        del decoder._compiled_fn  # the class's method again

    def count(event) -> int:
        if _is_kernel(event.name):
            return 1
        return sum(count(child) for child in event.cpu_children)

    steps = [e for e in prof.events() if e.name == STEP_EVENT]
    return sum(count(e) for e in steps) / max(len(steps), 1)


def per_step_table(args, arch, model, prompts, h_out, lat, results, compile_flag) -> list[str]:
    """Per image step of each engine method: forward passes per image, bytes read (from the layout, the
    lengths and the weights' format: the model a memory-bound GPU follows, :mod:`pure.decoding.traffic`),
    and kernels launched, eager and (when compiling) compiled, counted with the profiler."""
    from pure.decoding.traffic import step_traffic

    layout = args.guidance_layout
    shape = DecodeShape(prompts.shape[1], 0, SequenceFormat.image_block_length(h_out, lat), args.batch_size)
    fmt = SequenceFormat(arch.tokenizer)
    reads = "blocks" if compile_flag else "live"
    codebook = len(fmt.vocab.code_to_id)
    traffic = step_traffic(arch.config, model, shape, layout, args.quantize or "bf16", codebook, reads, 0)
    sampling = SamplingConfig(cfg_scale=args.cfg, temperature=args.temperature)
    gens = [torch.Generator(prompts.device).manual_seed(i) for i in range(args.batch_size)]
    lines = [
        f"per forward pass of the image phase ({layout} layout; bytes read: {args.quantize or 'bf16'} "
        f"weights and the cache {'blocks' if compile_flag else 'slots'} in use, one token per row; the ideal "
        "reads the attended slots only)",
        f"{'method':<28} {'passes/image':>12} {'GB/step':>8} {'vs ideal':>8} {'kernels eager':>13} "
        f"{'kernels compiled':>16}",
    ]
    for r in results:
        key = r.name[1]
        if key == "a":
            continue
        counts = []
        for compiled in (False, compile_flag) if compile_flag else (False,):
            jacobi = args.jacobi_window if key == "c" else 0
            variant = replace(sampling, jacobi_window=jacobi)
            decoder = RestorationDecoder(model, fmt, variant, compiled, layout)
            with torch.inference_mode():
                counts.append(
                    kernels_per_step(decoder, lambda d=decoder: d.generate_image(prompts, h_out, lat, gens))
                )
        compiled_count = f"{counts[1]:.0f}" if len(counts) > 1 else "-"
        lines.append(
            f"{r.name:<28} {r.passes / r.batch:>12.0f} {traffic.total / 1e9:>8.4f} "
            f"{traffic.total / traffic.ideal - 1:>+8.1%} {counts[0]:>13.0f} {compiled_count:>16}"
        )
    return lines


def forward_share(decoder: RestorationDecoder, run) -> float:
    """The share of ``run()``'s time that the decoder spends in the model's forwards, timed on the host
    (CPU only: on a GPU the host times launches, not work)."""
    spent = 0.0

    def timed(*args, **kwargs):
        nonlocal spent
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent += time.perf_counter() - start

    forward = decoder._forward
    decoder._forward = timed
    try:
        start = time.perf_counter()
        run()
        return spent / (time.perf_counter() - start)
    finally:
        del decoder._forward  # the class's method again


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def traffic_estimate(config, model, shape, bandwidth: float = H200_BANDWIDTH) -> list[str]:
    """Bytes one image step reads, averaged over the image, for each layout, weight format and attention path
    (:mod:`pure.decoding.traffic`), with an answer text of :data:`ANSWER_TOKENS` tokens."""
    from pure.decoding.traffic import READS, step_traffic, traffic_table

    rows = [
        step_traffic(config, model, shape, layout, fmt, PURE_CODEBOOK, reads, ANSWER_TOKENS)
        for layout in GUIDANCE_LAYOUTS
        for fmt in ("bf16", "int8")
        for reads in READS
    ]
    title = (
        f"bytes read per image step, mean over the image (pure.decoding.traffic; reads: capacity = the whole "
        f"cache, live = the slots in use (eager), blocks = the 128-slot blocks in use (compiled); ms at "
        f"{bandwidth / 1e12:g} TB/s)"
    )
    return [title, *("  " + line for line in traffic_table(rows, bandwidth))]


FED = (1, 4, 16, 32, 64, 128, 256, 1024)


def restoration_shape(lat: int, batch: int = 1) -> DecodeShape:
    """The lengths a restoration of a ``lat`` x ``lat`` code image allocates for: a prompt of the instruction
    and the LQ image's block, the default text reserve, the output's block."""
    block = SequenceFormat.image_block_length(lat, lat)
    return DecodeShape(1 + INSTRUCTION_TOKENS + block + 1, SamplingConfig().max_text_tokens, block, batch)


def forward_costs(config, model, shape) -> dict:
    """Weight format -> :class:`pure.decoding.traffic.ForwardCost` of the default layout, compiled reads."""
    from pure.decoding.traffic import forward_cost, step_traffic

    layout = default_layout()
    return {
        fmt: forward_cost(
            config,
            model,
            shape,
            step_traffic(config, model, shape, layout, fmt, PURE_CODEBOOK, "blocks", ANSWER_TOKENS),
            PURE_CODEBOOK,
        )
        for fmt in ("bf16", "int8")
    }


PROJECTED = (  # (name, row lag, Jacobi window) of the projection's decodings
    ("one token per forward", 0, 0),
    ("Jacobi 16", 0, 16),
    ("rows, lag 4 (lossy)", 4, 0),
    ("rows, lag 4, Jacobi 4 (fronts)", 4, 4),
    ("rows, lag 4, Jacobi 16 (fronts)", 4, 16),
)


def projected_forwards(lat: int, lag: int, window: int, p: float, seed: int = 0) -> list[int]:
    """Tokens fed per image by each body forward of a ``lat`` x ``lat`` image (compiled: padded as the
    decodings pad), were each draft accepted independently with probability ``p``."""
    import random

    from pure.decoding.fronts import padded, schedule
    from pure.decoding.rows import row_schedule

    rng = random.Random(seed)

    def accepted(row: int, m: int) -> int:  # leading drafts accepted of a window of m
        a = 0
        while a < m - 1 and rng.random() < p:
            a += 1
        return a

    n_body = lat * (lat + 1)
    if lag and window:
        return [padded(sum(m for _, m in active)) for active in schedule(lat, lat, lag, window, accepted)[0]]
    if lag:
        rows = list(row_schedule(lat, lat, lag))
        return [max(last - first + 1 for _, first, last in rows)] * len(rows)  # compiled: the most rows
    fed, done = [], 1  # the header's forward decided body index 0
    while done <= n_body:  # the body and <eoi>
        fed.append(window or 1)
        done += accepted(0, window) + 1 if window else 1
    return fed


def speed_projection(costs: dict, lat: int, ps=(0.6, 0.8), bandwidth: float = H200_BANDWIDTH) -> list[str]:
    """Seconds of the image phase per image on an H200, projected (not measured): the roofline of each forward
    (:func:`forward_costs`) over the forwards :func:`projected_forwards` counts."""
    header = f"{'decoding':<32} {'p':>4} {'forwards':>8} {'fed/fwd':>7} " + " ".join(
        f"{'s ' + fmt:>7}" for fmt in costs
    )
    lines = [header, "-" * len(header)]
    for name, lag, window in PROJECTED:
        for p in ps if window else (None,):
            fed = [3, *projected_forwards(lat, lag, window, p or 0.0)]  # the header's forward first
            seconds = [sum(c.seconds(n, bandwidth) for n in fed) for c in costs.values()]
            lines.append(
                f"{name:<32} {'-' if p is None else f'{p:.1f}':>4} {len(fed):>8} {sum(fed) / len(fed):>7.1f} "
                + " ".join(f"{s:>7.2f}" for s in seconds)
            )
    return lines


def forward_cost_estimate(costs: dict, bandwidth: float = H200_BANDWIDTH) -> list[str]:
    """Roofline milliseconds of one image forward against the tokens it feeds per image (a window, a token
    per row, the fronts' tokens), for :func:`forward_costs`' ``costs`` (:mod:`pure.decoding.traffic`):
    how many tokens a forward takes before it costs more than one."""
    from pure.decoding.traffic import H200_BF16_FLOPS, forward_cost_table

    layout = default_layout()
    title = (
        f"ms per image forward against tokens fed per image (roofline: reading the step's bytes at "
        f"{bandwidth / 1e12:g} TB/s or computing at {H200_BF16_FLOPS / 1e12:g} TFLOPS, an H200's bf16 peak, "
        f"whichever is longer; '{layout}' layout, guidance on, compiled reads; 'free up to': tokens per "
        "forward before computing outlasts reading, fewer at real kernels' efficiency)"
    )
    return [title, *("  " + line for line in forward_cost_table(list(costs.values()), list(FED), bandwidth))]


def memory_estimate(size: int = 512, batch: int = 1, window: int = DEFAULT_WINDOW) -> list[str]:
    """Analytic memory of the 7B model, guidance on, at ``size`` px (no GPU needed): the KV cache's sizes
    and, for each guidance layout and weight format, the predicted peak against issue 15's targets
    (:mod:`pure.memory`)."""
    from pure.memory import (
        LAYOUTS,
        TARGET_GB,
        WEIGHT_FORMATS,
        estimate_peak,
        peak_table,
    )
    from pure.vq import VQConfig, VQModel

    arch = build_arch("7b")
    c = arch.config
    with torch.device("meta"):
        model = PureForConditionalGeneration(c)
        vq_params = sum(p.numel() for p in VQModel(VQConfig()).parameters())
    n_params = sum(p.numel() for p in model.parameters())
    weights = n_params * 2
    lat = size // VQ_DOWNSAMPLE
    shape = restoration_shape(lat, batch)
    prompt, text, block = shape.prompt, shape.text, shape.block
    slot = kv_slot_bytes(c)
    rows, capacity = shape.cache("rows")
    kv = rows * capacity * slot
    kv_jacobi = rows * (capacity + window) * slot
    wasted = batch * (prompt + text) * slot  # twin rows' slots for a prompt and text they never attend
    interleaved = slot * shape.cache("shared")[1] * batch  # the "shared" guidance layout
    interleaved_jacobi = batch * (prompt + text + 2 * block + 2 * window) * slot
    logits = 2 * batch * window * PURE_CODEBOOK * 4  # the window scores the image codes only
    head_rows = PURE_CODEBOOK * c.hidden_size * 2
    lines = [
        f"memory estimate: 7B architecture ({n_params / 1e9:.2f} B parameters), bf16, {size}x{size} output, "
        f"guidance on, batch {batch}",
        f"  weights                                  {gib(weights)}",
        f"  KV cache per token slot and row          {slot / 2**20:.2f} MiB "
        f"({c.num_hidden_layers} layers x K,V x {c.hidden_size} x 2 B)",
        f"  KV cache as allocated (2 rows x {capacity} slots: prompt {prompt} + text reserve {text} + "
        f"block {block})  {gib(kv)}   (Jacobi: + {window} slots per row: {gib(kv_jacobi)})",
        f"  fp32 logits of a Jacobi window           {gib(logits)}",
        f"  image codes' LM-head rows                {gib(head_rows)} (a copy per decode)",
        f"  weights + KV cache                       {gib(weights + kv)} = {(weights + kv) / 1e9:.1f} GB",
        f"  of which the twins' prompt/text slots     {gib(wasted)} (allocated, never attended)",
        f"  guidance_layout='shared' (twin in its row) {gib(weights + interleaved)} = "
        f"{(weights + interleaved) / 1e9:.1f} GB (KV {gib(interleaved)}: prompt, text, 2 blocks; "
        f"Jacobi {gib(interleaved_jacobi)})",
        "",
        f"predicted peak (pure.memory), 7B, {size}x{size}, guidance on, batch {batch}, one token per "
        "forward; GiB unless marked; format: the decoder layers' linears' (the rest bf16); VQ fp32",
    ]
    default = default_layout()
    estimates = [
        estimate_peak(c, shape, layout, fmt, PURE_CODEBOOK, vq_params, model)
        for layout in LAYOUTS
        for fmt in WEIGHT_FORMATS
    ]
    lines += ["  " + line for line in peak_table(estimates, default)]
    for label, variant in (
        (f"with Jacobi {window}", DecodeShape(prompt, text, block, batch, window=window)),
    ):
        for fmt in TARGET_GB:
            e = estimate_peak(c, variant, default, fmt, PURE_CODEBOOK, vq_params, model)
            lines.append(f"  {label}, '{default}' layout, {fmt}: peak {gib(e.peak)} = {e.peak / 1e9:.2f} GB")
    for fmt, target in TARGET_GB.items():
        fit = [e.layout for e in estimates if e.weights_format == fmt and e.fits]
        lines.append(
            f"  {target} GB peak target ({fmt}): default layout '{default}' "
            f"{'fits' if default in fit else 'does NOT fit'}; fitting layouts: {', '.join(fit) or 'none'}"
        )
    costs = forward_costs(c, model, shape)
    lines += ["", *traffic_estimate(c, model, shape)]
    lines += ["", *forward_cost_estimate(costs)]
    lines += [
        "",
        f"projected seconds of the image phase per image on an H200, {size}x{size}, batch {batch}, compiled "
        "(not a measurement: the roofline above per forward, and drafts accepted independently with "
        "probability p; PURE-tiny v2's coupled Jacobi 16 accepts as if p were about 0.83)",
        *("  " + line for line in speed_projection(costs, lat)),
    ]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.bench",
        description="Decode one image block three ways on a random model and compare speed and memory: "
        "(a) transformers' generate with its own unbatched guidance, (b) the engine, (c) the engine "
        "with speculative Jacobi decoding. With --model, a trained checkpoint's forward passes per image "
        "for every decoding of the image instead (lossless and lossy, with the hold-out cost of the lossy).",
    )
    p.add_argument("--arch", choices=["tiny", "7b"], default="tiny", help="tiny (CPU, default) or 7b (GPU)")
    trained = p.add_argument_group(
        "a trained checkpoint instead (--model): forward passes per image of every decoding of the image "
        "(one token, Jacobi: independent, coupled, coupled with LQ drafts; row-parallel at --lags, alone and "
        "with speculative fronts), and the lossy ones' hold-out fidelity against one token per forward "
        "(pure.bench_passes)"
    )
    trained.add_argument("--model", help="checkpoint folder, e.g. examples/pure-tiny")
    trained.add_argument(
        "--holdout",
        help="folder (or glob) of held-out HQ images (default: 4 scikit-image photos and 4 generated scenes)",
    )
    trained.add_argument("--lags", default="1,2,4,8", help="row-parallel lags (default 1,2,4,8)")
    trained.add_argument("--seeds", default="0,1", help="degradation and sampling seeds (default 0,1)")
    trained.add_argument(
        "--crops-per-image", type=int, default=1, help="crops per hold-out image (default 1)"
    )
    p.add_argument("--size", type=int, help="output side in px (default 128 tiny, 512 7b)")
    p.add_argument("--batch-size", type=int, default=1, help="images decoded together (default 1)")
    p.add_argument("--cfg", type=float, default=0.8, help="guidance scale (default 0.8; 1 = off)")
    p.add_argument("--temperature", type=float, default=0.9, help="0 = greedy (outputs then compared)")
    p.add_argument("--jacobi-window", type=int, default=DEFAULT_WINDOW, help="(c)'s window (default 16)")
    p.add_argument("--steps-limit", type=int, help="generate only the first rows, about this many tokens")
    p.add_argument(
        "--compile",
        action="store_true",
        help="(b) and (c) with compile=True: CUDA graphs on CUDA, no-op on CPU",
    )
    p.add_argument(
        "--compile-backend", help="(b) and (c) compiled with this torch.compile backend, e.g. inductor on CPU"
    )
    p.add_argument(
        "--guidance-layout",
        choices=GUIDANCE_LAYOUTS,
        default=GUIDANCE_LAYOUTS[0],
        help="(b) and (c): twins inside their row's cache (shared, the engine's default: no slots for a "
        "prompt the twin never sees) or a cache row per guidance twin (rows)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="weight-only quantisation of the decoder layers' linears (pure.quant; needs torchao)",
    )
    p.add_argument(
        "--attn",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention implementation (default flash_attention_2 on CUDA when installed, else sdpa; "
        "the shared layout needs sdpa or eager)",
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default 1 for tiny: its ops are too small)"
    )
    p.add_argument("--device", help="default: cuda for 7b, cpu for tiny")
    p.add_argument(
        "--repeats", type=int, help="timed runs per method, the fastest kept (default 5 tiny, 1 7b)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated methods to skip, e.g. 'a'")
    return p


def trained_main(args) -> int:
    """``--model``: the forward-pass table of a trained checkpoint (:mod:`pure.bench_passes`)."""
    from pure.bench_passes import builtin_images, decodings, pass_table
    from pure.eval.holdout import HoldoutError, parse_seeds
    from pure.imageio import ImageLoadError, list_images
    from pure.restorer import PureRestorer

    try:
        lags = [int(x) for x in args.lags.split(",") if x.strip()]
        seeds = parse_seeds(args.seeds)
        settings = decodings(args.jacobi_window, lags, SamplingConfig(args.cfg, args.temperature))
        images = list_images(args.holdout) if args.holdout else builtin_images()
        torch.set_num_threads(args.threads or 1)
        restorer = PureRestorer.from_pretrained(args.model, device=args.device or "cpu")
        lines, _ = pass_table(restorer, images, settings, seeds, args.crops_per_image, args.size, True)
    except (ValueError, HoldoutError, ImageLoadError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model:
        return trained_main(args)
    device = torch.device(args.device or ("cuda" if args.arch == "7b" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        for line in memory_estimate(args.size or 512, args.batch_size, args.jacobi_window):
            print(line)
        print(f"error: --arch {args.arch} on {device} needs a CUDA GPU; the estimate above needs none")
        return 2
    size = args.size or (512 if args.arch == "7b" else 128)
    grid_px = LATENT_PER_GRID * VQ_DOWNSAMPLE
    if size <= 0 or size % grid_px:
        print(f"error: --size must be a positive multiple of {grid_px}; got {size}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.jacobi_window < 2:
        print("error: --batch-size must be >= 1 and --jacobi-window >= 2", file=sys.stderr)
        return 2
    try:
        check_quantize(args.quantize)
    except ValueError as err:
        print(f"error: --quantize: {err}", file=sys.stderr)
        return 2

    if args.threads or (args.arch == "tiny" and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    arch = build_arch(args.arch)
    fmt = SequenceFormat(arch.tokenizer)
    lat = size // VQ_DOWNSAMPLE
    h_out = lat
    if args.steps_limit:  # fewer output rows; the prompt keeps its full LQ image
        h_out = min(lat, max(LATENT_PER_GRID, math.ceil(args.steps_limit / (lat + 1) / LATENT_PER_GRID) * 4))
    steps = h_out * (lat + 1) + 1
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(arch, device, args.seed, args.attn)
    if args.quantize:
        from pure.quant import quantize_model

        quantize_model(model, args.quantize)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.stack([synthetic_prompt(fmt, lat, lat, gen) for _ in range(args.batch_size)]).to(device)
    sampling = SamplingConfig(cfg_scale=args.cfg, temperature=args.temperature)
    compile_flag = args.compile_backend or bool(args.compile)

    def seeds(offset: int = 0) -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(args.seed + offset + i) for i in range(args.batch_size)]

    def engine(decoder, h):
        def run():
            out = decoder.generate_image(prompts, h, lat, generators=seeds())
            tokens = torch.stack([a[3:-1] for a in out.answer_ids])  # drop <boi> <grid> <grid>, <eot>
            return tokens, out.forward_passes

        return run

    layout = args.guidance_layout
    engine_b = RestorationDecoder(model, fmt, sampling, compile_flag, layout)
    jacobi = replace(sampling, jacobi_window=args.jacobi_window)
    engine_c = RestorationDecoder(model, fmt, jacobi, compile_flag, layout)
    methods = {  # name, run of h output rows, the engine (None: the model's own forward)
        "a": (
            "(a) transformers generate",
            lambda h: lambda: run_generate(model, fmt, prompts, h, lat, sampling, 0),
            None,
        ),
        "b": ("(b) engine", lambda h: engine(engine_b, h), engine_b),
        "c": (f"(c) engine + Jacobi {args.jacobi_window}", lambda h: engine(engine_c, h), engine_c),
    }
    skip = {m.strip() for m in args.skip.split(",") if m.strip()}
    methods = {key: method for key, method in methods.items() if key not in skip}
    n_params = sum(p.numel() for p in model.parameters())
    dtype = str(arch.dtype).removeprefix("torch.") + (f", {args.quantize} linears" if args.quantize else "")
    print(
        f"arch {args.arch} ({n_params / 1e6:.1f} M parameters, {dtype}, "
        f"{arch.config._attn_implementation} attention) on {device}; "
        f"prompt {prompts.shape[1]} tokens, output {size}x{size} px = {lat}x{lat} codes"
        + (f" (first {h_out} rows)" if h_out < lat else "")
        + f", {steps} image tokens per row; batch {args.batch_size}, guidance {args.cfg}, "
        f"temperature {args.temperature}, torch threads {torch.get_num_threads()}, "
        f"compile {compile_flag if device.type == 'cuda' or isinstance(compile_flag, str) else False}, "
        f"guidance layout {layout}"
    )
    repeats = args.repeats or (5 if args.arch == "tiny" else 1)
    runs: dict[str, list[Result]] = {key: [] for key in methods}
    with torch.inference_mode():
        for key, (_, make, _) in methods.items():
            # warm-up: allocations, lazy initialisations; compiled steps specialise on the cache's
            # shape, so they warm up on the measured size (graphs captured before timing)
            make(h_out if compile_flag and key != "a" else LATENT_PER_GRID)()
        # Rounds of every method in turn: a load that comes and goes (a shared machine) touches them alike.
        for _ in range(repeats):
            for key, (name, make, decoder) in methods.items():
                runs[key].append(measure(name, make(h_out), model, device, steps, args.batch_size, decoder))
    results = [min(r, key=lambda r: r.seconds) for r in runs.values()]

    print()
    header = (
        f"{'method':<28} {'steps/s':>9} {'tokens/s':>9} {'passes':>7} {'s/image':>9} "
        f"{'peak mem':>12} {'KV cache':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        peak = gib(r.peak_bytes) if r.peak_bytes is not None else "n/a (CPU)"
        print(
            f"{r.name:<28} {r.steps_per_s:>9.1f} {r.steps_per_s * r.batch:>9.1f} {r.passes:>7d} "
            f"{r.seconds / r.batch:>9.2f} {peak:>12} {r.kv_bytes / 2**20:>7.1f} MiB"
        )
    base = next((r for r in results if r.name.startswith("(a)")), None)
    if base is not None:
        for r in results:
            if r is not base:
                print(f"{r.name.split()[0]}/(a) steps per second: {r.steps_per_s / base.steps_per_s:.2f}x")
    for r in results:
        if r.name.startswith("(c)"):
            print(
                f"(c) forward passes per image block: {r.passes} for {steps} tokens "
                f"({steps / r.passes:.2f} per pass)"
            )
    if args.temperature == 0 and len(results) > 1:
        same = all(torch.equal(results[0].tokens, r.tokens) for r in results[1:])
        print(f"greedy: identical image tokens across methods: {same}")
    print()
    for line in per_step_table(args, arch, model, prompts, h_out, lat, results, compile_flag):
        print(line)
    print()
    engine_result = next((r for r in results if r.name.startswith("(b)")), None)
    if base is not None and engine_result is not None and device.type == "cpu" and not compile_flag:
        with torch.inference_mode():
            share = forward_share(engine_b, methods["b"][1](h_out))
        ratio = engine_result.steps_per_s / base.steps_per_s
        print(
            f"(b) spends {share:.0%} of its time in the model's forwards (transformers' decoder layers, "
            f"which (a) runs twice per token): without compiling, (b)/(a) cannot pass {ratio:.2f}x / "
            f"{share:.2f} = {ratio / share:.1f}x"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    if device.type == "cpu":
        print(
            f"process peak RSS grew by {rss / 1024:.0f} MiB over the run "
            "(all methods together: the CPU allocator keeps no per-method peak)"
        )
    print()
    for line in memory_estimate(512, args.batch_size, args.jacobi_window):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pure.gpu_check OUT_DIR``: the first GPU run in one command of about 8 minutes.

Five stages, each a subprocess under its own timeout (a stage that fails or hangs is recorded and the
next one runs), all of them inside one time budget:

1. ``env``: Python and package versions, the CUDA device, whether flash-attn imports, which sdpa backends
   are enabled and which of them run the decode's and the training's attention shapes.
2. ``tiny``: the tiny model (the tests') on the GPU against a CPU reference: greedy tokens must be equal
   for the one-token loop and Jacobi decoding, eager and compiled (``compile=True``: CUDA graphs), in both
   guidance layouts, and for row-parallel decoding with speculative fronts against the CPU's row-parallel
   image; sampled runs (temperature 0.9, compiled) must complete with well-formed images.
3. ``decode``: the 7B architecture with random weights (:func:`pure.bench.build_model`), sdpa, guidance
   0.8, temperature 0.9: eager, CUDA graphs and Jacobi compiled. Each mode decodes the first
   ``rows[0]`` and ``rows[1]`` image rows of a 512 px image; the difference of the two gives the cost
   per forward and per token without prefill or compile. The prompt is padded so that the cache has a
   whole image's slots. A step reads the live cache only (:mod:`pure.decoding.attention`), and the padded
   prompt is live, so the measured steps read about as much as an image's last steps: the short runs
   extrapolate to an upper bound of a whole image (``s_per_image``; about 4% over at 7B/512 px by
   :mod:`pure.decoding.traffic`'s accounting, from 18.1 GB read per step against an image's mean 17.5 GB).
   Also compile seconds, peak memory, compiled graphs (recompiles) and CUDA-graph skips.
4. ``profile``: a ``torch.profiler`` trace of 3 compiled steps of that model: the share of attention
   kernels against GEMMs (the weight reads), with the top kernels and the weights' implied bandwidth.
5. ``lora``: two LoRA micro-steps of the 7B architecture at ~8.5k tokens as
   ``recipes/train/pure_7b_lora.yaml`` sets them up (adapters, residual dropout, gradient checkpointing,
   chunked loss, micro batch), with plain AdamW instead of DeepSpeed: seconds and peak memory.

Writes ``OUT_DIR/summary.json`` (every stage's status and figures), ``OUT_DIR/check.log`` (the stages'
output), ``OUT_DIR/table.md`` (the README's GPU rows), ``OUT_DIR/stages/*.json`` (each stage's record,
saved as it goes, so a stage killed by its timeout keeps what it measured) and
``OUT_DIR/profile_trace.json.gz``. Without CUDA, stages 3-5 report "skipped: no CUDA" and ``tiny`` checks
the CPU against itself; ``--arch tiny`` runs stages 3-5 on the tiny model instead (a dry run of the check
on any machine). Random weights say nothing about images or about speculative decoding's gain.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pure.sequence import LATENT_PER_GRID

if TYPE_CHECKING:
    from pure.decoding.loop import SamplingConfig
    from pure.sequence import SequenceFormat

# The stages import the model code (transformers) themselves: the parent process, which only schedules
# them, starts in seconds on a loaded CPU.

BUDGET_S = 460  # all stages together; the GPU machine's command runs under `timeout 480`
TIMEOUTS_S = {"env": 30, "tiny": 120, "decode": 200, "profile": 55, "lora": 55}  # compiles dominate
NEEDS_MODEL = ("decode", "profile", "lora")  # the stages that run --arch's model
TINY_SIZE = 64  # px of the tiny stage's images: 8 x 8 codes
TINY_TEXT_TOKENS = 24  # the tiny stage's text phase: the random model would write until max_text_tokens
ROW_LAG = 2  # the tiny stage's row-parallel decoding with speculative fronts
PROFILE_SKIP, PROFILE_STEPS = 10, 3  # compiled steps replayed before the trace, and traced
PACKAGES = [  # the versions the env stage reports (None: not installed)
    *("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface_hub"),
    *("triton", "numpy", "flash-attn", "deepspeed", "datasets", "kornia"),
]


class Skip(Exception):
    """A stage that cannot run here (its message says why)."""


class CheckFailed(Exception):
    """A stage that ran but whose results are wrong (its message says which)."""


@dataclass
class CheckConfig:
    arch: str = "7b"  # model of the decode, profile and lora stages: "7b" (needs CUDA) or "tiny"
    size: int = 0  # output side in px of those stages; 0: 512 for 7b, 64 for tiny
    rows: tuple[int, int] = (4, 8)  # image rows of the two timed decodes (the difference is timed)
    seed: int = 0

    def __post_init__(self) -> None:
        self.size = self.size or (512 if self.arch == "7b" else TINY_SIZE)
        a, b = self.rows
        if not 0 < a < b or a % LATENT_PER_GRID or b % LATENT_PER_GRID:
            raise ValueError(f"--rows must be two growing multiples of {LATENT_PER_GRID}; got {a},{b}")

    def latent_side(self) -> int:
        """The image's side in codes; checks that ``size`` and ``rows`` fit it."""
        from pure.bench import VQ_DOWNSAMPLE

        lat, grid_px = self.size // VQ_DOWNSAMPLE, LATENT_PER_GRID * VQ_DOWNSAMPLE
        if self.size <= 0 or self.size % grid_px or self.rows[1] > lat:
            raise ValueError(
                f"--size must be a positive multiple of {grid_px} px with at least --rows' {self.rows[1]} "
                f"rows of codes ({VQ_DOWNSAMPLE} px each); got {self.size}"
            )
        return lat


class StageRecord:
    """A stage's results, saved to ``OUT_DIR/stages/NAME.json`` at every assignment, so that a stage killed
    by its timeout still leaves what it measured."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir = out_dir  # for the stage's other files
        self.path = out_dir / "stages" / f"{name}.json"
        self.data: dict = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def __getitem__(self, key: str):
        return self.data[key]


# -- measuring helpers ------------------------------------------------------------------------------------


def model_device(cfg: CheckConfig) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if cfg.arch == "7b":
        raise Skip("no CUDA")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def dynamo_counters() -> dict[str, int]:
    """torch.compile's counters, flattened: ``frames.ok`` counts compiled graphs (recompiles included),
    ``inductor.cudagraph_skips`` steps that ``reduce-overhead`` ran without CUDA graphs."""
    from torch._dynamo.utils import counters

    return {f"{group}.{key}"[:120]: n for group, values in counters.items() for key, n in values.items()}


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


# -- stage 1: the environment -----------------------------------------------------------------------------


def stage_env(record: StageRecord, cfg: CheckConfig) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    record["python"] = platform.python_version()
    record["packages"] = {name: version(name) for name in PACKAGES}
    record["torch_cuda"] = torch.version.cuda
    record["torch_threads"] = torch.get_num_threads()
    try:
        import flash_attn

        record["flash_attn_import"] = f"ok ({flash_attn.__version__})"
    except Exception as err:  # ImportError, or a broken build's OSError
        record["flash_attn_import"] = short_error(err)
    if not torch.cuda.is_available():
        record["cuda"] = None
        return
    props = torch.cuda.get_device_properties(0)
    record["cuda"] = {
        "device": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,memory.used",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        record["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        record["nvidia_smi"] = short_error(err)
    b = torch.backends.cuda
    record["sdpa_enabled"] = {
        "flash": b.flash_sdp_enabled(),
        "mem_efficient": b.mem_efficient_sdp_enabled(),
        "cudnn": b.cudnn_sdp_enabled(),
        "math": b.math_sdp_enabled(),
    }
    # Which backend runs each attention the project uses, at 7B's head shape (32 heads of 128):
    # the decode's (a query per row over a masked static cache) and the training's (causal, no mask).
    heads, dim, slots = 32, 128, 4608
    q = torch.randn(2, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 1, slots, device="cuda", dtype=torch.bool)
    x = torch.randn(1, heads, 2048, dim, device="cuda", dtype=torch.bfloat16)
    shapes = {
        "decode (masked cache)": lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv, mask),
        "training (causal)": lambda: torch.nn.functional.scaled_dot_product_attention(
            x, x, x, is_causal=True
        ),
    }
    runs = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        for shape, attend in shapes.items():
            try:
                with sdpa_kernel(backend):
                    attend()
                torch.cuda.synchronize()
                runs[f"{backend.name} {shape}"] = "ok"
            except Exception as err:  # a backend that does not take this shape says so
                runs[f"{backend.name} {shape}"] = short_error(err)
    record["sdpa_runs"] = runs


# -- stage 2: the tiny model on the device against the CPU ------------------------------------------------


def stage_tiny(record: StageRecord, cfg: CheckConfig) -> None:
    from pure.bench import VQ_DOWNSAMPLE, build_arch, build_model
    from pure.decoding.jacobi import DEFAULT_WINDOW
    from pure.decoding.loop import RestorationDecoder, SamplingConfig
    from pure.sequence import SequenceFormat

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = build_arch("tiny")
    fmt = SequenceFormat(arch.tokenizer)
    reference_model = build_model(arch, torch.device("cpu"), cfg.seed, attn="sdpa")
    model = copy.deepcopy(reference_model).to(device) if device.type == "cuda" else reference_model
    lat = TINY_SIZE // VQ_DOWNSAMPLE
    gen = torch.Generator().manual_seed(cfg.seed)
    lq = torch.randint(fmt.vocab.codebook_size, (2, lat, lat), generator=gen)  # a batch of two
    prompts = torch.stack([fmt.prompt_ids(codes) for codes in lq])
    greedy = SamplingConfig(temperature=0, max_text_tokens=TINY_TEXT_TOKENS)
    record["device"] = str(device)
    record["compiled_means"] = (
        "CUDA graphs" if device.type == "cuda" else "nothing (compile=True is a no-op on CPU)"
    )
    reference = RestorationDecoder(reference_model, fmt, greedy).generate(prompts, lat, lat).answer_ids
    # row-parallel decoding's image (another model of the image: the staircase), which its speculative
    # fronts must give too
    rows_greedy = replace(greedy, row_lag=ROW_LAG)
    rows_reference = (
        RestorationDecoder(reference_model, fmt, rows_greedy).generate(prompts, lat, lat).answer_ids
    )

    def decode(sampling: SamplingConfig, compiled: bool, layout: str, generators=None):
        decoder = RestorationDecoder(model, fmt, sampling, compile=compiled, guidance_layout=layout)
        start = time.perf_counter()
        out = decoder.generate(prompts.to(device), lat, lat, generators=generators)
        sync(device)
        return out, time.perf_counter() - start

    def seeded() -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(cfg.seed + i) for i in range(len(prompts))]

    w = DEFAULT_WINDOW
    runs = [  # (Jacobi window, compiled, layout, temperature): the cheap eager ones first, then the rest
        *[(window, False, layout, 0.0) for layout in ("rows", "shared") for window in (0, w)],
        *[(0, True, "rows", 0.0), (w, True, "rows", 0.0)],
        (w, True, "rows", 0.9),  # issue 14.2: Jacobi carried CUDA-graph outputs into the next replay
        *[(0, True, "shared", 0.0), (w, True, "shared", 0.0)],
        (0, True, "rows", 0.9),
        # row-parallel decoding with speculative fronts (packed, padded to a power of two, compacted cache)
        *[(-w, False, "shared", 0.0), (-w, True, "shared", 0.0), (-w, True, "shared", 0.9)],
    ]
    failures, greedy_results, sampled_results = [], {}, {}
    before = dynamo_counters()
    for window, compiled, layout, temperature in runs:
        kind = "fronts" if window < 0 else "jacobi" if window else "one-token"
        name = f"{kind} {'compiled' if compiled else 'eager'} {layout}"
        sampling = replace(greedy, jacobi_window=abs(window), temperature=temperature)
        if window < 0:
            sampling = replace(sampling, row_lag=ROW_LAG)
        try:
            if temperature == 0:  # greedy: the same tokens as the CPU
                out, seconds = decode(sampling, compiled, layout)
                diff = differing(out.answer_ids, rows_reference if window < 0 else reference)
                equal = diff == [0] * len(diff)
                greedy_results[name] = {
                    "equal": equal,
                    "differing_tokens": diff,
                    "seconds": round(seconds, 2),
                }
                if not equal:
                    failures.append(f"{name}: greedy tokens differ from the CPU reference {diff}")
            else:  # sampled: completes with well-formed images; with the same seeds (counter-based noise)
                # it should draw what the eager run draws, unless rounding flips a draw: reported only
                name += f", temperature {temperature}"
                out, seconds = decode(sampling, compiled, layout, seeded())
                errors = [fmt.parse_answer(a).error for a in out.answer_ids]
                eager, _ = decode(sampling, False, layout, seeded())
                sampled_results[name] = {
                    "completed": not any(errors),
                    "errors": errors,
                    "differing_from_eager": differing(out.answer_ids, eager.answer_ids),
                    "seconds": round(seconds, 2),
                }
                if any(errors):
                    failures.append(f"{name}: malformed image {errors}")
        except Exception as err:
            traceback.print_exc()
            (greedy_results if temperature == 0 else sampled_results)[name] = {"error": short_error(err)}
            failures.append(f"{name}: {short_error(err)}")
        record["greedy_vs_cpu"] = greedy_results
        record["sampled"] = sampled_results
    record["dynamo_counters"] = counters_delta(before, dynamo_counters())
    if failures:
        raise CheckFailed("; ".join(failures))


def differing(answers: list[torch.Tensor], expected: list[torch.Tensor]) -> list:
    """Per row: 0, or how many tokens differ and where the first does (a late first difference after
    identical tokens can be a near-tie that rounding flipped; a wrong engine differs from the start)."""
    rows = []
    for a, b in zip(answers, expected, strict=True):
        n = min(a.numel(), b.numel())
        diff = (a[:n] != b[:n]).nonzero()
        first = int(diff[0]) if diff.numel() else (n if a.numel() != b.numel() else None)
        rows.append(0 if first is None else {"tokens": int(diff.numel()), "first": first, "of": n})
    return rows


# -- stage 3: decoding speed of the big model ------------------------------------------------------------


@dataclass
class DecodeSetup:
    """The model, its format and prompts for decoding ``rows`` image rows of a ``size`` px image, each
    prompt padded with answer text so that every run's cache has a whole image's slots."""

    model: torch.nn.Module
    fmt: SequenceFormat
    device: torch.device
    lat: int
    prompts: dict[int, torch.Tensor]  # image rows -> (1, T) prompt
    sampling: SamplingConfig

    @classmethod
    def build(cls, cfg: CheckConfig) -> DecodeSetup:
        from pure.bench import build_arch, build_model, synthetic_prompt
        from pure.decoding.loop import SamplingConfig
        from pure.sequence import SequenceFormat

        lat = cfg.latent_side()
        device = model_device(cfg)
        arch = build_arch(cfg.arch)
        fmt = SequenceFormat(arch.tokenizer)
        model = build_model(arch, device, cfg.seed, attn="sdpa")
        sampling = SamplingConfig()  # guidance 0.8, temperature 0.9: what a restoration runs
        whole = fmt.image_block_length(lat, lat) + sampling.max_text_tokens  # a restoration's answer slots
        prompts = {}
        for rows in cfg.rows:
            gen = torch.Generator().manual_seed(cfg.seed)
            pad = whole - fmt.image_block_length(rows, lat)
            prompts[rows] = synthetic_prompt(fmt, lat, lat, gen, answer_tokens=pad)[None].to(device)
        return cls(model, fmt, device, lat, prompts, sampling)

    def decoder(self, jacobi: bool, compiled: bool):
        """The one-token loop or Jacobi decoding (its default window), eager or ``compile=True``."""
        from pure.decoding.jacobi import DEFAULT_WINDOW
        from pure.decoding.loop import RestorationDecoder

        sampling = replace(self.sampling, jacobi_window=DEFAULT_WINDOW if jacobi else 0)
        return RestorationDecoder(self.model, self.fmt, sampling, compile=compiled)

    def run(self, decoder, rows: int) -> tuple[float, int]:
        """Seconds (synchronised) and image forward passes of one decode of the first ``rows`` rows."""
        generators = [torch.Generator(self.device).manual_seed(0)]
        sync(self.device)
        start = time.perf_counter()
        out = decoder.generate_image(self.prompts[rows], rows, self.lat, generators=generators)
        sync(self.device)
        return time.perf_counter() - start, out.image_forward_passes


@contextmanager
def recording_caches(decoder, caches: list):
    """Appends every KV cache the decoder allocates to ``caches`` (to size them). No module hook: a hook
    added or removed between compiled calls could make torch.compile recompile."""
    make_cache = decoder._make_cache

    def record(capacity: int):
        cache = make_cache(capacity)
        caches.append(cache)
        return cache

    decoder._make_cache = record
    try:
        yield
    finally:
        del decoder._make_cache  # the class's method again


def cache_size(cache) -> tuple[int, int]:
    """``(slots, bytes)`` of a transformers static cache after use."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    return tensors[0].shape[-2], sum(t.numel() * t.element_size() for t in tensors)


DECODE_MODES = (("eager", False, False), ("cuda graphs", False, True), ("jacobi compiled", True, True))


def measure_decode(setup: DecodeSetup, cfg: CheckConfig, jacobi: bool, compiled: bool) -> dict:
    decoder = setup.decoder(jacobi, compiled)
    compiled = compiled and setup.device.type == "cuda"  # compile=True is a no-op elsewhere
    short, long = cfg.rows
    tokens = {rows: rows * (setup.lat + 1) + 1 for rows in (short, long)}  # body tokens and <eoi>
    before = dynamo_counters()
    warm_s, _ = setup.run(decoder, short)  # allocations; compiled: the compile and the graphs' capture
    reset_peak(setup.device)
    short_s, short_passes = setup.run(decoder, short)
    caches: list = []
    with recording_caches(decoder, caches):
        long_s, long_passes = setup.run(decoder, long)
    slots, kv_bytes = cache_size(caches.pop())  # and let it go
    compiled_counts = counters_delta(before, dynamo_counters())
    seconds, passes, n_tokens = long_s - short_s, long_passes - short_passes, tokens[long] - tokens[short]
    ms_token = 1e3 * seconds / n_tokens
    fixed_s = short_s - tokens[short] * ms_token / 1e3  # the prefill and the image's set-up
    whole = setup.lat * (setup.lat + 1) + 1
    graphs = compiled_counts.get("frames.ok", 0)
    if seconds <= 0:  # seen on a loaded CPU with the tiny model, whose runs differ by milliseconds
        print(f"warning: the {long}-row decode took no longer than the {short}-row one: figures meaningless")
    return {
        "ms_per_forward": round(1e3 * seconds / passes, 3),
        "tokens_per_forward": round(n_tokens / passes, 2),
        "ms_per_token": round(ms_token, 3),
        "s_per_image": round(fixed_s + whole * ms_token / 1e3, 2),
        "prefill_and_setup_s": round(fixed_s, 3),
        "first_run_s": round(warm_s, 2),
        "compile_s": round(warm_s - short_s, 2) if compiled else None,
        "peak_memory_gib": peak_gib(setup.device),
        "kv_cache_gib": round(kv_bytes / 2**30, 2),
        "cache_slots": slots,
        "graphs_compiled": graphs,
        "recompiles": max(0, graphs - 1) if compiled else None,
        "cudagraph_skips": compiled_counts.get("inductor.cudagraph_skips", 0),
        # tensors that are not static buffers, copied into the graphs at every replay
        "cudagraph_non_static_inputs": compiled_counts.get(
            "inductor.cudagraph_recorded_non_static_inputs", 0
        ),
        "dynamo_counters": compiled_counts,
        "runs": {
            f"{short} rows": [round(short_s, 3), short_passes],
            f"{long} rows": [round(long_s, 3), long_passes],
        },
    }


def roofline_ms(model, lat: int) -> dict[str, dict[int, float]]:
    """Weight format -> tokens fed per forward (one token, a Jacobi window) -> the roofline's milliseconds on
    an H200 (:func:`pure.bench.forward_costs`) of ``model`` restoring ``lat`` x ``lat`` codes."""
    from pure.bench import forward_costs, restoration_shape
    from pure.decoding.jacobi import DEFAULT_WINDOW
    from pure.decoding.traffic import H200_BANDWIDTH

    costs = forward_costs(model.config, model, restoration_shape(lat))
    return {
        fmt: {fed: round(1e3 * c.seconds(fed, H200_BANDWIDTH), 2) for fed in (1, DEFAULT_WINDOW)}
        for fmt, c in costs.items()
    }


def stage_decode(record: StageRecord, cfg: CheckConfig) -> None:
    from pure.memory import default_layout

    setup = DecodeSetup.build(cfg)
    n_params = sum(p.numel() for p in setup.model.parameters())
    record["setup"] = {
        "arch": cfg.arch,
        "parameters_b": round(n_params / 1e9, 3),
        "device": str(setup.device),
        "attention": "sdpa",
        "size_px": cfg.size,
        "prompt_tokens": {rows: p.shape[1] for rows, p in setup.prompts.items()},
        "whole_image_tokens": setup.lat * (setup.lat + 1) + 1,
        "guidance": setup.sampling.cfg_scale,
        "temperature": setup.sampling.temperature,
        "layout": default_layout(),
    }
    if cfg.arch == "7b":  # what the roofline predicts for the modes' forwards, to set the measures against
        record["h200_roofline_ms_per_forward"] = roofline_ms(setup.model, setup.lat)
    modes, failures = {}, []
    for name, jacobi, compiled in DECODE_MODES:
        try:
            with torch.inference_mode():
                modes[name] = measure_decode(setup, cfg, jacobi, compiled)
        except Exception as err:
            traceback.print_exc()
            modes[name] = {"error": short_error(err)}
            failures.append(f"{name}: {short_error(err)}")
        record["modes"] = modes
    if failures:
        raise CheckFailed("; ".join(failures))


# -- stage 4: where a compiled step's time goes ----------------------------------------------------------

# Kernels by name (CUDA) or operators (CPU). A softmax is left out of attention: the compiled step's softmax
# kernels are the sampling's, while sdpa runs as one fused kernel (the record's "top" list shows the names).
ATTENTION_KERNEL = re.compile(r"attention|fmha|flash|sdpa|sdp_", re.IGNORECASE)
GEMM_KERNEL = re.compile(
    r"gemm|gemv|nvjet|xmma|cublas|cutlass|matmul|splitk|aten::(add|b)?mm\b|_mm\b|mm_", re.I
)


def classify_kernel(name: str) -> str:
    if ATTENTION_KERNEL.search(name):
        return "attention"
    if GEMM_KERNEL.search(name):
        return "gemm"
    return "other"


@contextmanager
def counting_steps(decoder, on_step: Callable[[], None]):
    """Calls ``on_step`` after every call of the decoder's (compiled) step functions."""

    def patched(step_fn, device):
        fn = original(step_fn, device)

        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            on_step()
            return out

        return counted

    original = decoder._compiled_fn
    decoder._compiled_fn = patched
    try:
        yield
    finally:
        del decoder._compiled_fn  # the class's method again


def kernel_shares(averages, device: torch.device, steps: int) -> dict:
    """The traced time by kind: device time of CUDA kernels, or self CPU time of operators on a CPU."""
    from torch.autograd import DeviceType

    times: dict[str, float] = {}
    for event in averages:
        if getattr(event, "is_user_annotation", False):
            continue
        if device.type == "cuda":  # kernels only: an operator's row repeats its kernels' time
            if event.device_type != DeviceType.CUDA:
                continue
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            times[event.key] = times.get(event.key, 0.0) + us
    total = sum(times.values())
    by_kind = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for name, us in times.items():
        by_kind[classify_kernel(name)] += us
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {
        "traced_ms_per_step": round(total / 1e3 / steps, 3),
        "share": {kind: round(us / total, 3) if total else None for kind, us in by_kind.items()},
        "ms_per_step": {kind: round(us / 1e3 / steps, 3) for kind, us in by_kind.items()},
        "top": [[name[:100], round(us / 1e3 / steps, 4), classify_kernel(name)] for name, us in top],
    }


def stage_profile(record: StageRecord, cfg: CheckConfig) -> None:
    from torch.profiler import ProfilerActivity, profile, schedule

    setup = DecodeSetup.build(cfg)
    decoder = setup.decoder(jacobi=False, compiled=True)
    rows = cfg.rows[0]
    with torch.inference_mode():
        warm_s, _ = setup.run(decoder, rows)  # compiles (warm caches after the decode stage) and captures
    record["first_run_s"] = round(warm_s, 2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    trace = record.out_dir / "profile_trace.json.gz"  # ui.perfetto.dev opens it as it is
    traced: dict = {}

    def ready(prof) -> None:
        prof.export_chrome_trace(str(trace))
        traced.update(kernel_shares(prof.key_averages(), setup.device, PROFILE_STEPS))

    plan = schedule(wait=PROFILE_SKIP, warmup=2, active=PROFILE_STEPS, repeat=1)
    with (
        torch.inference_mode(),
        profile(activities=activities, schedule=plan, on_trace_ready=ready) as prof,
        counting_steps(decoder, prof.step),
    ):
        setup.run(decoder, rows)
    if not traced:
        raise CheckFailed(
            f"the profiler traced nothing: fewer than {PROFILE_SKIP + 2 + PROFILE_STEPS} steps?"
        )
    if not traced["traced_ms_per_step"]:
        raise CheckFailed("the trace holds no kernel time: the profiler did not see inside the CUDA graphs")
    record["trace"] = str(trace.name)
    record.data.update(traced)
    # The weights a step reads: every decoder layer's, and the image codes' rows of the LM head; read
    # by the GEMMs, whose time gives the bandwidth they reached (an H200 copies at about 4.3 TB/s).
    layers = sum(p.numel() * p.element_size() for p in setup.model.model.layers.parameters())
    codes = setup.fmt.vocab.codebook_size * setup.model.config.hidden_size * setup.model.dtype.itemsize
    weight_bytes, gemm_s = layers + codes, traced["ms_per_step"]["gemm"] / 1e3
    record["weight_gib_per_step"] = round(weight_bytes / 2**30, 2)
    if setup.device.type == "cuda" and gemm_s:
        record["gemm_tb_per_s"] = round(weight_bytes / gemm_s / 1e12, 2)


# -- stage 5: a LoRA micro-step --------------------------------------------------------------------------


def stage_lora(
    record: StageRecord, cfg: CheckConfig, recipe_path: str = "recipes/train/pure_7b_lora.yaml"
) -> None:
    from pure.bench import ANSWER_TOKENS, build_arch, build_model, synthetic_prompt
    from pure.sequence import SequenceFormat
    from pure.train.config import load_recipe
    from pure.train.loss import SupervisedLMLoss
    from pure.train.modeling import add_residual_dropout, apply_lora, enable_gradient_checkpointing

    device = model_device(cfg)
    recipe = load_recipe(recipe_path)
    m, lo, t = recipe.model, recipe.lora, recipe.train
    arch = build_arch(cfg.arch)
    fmt = SequenceFormat(arch.tokenizer)
    lm = build_model(arch, device, cfg.seed, attn="sdpa").train().requires_grad_(True)
    add_residual_dropout(lm, m.residual_dropout)
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    lm = apply_lora(lm, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.modules_to_save)
    module = SupervisedLMLoss(lm, z_loss_weight=m.z_loss_weight, chunk_size=m.loss_chunk_size)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay
    )

    # A training example's shape: prompt (instruction, LQ block), answer text, HQ block, <eot>.
    lat = cfg.latent_side()
    gen = torch.Generator().manual_seed(cfg.seed)
    examples, prompt_length = [], 0
    for _ in range(t.micro_batch_size):
        prompt = synthetic_prompt(fmt, lat, lat, gen)  # ends with the answer's text
        prompt_length = prompt.numel() - ANSWER_TOKENS
        hq = torch.randint(fmt.vocab.codebook_size, (lat, lat), generator=gen)
        examples.append(torch.cat([prompt, fmt.image_block(hq), torch.tensor([fmt.vocab.eot])]))
    input_ids = torch.stack(examples).to(device)  # (B, T)
    labels = torch.stack([fmt.labels_from_prompt_length(ids, prompt_length) for ids in input_ids])
    image_mask = torch.stack([fmt.supervised_parts(ids, prompt_length)[1] for ids in input_ids])
    record["setup"] = {
        "arch": cfg.arch,
        "device": str(device),
        "recipe": recipe_path,
        "micro_batch": t.micro_batch_size,
        "tokens_per_sequence": input_ids.shape[1],
        "lora_r": lo.r,
        "trainable_parameters_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "gradient_checkpointing": m.gradient_checkpointing,
        "loss_chunk_size": m.loss_chunk_size,
        "optimizer": "torch AdamW (DeepSpeed's ZeRO-2 in the recipe)",
    }

    def micro_step(rows: int) -> dict:
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        loss = module(input_ids[:rows], labels[:rows], image_mask[:rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
        return {
            "seconds": round(seconds, 2),
            "peak_memory_gib": peak_gib(device),
            "loss": round(loss.item(), 3),
        }

    rows, steps = t.micro_batch_size, []
    while len(steps) < 2:  # the first also pays cuBLAS's and the allocator's start
        try:
            steps.append(micro_step(rows))
        except torch.cuda.OutOfMemoryError:
            if rows == 1:
                raise
            record["out_of_memory_at_micro_batch"] = rows  # then measure one sequence
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows, steps = 1, []
        record["micro_batch_run"] = rows
        record["micro_steps"] = steps
    record["tokens_per_s"] = round(rows * input_ids.shape[1] / steps[-1]["seconds"])


STAGES: dict[str, Callable[[StageRecord, CheckConfig], None]] = {
    "env": stage_env,
    "tiny": stage_tiny,
    "decode": stage_decode,
    "profile": stage_profile,
    "lora": stage_lora,
}


# -- running the stages --------------------------------------------------------------------------------


def run_stage(name: str, out_dir: Path, cfg: CheckConfig) -> int:
    """One stage, in this process: its record in ``out_dir/stages/NAME.json``; 1 when it failed."""
    record = StageRecord(out_dir, name)
    record["status"] = "running"
    start = time.perf_counter()
    try:
        STAGES[name](record, cfg)
        status = "ok"
    except Skip as why:
        status = f"skipped: {why}"
    except Exception as err:
        traceback.print_exc()
        record["error"] = str(err)[:2000] if isinstance(err, CheckFailed) else short_error(err)
        status = "failed"
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["status"] = status
    print(f"stage {name}: {json.dumps(record.data, default=str)}", flush=True)  # into check.log
    return 1 if status == "failed" else 0


def run_child(command: list[str], timeout: float, log, env: dict[str, str] | None = None) -> str:
    """Runs ``command`` in its own process group, output appended to ``log``; ``"timeout"`` when it ran
    out of time (the whole group is killed: compile workers too), else ``"exit N"``."""
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        return f"exit {proc.wait(timeout=timeout)}"
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:  # a timeout, or this process interrupted: the child's whole group goes too
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Interrupted(Exception):
    pass


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def stage_arguments(cfg: CheckConfig) -> list[str]:
    return ["--arch", cfg.arch, "--size", str(cfg.size), "--rows", f"{cfg.rows[0]},{cfg.rows[1]}"]


def run_in_child(name: str, out_dir: Path, cfg: CheckConfig, timeout: float, log, env: dict) -> dict:
    """Stage ``name`` in a subprocess under ``timeout``: its record, with how it ended."""
    stage_file = out_dir / "stages" / f"{name}.json"
    stage_file.parent.mkdir(parents=True, exist_ok=True)
    stage_file.unlink(missing_ok=True)
    log.write(f"\n===== stage {name} (timeout {round(timeout, 1):g} s) =====\n")
    command = [sys.executable, "-m", "pure.gpu_check", str(out_dir), "--stage", name, *stage_arguments(cfg)]
    start = time.monotonic()
    ended = "interrupted"
    try:
        ended = run_child(command, timeout, log, env)
    finally:  # also when this process is interrupted: what the stage saved so far is kept
        result = json.loads(stage_file.read_text()) if stage_file.exists() else {}
        result["wall_s"] = round(time.monotonic() - start, 1)
        if ended == "timeout":
            result["status"] = f"timeout after {round(timeout, 1):g} s"
        elif result.get("status", "running") == "running":  # the process died without a word
            result["status"] = f"failed ({ended}, see check.log)"
        stage_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def run_all(
    out_dir: Path, cfg: CheckConfig, stages: list[str], timeouts: dict[str, float], budget: float
) -> dict:
    """Every stage in a subprocess, in order, within ``budget`` seconds; the summary (also written to
    ``out_dir/summary.json``, with ``table.md``), written even when this process gets SIGTERM."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()  # no CUDA context: the stages' processes make their own
    summary = {
        "command": [sys.executable, "-m", "pure.gpu_check", *sys.argv[1:]],
        "git_commit": git_commit(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "config": asdict(cfg),
        "cuda": cuda,
        "budget_s": budget,
        "stages": {},
    }
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env = {**env, "TORCH_LOGS": "recompiles,graph_breaks", **os.environ}  # reasons into check.log
    start = time.monotonic()
    deadline = start + budget

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)  # `timeout 480` sends it
    name = None
    try:
        with open(out_dir / "check.log", "a") as log:
            for name in stages:
                left = deadline - time.monotonic()
                if name in NEEDS_MODEL and cfg.arch == "7b" and not cuda:
                    summary["stages"][name] = {"status": "skipped: no CUDA"}
                elif left < 5:
                    summary["stages"][name] = {"status": "skipped: out of time (--budget)"}
                else:
                    timeout = min(timeouts[name], left)
                    print(f"[gpu_check] {name}: running (timeout {round(timeout, 1):g} s)", flush=True)
                    summary["stages"][name] = {"status": "interrupted"}
                    summary["stages"][name] = run_in_child(name, out_dir, cfg, timeout, log, env)
                print(f"[gpu_check] {name}: {summary['stages'][name]['status']}", flush=True)
    except (Interrupted, KeyboardInterrupt) as why:
        summary["interrupted"] = str(why) or "KeyboardInterrupt"
        stage_file = out_dir / "stages" / f"{name}.json"
        if name and stage_file.exists():  # what the interrupted stage had saved
            summary["stages"][name] = {**json.loads(stage_file.read_text()), "status": "interrupted"}
    finally:
        signal.signal(signal.SIGTERM, previous)
        for name in stages:
            summary["stages"].setdefault(name, {"status": "not run: interrupted"})
        summary["seconds"] = round(time.monotonic() - start, 1)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        try:
            table = markdown_table(summary)
        except Exception as err:  # a figure of an unexpected shape must not lose the summary
            table = f"no table: {short_error(err)}\n"
        (out_dir / "table.md").write_text(table)
    return summary


TABLE_COLUMNS = {  # README column: key of a decode mode's record
    "ms/forward": "ms_per_forward",
    "tokens/forward": "tokens_per_forward",
    "ms/token": "ms_per_token",
    "s/image": "s_per_image",
    "compile s": "compile_s",
    "peak GiB": "peak_memory_gib",
    "recompiles": "recompiles",
}


def markdown_table(summary: dict) -> str:
    """The README's GPU lines from a summary: the device, the decode modes' table, profile and LoRA."""
    stages, cfg = summary["stages"], summary["config"]
    env = stages.get("env", {})
    packages = env.get("packages", {})
    device = (env.get("cuda") or {}).get("device", "no CUDA device")

    def cell(value) -> str:
        return "n/a" if value is None else str(value)

    lines = [
        f"{device}; torch {packages.get('torch')}, transformers {packages.get('transformers')}; flash-attn: "
        f"{env.get('flash_attn_import', 'n/a')}. Stages: "
        + ", ".join(f"{name} {s.get('status')}" for name, s in stages.items()),
        "",
        f"| {cfg['arch']}, random weights, sdpa, {cfg['size']} px, guidance | "
        + " | ".join(TABLE_COLUMNS)
        + " |",
        "|---" * (len(TABLE_COLUMNS) + 1) + "|",
    ]
    modes = stages.get("decode", {}).get("modes", {})
    for name, _, _ in DECODE_MODES:
        record = modes.get(name) or {}
        values = [cell(record.get(key, "-")) for key in TABLE_COLUMNS.values()]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    profile = stages.get("profile", {})
    if profile.get("traced_ms_per_step"):
        share = profile["share"]
        lines.append(
            f"\nProfile of {PROFILE_STEPS} compiled steps: {profile['traced_ms_per_step']} ms traced a step; "
            f"attention {share['attention']:.0%}, GEMMs {share['gemm']:.0%}, other {share['other']:.0%}"
            + (f"; weights read at {profile['gemm_tb_per_s']} TB/s" if "gemm_tb_per_s" in profile else "")
        )
    lora = stages.get("lora", {})
    if lora.get("micro_steps"):
        setup, step = lora["setup"], lora["micro_steps"][-1]
        lines.append(
            f"\nLoRA micro-step ({lora['micro_batch_run']} x {setup['tokens_per_sequence']} tokens, "
            f"r {setup['lora_r']}, checkpointing, AdamW): {step['seconds']} s, "
            f"peak {cell(step['peak_memory_gib'])} GiB"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.gpu_check",
        description="The first GPU run in one command (about 8 minutes on an H200): environment, the tiny "
        "model on the GPU against the CPU, 7B decoding speed (eager, CUDA graphs, Jacobi), a profile of "
        "compiled steps, a LoRA micro-step. Writes summary.json, check.log and table.md into OUT_DIR.",
    )
    p.add_argument(
        "out_dir", type=Path, help="folder for summary.json, check.log, table.md, stages/, the trace"
    )
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument(
        "--arch",
        choices=["7b", "tiny"],
        default="7b",
        help="model of decode, profile, lora (tiny: a dry run)",
    )
    p.add_argument("--size", type=int, default=0, help="output side in px (default 512 for 7b, 64 for tiny)")
    p.add_argument("--rows", default="4,8", help="image rows of the two timed decodes (default 4,8)")
    p.add_argument(
        "--budget", type=float, default=BUDGET_S, help=f"seconds for all stages (default {BUDGET_S})"
    )
    p.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="STAGE=S",
        help="a stage's timeout in seconds (defaults: "
        + ", ".join(f"{k}={v}" for k, v in TIMEOUTS_S.items())
        + ")",
    )
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a child: run one stage here
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = tuple(int(r) for r in args.rows.split(","))
        cfg = CheckConfig(arch=args.arch, size=args.size, rows=rows)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown or len(rows) != 2:
            raise ValueError(
                f"--stages takes {','.join(STAGES)}; got {unknown}" if unknown else "--rows takes 2"
            )
        timeouts = dict(TIMEOUTS_S)
        for item in args.timeout:
            name, _, seconds = item.partition("=")
            if name not in STAGES:
                raise ValueError(
                    f"--timeout takes STAGE=SECONDS with a stage of {','.join(STAGES)}; got {item!r}"
                )
            timeouts[name] = float(seconds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the CPU work here is tiny models and the host side of a GPU's
    if args.stage:
        return run_stage(args.stage, args.out_dir, cfg)
    summary = run_all(args.out_dir, cfg, stages, timeouts, args.budget)
    print()
    print(markdown_table(summary))
    print(f"[gpu_check] {summary['seconds']} s; summary in {args.out_dir / 'summary.json'}")
    failed = [
        n for n, s in summary["stages"].items() if not str(s.get("status")).startswith(("ok", "skipped"))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

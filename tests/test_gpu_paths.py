"""The GPU's code paths, emulated on the CPU: flash-attention kernels, CUDA-graph replays, host copies.

Nothing here needs a GPU: each test makes the CPU behave as a GPU would where it matters (reference kernels
of flash-attn 2.x injected into transformers' own glue; a compiled step whose outputs are overwritten by its
next call, as cudagraph trees do; a device that refuses host data inside the image loop).
"""

import copy
import itertools

import flash_reference
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pure.decoding import loop as engine
from pure.decoding.fronts import RowFrontsDecoding
from pure.decoding.jacobi import JacobiDecoding
from pure.decoding.loop import RestorationDecoder, SamplingConfig
from pure.decoding.sampling import ImageGridConstraintLogitsProcessor
from pure.model import load_model

H, W = 8, 4


def prompts_for(fmt, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randint(fmt.vocab.codebook_size, (H, W), generator=gen) for _ in range(n)]
    return torch.stack([fmt.prompt_ids(c, instruction="Restore.") for c in codes])


def decode(decoder, prompts, seeds=(3, 4)):
    gens = [torch.Generator().manual_seed(s) for s in seeds[: prompts.shape[0]]]
    return decoder.generate(prompts, H, W, generators=gens)


# the image phase's variants: one token per forward, Jacobi windows, row-parallel (padded sets of rows), and
# row-parallel with speculative fronts (padded windows of several rows, compacted)
VARIANTS = {
    "one-token": {},
    "jacobi": {"jacobi_window": 6},
    "rows": {"row_lag": 2},
    "fronts": {"row_lag": 2, "jacobi_window": 4},
}


def same_answers(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.answer_ids, b.answer_ids, strict=True))


# -- flash-attention 2 ---------------------------------------------------------------------------------------


@pytest.fixture
def flash_model(tiny_checkpoint, monkeypatch):
    """The tiny checkpoint with attn_implementation="flash_attention_2", the kernels emulated. (Loaded with
    sdpa and switched: transformers' load-time check wants a CUDA device; the forward reads the config.)"""
    flash_reference.install(monkeypatch)
    model = load_model(tiny_checkpoint, attn_implementation="sdpa")
    model.config._attn_implementation = "flash_attention_2"
    return model


def test_the_flash_emulation_is_faithful_where_flash_attention_is_correct(flash_model, tiny_restorer):
    """A plain forward (training's: no cache, a padding mask) through transformers' flash glue and the
    reference kernels equals sdpa's: the emulation is trustworthy, so the decoding test below means
    something."""
    ids = torch.randint(flash_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding, the case the glue is made for
    with torch.inference_mode():
        flash = flash_model(input_ids=ids, attention_mask=mask).logits
        sdpa = tiny_restorer.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(flash[0], sdpa[0], atol=2e-5)
    assert torch.allclose(flash[1, 3:], sdpa[1, 3:], atol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cfg_scale", [1.0, 0.8])
def test_decoding_is_the_same_whatever_attention_the_model_was_loaded_with(
    flash_model, tiny_restorer, tiny_format, variant, cfg_scale
):
    """A model loaded with flash-attention 2 decodes exactly as with sdpa: prompt prefill, the grid feed,
    Jacobi windows and sets of rows (flash's glue reads a static cache's 2-D mask as left padding)."""
    sampling = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale, max_text_tokens=4, **VARIANTS[variant])
    prompts = prompts_for(tiny_format, 2)
    sdpa = decode(RestorationDecoder(tiny_restorer.model, tiny_format, sampling), prompts)
    flash = decode(RestorationDecoder(flash_model, tiny_format, sampling), prompts)
    assert same_answers(flash, sdpa)
    assert flash_model.config._attn_implementation == "flash_attention_2"  # training keeps it


# -- CUDA graphs: a replay overwrites the previous replay's outputs ------------------------------------------


def overwriting_capture(fn):
    """A CPU stand-in for ``torch.compile(mode="reduce-overhead")``: like a CUDA-graph replay, each call
    writes over the tensors the previous call returned (here with garbage), so a caller that keeps them
    across calls without copying reads wrong values."""
    previous: list[torch.Tensor] = []

    def step(*args):
        for t in previous:
            t.fill_(-7) if not t.is_floating_point() else t.fill_(float("nan"))
        out = fn(*args)
        previous[:] = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
        return out

    return step


@pytest.fixture
def cpu_graphs(monkeypatch):
    """``compile=True`` takes the CUDA-graph path on the CPU, with :func:`overwriting_capture`."""
    monkeypatch.setattr(engine, "capture_cuda_graphs", overwriting_capture)
    monkeypatch.setattr(engine, "uses_cuda_graphs", lambda compile, device: compile is True)


@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_compiled_step_survives_replays_overwriting_its_outputs(
    tiny_restorer, tiny_format, cpu_graphs, layout, variant, temperature
):
    sampling = SamplingConfig(temperature=temperature, max_text_tokens=3, **VARIANTS[variant])
    prompts = prompts_for(tiny_format, 2)
    model = tiny_restorer.model
    eager = decode(RestorationDecoder(model, tiny_format, sampling, guidance_layout=layout), prompts)
    graphs = decode(
        RestorationDecoder(model, tiny_format, sampling, compile=True, guidance_layout=layout), prompts
    )
    assert same_answers(graphs, eager)
    # a graph's masks span the whole capacity: more masked slots in sdpa's sums, the last bits may differ
    assert torch.allclose(graphs.entropy, eager.entropy, atol=1e-5)


def test_the_overwriting_stand_in_catches_a_loop_that_keeps_outputs(tiny_restorer, tiny_format, monkeypatch):
    """The stand-in has teeth: a loop that reads a step's output after the next call gets garbage."""
    step = overwriting_capture(lambda x: (x + 1,))
    (kept,) = step(torch.zeros(3))
    step(torch.zeros(3))
    assert kept.isnan().all()


# -- host-to-device copies and static inputs -----------------------------------------------------------------


class HostDataRefused(TorchFunctionMode):
    """Fails on any tensor made from host data on another device, or copied there from the CPU: on a GPU,
    a blocking host-to-device copy (and a copy of a non-static input in every CUDA-graph replay)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        device = kwargs.get("device")
        if name in ("tensor", "as_tensor") and device is not None and torch.device(device).type != "cpu":
            raise AssertionError(f"torch.{name}(..., device={device}) in the image loop")
        if name in ("to", "copy_") and args and isinstance(args[0], torch.Tensor):
            target = args[1] if len(args) > 1 else kwargs.get("device")
            source = args[1] if name == "copy_" else args[0]
            to_device = isinstance(target, (str, torch.device)) and torch.device(target).type != "cpu"
            if name == "to" and to_device and args[0].device.type == "cpu":
                raise AssertionError("a CPU tensor copied to the device in the image loop")
            if name == "copy_" and source.device.type == "cpu" and args[0].device.type != "cpu":
                raise AssertionError("a CPU tensor copied to the device in the image loop")
        return func(*args, **kwargs)


@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_loop_copies_nothing_from_the_host(
    tiny_restorer, tiny_format, monkeypatch, layout, variant
):
    """On the meta device (no values, so no syncs either), the image phase runs without host data. What is
    made once per decoder or per device (the constraint's tables, the image codes) is made first."""
    model = copy.deepcopy(tiny_restorer.model).to("meta")
    monkeypatch.setattr(
        engine, "noise_keys", lambda gens, b, device: torch.zeros(b, 2, dtype=torch.long, device=device)
    )
    monkeypatch.setattr("pure.decoding.jacobi.noise_keys", engine.noise_keys)
    monkeypatch.setattr("pure.decoding.rows.noise_keys", engine.noise_keys)
    monkeypatch.setattr("pure.decoding.fronts.noise_keys", engine.noise_keys)
    sampling = SamplingConfig(temperature=0.9, cfg_scale=0.8, **VARIANTS[variant])
    decoder = RestorationDecoder(model, tiny_format, sampling, guidance_layout=layout)
    meta = torch.device("meta")
    prompts = prompts_for(tiny_format, 1).to(meta)
    block = tiny_format.image_block_length(H, W)
    state = decoder._prefill(prompts, block, block, decoder._ahead(H, W))
    decoder._start_image(state, H, W)
    constraint = ImageGridConstraintLogitsProcessor(tiny_format.vocab, H, W)
    entropy = torch.zeros(1, H, W, device=meta)

    class Bar:
        def update(self, n):
            pass

    constraint.forced_at(torch.arange(1, device=meta))
    decoder._image_codes(meta)
    if (
        variant == "jacobi"
    ):  # Jacobi commits as many tokens as its window accepted: the one host read it makes
        monkeypatch.setattr(JacobiDecoding, "_committed", staticmethod(lambda decided, left: min(2, left)))
    if variant == "fronts":  # as Jacobi: how many drafts each front accepted (here one)
        monkeypatch.setattr(
            RowFrontsDecoding, "_read", staticmethod(lambda a: [[1] * a.shape[1]] * a.shape[0])
        )
    with torch.inference_mode(), HostDataRefused():
        decoder._image_phase(state, constraint, [None], entropy, Bar())


def test_head_rows_and_rotary_tables_are_made_once_and_static(tiny_restorer, tiny_format):
    """CUDA-graph trees copy every input that is not static at each replay: the image codes' LM-head rows
    (128 MiB at 7B) and the rotary tables are made once per decoder and marked static."""
    decoder = RestorationDecoder(
        tiny_restorer.model, tiny_format, SamplingConfig(temperature=0.0, max_text_tokens=2)
    )
    prompts = prompts_for(tiny_format, 1)
    seen = []
    forward = decoder._forward

    def record(ids, positions, mask, cache, keep, rotary=None, codes=None):
        if codes is not None:
            seen.append((codes.head, rotary[0], rotary[1]))
        return forward(ids, positions, mask, cache, keep, rotary, codes)

    decoder._forward = record
    decode(decoder, prompts)
    decode(decoder, prompts)
    first = seen[0]
    assert all(all(a is b for a, b in zip(first, other, strict=True)) for other in seen)
    for t in first:
        assert getattr(t, "_dynamo_static_input_type", None) is not None, "not marked static"


# -- recompilation -------------------------------------------------------------------------------------------


def test_cache_capacity_grows_geometrically_so_recompiles_are_bounded(tiny_restorer, tiny_format):
    """Compiled steps specialise on the cache's shape. A decoder reuses its largest capacity for anything
    that fits and grows it by at least half when it must, so a run of ever longer texts recompiles a few
    times, not once per 256 slots, and never past dynamo's limit without saying so."""
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, compile="eager")
    needs = range(300, 8000, 97)  # from a 64 px image with a short text to 512 px with a long one
    capacities = [decoder._capacity_for(need) for need in needs]
    assert all(c >= n and c % 256 == 0 for c, n in zip(capacities, needs, strict=True))
    assert capacities == sorted(capacities)
    assert len(set(capacities)) <= 8
    assert decoder._capacity_for(500) == capacities[-1]  # a smaller need reuses the largest shape
    assert decoder.recompiles == len(set(capacities)) - 1


def test_past_dynamo_s_recompile_limit_the_decoder_warns(tiny_restorer, tiny_format):
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, compile="eager")
    with torch._dynamo.config.patch(recompile_limit=2):
        decoder._capacity_for(300)
        decoder._capacity_for(1000)
        with pytest.warns(RuntimeWarning, match="recompile"):
            decoder._capacity_for(5000)
            decoder._capacity_for(50000)


# -- timings -------------------------------------------------------------------------------------------------


def test_phase_timings_wait_for_the_device(tiny_restorer, tiny_format, monkeypatch):
    """Each phase's time is read after the device has finished its queued work (a GPU runs asynchronously)."""
    events = []
    monkeypatch.setattr(engine, "synchronize", lambda device: events.append(("sync", str(device))))
    clock = iter(range(100))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: events.append(("clock",)) or next(clock))
    decoder = RestorationDecoder(
        tiny_restorer.model, tiny_format, SamplingConfig(temperature=0.0, max_text_tokens=2)
    )
    decode(decoder, prompts_for(tiny_format, 1))
    clocks = [i for i, e in enumerate(events) if e[0] == "clock"]
    assert len(clocks) >= 3
    assert all(i > 0 and events[i - 1] == ("sync", "cpu") for i in clocks)


def test_the_restorer_s_timings_wait_for_the_device(tiny_restorer, monkeypatch):
    from PIL import Image

    from pure import restorer

    events = []
    monkeypatch.setattr(restorer, "synchronize", lambda device: events.append("sync"))
    clock = iter(range(100))
    monkeypatch.setattr(restorer.time, "perf_counter", lambda: events.append("clock") or next(clock))
    tiny_restorer.restore_batch(
        [Image.new("RGB", (16, 16), "gray")], size=64, sampling=SamplingConfig(max_text_tokens=2)
    )
    first_two = [i for i, e in enumerate(events) if e == "clock"][:2]  # start, then after the VQ encoding
    assert all(events[i - 1] == "sync" for i in first_two)


# -- reading only the live cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_eager_steps_attend_only_the_slots_in_use(tiny_restorer, tiny_format, monkeypatch, layout):
    """Eagerly, each step's attention gets the cache's first ``length`` slots, not its whole capacity: one
    more per image token (two in the "shared" layout, the row's and its twin's)."""
    from pure.decoding import attention

    widths = []
    sdpa = attention.sdpa_attention_forward

    def record(module, query, key, value, mask, *args, **kwargs):
        if module.layer_idx == 0:
            widths.append((key.shape[-2], mask.shape[-1]))
        return sdpa(module, query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", record)
    sampling = SamplingConfig(temperature=0.0, max_text_tokens=3)
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, sampling, guidance_layout=layout)
    out = decode(decoder, prompts_for(tiny_format, 1))
    keys = [k for k, m in widths]
    assert all(k == m for k, m in widths)
    image = keys[-(H * (W + 1)) :]  # the body's steps
    per_token = 2 if layout == "shared" else 1
    assert all(b - a == per_token for a, b in itertools.pairwise(image))
    assert out.forward_passes == len(keys)


def test_a_block_mask_of_the_visible_blocks_gives_the_dense_mask_s_attention():
    """flex attention over :func:`live_block_mask` equals sdpa with the dense mask, and its block table
    lists the blocks that hold a visible slot, first."""
    from torch.nn.attention.flex_attention import flex_attention

    from pure.decoding.attention import KV_BLOCK, live_block_mask

    slots = 4 * KV_BLOCK
    allowed = torch.zeros(2, 1, 2, slots, dtype=torch.bool)
    allowed[0, 0, :, :200] = True  # blocks 0, 1
    allowed[1, 0, 0, 300:310] = True  # block 2 only, for one query ...
    allowed[1, 0, 1, 5:6] = True  # ... and block 0 for the other
    block_mask = live_block_mask(allowed)
    count, order = block_mask.kv_num_blocks[:, 0, 0], block_mask.kv_indices[:, 0, 0]
    assert count.tolist() == [2, 2]
    assert order[0, :2].tolist() == [0, 1] and order[1, :2].tolist() == [0, 2]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16, generator=gen) for n in (2, slots, slots))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(flex_attention(q, k, v, block_mask=block_mask), dense, atol=1e-5)


def test_step_traffic_counts_the_slots_each_attention_reads():
    """Hand-counted on a 1-layer model decoding 4 image tokens after a 100-token context (in KV slots)."""
    from types import SimpleNamespace

    from pure.decoding.traffic import step_traffic
    from pure.memory import DecodeShape

    config = SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_key_value_heads=1, num_attention_heads=1)
    slot = 1 * 2 * 1 * 8 * 2  # K and V of 8 bf16 values
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False)])
    model.model.embed_tokens = torch.nn.Embedding(10, 8)
    model.lm_head = torch.nn.Linear(8, 10, bias=False)
    shape = DecodeShape(prompt=90, text=20, block=4)  # capacity 114 per row ("rows"), 118 ("shared")
    context = 90 + 7 + 3  # prompt, 7 tokens of text, the grid feed

    def kv(layout, reads):
        return step_traffic(config, model, shape, layout, "bf16", 5, reads, text=7).kv / slot

    steps = range(4)
    assert kv("rows", "capacity") == 2 * 114 and kv("shared", "capacity") == 118
    assert kv("rows", "live") == sum(2 * (context + t) for t in steps) / 4
    assert kv("shared", "live") == sum(context + 2 * (3 + t) for t in steps) / 4
    assert kv("shared", "blocks") == 128  # everything live fits the first block
    assert kv("rows", "blocks") == 128 + 128  # the twin's block (slots 97..) is block 0 too
    ideal = step_traffic(config, model, shape, "rows", "bf16", 5, "blocks", text=7).ideal_kv / slot
    assert ideal == sum(context + t + 3 + t for t in steps) / 4
    weights = step_traffic(config, model, shape, "rows", "bf16", 5, "live", text=7)
    assert weights.weights == 8 * 8 * 2 and weights.head == 5 * 8 * 2  # the tables are not read


def test_a_forward_costs_one_read_until_its_tokens_outlast_it():
    """The roofline of a forward (pure.decoding.traffic.ForwardCost), hand-counted on the model above: per
    fed token, 2 FLOPs per linear weight and image-code head row, 4 per attended key and channel, for the
    token and its guidance twin."""
    from types import SimpleNamespace

    from pure.decoding.traffic import forward_cost, step_traffic
    from pure.memory import DecodeShape

    config = SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_key_value_heads=1, num_attention_heads=1)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False)])
    model.model.embed_tokens = torch.nn.Embedding(10, 8)
    model.lm_head = torch.nn.Linear(8, 10, bias=False)
    shape = DecodeShape(prompt=90, text=20, block=4)
    traffic = step_traffic(config, model, shape, "rows", "bf16", 5, "blocks", text=7)
    cost = forward_cost(config, model, shape, traffic, 5)
    attended = (90 + 7 + 3) + 1.5 + 3 + 1.5  # the row's context and its twin's, mean over the 4 steps
    per_token = 2 * (2 * (8 * 8 + 5 * 8)) + 4 * 8 * attended
    assert cost.linear_flops * 2 + cost.attention_flops * 2 == pytest.approx(per_token)
    read = traffic.total  # bytes: one second at this bandwidth
    assert cost.free_tokens(read, flops=10 * per_token) == 10
    times = [cost.seconds(n, read, flops=10 * per_token) for n in (1, 10, 20, 40)]
    assert times == pytest.approx([1, 1, 2, 4])


def test_a_compiled_step_attends_through_one_block_mask_per_forward(tiny_restorer, tiny_format):
    """Inside torch.compile every layer runs flex attention over the live blocks, and the block mask is built
    once per forward (one sort of the blocks), not once per layer: read off the graphs dynamo captures."""
    graphs = []

    @torch._dynamo.register_backend(name="pure_test_recorder")
    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    sampling = SamplingConfig(temperature=0.0, max_text_tokens=2)
    eager = decode(
        RestorationDecoder(tiny_restorer.model, tiny_format, sampling), prompts_for(tiny_format, 1)
    )
    decoder = RestorationDecoder(tiny_restorer.model, tiny_format, sampling, compile="pure_test_recorder")
    assert same_answers(decode(decoder, prompts_for(tiny_format, 1)), eager)
    torch._dynamo.reset()
    [graph] = graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    layers = tiny_restorer.model.config.num_hidden_layers
    assert sum("flex_attention" in t for t in targets) == layers
    # one block mask: two sorts (the visible blocks, and BlockMask's own query-block table); per layer, 2 each
    assert layers > 1 and sum("argsort" in t for t in targets) == 2

"""pure.memory: the predicted peak follows the engine's allocations and the 7B architecture's sizes."""

from __future__ import annotations

import pytest
import torch

from pure.bench import PURE_CODEBOOK, PassCounter, build_arch, memory_estimate
from pure.decoding.loop import RestorationDecoder, SamplingConfig
from pure.memory import (
    LAYOUTS,
    TARGET_GB,
    DecodeShape,
    default_layout,
    estimate_peak,
    peak_table,
    weight_bytes,
)
from pure.model import PureForConditionalGeneration


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_slots_are_what_the_engine_allocates(tiny_restorer, layout):
    """The estimate's cache (rows x slots) against the cache the engine really allocates for one image."""
    model, fmt = tiny_restorer.model, tiny_restorer.format
    decoder = RestorationDecoder(model, fmt, SamplingConfig(temperature=0.0), guidance_layout=layout)
    prompt = fmt.prompt_ids(torch.zeros((4, 4), dtype=torch.long))[None]  # (1, T): a 32 px LQ image
    h = w = 4
    counter = PassCounter(model, decoder)
    try:
        decoder.generate_image(prompt, h, w)
    finally:
        counter.close()
    c = model.config
    per_slot = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    allocated = counter.cache_bytes() // model.dtype.itemsize // per_slot  # rows x slots
    shape = DecodeShape(prompt=prompt.shape[1], text=0, block=fmt.image_block_length(h, w))
    rows, slots = shape.cache(layout)
    assert allocated == rows * slots


def test_weight_bytes_by_format():
    arch = build_arch("7b")
    with torch.device("meta"):
        model = PureForConditionalGeneration(arch.config)
    n = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model, "bf16") == 2 * n
    c = arch.config
    linear = c.num_hidden_layers * (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size)
    assert linear == 6_476_005_376  # 6.48 B of the 7.08 B parameters are the decoder layers' linears
    int8 = weight_bytes(model, "int8")
    assert 2 * n - linear < int8 < 2 * n - linear + 1e7  # a byte per linear weight, scales ~7 MB
    assert weight_bytes(model, "int4") < int8
    with pytest.raises(ValueError, match="bf16, int8, int4"):
        weight_bytes(model, "fp8")


def test_7b_peaks_and_targets_at_512():
    arch = build_arch("7b")
    shape = DecodeShape(prompt=4186, text=SamplingConfig().max_text_tokens, block=4164)
    peaks = {
        (layout, fmt): estimate_peak(arch.config, shape, layout, fmt, PURE_CODEBOOK)
        for layout in LAYOUTS
        for fmt in ("bf16", "int8")
    }
    for e in peaks.values():
        assert e.peak == e.weights + e.vq + e.kv + max(e.prefill, e.image)
        assert e.fits == (e.peak <= TARGET_GB[e.weights_format] * 1e9)
    rows, shared = peaks["rows", "bf16"], peaks["shared", "bf16"]
    # the twins' prompt and text slots are what "shared" saves; its prompt runs once, not twice
    assert rows.kv - shared.kv == (shape.prompt + shape.text) * 32 * 2 * 4096 * 2
    assert rows.prefill > shared.prefill
    assert peaks["rows", "int8"].kv == rows.kv and peaks["rows", "int8"].weights < rows.weights / 1.8
    table = "\n".join(peak_table(list(peaks.values()), default_layout()))
    assert "22 GB: " in table and "16 GB: " in table and "(default)" in table


def test_bench_prints_each_layout_and_format():
    lines = memory_estimate(512)
    text = "\n".join(lines)
    for layout in LAYOUTS:
        for fmt in ("bf16", "int8", "int4"):
            assert any(line.split()[:2] == [layout, fmt] for line in lines), (layout, fmt)
    assert "22 GB peak target (bf16): default layout" in text
    assert "16 GB peak target (int8): default layout" in text

"""``python -m pure.bench``: runs on a CPU with the tiny model, prints every column and ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from pure.bench import build_arch, memory_estimate, pure_like_names
from pure.decoding.config import SamplingConfig


def run_bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pure.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_bench_runs_on_cpu_and_prints_the_table():
    done = run_bench("--size", "64", "--temperature", "0", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for column in ("steps/s", "tokens/s", "passes", "s/image", "peak mem", "KV cache"):
        assert column in out
    table, per_step = out.split("per forward pass of the image phase")[:2]
    lines = {
        line.split()[0] + " " + line.split()[1]: line for line in table.splitlines() if line.startswith("(")
    }
    assert {"(a) transformers", "(b) engine", "(c) engine"} <= set(lines)
    assert "(b)/(a) steps per second:" in out and "(c)/(a) steps per second:" in out
    assert "n/a (CPU)" in lines["(b) engine"]
    # 64 px: 8 x 8 codes, 8 x 9 + 1 = 73 image tokens; the engine: prefill, <boi> grid, 72 steps
    assert lines["(b) engine"].split()[4] == "74"
    assert lines["(a) transformers"].split()[5] == "146"  # two forwards per token
    assert "greedy: identical image tokens across methods: True" in out
    # per forward: passes per image, bytes read (within 5% of the attended slots), kernels counted
    rows = per_step.split("\n\n")[0].splitlines()
    steps = {line.split()[0]: line.split()[-5:] for line in rows if line.startswith("(")}
    assert set(steps) == {"(b)", "(c)"} and steps["(b)"][0] == "74"
    for _passes, gb, vs_ideal, eager, compiled in steps.values():
        assert float(gb) > 0 and abs(float(vs_ideal.rstrip("%"))) < 5 and int(eager) > 20 and compiled == "-"
    assert "memory estimate: 7B architecture" in out and "22 GB peak target" in out
    # where the eager engine's time goes: the ceiling is its measured ratio over its forwards' share
    bound = re.search(
        r"\(b\) spends (\d+)% of its time in the model's forwards .* cannot pass ([\d.]+)x / ([\d.]+) = "
        r"([\d.]+)x",
        out,
    )
    assert bound, out
    percent, ratio, share, ceiling = map(float, bound.groups())
    assert 0 < share < 1 and percent == pytest.approx(100 * share, abs=1)
    ratio_line = re.search(r"\(b\)/\(a\) steps per second: ([\d.]+)x", out)
    assert ratio == float(ratio_line.group(1))
    # the printed figures are rounded (ratio and share to 0.01, the ceiling to 0.1): the ceiling lies within
    # what the rounded ratio over the rounded share allows
    low, high = (ratio - 0.005) / (share + 0.005), (ratio + 0.005) / (share - 0.005)
    assert low - 0.05 <= ceiling <= high + 0.05, (ratio, share, ceiling)


def test_bench_refuses_7b_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the 7b run is the gpu-marked test")
    done = run_bench("--arch", "7b")
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stdout and "weights" in done.stdout


def test_synthetic_vocabulary_has_pure_ids():
    names = pure_like_names()
    arch = build_arch("7b")
    v = arch.tokenizer.vocab
    assert len(names) == v.size == 73_728 and v.codebook_size == 16_384
    assert (v.bos, v.pad, v.eoi, v.boi, v.eot, v.newline) == (0, 1, 8196, 8197, 8710, 8803)
    assert v.grid_token(16) == 8820  # spec 1.4: a 512 px image has 16 grid cells a side
    assert v.code_to_id[0] == 4 and v.code_to_id[8191] == 8195
    assert v.code_to_id[8192] == 65_536 and v.code_to_id[16_383] == 73_727


def test_memory_estimate_of_7b_at_512():
    lines = "\n".join(memory_estimate(512))
    assert "7.08 B parameters" in lines
    assert "weights                                  13.19 GiB" in lines
    assert "0.50 MiB" in lines  # per token slot and row: 32 layers x K,V x 4096 x 2 bytes
    assert "block 4164" in lines  # spec 1.4
    # the roofline of a forward: flat while reading the weights and cache dominates, then linear in tokens
    bf16 = next(
        line.split() for line in lines.splitlines() if line.strip().startswith("bf16") and "free" not in line
    )
    ms = [float(x) for x in bf16[1:-1]]
    assert ms[0] == ms[1] == ms[2] < ms[-1] and 64 < int(bf16[-1]) < 256
    projected = {line[:38].strip(): line[38:].split() for line in lines.splitlines() if line.startswith("  ")}
    assert projected["one token per forward"][1] == "4161"  # header + 64 x 65 body tokens
    assert projected["rows, lag 4 (lossy)"][1] == "316"  # (h - 1) L + w


def test_projected_forwards_count_what_each_decoding_feeds():
    from pure.bench import projected_forwards

    assert projected_forwards(4, 0, 0, 0.0) == [1] * 20  # the 4 x 5 body (the header's forward decided one)
    assert projected_forwards(4, 0, 5, 0.0) == [5] * 20  # Jacobi, nothing accepted: a token per window
    assert projected_forwards(4, 0, 5, 1.0) == [5] * 4  # everything accepted: 5 tokens per window
    rows = projected_forwards(4, 2, 0, 0.0)  # compiled row-parallel decoding: padded to the most rows
    assert len(rows) == 6 + 3 and set(rows) == {3}  # (h - 1) L + w - 1 forwards after the header
    fronts = projected_forwards(8, 1, 4, 0.9)
    assert len(fronts) < len(projected_forwards(8, 1, 0, 0.0)) and all(n >= 16 for n in fronts)  # padded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_7b_on_gpu():
    done = run_bench("--arch", "7b", "--steps-limit", "260", "--skip", "a", timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(b) engine" in done.stdout and "GiB" in done.stdout


def test_pass_table_of_a_checkpoint(tiny_checkpoint, tiny_restorer):
    """``--model``: every decoding of the image on the same hold-out, its forwards per image and the lossy
    ones' paired differences from one token per forward."""
    from PIL import Image

    from pure.bench_passes import REFERENCE, decodings, pass_table

    settings = decodings(6, [1, 99], SamplingConfig(max_text_tokens=4))  # a random model never ends its text
    assert next(iter(settings)) == REFERENCE and settings["rows, lag 1"].row_lag == 1
    gen = torch.Generator().manual_seed(0)
    images = {
        f"noise{i}": Image.fromarray(torch.randint(0, 256, (96, 96, 3), generator=gen).byte().numpy())
        for i in range(2)
    }
    with torch.inference_mode():
        lines, results = pass_table(tiny_restorer, images, settings, seeds=(0, 1), crop=64)
    size = results["protocol"]["crop"]
    grid = size // 8
    table = {line[:34].strip(): line[34:].split() for line in lines[2:-1]}
    assert list(table) == list(settings)
    one = table[REFERENCE]
    assert one[:2] == ["yes", "1.00"] and int(one[2]) == grid * (grid + 1) + 1
    rows1 = table["rows, lag 1"]
    assert rows1[0] == "no" and int(rows1[2]) == (grid - 1) * 1 + grid
    assert float(rows1[1]) == pytest.approx((grid * (grid + 1) + 1) / int(rows1[2]), abs=0.01)
    assert int(table["rows, lag 99"][2]) == grid * (grid + 1) - 1  # the one-token order, 2 forwards fewer
    fronts = table["rows, lag 1, Jacobi 6"]  # row-parallel's distribution: as lossy, in fewer forwards
    assert fronts[0] == "no" and int(fronts[2]) <= int(rows1[2])
    assert "±" in " ".join(rows1) and all(t[0] == "yes" for k, t in table.items() if k.startswith("Jacobi"))
    # a lag past the width is the one-token loop: the same images, so every paired difference is 0
    assert " ".join(table["rows, lag 99"][5:]).count("+0.0") == 3
    # tokens fed per forward: the one-token loop feeds the header's 3, then one per forward
    assert float(one[3]) == pytest.approx((3 + grid * (grid + 1)) / int(one[2]), abs=0.05)
    assert float(rows1[3]) > 1 and float(fronts[3]) > 1
    assert "guidance 0.8, temperature 0.9 (PURE's);" in lines[0]  # the sampling every row shares


def test_pass_table_names_its_sampling():
    from pure.bench_passes import sampling_words

    assert sampling_words(SamplingConfig()) == "guidance 0.8, temperature 0.9 (PURE's)"
    assert sampling_words(SamplingConfig(cfg_scale=1.0, temperature=0.0)) == "no guidance, greedy"
    assert sampling_words(SamplingConfig(cfg_scale=3, temperature=1)) == "guidance 3, temperature 1"

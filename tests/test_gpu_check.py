"""``python -m pure.gpu_check``: its CPU mode end to end, its stages on the tiny model, its timeouts.

The GPU run itself happens on the GPU machine (README, "Decoding speed"); here every stage's code runs on
the tiny model, so that the one GPU run does not find a bug in the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pure import gpu_check
from pure.gpu_check import CheckConfig, markdown_table, run_all, run_child, run_stage

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode: stages 3-5 run on a GPU here")


@pytest.mark.slow  # 37-47 s on the 2 shared cores under load: three processes import torch
@no_cuda
def test_cpu_mode_checks_the_tiny_model_and_skips_the_gpu_stages(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pure.gpu_check", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["env", "tiny", "decode", "profile", "lora"]
    assert stages["env"]["status"] == "ok" and stages["env"]["packages"]["torch"] == torch.__version__
    assert stages["env"]["cuda"] is None and "flash_attn_import" in stages["env"]
    tiny = stages["tiny"]
    assert tiny["status"] == "ok" and tiny["device"] == "cpu"
    # one-token and Jacobi, eager and compiled, rows and shared; fronts eager and compiled
    assert len(tiny["greedy_vs_cpu"]) == 10
    assert all(case["equal"] for case in tiny["greedy_vs_cpu"].values())
    assert [case["completed"] for case in tiny["sampled"].values()] == [
        True,
        True,
        True,
    ]  # fronts sampled too
    for name in ("decode", "profile", "lora"):
        assert stages[name] == {"status": "skipped: no CUDA"}
    assert "===== stage tiny" in (out / "check.log").read_text()
    table = (out / "table.md").read_text()
    assert "| eager | - |" in table and "tiny ok" in table
    assert table in done.stdout


@pytest.mark.slow
def test_decode_profile_and_lora_stages_run_on_the_tiny_model(tmp_path):
    cfg = CheckConfig(arch="tiny")
    for name in ("decode", "profile", "lora"):
        assert run_stage(name, tmp_path, cfg) == 0, (tmp_path / "stages" / f"{name}.json").read_text()
    decode = json.loads((tmp_path / "stages" / "decode.json").read_text())
    assert list(decode["modes"]) == ["eager", "cuda graphs", "jacobi compiled"]
    for mode in decode["modes"].values():
        # the times are differences of two short runs: on a loaded CPU only their presence is certain
        assert all(isinstance(mode[key], float) for key in ("ms_per_forward", "ms_per_token", "s_per_image"))
        assert mode["runs"]["8 rows"][1] > mode["runs"]["4 rows"][1]  # more rows, more forwards
    eager, jacobi = decode["modes"]["eager"], decode["modes"]["jacobi compiled"]
    assert eager["tokens_per_forward"] == 1.0 and jacobi["tokens_per_forward"] > 1
    # both prompts were padded to a whole image's cache, so the two runs cost the same per step
    assert eager["cache_slots"] >= decode["setup"]["whole_image_tokens"]
    profile = json.loads((tmp_path / "stages" / "profile.json").read_text())
    assert sum(profile["share"].values()) == pytest.approx(1, abs=0.01)
    assert profile["share"]["attention"] > 0 and profile["share"]["gemm"] > 0
    assert (tmp_path / profile["trace"]).stat().st_size > 0
    lora = json.loads((tmp_path / "stages" / "lora.json").read_text())
    assert lora["setup"]["micro_batch"] >= 1 and lora["setup"]["trainable_parameters_m"] > 0
    assert [torch.isfinite(torch.tensor(s["loss"])).item() for s in lora["micro_steps"]] == [True, True]
    summary = {"config": vars(cfg), "stages": {"decode": decode, "profile": profile, "lora": lora}}
    table = markdown_table(summary)
    assert "| jacobi compiled | " in table and "Profile of 3 compiled steps" in table and "LoRA" in table


def test_a_failing_stage_is_recorded_with_its_error(tmp_path):
    assert run_stage("decode", tmp_path, CheckConfig(arch="tiny", size=40)) == 1
    record = json.loads((tmp_path / "stages" / "decode.json").read_text())
    assert record["status"] == "failed" and "--size must be a positive multiple of 32" in record["error"]


def test_a_stage_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path):
    start = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        assert run_child([sys.executable, "-c", "import time; time.sleep(60)"], 0.5, log) == "timeout"
    assert time.monotonic() - start < 10
    # the real stages' processes, given no time to import: each times out and the next still runs
    summary = run_all(tmp_path, CheckConfig(), ["env", "tiny"], {"env": 0.2, "tiny": 0.2}, budget=60)
    assert [s["status"] for s in summary["stages"].values()] == ["timeout after 0.2 s"] * 2
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == summary["stages"]
    assert (tmp_path / "table.md").exists()
    # a spent budget skips what is left
    summary = run_all(tmp_path, CheckConfig(), ["env"], gpu_check.TIMEOUTS_S, budget=1)
    assert summary["stages"]["env"]["status"] == "skipped: out of time (--budget)"


def test_bad_arguments_exit_2_with_one_line():
    assert gpu_check.main(["out", "--stages", "env,nope"]) == 2
    assert gpu_check.main(["out", "--rows", "4,6"]) == 2
    assert gpu_check.main(["out", "--timeout", "warp=3"]) == 2


def test_gpu_recipe_runs_the_check_with_the_machines_python():
    script = Path("recipes/bench/gpu_7b.sh")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-m pure.gpu_check" in text and "python3" in text and ".venv/bin" not in text
    readme = Path("README.md").read_text()
    assert "PYTHONPATH=. timeout 480 python3 -m pure.gpu_check $OUT/gpu_check" in readme
    assert f"inside a {gpu_check.BUDGET_S} s budget" in readme and gpu_check.BUDGET_S < 480


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
        ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
        ("cudnn_generated_fused_attention_forward", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "gemm"),
        (
            "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>",
            "gemm",
        ),
        ("aten::addmm", "gemm"),
        ("triton_red_fused__softmax_div_12", "other"),
        ("triton_poi_fused_add_mul_rsqrt_3", "other"),
    ],
)
def test_profile_sorts_kernels_into_attention_and_gemms(name, kind):
    assert gpu_check.classify_kernel(name) == kind


def test_the_decode_stage_sets_the_roofline_beside_its_measures():
    """On a GPU the 7B decode stage records what the roofline predicts per forward (here on a meta model)."""
    from pure.bench import build_arch
    from pure.gpu_check import roofline_ms
    from pure.model import PureForConditionalGeneration

    config = build_arch("7b").config
    with torch.device("meta"):
        model = PureForConditionalGeneration(config)
    ms = roofline_ms(model, 64)
    assert ms["bf16"][1] == ms["bf16"][16] == 3.65 and ms["int8"][1] == 2.31  # the README's table

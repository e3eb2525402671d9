"""Tests for ``python -m pure.infer`` on the tiny random checkpoint.

A subprocess costs ~6 s of imports (torch + transformers) on 2 CPU cores, so only two tests start one: the
single full-size (512 px) folder run, started in the background when this module starts and checked by its
last test, and the offline Hub lookup (it needs its own environment). The rest calls
``pure.infer.main(argv)`` in-process at 64 or 32 px: an exception escaping `main` is what would be a
traceback under ``python -m pure.infer``, and it fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import EXPECTED, make_bad_inputs
from cli_run import CliRun
from native_checkpoint import NATIVE_SIZE, native_size_checkpoint
from PIL import Image
from skimage import data

from pure.decoding.loop import SamplingConfig

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FULL_SIZE_TEST = "test_full_size_folder_run"
FULL_SIZE_INPUTS = (128, 256, 512)  # the native x4, x2 and x1 cases of a 512 px restoration
SUBPROCESS_TIMEOUT_S = 300
# `main` timed inside the process: importing torch and transformers takes ~6 s alone, more on a busy machine.
TIMED_MAIN = """
import sys, time
from pure import infer
start = time.monotonic()
code = infer.main(sys.argv[1:])
print(f"main took {time.monotonic() - start:.2f} s", file=sys.stderr)
sys.exit(code)
"""
# Ctrl-C while `python -m pure.infer` imports torch (the ~10 s before main runs): an import hook raises it.
INTERRUPTED_IMPORTS = """
import builtins, runpy, sys
real_import = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted
sys.argv = ["pure.infer", *sys.argv[1:]]
runpy.run_module("pure.infer", run_name="__main__", alter_sys=True)
"""
CAPTION = "A red brick wall."
DEGRADATION = "Large blur, small noise."
# Loader conversions that must be reported on a `note:` line: case -> a word of the notice.
NOTED_CONVERSIONS = {"animated.gif": "animated", "sixteen_bit.png": "16-bit", "cmyk.jpg": "CMYK"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread is several times faster than two for these tiny matmuls, and leaves a core to the
    background run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_astronaut(path: Path, side: int) -> Path:
    Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC).save(path)
    return path


def save_coffee(path: Path, side: int) -> Path:
    Image.fromarray(data.coffee()).resize((side, side), Image.BICUBIC).save(path)
    return path


def names(folder: Path) -> set[str]:
    """Every entry, hidden ones included (atomic writes use ``.<name>.tmp-*`` files)."""
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def read_sidecar(png: Path) -> dict:
    return json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the one full-size run (background)


@dataclass
class FullSizeRun:
    process: subprocess.Popen
    inputs: list[Path]
    output: Path
    stdout: Path
    stderr: Path


@pytest.fixture(scope="module", autouse=True)
def full_size_run(request, tiny_checkpoint, tmp_path_factory):
    """Start the 512 px folder run (~20-60 s) when this module starts, so the other tests use the second
    core meanwhile; `test_full_size_folder_run` (the last test) waits for it. Not started when that test is
    deselected, and killed if it is still running when the module ends."""
    selected = any(
        getattr(item, "module", None) is request.module
        and getattr(item, "originalname", "") == FULL_SIZE_TEST
        for item in request.session.items
    )
    if not selected:
        yield None
        return
    folder = tmp_path_factory.mktemp("full_size")
    inputs_dir = folder / "inputs"
    inputs_dir.mkdir()
    inputs = [save_astronaut(inputs_dir / f"astronaut_{side}.png", side) for side in FULL_SIZE_INPUTS]
    output, stdout, stderr = folder / "restored", folder / "stdout.txt", folder / "stderr.txt"
    args = ["--input", str(inputs_dir), "--output", str(output), "--model", str(tiny_checkpoint)]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "pure.infer", *args, "--batch-size", "3", "--quiet"],
            stdout=out,
            stderr=err,
            env=ENV,
            cwd=folder,
        )
    run = FullSizeRun(process, inputs, output, stdout, stderr)
    yield run
    if run.process.poll() is None:
        run.process.kill()
    run.process.wait()


# ---------------------------------------------------------------- help and argument errors


def test_help_exits_0_and_names_the_main_options(cli):
    run = cli("--help")

    assert run.returncode == 0
    for option in ("--input", "--caption", "--overwrite", "--degradation", "--size"):
        assert option in run.stdout


@pytest.mark.parametrize(
    ("option", "value", "word"),
    [
        ("--cfg", "-1", "cfg"),
        ("--size", "100", "--size"),
        ("--size", "0", "--size"),
        ("--temperature", "-0.5", "temperature"),
        ("--batch-size", "0", "--batch-size"),
        # checked by SamplingConfig alone; the message names the option, not the field
        ("--jacobi", "1", "--jacobi must be 0 (off) or >= 2"),
        ("--jacobi", "-3", "--jacobi must be 0 (off) or >= 2"),
        ("--compile", "no-such-backend", "torch.compile backend"),
        ("--max-text-tokens", "0", "--max-text-tokens must be >= 1"),
        ("--threads", "0", "--threads must be >= 1"),
    ],
)
def test_bad_setting_is_one_error_line_and_exit_2(cli, tmp_path, option, value, word):
    image = save_astronaut(tmp_path / "lq.png", 64)

    run = cli("--input", str(image), option, value)

    assert run.returncode == 2
    assert len(run.error_lines) == 1 and word in run.error_lines[0]
    assert names(tmp_path) == {"lq.png"}


def test_missing_model_folder_is_one_error_line_and_exit_2(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 64)

    run = cli("--input", str(image), "--model", "/nonexistent")

    assert run.returncode == 2
    assert len(run.error_lines) == 1 and "/nonexistent" in run.error_lines[0]
    assert names(tmp_path) == {"lq.png"}


@pytest.mark.parametrize("name", ["examples/tiny-random", "./tiny", "no/such/ckpt", "~/no-such-checkpoint"])
def test_a_missing_model_folder_is_no_such_folder_not_a_hub_failure(cli, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()  # as in a fresh clone, which has no examples/tiny-random
    image = save_astronaut(tmp_path / "lq.png", 32)

    run = cli("--input", str(image), "--model", name)

    assert run.returncode == 2
    (line,) = run.error_lines
    assert f"{name} is not a checkpoint folder: no such folder" in line
    assert f"pure.make_random_checkpoint {name}" in line
    assert "hf download" not in line and "Hub could not be reached" not in line


def test_hub_model_offline_says_how_to_get_it_quickly(tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 64)
    empty_cache = tmp_path / "hf"
    env = {**ENV, "HF_HOME": str(empty_cache), "HF_HUB_CACHE": str(empty_cache / "hub")}
    args = ["--input", str(image), "--model", "nonwhy/PURE", "--quiet"]

    proc = subprocess.run(
        [sys.executable, "-c", TIMED_MAIN, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    run = CliRun(proc.returncode, proc.stdout, proc.stderr)

    assert "Traceback" not in run.stderr
    assert run.returncode == 2
    assert len(run.error_lines) == 1
    assert "hf download nonwhy/PURE" in run.error_lines[0] and "--model" in run.error_lines[0]
    seconds = float(re.search(r"main took ([0-9.]+) s", run.stderr).group(1))
    assert seconds < 20  # no network attempt, no retry loop
    assert not (tmp_path / "lq_pure.png").exists()


# ---------------------------------------------------------------- single file: outputs and --overwrite


def test_single_file_writes_beside_the_input_and_keeps_it_without_overwrite(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 64)
    output = tmp_path / "lq_pure.png"

    first = cli("--input", str(image))

    assert first.returncode == 0, first.stderr
    assert names(tmp_path) == {"lq.png", "lq_pure.png", "lq_pure.json"}
    with Image.open(output) as restored:
        assert restored.size == (64, 64) and restored.mode == "RGB"
    assert read_sidecar(output)["seed"] == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (output, output.with_suffix(".json"))}

    again = cli("--input", str(image), "--seed", "1")

    assert again.returncode != 0
    assert len(again.error_lines) == 1 and "--overwrite" in again.error_lines[0]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before

    replaced = cli("--input", str(image), "--seed", "1", "--overwrite")

    assert replaced.returncode == 0, replaced.stderr
    assert output.read_bytes() != before[output][0]
    assert read_sidecar(output)["seed"] == 1
    assert names(tmp_path) == {"lq.png", "lq_pure.png", "lq_pure.json"}


def test_interrupted_write_leaves_no_file(cli, tmp_path, monkeypatch):
    image = save_astronaut(tmp_path / "lq.png", 64)
    out_dir = tmp_path / "out"
    real_save = Image.Image.save

    def save_then_interrupt(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C with the PNG bytes written but not yet renamed into place

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    run = cli("--input", str(image), "--output", str(out_dir / "restored.png"))

    assert run.returncode == 130
    assert "interrupted" in run.stderr
    assert names(out_dir) == set()


def test_ctrl_c_during_the_imports_ends_with_the_same_one_line(tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 32)

    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORTS, "--input", str(image)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=SUBPROCESS_TIMEOUT_S,
    )

    assert "Traceback" not in proc.stderr
    assert proc.returncode == 130
    assert proc.stderr.splitlines() == ["interrupted; finished outputs are kept, none is half-written"]
    assert names(tmp_path) == {"lq.png"}


def blocked_output(folder: Path) -> tuple[Path, Path]:
    """An input, and an output path whose parent is a file, so writing the output must fail."""
    image = save_astronaut(folder / "lq.png", 32)
    (folder / "blocker").write_text("a file, not a folder\n")
    return image, folder / "blocker" / "restored.png"


def test_failed_write_leaves_no_partial_files(cli, tmp_path):
    image, output = blocked_output(tmp_path)

    try:
        run = cli("--input", str(image), "--output", str(output), "--size", "32")
    except OSError:
        pass  # the traceback is test_failed_write_is_one_error_line_not_a_traceback's business
    else:
        assert run.returncode != 0
    assert names(tmp_path) == {"lq.png", "blocker"}
    assert (tmp_path / "blocker").read_text() == "a file, not a folder\n"


def test_failed_write_is_one_error_line_not_a_traceback(cli, tmp_path):
    image, output = blocked_output(tmp_path)

    run = cli("--input", str(image), "--output", str(output), "--size", "32")  # an escaping error fails

    assert run.returncode != 0
    assert len(run.error_lines) == 1 and "blocker" in run.error_lines[0]


# ---------------------------------------------------------------- the bad-input corpus, one file at a time


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_corpus(cli, bad_inputs, tmp_path, name):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / (Path(name).stem + "_pure.png")

    run = cli("--input", str(bad_inputs[name]), "--output", str(output))

    if EXPECTED[name] == "error":
        assert run.returncode != 0
        assert len(run.error_lines) == 1 and name in run.error_lines[0]
        assert names(out_dir) == set()  # no output, no temporary file
        return
    assert run.returncode == 0, run.stderr
    assert run.error_lines == []
    assert names(out_dir) == {output.name, output.with_suffix(".json").name}
    with Image.open(output) as restored:
        assert restored.size == (64, 64) and restored.mode == "RGB"
    if name in NOTED_CONVERSIONS:
        notes = [line for line in run.note_lines if line.startswith(f"note: {name}:")]
        assert any(NOTED_CONVERSIONS[name] in line for line in notes), run.stderr
        assert any(NOTED_CONVERSIONS[name] in notice for notice in read_sidecar(output)["notices"])


# ---------------------------------------------------------------- folder mode


def test_folder_with_good_and_bad_files_restores_the_good_and_exits_1(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # Sorted order puts one good and one bad file in each batch of 2.
    save_astronaut(inputs / "a_good.png", 64)
    (inputs / "b_bad.png").write_text("not an image\n")
    save_coffee(inputs / "c_good.png", 32)
    (inputs / "d_bad.png").write_bytes(b"")
    out_dir = tmp_path / "restored"

    first = cli("--input", str(inputs), "--output", str(out_dir), "--batch-size", "2")

    assert first.returncode == 1
    assert "restored 2, skipped 0 existing, failed 2" in first.stdout
    assert len(first.error_lines) == 2
    assert "b_bad.png" in first.error_lines[0] and "d_bad.png" in first.error_lines[1]
    assert names(out_dir) == {"a_good.png", "a_good.json", "c_good.png", "c_good.json"}
    for stem in ("a_good", "c_good"):
        with Image.open(out_dir / f"{stem}.png") as restored:
            assert restored.size == (64, 64)
    kept = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}

    second = cli("--input", str(inputs), "--output", str(out_dir), "--batch-size", "2")

    assert second.returncode == 1  # only the bad files fail again
    assert "restored 0, skipped 2 existing, failed 2" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == kept


def test_folder_rerun_restores_only_new_files_and_exits_0(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "one.png", 64)
    save_coffee(inputs / "two.png", 16)
    out_dir = tmp_path / "restored"

    first = cli("--input", str(inputs), "--output", str(out_dir), "--batch-size", "2")

    assert first.returncode == 0, first.stderr
    assert "restored 2, skipped 0 existing, failed 0" in first.stdout
    kept = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    save_astronaut(inputs / "three.png", 32)

    second = cli("--input", str(inputs), "--output", str(out_dir), "--batch-size", "2")

    assert second.returncode == 0, second.stderr
    assert "restored 1, skipped 2 existing, failed 0" in second.stdout
    assert {name: (out_dir / name).read_bytes() for name in kept} == kept
    assert names(out_dir) == {f"{stem}.{ext}" for stem in ("one", "two", "three") for ext in ("png", "json")}

    third = cli("--input", str(inputs), "--output", str(out_dir))

    assert third.returncode == 0
    assert "nothing to do" in third.stdout and "exist" in third.stdout


def test_folder_goes_on_past_an_output_over_the_size_cap(cli, tmp_path, monkeypatch):
    from pure import tiling

    monkeypatch.setattr(tiling, "MAX_OUTPUT_PIXELS", 80 * 80)  # a small cap: no big image is ever made
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "a_small.png", 32)  # x2: 64x64, under the cap
    Image.new("RGB", (48, 48), (120, 80, 40)).save(inputs / "b_big.png")  # x2: 96x96, over it
    save_coffee(inputs / "c_small.png", 32)
    out_dir = tmp_path / "restored"

    run = cli("--input", str(inputs), "--output", str(out_dir), "--scale", "2", "--caption", CAPTION)

    assert run.returncode == 1
    assert "restored 2, skipped 0 existing, failed 1" in run.stdout
    assert len(run.error_lines) == 1 and "b_big.png" in run.error_lines[0] and "limit" in run.error_lines[0]
    assert names(out_dir) == {f"{stem}.{ext}" for stem in ("a_small", "c_small") for ext in ("png", "json")}


def test_one_image_s_bad_steering_text_fails_that_image_not_its_batch(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for stem in ("a", "b", "c"):
        save_astronaut(inputs / f"{stem}.png", 32)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"a": CAPTION, "b": "A wall <racm3:break> with ivy.", "c": CAPTION}))
    out_dir = tmp_path / "restored"

    run = cli(
        "--input", str(inputs), "--output", str(out_dir), "--batch-size", "3",
        "--caption", str(captions), "--degradation", DEGRADATION,
    )  # fmt: skip

    assert run.returncode == 1
    assert "restored 2, skipped 0 existing, failed 1" in run.stdout
    assert len(run.error_lines) == 1
    assert "b.png" in run.error_lines[0] and "special-token" in run.error_lines[0]
    assert names(out_dir) == {f"{stem}.{ext}" for stem in ("a", "c") for ext in ("png", "json")}
    assert read_sidecar(out_dir / "a.png")["caption"] == CAPTION


def test_folder_mode_shows_an_image_bar_and_a_token_bar_unless_quiet(capsys, tiny_checkpoint, tmp_path):
    from pure import infer

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "a.png", 32)
    save_coffee(inputs / "b.png", 48)  # not native: tiled
    argv = ["--model", str(tiny_checkpoint), "--size", "32", "--input", str(inputs), "--tile", "32"]
    argv += ["--caption", CAPTION, "--degradation", DEGRADATION]

    assert infer.main([*argv, "--output", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr().err
    assert infer.main([*argv, "--output", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr().err

    assert "images: 100%" in loud and "2/2" in loud
    assert "a.png tokens: 100%" in loud and "16/16" in loud  # one 32 px image: 4 x 4 latents
    assert "b.png tokens (4 tiles): 100%" in loud and "64/64" in loud  # 48 px in 32 px tiles: 2 x 2
    assert "tokens" not in quiet and "images" not in quiet


# ---------------------------------------------------------------- the checkpoint's native size


@pytest.fixture(scope="module")
def native_checkpoint(tiny_checkpoint, tmp_path_factory):
    return native_size_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("native") / "ckpt")


def test_cli_sizes_default_to_the_checkpoint_s_native_size(capsys, native_checkpoint, tmp_path):
    from pure import infer

    save_astronaut(tmp_path / "native.png", NATIVE_SIZE // 4)  # x4 of the native size
    Image.fromarray(data.coffee()).resize((100, 60), Image.BICUBIC).save(tmp_path / "wide.png")
    common = ["--model", str(native_checkpoint), "--quiet", "--caption", CAPTION]
    common += ["--degradation", DEGRADATION]

    assert infer.main([*common, "--input", str(tmp_path / "native.png")]) == 0
    assert infer.main([*common, "--input", str(tmp_path / "wide.png"), "--scale", "2"]) == 0
    err = capsys.readouterr().err
    squashed = tmp_path / "squashed.png"
    assert infer.main([*common, "--input", str(tmp_path / "wide.png"), "--output", str(squashed)]) == 0
    squash_note = capsys.readouterr().err

    assert "note:" not in err  # the 16 px square is native: no resize notice
    # without --scale a non-square input is squashed to the native square, and the note says how not to
    assert "aspect ratio not kept (--scale 2|4 or --outscale F restore it by tiles" in squash_note
    with Image.open(squashed) as restored:
        assert restored.size == (NATIVE_SIZE, NATIVE_SIZE)
    with Image.open(tmp_path / "native_pure.png") as restored:
        assert restored.size == (NATIVE_SIZE, NATIVE_SIZE)
    assert read_sidecar(tmp_path / "native_pure.png")["settings"]["size"] == NATIVE_SIZE
    settings = read_sidecar(tmp_path / "wide_pure.png")["settings"]
    assert settings["tile"] == NATIVE_SIZE and settings["tile_overlap"] == NATIVE_SIZE // 8
    assert settings["size"] == [200, 120]


def test_help_lists_the_exit_codes_and_version_prints_it(cli):
    import pure

    run = cli("--help")
    version = cli("--version")

    codes = run.stdout.split("exit codes:", 1)[1]
    for code, word in (("0", "restored"), ("1", "failed"), ("2", "usage"), ("130", "interrupted")):
        assert re.search(rf"^\s+{code}\s+.*{word}", codes, flags=re.M), code
    assert version.returncode == 0 and version.stdout.strip() == f"python -m pure.infer {pure.__version__}"


def test_help_says_the_size_defaults_to_the_checkpoint_s(cli):
    run = cli("--help")

    assert "native size" in run.stdout and "pure_image_size" in run.stdout


# ---------------------------------------------------------------- steering


def test_degradation_and_caption_go_into_the_sidecar_exactly(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 64)

    run = cli("--input", str(image), "--caption", CAPTION, "--degradation", DEGRADATION)

    assert run.returncode == 0, run.stderr
    sidecar = read_sidecar(tmp_path / "lq_pure.png")
    assert sidecar["degradation"] == DEGRADATION
    assert sidecar["caption"] == CAPTION


def test_caption_alone_goes_into_the_sidecar_exactly(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 64)

    run = cli("--input", str(image), "--caption", CAPTION)

    assert run.returncode == 0, run.stderr
    assert read_sidecar(tmp_path / "lq_pure.png")["caption"] == CAPTION


def test_caption_spelling_a_special_token_is_refused(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 64)

    run = cli("--input", str(image), "--caption", "A wall <racm3:break> with ivy.")

    assert run.returncode == 2
    assert len(run.error_lines) == 1 and "special-token" in run.error_lines[0]
    assert names(tmp_path) == {"lq.png"}


# ---------------------------------------------------------------- the text limit and tiled sidecars

SAMPLING_FIELDS = [f.name for f in fields(SamplingConfig)]


def test_max_text_tokens_cuts_the_text_and_the_sidecar_says_so(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 32)

    run = cli("--input", str(image), "--size", "32", "--max-text-tokens", "4")  # the random model babbles

    assert run.returncode == 0, run.stderr
    sidecar = read_sidecar(tmp_path / "lq_pure.png")
    assert sidecar["text_cut"] is True and sidecar["settings"]["max_text_tokens"] == 4
    assert any("max_text_tokens (4)" in notice for notice in sidecar["notices"])
    assert any("--max-text-tokens" in line for line in run.note_lines)

    steered = cli(
        "--input", str(image), "--size", "32", "--max-text-tokens", "4", "--overwrite",
        "--caption", CAPTION, "--degradation", DEGRADATION,
    )  # fmt: skip

    assert steered.returncode == 0, steered.stderr
    assert read_sidecar(tmp_path / "lq_pure.png")["text_cut"] is False


def test_tiled_sidecar_has_every_sampling_setting_and_the_text_cut(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 48)  # not native at 32 px: tiled

    run = cli(
        "--input", str(image), "--size", "32", "--scale", "1", "--max-text-tokens", "4",
        "--cfg", "1.5", "--temperature", "0.7", "--text-top-k", "2", "--jacobi", "4",
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    sidecar = read_sidecar(tmp_path / "lq_pure.png")
    settings = sidecar["settings"]
    assert set(SAMPLING_FIELDS) <= set(settings)
    assert (settings["cfg_scale"], settings["temperature"], settings["text_top_k"]) == (1.5, 0.7, 2)
    assert (settings["jacobi_window"], settings["max_text_tokens"]) == (4, 4)
    assert settings["tiles"] == 4 and sidecar["text_cut"] is True
    assert sidecar["timings"]["cpu_threads"] == 1 and "cpu_threads_from" in sidecar["timings"]


def test_settings_not_given_are_the_checkpoints_own_from_its_sampling_file(cli, tiny_checkpoint, tmp_path):
    import shutil

    from pure.decoding.config import SAMPLING_FILE

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (folder / SAMPLING_FILE).write_text('{"cfg_scale": 1.0, "temperature": 0.0, "text_top_k": 3}')
    image = save_astronaut(tmp_path / "lq.png", 16)

    own = cli("--model", str(folder), "--input", str(image), "--output", str(tmp_path / "own.png"))
    given = cli(
        "--model", str(folder), "--input", str(image), "--output", str(tmp_path / "given.png"), "--cfg", "2"
    )
    pures = cli("--input", str(image), "--output", str(tmp_path / "pure.png"))  # no file: PURE's

    assert own.returncode == given.returncode == pures.returncode == 0, own.stderr + given.stderr
    settings = {name: read_sidecar(tmp_path / f"{name}.png")["settings"] for name in ("own", "given", "pure")}
    assert [settings["own"][k] for k in ("cfg_scale", "temperature", "text_top_k")] == [1.0, 0.0, 3]
    assert [settings["given"][k] for k in ("cfg_scale", "temperature", "text_top_k")] == [2.0, 0.0, 3]
    default = SamplingConfig()
    assert [settings["pure"][k] for k in ("cfg_scale", "temperature", "text_top_k")] == [
        default.cfg_scale,
        default.temperature,
        default.text_top_k,
    ]
    assert SAMPLING_FILE in cli("--help").stdout


# ---------------------------------------------------------------- checks before any work

UNWRITABLE = Path("/proc")  # a folder no one, root included, can create a file in


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("mode", ["single", "folder"])
def test_an_unwritable_output_folder_fails_before_the_model_loads(cli, tmp_path, monkeypatch, mode):
    from pure.restorer import PureRestorer

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was found unwritable")

    monkeypatch.setattr(PureRestorer, "from_pretrained", classmethod(loaded))
    save_astronaut(tmp_path / "a.png", 32)
    if mode == "single":
        argv = ["--input", str(tmp_path / "a.png"), "--output", str(UNWRITABLE / "a_pure.png")]
    else:
        save_coffee(tmp_path / "b.png", 32)
        argv = ["--input", str(tmp_path), "--output", str(UNWRITABLE)]

    run = cli(*argv)

    assert run.returncode == 2
    (line,) = run.error_lines
    assert f"cannot write into the output folder {UNWRITABLE}" in line


# ---------------------------------------------------------------- what a folder run says


def test_a_folder_named_like_an_image_and_a_broken_link_each_get_a_line_and_count_as_failed(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "a.png", 32)
    (inputs / "folder.png").mkdir()
    (inputs / "gone.png").symlink_to(tmp_path / "deleted.png")
    out_dir = tmp_path / "restored"

    run = cli("--input", str(inputs), "--output", str(out_dir))

    assert run.returncode == 1
    assert "restored 1, skipped 0 existing, failed 2" in run.stdout
    assert len(run.error_lines) == 2
    folder_line, link_line = sorted(run.error_lines)
    assert "folder.png" in folder_line and "folder" in folder_line.split("folder.png", 1)[1]
    assert "gone.png" in link_line and "broken symbolic link" in link_line
    assert names(out_dir) == {"a.png", "a.json"}


def test_a_folder_of_nothing_but_a_broken_link_fails_with_its_line(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "gone.png").symlink_to(tmp_path / "deleted.png")

    run = cli("--input", str(inputs), "--output", str(tmp_path / "restored"))

    assert run.returncode == 1
    assert len(run.error_lines) == 1 and "broken symbolic link" in run.error_lines[0]
    assert "restored 0, skipped 0 existing, failed 1" in run.stdout


def test_stem_collision_names_the_colliding_files(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "wall.png", 32)
    save_astronaut(inputs / "wall.jpg", 32)
    save_astronaut(inputs / "other.png", 32)

    run = cli("--input", str(inputs), "--output", str(tmp_path / "restored"))

    assert run.returncode == 2
    (line,) = run.error_lines
    assert str(inputs / "wall.jpg") in line and str(inputs / "wall.png") in line and "other" not in line


def test_a_bad_file_s_error_names_its_path_once(cli, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "a.png", 32)
    (inputs / "bad.png").write_text("not an image\n")

    run = cli("--input", str(inputs), "--output", str(tmp_path / "restored"))
    described = cli("--input", str(inputs), "--describe-only")

    for result in (run, described):
        (line,) = result.error_lines
        assert line.count("bad.png") == 1, line


def test_folder_summary_lines_do_not_cut_the_caption_mid_word(capsys, tiny_checkpoint, tmp_path):
    from pure import infer

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_astronaut(inputs / "a.png", 32)
    save_coffee(inputs / "b.png", 32)
    caption = "An astronaut in a white suit stands before an American flag, holding a helmet in one hand."
    argv = ["--model", str(tiny_checkpoint), "--size", "32", "--input", str(inputs)]
    argv += ["--output", str(tmp_path / "out"), "--caption", caption, "--degradation", DEGRADATION]

    assert infer.main(argv) == 0
    out = capsys.readouterr().out

    lines = [line for line in out.splitlines() if line.startswith(("a.png: ", "b.png: "))]
    assert len(lines) == 2
    for line in lines:
        shown = line.split(DEGRADATION, 1)[1].strip()
        words = shown.removesuffix(" ...")
        assert shown == caption or (shown.endswith(" ...") and caption.startswith(words + " "))


def test_no_token_bar_when_nothing_is_decoded(capsys, tiny_checkpoint, tmp_path):
    from pure import infer

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.png").write_text("not an image\n")
    (inputs / "b.png").write_bytes(b"")
    argv = ["--model", str(tiny_checkpoint), "--size", "32", "--input", str(inputs)]

    assert infer.main([*argv, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err

    assert "0tok" not in err and "image tokens" not in err and "images: 100%" in err


# ---------------------------------------------------------------- CPU threads


@pytest.mark.parametrize(
    ("env", "argv", "threads", "source"),
    [
        ({}, [], 1, "auto: one for a model under 100 M parameters"),
        ({"OMP_NUM_THREADS": "2"}, [], 2, "OMP_NUM_THREADS"),
        ({"OMP_NUM_THREADS": "2"}, ["--threads", "1"], 1, "--threads"),
    ],
    ids=["auto", "OMP_NUM_THREADS", "--threads"],
)
def test_cpu_threads_follow_the_model_s_size_unless_told_and_the_sidecar_says(
    cli, tmp_path, monkeypatch, env, argv, threads, source
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    image = save_astronaut(tmp_path / "lq.png", 32)
    torch.set_num_threads(2)  # torch's default here: one per core
    try:
        run = cli("--input", str(image), "--size", "32", *argv)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)  # this module's

    assert run.returncode == 0, run.stderr
    timings = read_sidecar(tmp_path / "lq_pure.png")["timings"]
    assert used == timings["cpu_threads"] == threads
    assert source in timings["cpu_threads_from"]


# ---------------------------------------------------------------- the full-size run: keep this test last


@pytest.mark.slow
def test_full_size_folder_run(full_size_run, tiny_checkpoint):
    run = full_size_run
    returncode = run.process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    stdout, stderr = run.stdout.read_text(), run.stderr.read_text()

    assert "Traceback" not in stderr
    assert returncode == 0, stderr
    assert "restored 3, skipped 0 existing, failed 0" in stdout
    stems = [p.stem for p in run.inputs]
    assert names(run.output) == {f"{stem}.{ext}" for stem in stems for ext in ("png", "json")}
    for src in run.inputs:
        png = run.output / f"{src.stem}.png"
        with Image.open(png) as restored:
            assert restored.size == (512, 512) and restored.mode == "RGB"
            assert np.asarray(restored).std() > 0  # not a blank image
        sidecar = read_sidecar(png)
        assert sidecar["input"] == str(src) and sidecar["output"] == str(png)
        assert sidecar["degradation"] is None or isinstance(sidecar["degradation"], str)
        assert isinstance(sidecar["caption"], str)
        assert sidecar["seed"] == 0
        settings = sidecar["settings"]
        assert settings["cfg_scale"] == 0.8 and settings["temperature"] == 0.9
        assert settings["size"] == 512 and settings["color_fix"] is True and settings["text_top_k"] == 1
        assert sidecar["model"]["model"] == str(tiny_checkpoint)
        assert sidecar["model"]["vq"] == str(tiny_checkpoint / "vq")
        assert sidecar["model"]["dtype"] == "torch.float32"
        timings = sidecar["timings"]
        assert timings["batch_size"] == 3 and timings["total_s"] > 0
        assert {"encode_s", "text_s", "image_s", "decode_s", "forward_passes"} <= set(timings)
        assert sidecar["notices"] == []  # 128, 256 and 512 px squares are native: no resize notice


def test_describe_only_prints_text_and_writes_nothing(cli, tiny_restorer, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    save_astronaut(folder / "a.png", 64)
    save_coffee(folder / "b.png", 32)
    (folder / "broken.png").write_bytes(b"not an image")

    run = cli("--input", str(folder), "--describe-only", "--seed", "3")

    assert run.returncode == 1  # one bad file
    lines = [line for line in run.stdout.splitlines() if line.startswith(("a.png:", "b.png:"))]
    assert len(lines) == 2 and all(" | " in line for line in lines)
    assert len(run.error_lines) == 1 and "broken.png" in run.error_lines[0]
    assert names(folder) == {"a.png", "b.png", "broken.png"}  # nothing written
    # the same text as a full restoration's (the text phase is shared)
    image = Image.open(folder / "a.png")
    short = SamplingConfig(max_text_tokens=32)  # the cli fixture's
    degradation, caption = tiny_restorer.describe([image], short, seeds=[3], size=64)[0]
    one_line = " ".join(caption.split())
    assert lines[0] == f"a.png: {degradation or '(no degradation sentence)'} | {one_line}"
    result = tiny_restorer.restore(image, seed=3, size=64, sampling=short)
    assert (result.degradation, result.caption) == (degradation, caption)


def test_compare_and_entropy_map_pictures(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 32)
    out = tmp_path / "out.png"

    run = cli("--input", str(image), "--output", str(out), "--compare", "--entropy-map")

    assert run.returncode == 0
    compare, heat = Image.open(tmp_path / "out_compare.png"), Image.open(tmp_path / "out_entropy.png")
    assert compare.width >= 2 * 64  # two panels side by side
    assert heat.width >= 64 and heat.height >= 64


def test_per_image_captions_from_a_json_file(cli, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    save_astronaut(folder / "a.png", 32)
    save_coffee(folder / "b.png", 32)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"a.png": "An astronaut in a suit.", "b": "A cup of coffee."}))
    out = tmp_path / "out"

    run = cli(
        "--input", str(folder), "--output", str(out), "--caption", str(captions), "--degradation", DEGRADATION
    )

    assert run.returncode == 0
    sidecars = {name: json.loads((out / f"{name}.json").read_text()) for name in ("a", "b")}
    assert sidecars["a"]["caption"] == "An astronaut in a suit."  # by file name
    assert sidecars["b"]["caption"] == "A cup of coffee."  # by stem
    assert {s["degradation"] for s in sidecars.values()} == {DEGRADATION}


def test_unreadable_caption_file_is_one_error_line(cli, tmp_path):
    image = save_astronaut(tmp_path / "lq.png", 32)
    bad = tmp_path / "captions.json"
    bad.write_text("[1, 2")

    run = cli("--input", str(image), "--caption", str(bad))

    assert run.returncode == 2 and len(run.error_lines) == 1 and "captions.json" in run.error_lines[0]


def test_pictures_of_a_big_output_are_drawn_smaller(cli, tmp_path, monkeypatch):
    from pure import infer

    monkeypatch.setattr(infer, "PICTURE_MAX_SIDE", 32)
    image = save_astronaut(tmp_path / "lq.png", 32)

    run = cli(
        "--input",
        str(image),
        "--compare",
        "--entropy-map",
        "--degradation",
        DEGRADATION,
        "--caption",
        CAPTION,
    )

    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "lq_pure.png") as restored:
        assert restored.size == (64, 64)  # the output itself is full size
    with Image.open(tmp_path / "lq_pure_compare.png") as compare:
        assert compare.width < 2 * 64  # two 32 px panels: full size would be >= 128 (test above)
    assert (tmp_path / "lq_pure_entropy.png").exists()

"""Tests for pure.restorer: the Python API on the tiny random checkpoint, in-process, at 32-64 px.

The tiny model restores nothing (its weights are random), so these tests pin the contract, not the quality:
shapes and ranges of a `RestoreResult`, same seed -> same output, batched equals single, steering text,
the colour fix, transparency handling, and the errors `from_pretrained` and `restore_batch` raise.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from native_checkpoint import NATIVE_SIZE, native_size_checkpoint
from PIL import Image
from skimage import data

from pure.decoding.config import SAMPLING_FILE, read_sampling
from pure.decoding.loop import SamplingConfig
from pure.model import ModelLoadError
from pure.restorer import DEFAULT_IMAGE_SIZE, IMAGE_SIZE_KEY, PureRestorer, RestoreResult
from pure.sequence import SequenceFormat
from pure.vq import VQConfig, VQModel

DEGRADATION = "Large blur, small noise."
CAPTION = "A red brick wall."

# The text phase only forces a caption-only prior after a "." in the model's own text and parses the
# degradation with a regex: a model that writes no well-formed degradation sentence (the random one, or a
# real one that rambles) gets the caption dropped or glued to its own text.


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread is several times faster than two for these tiny matmuls on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def astronaut(side: int, height: int | None = None) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((side, height or side), Image.BICUBIC)


def coffee(side: int, height: int | None = None) -> Image.Image:
    return Image.fromarray(data.coffee()).resize((side, height or side), Image.BICUBIC)


def input_notices(result: RestoreResult) -> list[str]:
    """The notices about the input: the random model never ends its text, so each result also says that
    its text was cut at max_text_tokens."""
    return [notice for notice in result.notices if "max_text_tokens" not in notice]


def assert_same_result(a: RestoreResult, b: RestoreResult, pixel_tolerance: int = 0) -> None:
    assert torch.equal(a.codes, b.codes)
    assert (a.degradation, a.caption, a.text) == (b.degradation, b.caption, b.text)
    torch.testing.assert_close(a.entropy, b.entropy)
    if pixel_tolerance == 0:
        assert a.image.tobytes() == b.image.tobytes()
    else:
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
        assert diff.max() <= pixel_tolerance


# ---------------------------------------------------------------- the result


@pytest.mark.parametrize("side", [64, 32, 16])
def test_restore_result_shapes_and_ranges(tiny_restorer, side):
    result = tiny_restorer.restore(astronaut(side), seed=0, size=64)

    assert isinstance(result, RestoreResult)
    assert result.image.mode == "RGB" and result.image.size == (64, 64)
    assert result.lq_upsampled.size == (64, 64)
    assert result.codes.shape == (8, 8) and result.codes.dtype == torch.int64
    codebook = tiny_restorer.vq.config.codebook_size
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) < codebook
    assert result.entropy.shape == (8, 8)
    assert torch.isfinite(result.entropy).all()
    assert float(result.entropy.min()) >= 0.0
    assert float(result.entropy.max()) <= math.log(codebook) + 1e-3
    assert input_notices(result) == []  # 64, 32 and 16 px squares are the native x1, x2, x4 cases
    assert result.seed == 0
    assert result.settings["cfg_scale"] == 0.8 and result.settings["temperature"] == 0.9
    assert result.settings["size"] == 64 and result.settings["color_fix"] is True
    assert isinstance(result.caption, str)


def test_non_square_input_is_resized_with_a_notice(tiny_restorer):
    result = tiny_restorer.restore(astronaut(64, 48), size=32)

    assert result.image.size == (32, 32)
    (notice,) = input_notices(result)
    assert "64x48" in notice and "aspect ratio" in notice


# ---------------------------------------------------------------- seeds and batches


def test_same_seed_same_output_different_seed_different_codes(tiny_restorer):
    image = astronaut(32)
    first = tiny_restorer.restore(image, seed=7, size=32)
    again = tiny_restorer.restore(image, seed=7, size=32)
    other = tiny_restorer.restore(image, seed=8, size=32)

    assert_same_result(first, again)
    assert not torch.equal(first.codes, other.codes)


@pytest.mark.parametrize(
    ("overrides", "degradations", "captions"),
    [
        ({}, None, None),
        ({"cfg_scale": 1.0}, None, None),
        ({"text_top_k": 5}, None, None),
        # Rows whose text ends at different steps: the early ones wait with masked hole tokens.
        ({}, [DEGRADATION, None, DEGRADATION], [CAPTION, None, None]),
    ],
    ids=["cfg-0.8", "cfg-1.0-unguided", "text-top-k-5", "steered-rows"],
)
def test_batched_equals_single(tiny_restorer, overrides, degradations, captions):
    # Different sizes (native x1 and x2, and a resized non-square one) so the rows differ from the start.
    images = [astronaut(32), coffee(16), astronaut(40, 24)]
    seeds = [0, 1, 2]
    degradations = degradations or [None] * 3
    captions = captions or [None] * 3
    overrides = {**overrides, "max_text_tokens": 64}  # the random model never ends its text: keep it short

    batched = tiny_restorer.restore_batch(
        images, seeds=seeds, degradations=degradations, captions=captions, size=32, **overrides
    )
    singles = [
        tiny_restorer.restore(im, seed=s, degradation=d, caption=c, size=32, **overrides)
        for im, s, d, c in zip(images, seeds, degradations, captions, strict=True)
    ]

    assert len(batched) == 3
    for b, s in zip(batched, singles, strict=True):
        assert_same_result(b, s, pixel_tolerance=0)  # images are decoded one by one: exactly equal
        assert b.notices == s.notices
    if degradations[0]:
        assert (batched[0].degradation, batched[0].caption) == (DEGRADATION, CAPTION)
    assert batched[0].timings["batch_size"] == 3 and singles[0].timings["batch_size"] == 1


# ---------------------------------------------------------------- steering


def test_degradation_and_caption_are_forced_exactly(tiny_restorer):
    result = tiny_restorer.restore(astronaut(32), size=32, degradation=DEGRADATION, caption=CAPTION)

    assert result.degradation == DEGRADATION
    assert result.caption == CAPTION


def test_a_compiled_restorer_restores_the_same_and_keeps_its_decoders(tiny_checkpoint, tiny_restorer):
    # "eager": dynamo captures the step as one graph (what CUDA graphs need) without generating code
    compiled = PureRestorer.from_pretrained(tiny_checkpoint, device="cpu", compile="eager")
    image = astronaut(32)
    first = compiled.restore(image, seed=3, size=32)
    assert_same_result(first, tiny_restorer.restore(image, seed=3, size=32))
    decoder = compiled.decoder(SamplingConfig())
    assert decoder.compile == "eager" and "_decode_step" in decoder._compiled  # it ran compiled
    assert_same_result(compiled.restore(image, seed=3, size=32), first)
    assert compiled.decoder(SamplingConfig()) is decoder  # reused, not compiled again
    for scale in (1.0, 1.5, 2.0, 2.5, 3.0):  # other settings get their own; the oldest are let go
        compiled.decoder(SamplingConfig(cfg_scale=scale))
    assert compiled.decoder(SamplingConfig()) is not decoder
    with pytest.raises(ValueError, match=r"torch\.compile backend"):
        PureRestorer.from_pretrained(tiny_checkpoint, device="cpu", compile="no-such-backend")


def test_caption_alone_is_forced_exactly(tiny_restorer):
    result = tiny_restorer.restore(astronaut(32), size=32, caption=CAPTION)

    assert result.caption == CAPTION


def test_steering_text_that_spells_special_tokens_is_refused(tiny_restorer):
    with pytest.raises(ValueError, match="special-token"):
        tiny_restorer.restore(astronaut(32), size=32, caption="A wall <racm3:break> with ivy.")


# ---------------------------------------------------------------- colour fix and transparency


def test_color_fix_changes_pixels_not_codes_and_follows_the_lq_colours(tiny_restorer):
    image = coffee(64)
    fixed = tiny_restorer.restore(image, seed=3, size=64, color_fix=True)
    raw = tiny_restorer.restore(image, seed=3, size=64, color_fix=False)

    assert torch.equal(fixed.codes, raw.codes)
    assert fixed.image.tobytes() != raw.image.tobytes()
    assert fixed.lq_upsampled.tobytes() == raw.lq_upsampled.tobytes()

    def mean_rgb(im: Image.Image) -> np.ndarray:
        return np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)

    lq_mean = mean_rgb(fixed.lq_upsampled)
    fixed_error = np.abs(mean_rgb(fixed.image) - lq_mean).max()
    raw_error = np.abs(mean_rgb(raw.image) - lq_mean).max()
    assert fixed_error < raw_error
    assert fixed_error < 3.0  # the low band is the LQ's: the mean is kept up to clamping and truncation


def test_transparent_input_is_blended_on_white(tiny_restorer):
    clear = Image.new("RGBA", (32, 32), (10, 200, 30, 0))  # any colour, fully transparent
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    from_clear = tiny_restorer.restore(clear, seed=5, size=32)
    from_white = tiny_restorer.restore(white, seed=5, size=32)

    assert from_clear.lq_upsampled.tobytes() == from_white.lq_upsampled.tobytes()
    assert torch.equal(from_clear.codes, from_white.codes)
    assert from_clear.image.tobytes() == from_white.image.tobytes()
    assert input_notices(from_white) == []
    (notice,) = input_notices(from_clear)
    assert "RGBA" in notice and "white" in notice


# ---------------------------------------------------------------- errors


def test_from_pretrained_without_vq_folder_says_pass_vq(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt", ignore=shutil.ignore_patterns("vq"))

    with pytest.raises(ModelLoadError, match="--vq"):
        PureRestorer.from_pretrained(copy, device="cpu")


def test_from_pretrained_with_mismatched_vq_codebook_names_both_sizes(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt", ignore=shutil.ignore_patterns("vq"))
    small = VQConfig(
        codebook_size=32, base_channels=32, channel_mult=(1, 1, 1, 2), z_channels=32, num_res_blocks=1
    )
    VQModel(small).save_pretrained(copy / "vq")

    with pytest.raises(ValueError, match="64") as excinfo:
        PureRestorer.from_pretrained(copy, device="cpu")
    assert "32" in str(excinfo.value)


@pytest.mark.parametrize("size", [0, 48, 100, -32])
def test_restore_batch_refuses_a_size_that_is_not_a_multiple_of_32(tiny_restorer, size):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_restorer.restore_batch([astronaut(32)], size=size)


@pytest.mark.parametrize(
    "lists",
    [{"seeds": [0]}, {"captions": [None, None, None]}, {"degradations": [DEGRADATION]}],
    ids=["seeds", "captions", "degradations"],
)
def test_restore_batch_refuses_lists_of_the_wrong_length(tiny_restorer, lists):
    with pytest.raises(ValueError, match="one entry per image"):
        tiny_restorer.restore_batch([astronaut(32), coffee(32)], size=32, **lists)


# ---------------------------------------------------------------- the checkpoint's native size


@pytest.fixture(scope="module")
def native_restorer(tiny_checkpoint, tmp_path_factory):
    folder = native_size_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("native") / "ckpt")
    return PureRestorer.from_pretrained(folder, device="cpu")


def test_a_checkpoint_without_the_key_is_native_512(tiny_restorer):
    assert tiny_restorer.image_size == DEFAULT_IMAGE_SIZE == 512
    upsampled, notices = tiny_restorer.upsample_input(astronaut(128))  # x4 of 512

    assert upsampled.size == (512, 512) and notices == []


def test_defaults_follow_the_native_size_of_the_checkpoint(native_restorer):
    assert native_restorer.image_size == NATIVE_SIZE
    for side in (16, 32, 64):  # x4, x2, x1 of the native 64 px
        upsampled, notices = native_restorer.upsample_input(astronaut(side))
        assert upsampled.size == (NATIVE_SIZE, NATIVE_SIZE) and notices == []
    upsampled, notices = native_restorer.upsample_input(astronaut(128))  # x1 at 512, not here
    assert upsampled.size == (NATIVE_SIZE, NATIVE_SIZE) and "16, 32, 64 px" in notices[0]

    result = native_restorer.restore(coffee(16), seed=1, degradation=DEGRADATION, caption=CAPTION)

    assert result.image.size == result.lq_upsampled.size == (NATIVE_SIZE, NATIVE_SIZE)
    assert result.codes.shape == (NATIVE_SIZE // 8, NATIVE_SIZE // 8)
    assert result.settings["size"] == NATIVE_SIZE and result.notices == []
    assert len(native_restorer.describe([coffee(16)], SamplingConfig(max_text_tokens=8))) == 1


@pytest.mark.parametrize("value", [100, 0, "128", True])
def test_a_bad_native_size_in_config_json_fails_on_load(tiny_checkpoint, tmp_path, value):
    folder = native_size_checkpoint(tiny_checkpoint, tmp_path / "ckpt", size=value)

    with pytest.raises(ValueError, match=IMAGE_SIZE_KEY):
        PureRestorer.from_pretrained(folder, device="cpu")


# ---------------------------------------------------------------- forced text and token progress


def test_forced_text_is_the_whole_answer_of_every_row_and_equals_forcing_both_texts(tiny_restorer):
    images, seeds = [astronaut(32), coffee(16)], [4, 5]
    rambling = "A cup of coffee, seen from above, no degradation sentence."

    forced = tiny_restorer.restore_batch(images, seeds=seeds, size=32, forced_text=rambling)

    assert [r.text for r in forced] == [rambling] * 2
    assert all(r.degradation is None and r.caption == rambling for r in forced)
    # the text in the prompt is the sequence the text phase builds when it forces both texts token by token
    answer = SequenceFormat.answer_text(DEGRADATION, CAPTION)
    both = tiny_restorer.restore(images[0], seed=4, size=32, degradation=DEGRADATION, caption=CAPTION)
    as_text = tiny_restorer.restore_batch(images[:1], seeds=[4], size=32, forced_text=answer)[0]
    assert_same_result(both, as_text)


def test_forced_text_with_captions_is_refused(tiny_restorer):
    with pytest.raises(ValueError, match="forced_text"):
        tiny_restorer.restore_batch([astronaut(32)], size=32, captions=[CAPTION], forced_text="A wall.")


@pytest.mark.parametrize("jacobi_window", [0, 4], ids=["one-token", "jacobi"])
def test_progress_callback_counts_every_image_token(tiny_restorer, jacobi_window):
    counted: list[int] = []

    tiny_restorer.restore_batch(
        [astronaut(32), coffee(32)],
        size=32,
        forced_text="A wall.",
        progress=counted.append,
        jacobi_window=jacobi_window,
    )

    assert sum(counted) == 2 * 4 * 4  # two images of 4 x 4 latents
    assert all(n > 0 for n in counted)


def test_the_default_text_limit_holds_a_whole_pure_caption():
    # pure.data.captions caps a LLaVA caption at 512 tokens; the degradation sentence comes before it
    assert SamplingConfig().max_text_tokens >= 512 + 32


def test_a_text_cut_at_max_text_tokens_is_flagged_with_a_notice(tiny_restorer):
    image = astronaut(32)

    cut = tiny_restorer.restore(image, size=32, max_text_tokens=4)  # the random model never ends its text
    steered = tiny_restorer.restore(
        image, size=32, max_text_tokens=4, degradation=DEGRADATION, caption=CAPTION
    )
    (answer,) = tiny_restorer.describe_answers([image], SamplingConfig(max_text_tokens=4), size=32)

    assert cut.text_cut is True and cut.settings["max_text_tokens"] == 4
    assert any("max_text_tokens (4)" in notice for notice in cut.notices)
    assert steered.text_cut is False and steered.notices == []  # forced text is never cut
    assert answer.text_cut is True
    assert (answer.degradation, answer.caption) == (cut.degradation, cut.caption)


def test_a_palette_image_with_transparency_is_not_called_rgba(tiny_restorer, tmp_path):
    from pure.imageio import load_image

    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 8, 24, 24))
    palette.save(tmp_path / "palette.png", transparency=0)
    image = load_image(tmp_path / "palette.png")  # RGBA now, its source a palette

    result = tiny_restorer.restore(image, size=32, max_text_tokens=4)

    (notice,) = input_notices(result)
    assert "palette" in notice and "white" in notice and "RGBA" not in notice


def test_choose_cpu_threads():
    from pure.restorer import ONE_THREAD_PARAMETERS, choose_cpu_threads

    small, big = ONE_THREAD_PARAMETERS - 1, ONE_THREAD_PARAMETERS
    assert choose_cpu_threads(small, environ={})[0] == 1
    assert choose_cpu_threads(big, environ={}) == (None, "auto: torch's default, a thread per core")
    assert choose_cpu_threads(small, environ={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert choose_cpu_threads(big, requested=2, environ={"OMP_NUM_THREADS": "3"})[0] == 2
    assert choose_cpu_threads(small, environ={"OMP_NUM_THREADS": "lots"})[0] == 1  # not a count: ignored
    with pytest.raises(ValueError, match="threads must be >= 1"):
        choose_cpu_threads(small, requested=0)


def test_from_pretrained_sets_cpu_threads_only_when_asked(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        untouched = PureRestorer.from_pretrained(tiny_checkpoint, device="cpu")  # a library call: as found
        kept = torch.get_num_threads()
        auto = PureRestorer.from_pretrained(tiny_checkpoint, device="cpu", threads="auto")
        chosen = torch.get_num_threads()
        with pytest.raises(ValueError, match="threads must be 'auto' or a count"):
            PureRestorer.from_pretrained(tiny_checkpoint, device="cpu", threads=0)
    finally:
        torch.set_num_threads(1)

    assert (kept, untouched.threads_from) == (2, "as found")
    assert chosen == 1 and auto.threads_from.startswith("auto: one for a model under")
    result = auto.restore(astronaut(32), size=32, max_text_tokens=4)
    assert result.timings["cpu_threads"] == 1 and result.timings["cpu_threads_from"] == auto.threads_from


# ---------------------------------------------------------------- the checkpoint's decoding defaults


def with_sampling_file(tiny_checkpoint, folder, text: str):
    """A copy of the tiny checkpoint with ``text`` as its sampling.json."""
    copy = shutil.copytree(tiny_checkpoint, folder)
    (copy / SAMPLING_FILE).write_text(text)
    return copy


def test_read_sampling_takes_the_files_fields_over_pures(tmp_path):
    assert read_sampling(tmp_path) == SamplingConfig()  # no file: PURE's defaults
    (tmp_path / SAMPLING_FILE).write_text('{"cfg_scale": 1.0, "temperature": 0.0}')
    assert read_sampling(tmp_path) == SamplingConfig(cfg_scale=1.0, temperature=0.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"cfg": 1.0}', "unknown field"),  # the command-line name, not the field's
        ('{"temperature": -1}', "temperature must be >= 0"),
        ('{"row_lag": true}', "row_lag"),
        ('{"cfg_scale": "high"}', "cfg_scale"),
        ("[1.0]", "JSON object"),
        ("{cfg_scale: 1}", "not readable JSON"),
    ],
)
def test_a_bad_sampling_file_is_an_error_naming_it_before_the_weights_load(
    tiny_checkpoint, tmp_path, text, message
):
    with pytest.raises(ValueError, match=message) as excinfo:
        read_sampling(with_sampling_file(tiny_checkpoint, tmp_path / "ckpt", text))
    assert SAMPLING_FILE in str(excinfo.value)
    with pytest.raises(ModelLoadError, match=message):
        PureRestorer.from_pretrained(tmp_path / "ckpt", device="cpu")


def test_a_restoration_without_settings_uses_the_checkpoints_own(tiny_checkpoint, tiny_restorer, tmp_path):
    folder = with_sampling_file(tiny_checkpoint, tmp_path / "ckpt", '{"cfg_scale": 1.0, "temperature": 0.0}')
    restorer = PureRestorer.from_pretrained(folder, device="cpu")
    own = SamplingConfig(cfg_scale=1.0, temperature=0.0, max_text_tokens=8)
    assert restorer.sampling == SamplingConfig(cfg_scale=1.0, temperature=0.0)
    assert tiny_restorer.sampling == SamplingConfig()  # no file: PURE's

    lq = coffee(16)
    by_default = restorer.restore(
        lq, seed=1, size=64, max_text_tokens=8
    )  # an override keeps the file's other fields
    assert (by_default.settings["cfg_scale"], by_default.settings["temperature"]) == (1.0, 0.0)
    assert torch.equal(by_default.codes, tiny_restorer.restore(lq, seed=1, size=64, sampling=own).codes)
    pures = restorer.restore(
        lq, seed=1, size=64, sampling=SamplingConfig(max_text_tokens=8)
    )  # given: it wins
    assert torch.equal(pures.codes, tiny_restorer.restore(lq, seed=1, size=64, max_text_tokens=8).codes)
    assert not torch.equal(pures.codes, by_default.codes)

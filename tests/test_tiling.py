"""Tiled restoration (``pure.tiling``): tile plans, the blending window, sizes, alpha, seams, and the CLI.

Seams and the describe-once / batch-size contract use a stand-in restorer (same ``describe`` and
``restore_batch`` interface) that returns each tile with a per-tile brightness offset, so a seam is
measurable; sizes and alpha run the tiny random model at 64 px tiles.
"""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pure.decoding.config import SamplingConfig
from pure.restorer import TextAnswer
from pure.tiling import (
    blend_window,
    count_tiles,
    default_overlap,
    plan_tiles,
    restore_tiled,
    seam_steps,
    step_gradients,
    target_size,
    tiled_memory,
)

TILE, OVERLAP = 64, 16
DESCRIBED = ("Small noise.", "A smooth colour ramp.")


def smooth_image(width: int, height: int) -> Image.Image:
    """A smooth synthetic RGB image (ramps and a slow sine), kept within [30, 225] so offsets do not clip."""
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    red = 40 + 0.5 * x + 0 * y
    green = 60 + 0.6 * y + 0 * x
    blue = 128 + 60 * np.sin(x / 25.0) * np.cos(y / 30.0)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8), "RGB")


class OffsetRestorer:
    """Stand-in restorer: every tile comes back as given, plus a per-tile constant brightness offset."""

    image_size = TILE  # its "checkpoint's" native size: the default tile
    sampling = SamplingConfig()  # its "checkpoint's" decoding defaults

    def __init__(self, seed: int = 0, amplitude: float = 20.0, described: tuple = DESCRIBED):
        self.rng = np.random.default_rng(seed)
        self.amplitude = amplitude
        self.described = described
        self.describe_calls: list[dict] = []
        self.batches: list[dict] = []
        self.offsets: list[float] = []

    def describe_answers(self, images, sampling=None, seeds=None, size=None):
        self.describe_calls.append({"n": len(images), "size": size, "view": images[0].size})
        return [TextAnswer(*self.described)] * len(images)

    def restore_batch(self, images, sampling=None, seeds=None, captions=None, degradations=None, **kwargs):
        size = kwargs["size"]
        self.batches.append(
            {
                "n": len(images),
                "sizes": [im.size for im in images],
                "size": size,
                "captions": captions,
                "degradations": degradations,
                "forced_text": kwargs.get("forced_text"),
            }
        )
        results = []
        for image in images:
            offset = float(self.rng.uniform(-self.amplitude, self.amplitude))
            self.offsets.append(offset)
            pixels = np.asarray(image, dtype=np.float64) + offset
            results.append(
                SimpleNamespace(
                    image=Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8), "RGB"),
                    entropy=torch.zeros(size // 8, size // 8),
                    timings={},
                )
            )
        return results


# ---------------------------------------------------------------- the plan and the window


def tiles_per_side(length: int) -> int:
    return 1 if length <= TILE else math.ceil((length - TILE) / (TILE - OVERLAP)) + 1


@pytest.mark.parametrize(
    ("width", "height"), [(64, 64), (112, 64), (113, 64), (200, 120), (640, 480), (1000, 333)]
)
def test_plan_covers_the_image_with_overlapping_tiles_flush_with_the_border(width, height):
    boxes = plan_tiles(width, height, TILE, OVERLAP)

    assert len(boxes) == tiles_per_side(width) * tiles_per_side(height)
    covered = np.zeros((height, width), dtype=int)
    for left, top in boxes:
        assert 0 <= left <= width - TILE and 0 <= top <= height - TILE
        covered[top : top + TILE, left : left + TILE] += 1
    assert (covered >= 1).all()
    lefts, tops = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    assert lefts[-1] == width - TILE and tops[-1] == height - TILE  # last tile flush with the border
    for starts in (lefts, tops):
        assert all(0 < b - a <= TILE - OVERLAP for a, b in itertools.pairwise(starts))


def test_plan_for_a_side_shorter_than_a_tile_is_one_tile_at_zero():
    assert plan_tiles(40, 30, TILE, OVERLAP) == [(0, 0)]
    assert plan_tiles(100, 60, TILE, OVERLAP) == [(0, 0), (36, 0)]


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (64, 64), (64, -1)])
def test_plan_refuses_bad_settings(tile, overlap):
    with pytest.raises(ValueError, match=r"tile|overlap"):
        plan_tiles(100, 100, tile, overlap)


def test_window_is_one_inside_smooth_positive_and_sums_to_one_across_an_overlap():
    window = blend_window(TILE, OVERLAP)

    assert window.shape == (TILE, TILE) and window.dtype == np.float32
    assert (window > 0).all() and (window <= 1).all()
    assert (window[OVERLAP:-OVERLAP, OVERLAP:-OVERLAP] == 1).all()
    np.testing.assert_allclose(window, window.T)
    np.testing.assert_allclose(window, window[::-1, ::-1])
    ramp = window[TILE // 2, :OVERLAP]
    assert (np.diff(ramp) > 0).all()
    # the falling edge of one tile and the rising edge of the next add up to 1 (no bump, no dip)
    np.testing.assert_allclose(ramp + ramp[::-1], 1.0, rtol=1e-6)
    assert (blend_window(TILE, 0) == 1).all()


def test_target_size_keeps_the_aspect_ratio():
    assert target_size((100, 60), scale=2) == ((200, 120), 2.0)
    assert target_size((100, 60), scale=4) == ((400, 240), 4.0)
    assert target_size((100, 60), outscale=1.5) == ((150, 90), 1.5)
    assert target_size((100, 60)) == ((100, 60), 1.0)
    for kwargs, word in (
        ({"scale": 3}, "scale"),
        ({"outscale": 0}, "outscale"),
        ({"scale": 2, "outscale": 2}, "either"),
    ):
        with pytest.raises(ValueError, match=word):
            target_size((100, 60), **kwargs)


# ---------------------------------------------------------------- the stand-in restorer: contract and seams


def test_describe_once_and_every_tile_gets_the_same_text_in_small_batches():
    fake = OffsetRestorer()

    result = restore_tiled(fake, smooth_image(100, 60), scale=2, tile=TILE, overlap=OVERLAP, tile_batch=5)

    assert len(fake.describe_calls) == 1
    assert fake.describe_calls[0]["size"] == TILE and fake.describe_calls[0]["view"] == (TILE, 38)
    assert result.tiles == 12 == sum(b["n"] for b in fake.batches)
    assert [b["n"] for b in fake.batches] == [5, 5, 2]  # never more than tile_batch at once
    for batch in fake.batches:
        assert batch["size"] == TILE and all(size == (TILE, TILE) for size in batch["sizes"])
        assert batch["forced_text"] == "Small noise. A smooth colour ramp. "  # the whole answer, verbatim
        assert batch["captions"] is None and batch["degradations"] is None
    assert (result.degradation, result.caption) == DESCRIBED
    assert result.text == "Small noise. A smooth colour ramp."
    assert result.image.size == (200, 120) and result.entropy.shape == (15, 25)


def test_given_caption_and_degradation_skip_describe():
    fake = OffsetRestorer()

    result = restore_tiled(
        fake, smooth_image(100, 60), tile=TILE, overlap=OVERLAP, caption="A wall.", degradation="Blur."
    )

    assert fake.describe_calls == []
    assert all(b["forced_text"] == "Blur. A wall. " for b in fake.batches)
    assert (result.degradation, result.caption) == ("Blur.", "A wall.")


@pytest.mark.parametrize(
    ("described", "caption", "forced"),
    [
        ((None, "A colour ramp, no degradation sentence."), None, "A colour ramp, no degradation sentence. "),
        ((None, "The model's own words."), "A wall.", "A wall. "),  # a given caption alone
        ((None, ""), None, ""),  # the model wrote no text at all: none in any tile either
    ],
    ids=["described-text", "given-caption", "no-text"],
)
def test_without_a_degradation_sentence_every_tile_is_forced_the_same_whole_text(described, caption, forced):
    fake = OffsetRestorer(described=described)

    result = restore_tiled(fake, smooth_image(100, 60), scale=2, tile=TILE, overlap=OVERLAP, caption=caption)

    assert len(fake.batches) == 3  # 12 tiles, 4 at a time
    # not a caption alone, after which each tile would write a degradation sentence of its own
    assert [b["forced_text"] for b in fake.batches] == [forced] * 3
    assert result.degradation is None and result.text == forced.strip()


def test_default_tile_is_the_native_size_and_overlap_an_eighth_of_it():
    fake = OffsetRestorer()

    result = restore_tiled(fake, smooth_image(100, 60), scale=2)

    assert {b["size"] for b in fake.batches} == {fake.image_size}
    assert result.settings["tile"] == TILE and result.settings["tile_overlap"] == default_overlap(TILE) == 8
    assert result.tiles == count_tiles((100, 60), TILE, 8, scale=2) == len(plan_tiles(200, 120, TILE, 8))
    assert [default_overlap(t) for t in (512, 128, 96, 64, 32)] == [64, 16, 8, 8, 8]  # whole latents


def test_target_smaller_than_a_tile_is_padded_and_cropped_back():
    fake = OffsetRestorer(amplitude=0)

    result = restore_tiled(fake, smooth_image(40, 30), tile=TILE, overlap=OVERLAP)

    assert result.tiles == 1 and result.image.size == (40, 30)
    assert any("padded" in notice for notice in result.notices)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(smooth_image(40, 30)))


@pytest.mark.parametrize("axis", [1, 0], ids=["vertical-seams", "horizontal-seams"])
def test_blending_hides_the_seams_that_a_hard_paste_shows(axis):
    width, height = 232, 136  # 5 x 3 tiles of 64 px with 16 px overlap
    lq = smooth_image(width, height)
    fake = OffsetRestorer(seed=1)

    blended = np.asarray(restore_tiled(fake, lq, tile=TILE, overlap=OVERLAP, tile_batch=4).image)

    boxes = plan_tiles(width, height, TILE, OVERLAP)
    pixels = np.asarray(lq, dtype=np.float64)
    hard = pixels.copy()
    for (left, top), offset in zip(boxes, fake.offsets, strict=True):  # later tiles cover earlier ones
        crop = pixels[top : top + TILE, left : left + TILE]
        hard[top : top + TILE, left : left + TILE] = np.rint(crop + offset).clip(0, 255)
    band = seam_steps(boxes, pixels.shape[axis], TILE, axis)  # steps within an overlap, where a seam can be
    interior = step_gradients(pixels, axis)[~band].mean()  # the smooth input, away from any border
    hard_seam = step_gradients(hard, axis)[band].max()  # the worst step in any overlap
    blended_seam = step_gradients(blended, axis)[band].max()

    # measured (interior, hard paste, blended): vertical seams 0.48, 22.1, 2.6; horizontal 0.45, 9.5, 1.3
    assert hard_seam > 5 * interior  # the per-tile offsets make visible seams when pasted
    assert blended_seam < hard_seam / 4
    # comparable to the image's own gradient: a 40-level jump spread by a cosine over 16 px is <= 3.9
    assert blended_seam < 3 * interior + 1.5


def test_seam_steps_cover_every_overlap_and_nothing_else():
    boxes = plan_tiles(232, 136, TILE, OVERLAP)  # columns at 0, 48, 96, 144, 168 (flush); rows 0, 48, 72

    columns = seam_steps(boxes, 232, TILE, axis=1)
    rows = seam_steps(boxes, 136, TILE, axis=0)

    assert columns.shape == (231,) and rows.shape == (135,)
    # from the step into each later tile to the end of the tile before it
    assert np.flatnonzero(columns).tolist() == [
        *range(47, 64),
        *range(95, 112),
        *range(143, 160),
        *range(167, 208),
    ]
    assert np.flatnonzero(rows).tolist() == [*range(47, 64), *range(71, 112)]
    assert not seam_steps(plan_tiles(64, 64, TILE, OVERLAP), 64, TILE, axis=1).any()  # one tile: no seam


def test_step_gradients_are_the_mean_step_per_column_or_row():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[:, 3:] = 30  # a 30-level edge between columns 2 and 3
    image[2:, :, 0] += 6  # red steps by 6 between rows 1 and 2

    np.testing.assert_allclose(step_gradients(image, axis=1), [0, 0, 30, 0])
    np.testing.assert_allclose(step_gradients(image, axis=0), [0, 2, 0])
    with pytest.raises(ValueError, match="axis"):
        step_gradients(image, axis=2)


@pytest.mark.parametrize(("width", "height"), [(232, 136), (100, 60), (64, 200), (40, 30)])
def test_band_stitching_equals_blending_on_a_whole_canvas(width, height):
    """The stitcher holds one band of tile rows; the result is what a full float canvas gives."""
    lq = smooth_image(width, height)
    fake = OffsetRestorer(seed=2)

    stitched = np.asarray(restore_tiled(fake, lq, tile=TILE, overlap=OVERLAP, tile_batch=3).image)

    padded = np.pad(np.asarray(lq), ((0, max(0, TILE - height)), (0, max(0, TILE - width)), (0, 0)), "edge")
    canvas = np.zeros(padded.shape, dtype=np.float64)
    weights = np.zeros((*padded.shape[:2], 1), dtype=np.float64)
    window = blend_window(TILE, OVERLAP).astype(np.float64)[..., None]
    boxes = plan_tiles(padded.shape[1], padded.shape[0], TILE, OVERLAP)
    for (left, top), offset in zip(boxes, fake.offsets, strict=True):
        tile = np.rint(padded[top : top + TILE, left : left + TILE] + offset).clip(0, 255)
        canvas[top : top + TILE, left : left + TILE] += tile * window
        weights[top : top + TILE, left : left + TILE] += window
    expected = np.rint(canvas / weights).clip(0, 255)[:height, :width]
    assert stitched.shape == expected.shape
    assert np.abs(stitched - expected).max() <= 1  # float32 vs float64 rounding at .5, no more


def test_tiled_memory_counts_the_input_the_upsampled_input_the_output_and_one_band():
    # 3000x2000 at x2: 4 bytes per input pixel, 8 per output pixel, and a 512-row float band of 6000 px
    assert tiled_memory((3000, 2000), 512, scale=2) == 4 * 6_000_000 + 8 * 24_000_000 + 19 * 512 * 6000
    assert (
        tiled_memory((3000, 2000), 512, scale=2, alpha=True)
        == tiled_memory((3000, 2000), 512, scale=2) + 5 * 24_000_000
    )
    # per output pixel at x2: 1 (the input), 8 and the band, which weighs more on a small image
    small, big = (tiled_memory((w, h), 512, scale=2) / (4 * w * h) for w, h in ((600, 400), (3000, 2000)))
    assert 9 < big < 12 < small


# ---------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("kwargs", "size"), [({"scale": 2}, (200, 120)), ({"outscale": 1.5}, (150, 90))])
def test_tiny_model_output_size_for_scale_and_outscale(tiny_restorer, kwargs, size):
    result = restore_tiled(tiny_restorer, smooth_image(100, 60), tile=TILE, overlap=OVERLAP, **kwargs)

    assert result.image.size == size and result.image.mode == "RGB"
    assert result.lq_upsampled.size == size
    assert result.tiles == tiles_per_side(size[0]) * tiles_per_side(size[1])
    assert isinstance(result.caption, str)


def test_tiny_model_carries_alpha_through(tiny_restorer):
    rgb = np.asarray(smooth_image(100, 60))
    alpha = np.zeros((60, 100), dtype=np.uint8)
    alpha[:, :50] = 255
    alpha[20:40, 60:90] = 128
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")

    result = restore_tiled(tiny_restorer, rgba, scale=2, tile=TILE, overlap=OVERLAP, tile_batch=6)

    assert result.image.mode == "RGBA" and result.image.size == (200, 120)
    expected = Image.fromarray(alpha).resize((200, 120), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(result.image.getchannel("A")), np.asarray(expected))


# ---------------------------------------------------------------- the CLI (in-process, as test_infer_cli.py)


def test_cli_scale_restores_by_tiles_and_native_inputs_keep_the_single_pass(cli, tmp_path):
    smooth_image(100, 60).save(tmp_path / "wide.png")
    smooth_image(32, 32).save(tmp_path / "native.png")

    run = cli("--input", str(tmp_path / "wide.png"), "--scale", "2", "--tile-overlap", str(OVERLAP))

    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "wide_pure.png") as restored:
        assert restored.size == (200, 120)
    settings = json.loads((tmp_path / "wide_pure.json").read_text())["settings"]
    assert settings["tiles"] == 12 and settings["tile"] == 64 and settings["scale"] == 2.0

    native = cli("--input", str(tmp_path / "native.png"), "--tile", "64")  # 32 px = x2 of --size 64

    assert native.returncode == 0, native.stderr
    with Image.open(tmp_path / "native_pure.png") as restored:
        assert restored.size == (64, 64)
    assert "tiles" not in json.loads((tmp_path / "native_pure.json").read_text())["settings"]

    both = cli("--input", str(tmp_path / "wide.png"), "--scale", "2", "--outscale", "1.5", "--overwrite")

    assert both.returncode == 2
    assert len(both.error_lines) == 1 and "--outscale" in both.error_lines[0]


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("--tile", "48"), "--tile"),
        (("--tile", "64", "--tile-overlap", "64"), "--tile-overlap"),
        (("--scale", "2", "--tile-batch", "0"), "--tile-batch"),
        (("--outscale", "-1"), "--outscale"),
    ],
)
def test_cli_bad_tiling_option_is_one_error_line_and_exit_2(cli, tmp_path, args, word):
    smooth_image(100, 60).save(tmp_path / "wide.png")

    run = cli("--input", str(tmp_path / "wide.png"), *args)

    assert run.returncode == 2
    assert len(run.error_lines) == 1 and word in run.error_lines[0]
    assert not (tmp_path / "wide_pure.png").exists()


def test_outputs_over_the_size_limit_are_refused():
    from pure.tiling import MAX_OUTPUT_PIXELS, target_size

    side = int(MAX_OUTPUT_PIXELS**0.5)
    assert target_size((side // 4, side // 4), scale=4)[0] == (side // 4 * 4, side // 4 * 4)
    with pytest.raises(ValueError, match="MP limit"):
        target_size((side // 4 + 8, side // 4 + 8), scale=4)


class RecordingRestorer:
    """The tiny restorer, keeping every tile's result (to compare the tiles' texts)."""

    def __init__(self, restorer):
        self.restorer = restorer
        self.image_size = restorer.image_size
        self.sampling = restorer.sampling
        self.tiles: list = []

    def describe_answers(self, *args, **kwargs):
        return self.restorer.describe_answers(*args, **kwargs)

    def restore_batch(self, *args, **kwargs):
        results = self.restorer.restore_batch(*args, **kwargs)
        self.tiles.extend(results)
        return results


def test_tiny_model_every_tile_has_the_same_text(tiny_restorer):
    from pure.decoding.loop import SamplingConfig

    recorder = RecordingRestorer(tiny_restorer)
    sampling = SamplingConfig(max_text_tokens=24)  # the random model's text: short, without a degradation

    result = restore_tiled(
        recorder, smooth_image(80, 40), scale=1, tile=TILE, overlap=OVERLAP, tile_batch=2, sampling=sampling
    )

    assert len(recorder.tiles) == result.tiles == 2
    assert {tile.text for tile in recorder.tiles} == {result.text}
    assert {(tile.degradation, tile.caption) for tile in recorder.tiles} == {
        (result.degradation, result.caption)
    }


# ---------------------------------------------------------------- EXIF orientation


def save_rotated(path, orientation: int):
    """A 40x24 px image stored sideways: red left half, blue right half, with EXIF ``orientation``."""
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (220, 40, 40)
    pixels[:, 20:] = (40, 40, 220)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    return path


EXIF_ORIENTATION = 0x0112  # the TIFF/EXIF tag


@pytest.mark.parametrize(("orientation", "red_on_top"), [(6, True), (8, False)])
def test_exif_orientation_is_applied_before_tiling(tmp_path, orientation, red_on_top):
    from pure.imageio import load_image

    image = load_image(save_rotated(tmp_path / "sideways.png", orientation))
    assert image.size == (24, 40)  # 6: turn 90 degrees clockwise to view; 8: counter-clockwise

    result = restore_tiled(OffsetRestorer(amplitude=0), image, scale=2, tile=TILE, overlap=OVERLAP)

    assert result.image.size == (48, 80)  # upright, aspect ratio kept
    pixels = np.asarray(result.image, dtype=np.float64)
    top, bottom = pixels[:30].mean(axis=(0, 1)), pixels[50:].mean(axis=(0, 1))
    red, blue = (top, bottom) if red_on_top else (bottom, top)
    assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0]


def test_cli_restores_an_exif_rotated_image_upright(cli, tmp_path):
    source = save_rotated(tmp_path / "sideways.png", 6)

    run = cli("--input", str(source), "--scale", "2", "--tile-overlap", str(OVERLAP))

    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "sideways_pure.png") as restored:
        assert restored.size == (48, 80)
    assert json.loads((tmp_path / "sideways_pure.json").read_text())["settings"]["size"] == [48, 80]

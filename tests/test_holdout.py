"""`pure.eval.holdout`: Y-channel PSNR/SSIM against references, deterministic crops and baselines, the
beats-bicubic sentence following the numbers, and the CLI end to end on the tiny random checkpoint."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

from pure.colorfix import wavelet_color_fix
from pure.decoding.loop import SamplingConfig
from pure.eval import holdout
from pure.eval.holdout import (
    BORDER,
    SETTINGS,
    VQOnly,
    codes_digest,
    crop_boxes,
    gms_y,
    measure_holdout,
    native_size,
    paired_differences,
    perceive_summary,
    psnr_y,
    render_markdown,
    rgb_to_y,
    ssim_y,
    summarise,
    token_accuracy,
    understand_summary,
    verdict,
)
from pure.vq import pil_to_pixels, pixels_to_pil

CROP = 64  # small multiple of 32: the tiny model restores 16 px LQ -> 64 px in about a second
SKIMAGE_TOLERANCE = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """1 torch thread, as on the 2-core test machine; restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def astronaut(width: int = 96, height: int = 96) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)


def coffee(width: int = 100, height: int = 80) -> Image.Image:
    return Image.fromarray(data.coffee()).resize((width, height), Image.BICUBIC)


@pytest.fixture
def holdout_folder(tmp_path):
    folder = tmp_path / "holdout"
    folder.mkdir()
    astronaut().save(folder / "astronaut.png")
    coffee().save(folder / "coffee.png")
    return folder


# -- metrics -----------------------------------------------------------------------------------------------


def test_y_channel_is_bt601_studio_range():
    black = np.zeros((4, 4, 3), np.uint8)
    white = np.full((4, 4, 3), 255, np.uint8)
    assert np.allclose(rgb_to_y(black), 16.0)
    assert np.allclose(rgb_to_y(white), 235.0)  # 16 + 65.481 + 128.553 + 24.966
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert rgb_to_y(red)[0, 0] == pytest.approx(16.0 + 65.481)


def test_identical_images_give_inf_and_one():
    image = np.asarray(astronaut())
    assert psnr_y(image, image) == math.inf
    assert ssim_y(image, image) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_gives_the_analytic_psnr():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 200, size=(48, 48, 3), dtype=np.uint8)
    offset = 10  # on every channel: Y moves by offset * (65.481 + 128.553 + 24.966) / 255
    pred = ref + np.uint8(offset)
    y_offset = offset * 219.0 / 255.0
    assert psnr_y(pred, ref) == pytest.approx(20 * math.log10(255.0 / y_offset), abs=1e-9)


def test_ssim_matches_scikit_image_on_the_same_y():
    rng = np.random.default_rng(1)
    ref = np.asarray(astronaut())
    noisy = np.clip(ref.astype(np.int16) + rng.normal(0, 12, ref.shape).round(), 0, 255).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(ref).resize((24, 24), Image.BILINEAR).resize((96, 96)))
    for pred in (noisy, blurred):
        a = rgb_to_y(pred)[BORDER:-BORDER, BORDER:-BORDER]
        b = rgb_to_y(ref)[BORDER:-BORDER, BORDER:-BORDER]
        expected = structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255.0
        )
        assert ssim_y(pred, ref) == pytest.approx(expected, abs=SKIMAGE_TOLERANCE)
        assert ssim_y(pred, ref) < 1.0


def test_border_is_cut_before_scoring():
    ref = np.full((32, 32, 3), 128, np.uint8)
    pred = ref.copy()
    pred[:BORDER] = 0  # only inside the border
    assert psnr_y(pred, ref) == math.inf
    assert psnr_y(pred, ref, border=0) < 30


# -- crops, sizes, settings ----------------------------------------------------------------------------------


def test_crop_boxes_are_a_fixed_grid_inside_the_image():
    assert crop_boxes(100, 80, 64, 1) == [(8, 18)]  # the centre
    boxes = crop_boxes(300, 200, 64, 4)
    assert boxes == crop_boxes(300, 200, 64, 4) and len(set(boxes)) == 4
    assert all(0 <= t <= 200 - 64 and 0 <= left <= 300 - 64 for t, left in boxes)
    assert len(crop_boxes(300, 200, 64, 3)) == 3
    with pytest.raises(ValueError, match="smaller than"):
        crop_boxes(50, 80, 64, 1)


def test_native_size_prefers_the_restorer_then_the_config():
    assert native_size(SimpleNamespace(image_size=128)) == 128
    with_config = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(pure_image_size=256)))
    assert native_size(with_config) == 256
    assert native_size(SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace()))) == 512


def test_settings_switch_off_one_thing_each():
    default = SETTINGS["pure"]
    assert SETTINGS["pure-no-entropy"].min_k == SETTINGS["pure-no-entropy"].max_k  # fixed k
    assert SETTINGS["pure-no-cfg"].cfg_scale == 1.0
    assert SETTINGS["pure-greedy"].temperature == 0.0
    both = SETTINGS["pure-greedy-no-cfg"]
    assert (both.temperature, both.cfg_scale) == (0.0, 1.0) and both.min_k == default.min_k
    assert default.min_k < default.max_k and default.cfg_scale != 1.0


# -- the verdict follows the numbers -------------------------------------------------------------------------


def _rows(method: str, psnrs: list[float], ssims: list[float]) -> list[dict]:
    return [
        {"method": method, "crop": f"img_{i:03d}", "psnr_y": p, "ssim_y": s, "seconds": 0.5}
        for i, (p, s) in enumerate(zip(psnrs, ssims, strict=True))
    ]


def _results(rows: list[dict]) -> dict:
    summary = summarise(rows)
    return {
        "methods": summary,
        "verdict": verdict(summary),
        "protocol": {
            "crops_per_image": 1,
            "crop": 128,
            "lq_size": 32,
            "scale": 4,
            "degradation_preset": "realesrgan",
            "seeds": [0, 1],
            "color_fix": "wavelet (restorer default)",
        },
        "checkpoint": {"model": "ckpt"},
        "images": ["a", "b"],
        "skipped": [],
    }


def test_verdict_says_beats_only_when_both_means_are_higher():
    bicubic = _rows("bicubic", [24.0, 26.0], [0.60, 0.70])
    better = _results([*bicubic, *_rows("pure", [25.0, 27.0], [0.65, 0.75])])
    assert better["verdict"].startswith("pure beats bicubic on both PSNR-Y and SSIM-Y")
    assert "26.00 vs 25.00 dB" in better["verdict"]

    sharper_not_faithful = _results([*bicubic, *_rows("pure", [25.0, 27.0], [0.55, 0.60])])
    text = sharper_not_faithful["verdict"]
    assert text.startswith("pure does not beat bicubic on both: not on SSIM-Y")
    assert "PSNR-Y" not in text.split("(")[0].split("not on")[1]

    worse = _results([*bicubic, *_rows("pure", [20.0, 21.0], [0.40, 0.50])])
    assert "not on PSNR-Y nor SSIM-Y" in worse["verdict"]

    markdown = render_markdown(better)
    assert "| method | PSNR-Y (dB) | SSIM-Y | GMS-Y | token acc | s/image |" in markdown
    assert "| pure | 26.00 ± 1.00 | 0.7000 ± 0.0500 | - | - | 0.5 |" in markdown
    assert better["verdict"] in markdown


def test_verdict_without_pure_says_so():
    results = _results(_rows("bicubic", [24.0], [0.6]))
    assert "not measured" in results["verdict"]


# -- measurement on the tiny checkpoint ---------------------------------------------------------------------


def test_baselines_are_deterministic_and_plausible(tiny_restorer):
    images = {"astronaut.png": astronaut(), "coffee.png": coffee()}
    first = measure_holdout(tiny_restorer, images, crop=CROP, seeds=[0, 1], methods=["bicubic", "vq"])
    again = measure_holdout(tiny_restorer, images, crop=CROP, seeds=[0, 1], methods=["bicubic", "vq"])
    strip = ("seconds", "degrade_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in first["rows"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in again["rows"]
    ]
    assert len(first["rows"]) == 2 * 2 * 2  # images x seeds x methods

    bicubic = [r for r in first["rows"] if r["method"] == "bicubic"]
    assert all(math.isfinite(r["psnr_y"]) and r["psnr_y"] > 10 and 0 < r["ssim_y"] < 1 for r in bicubic)
    by_seed = {(r["crop"], r["seed"]): r["psnr_y"] for r in bicubic}
    assert by_seed[("astronaut_000", 0)] != by_seed[("astronaut_000", 1)]  # each seed, another LQ

    # the VQ ceiling is the decode of the HQ crop's own codes, whatever the seed
    vq_rows = [r for r in first["rows"] if r["method"] == "vq" and r["crop"] == "astronaut_000"]
    box = vq_rows[0]["box"]
    hq = astronaut().crop((box["left"], box["top"], box["left"] + CROP, box["top"] + CROP))
    vq = tiny_restorer.vq
    decoded = pixels_to_pil(vq.decode(vq.encode(pil_to_pixels(hq)[None]))[0])
    assert [r["psnr_y"] for r in vq_rows] == [pytest.approx(psnr_y(decoded, hq))] * 2
    assert first["methods"]["vq"]["psnr_y"]["n"] == 4
    assert first["protocol"]["color_fix"] == "wavelet (restorer default)"


def test_bad_api_input_is_a_holdout_error(tiny_restorer):
    with pytest.raises(holdout.HoldoutError, match="multiple of 32"):
        measure_holdout(tiny_restorer, {"a": astronaut()}, crop=48)
    with pytest.raises(holdout.HoldoutError, match="no usable"):
        measure_holdout(tiny_restorer, {"small": astronaut(40, 40)}, crop=CROP, methods=["bicubic"])
    with pytest.raises(holdout.HoldoutError, match="unknown method"):
        measure_holdout(tiny_restorer, {"a": astronaut()}, crop=CROP, methods=["nearest"])


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = holdout.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_cli_writes_results_markdown_and_pictures(tiny_checkpoint, holdout_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint), "--holdout", str(holdout_folder), "--out", str(out)]
    code, stdout, _ = _run(
        capsys, *args, "--crop", str(CROP), "--seeds", "0,1", "--methods", "bicubic,vq,pure", "--quiet"
    )
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["bicubic", "vq", "pure"]
    assert results["protocol"]["seeds"] == [0, 1] and results["protocol"]["crop"] == CROP
    assert len(results["rows"]) == 2 * 2 * 3
    assert results["checkpoint"]["files"]["model.safetensors"]["sha256"]
    assert results["settings"]["pure"]["sampling"]["cfg_scale"] == SETTINGS["pure"].cfg_scale
    pure_rows = [r for r in results["rows"] if r["method"] == "pure"]
    assert all(r["seconds"] > 0 and "degradation" in r for r in pure_rows)

    # the sentence follows the numbers written beside it
    means = {m: (s["psnr_y"]["mean"], s["ssim_y"]["mean"]) for m, s in results["methods"].items()}
    beats = means["pure"][0] > means["bicubic"][0] and means["pure"][1] > means["bicubic"][1]
    markdown = (out / "results.md").read_text()
    assert ("pure beats bicubic on both" in markdown) == beats
    assert ("pure does not beat bicubic" in markdown) == (not beats)
    assert "| method | PSNR-Y (dB) | SSIM-Y | GMS-Y | token acc | s/image |" in markdown
    assert "colour fix: wavelet" in markdown

    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert pictures == ["astronaut_000_seed0.png", "coffee_000_seed0.png"]
    with Image.open(out / "pictures" / pictures[0]) as picture:
        assert picture.width > 5 * CROP  # labelled panels: LQ, bicubic, VQ ceiling, PURE, HQ

    code, _, stderr = _run(capsys, *args, "--crop", str(CROP), "--methods", "bicubic")
    assert code == 2 and "--overwrite" in stderr  # an earlier measurement is never silently replaced


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--crop", "48"], "multiple of 32"),
        (["--crop", "64", "--seeds", "0,x"], "--seeds"),
        (["--crop", "64", "--methods", "bicubic,nearest"], "--methods"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    tiny_checkpoint, holdout_folder, tmp_path, capsys, extra, message
):
    argv = ["--model", str(tiny_checkpoint), "--holdout", str(holdout_folder), "--out", str(tmp_path / "o")]
    code, _, stderr = _run(capsys, *argv, *extra)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:") and message in stderr


def test_cli_empty_or_unusable_folder_exits_2(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--crop", "64", "--quiet"]
    code, _, stderr = _run(capsys, *argv, "--holdout", str(empty))
    assert code == 2 and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1

    small = tmp_path / "small"
    small.mkdir()
    astronaut(40, 40).save(small / "tiny.png")
    code, _, stderr = _run(capsys, *argv, "--holdout", str(small), "--methods", "bicubic")
    assert code == 2 and "no usable" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()


# -- learning or copying: the copy baseline, token accuracy, edges, Perceive and Understand ---------------


def test_token_accuracy_counts_equal_codes():
    grid = torch.arange(16).reshape(4, 4)
    assert token_accuracy(grid, grid.clone()) == 1.0
    half = grid.clone()
    half[:2] += 100
    assert token_accuracy(half, grid) == 0.5
    assert token_accuracy(grid + 1, grid) == 0.0
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(grid[:2], grid)


def test_gms_is_one_for_identical_images_and_falls_with_blur_and_invented_edges():
    ref = np.asarray(astronaut())
    assert gms_y(ref, ref) == pytest.approx(1.0)
    blurred = np.asarray(
        Image.fromarray(ref).resize((24, 24), Image.BILINEAR).resize((96, 96), Image.BILINEAR)
    )
    flat = np.full_like(ref, 128)
    assert gms_y(blurred, ref) < 0.95
    assert gms_y(flat, ref) < gms_y(blurred, ref)  # no edges at all: worst
    checker = (np.indices((96, 96)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    invented = np.repeat(checker[..., None], 3, -1)
    plain = np.full_like(invented, 128)
    assert gms_y(invented, plain) < 0.1  # edges where the reference has none


class _PerfectCopier:
    """A restorer whose model copies its input tokens: restore = VQ round trip of the upsampled LQ,
    colour-fixed against it by default as `pure.restorer.PureRestorer` does."""

    def __init__(self, vq):
        self.vq = vq
        self.image_size = CROP

    def upsample_input(self, image, size=None):
        return image.resize((size, size), Image.BICUBIC), []

    def restore_batch(self, images, color_fix=True, **kwargs):  # read for its color_fix default only
        raise NotImplementedError

    def restore(self, lq, seed=0, sampling=None, size=None, color_fix=True):
        shown, _ = self.upsample_input(lq, size)
        codes = self.vq.encode(pil_to_pixels(shown)[None])[0]
        image = pixels_to_pil(self.vq.decode(codes[None])[0])
        return SimpleNamespace(
            image=wavelet_color_fix(image, shown) if color_fix else image,
            codes=codes,
            degradation="Small blur, small noise.",
            caption="A red disc over a plain blue background.",
            entropy=torch.zeros(codes.shape),
        )


@pytest.mark.parametrize("color_fix", [None, False])
def test_copy_baseline_of_a_perfect_copy_model_equals_the_model(tiny_restorer, color_fix):
    """With the restorer's colour fix (default) and without it (--no-color-fix), the copy row is what a model
    that copies its input gives through the same restorer: the colour fix is not counted as learning."""
    copier = _PerfectCopier(tiny_restorer.vq)
    images = {"astronaut.png": astronaut(), "coffee.png": coffee()}
    results = measure_holdout(
        copier,
        images,
        crop=CROP,
        seeds=[0, 1],
        methods=["bicubic", "copy", "vq", "pure"],
        color_fix=color_fix,
    )
    assert results["protocol"]["color_fix"] == (
        "wavelet (restorer default)" if color_fix is None else "none (chosen)"
    )
    by = {(r["method"], r["crop"], r["seed"]): r for r in results["rows"]}
    for (method, crop, seed), row in by.items():
        if method == "pure":
            twin = by["copy", crop, seed]
            for key in ("psnr_y", "ssim_y", "gms_y", "token_acc"):
                assert row[key] == twin[key], key
    # every row of a pair carries one digest of the codes the model is shown; another seed, another LQ
    digests = {
        (crop, seed): {r["lq_codes"] for k, r in by.items() if k[1:] == (crop, seed)} for _, crop, seed in by
    }
    assert all(len(d) == 1 for d in digests.values())
    assert all(digests[c, 0] != digests[c, 1] for _, c, _ in by)
    assert codes_digest(torch.tensor([[1, 2]])) != codes_digest(torch.tensor([[2, 1]]))
    assert all(r["token_acc"] == 1.0 for r in results["rows"] if r["method"] == "vq")
    assert all("token_acc" not in r for r in results["rows"] if r["method"] == "bicubic")
    paired = results["paired"]
    assert all(e["mean"] == 0.0 and e["resolved"] == 0 for e in paired["copy"].values())
    assert results["methods"]["bicubic"]["token_acc"]["n"] == 0
    assert "GMS-Y" in render_markdown(results) and "pure minus each baseline" in render_markdown(results)


def test_the_colour_fix_moves_the_copy_row_and_not_its_codes(tiny_restorer):
    """The copy row with the colour fix differs in pixels from the one without, with the same token accuracy
    (the fix takes the LQ's low frequencies, it writes no codes)."""
    copier = _PerfectCopier(tiny_restorer.vq)
    images = {"astronaut.png": astronaut()}
    rows = {
        fix: {
            r["crop"]: r
            for r in measure_holdout(copier, images, crop=CROP, seeds=[0], methods=["copy"], color_fix=fix)[
                "rows"
            ]
        }
        for fix in (True, False)
    }
    assert rows[True].keys() == rows[False].keys()
    for crop in rows[True]:
        assert rows[True][crop]["token_acc"] == rows[False][crop]["token_acc"]
        assert rows[True][crop]["psnr_y"] != rows[False][crop]["psnr_y"]


def test_the_ceiling_row_is_the_hq_codes_through_the_colour_fix(tiny_restorer):
    """vq-fixed is what a model that writes every HQ code right gives through the restorer: the VQ round trip
    colour-fixed against the LQ it is shown (so per seed); the headroom is it minus copy, paired."""
    copier = _PerfectCopier(tiny_restorer.vq)
    images = {"astronaut.png": astronaut()}
    results = measure_holdout(copier, images, crop=CROP, seeds=[0, 1], methods=["vq", "vq-fixed", "copy"])
    by = {(r["method"], r["seed"]): r for r in results["rows"] if r["crop"] == "astronaut_000"}
    box = by["vq", 0]["box"]
    hq = astronaut().crop((box["left"], box["top"], box["left"] + CROP, box["top"] + CROP))
    vq = tiny_restorer.vq
    round_trip = pixels_to_pil(vq.decode(vq.encode(pil_to_pixels(hq)[None]))[0])
    for seed in (0, 1):
        pair = holdout.PairSettings(preset=holdout.PRESET, scale=holdout.SCALE, crop=CROP, seed=seed)
        _, lq, _ = holdout.make_pair(
            hq, holdout.DegradationConfig.from_yaml(holdout.PRESET), pair, "astronaut.png", 0
        )
        shown = Image.fromarray(lq, "RGB").resize((CROP, CROP), Image.BICUBIC)
        fixed = wavelet_color_fix(round_trip, shown)
        assert by["vq-fixed", seed]["psnr_y"] == pytest.approx(psnr_y(fixed, hq))
        assert by["vq-fixed", seed]["token_acc"] == 1.0
    assert by["vq-fixed", 0]["psnr_y"] != by["vq-fixed", 1]["psnr_y"] != by["vq", 1]["psnr_y"]
    assert by["vq", 0]["psnr_y"] == by["vq", 1]["psnr_y"]  # the raw round trip does not see the LQ
    headroom = results["headroom"]
    assert headroom == paired_differences(results["rows"], "vq-fixed", ("copy",))["copy"]
    assert headroom["psnr_y"]["n"] == 2
    assert "Headroom: vq-fixed minus copy" in render_markdown(results)


def test_the_ceiling_row_needs_the_colour_fix(tiny_restorer):
    copier = _PerfectCopier(tiny_restorer.vq)
    images = {"astronaut.png": astronaut()}
    unfixed = measure_holdout(copier, images, crop=CROP, seeds=[0], methods=None, color_fix=False)
    assert "vq-fixed" not in unfixed["methods"] and "vq" in unfixed["methods"]
    assert unfixed["headroom"] == {} and "Headroom" not in render_markdown(unfixed)
    assert "vq-fixed" in measure_holdout(copier, images, crop=CROP, seeds=[0], methods=None)["methods"]
    with pytest.raises(holdout.HoldoutError, match="colour fix"):
        measure_holdout(copier, images, crop=CROP, seeds=[0], methods=["vq-fixed"], color_fix=False)


def test_the_checkpoints_default_decoding_is_the_row_the_report_is_about(tiny_restorer):
    copier = _PerfectCopier(tiny_restorer.vq)
    images = {"astronaut.png": astronaut()}
    assert holdout.default_settings(copier) == SETTINGS  # no defaults of its own: PURE's rows

    copier.sampling = SETTINGS["pure-greedy-no-cfg"]  # one of the rows: no extra one
    assert holdout.default_settings(copier) == SETTINGS
    results = measure_holdout(
        copier, images, crop=CROP, seeds=[0], methods=["bicubic", "copy", "pure", "pure-greedy-no-cfg"]
    )
    assert results["subject"] == "pure-greedy-no-cfg"
    markdown = render_markdown(results)
    assert (
        "pure-greedy-no-cfg minus each baseline" in markdown and "checkpoint's default decoding" in markdown
    )
    assert "cfg_scale 1.0" in markdown and "temperature 0.0" in markdown
    assert results["verdict"].startswith("pure-greedy-no-cfg ")

    copier.sampling = SamplingConfig(temperature=0.5)  # none of the rows: its own, first
    settings = holdout.default_settings(copier)
    assert (
        next(iter(settings)) == holdout.CHECKPOINT_METHOD
        and settings[holdout.CHECKPOINT_METHOD] == copier.sampling
    )
    results = measure_holdout(copier, images, crop=CROP, seeds=[0], methods=["copy", "pure", "checkpoint"])
    assert results["subject"] == "checkpoint" and set(results["paired"]) == {"copy"}
    assert results["settings"]["checkpoint"]["sampling"]["temperature"] == 0.5


def test_paired_differences_resolve_a_steady_gain_and_not_jitter():
    def rows(method, values):
        return [
            {"method": method, "crop": f"c{i}", "seed": 0, "psnr_y": v, "ssim_y": 0.5}
            for i, v in enumerate(values)
        ]

    base = [20.0, 22.0, 24.0, 26.0]
    steady = paired_differences(
        [*rows("copy", base), *rows("pure", [v + 0.3 for v in base])], baselines=["copy"]
    )
    assert (
        steady["copy"]["psnr_y"]["mean"] == pytest.approx(0.3) and steady["copy"]["psnr_y"]["resolved"] == 1
    )
    jitter = [v + d for v, d in zip(base, [0.5, -0.5, 0.5, -0.4], strict=True)]
    noisy = paired_differences([*rows("copy", base), *rows("pure", jitter)], baselines=["copy"])
    assert noisy["copy"]["psnr_y"]["resolved"] == 0 and noisy["copy"]["psnr_y"]["n"] == 4
    assert noisy["copy"]["ssim_y"]["mean"] == 0.0


def test_perceive_counts_exact_levels_beside_chance_and_majority():
    labels = [
        "Small blur, small noise.",
        "Small blur, large noise.",
        "Large blur, small noise.",
        "Small blur, small noise.",
    ]
    said = ["Small blur, small noise.", "Small blur, small noise.", "Medium blur, small noise.", None]
    rows = [
        {"method": "pure", "label": t, "degradation": s, "crop": f"c{i}", "seed": 0}
        for i, (t, s) in enumerate(zip(labels, said, strict=True))
    ]
    p = perceive_summary(rows)
    assert p["n"] == 4 and p["unreadable"] == 1
    assert p["blur"] == 0.5 and p["noise"] == 0.5 and p["both"] == 0.25
    assert p["chance"] == {"blur": 1 / 3, "noise": 1 / 3, "both": 1 / 9}
    assert p["majority"] == {"blur": 0.75, "noise": 0.75, "both": 0.5}
    assert perceive_summary(rows, "pure-greedy") == {"n": 0}


def test_understand_scores_generated_captions_only():
    truth = {"scene.png": "Two red discs and a blue star over a plain white background, with black text.",
             "photo.png": "A cup of coffee on a table."}  # fmt: skip
    rows = [
        {"method": "pure", "image": "scene.png", "caption": "A red disc over a plain white background."},
        {"method": "pure", "image": "photo.png", "caption": "A red disc over a plain white background."},
    ]
    u = understand_summary(rows, "pure", truth)
    assert u["n"] == 1  # the photo's fixed caption has no attributes to check
    assert u["kinds"] == 0.5 and u["colours"] == 0.5  # disc of {disc, star}; red of {red, blue}
    assert u["background"] == 1.0 and u["background_colours"] == 1.0 and u["text"] == 0.0
    assert understand_summary(rows, "pure", {}) == {"n": 0}


def test_crop_boxes_of_an_image_the_crop_size_are_one(tiny_restorer):
    assert crop_boxes(64, 64, 64, 4) == [(0, 0)]
    assert len(crop_boxes(128, 64, 64, 4)) == 2


def test_cli_measures_a_tokenizer_alone(tiny_checkpoint, holdout_folder, tmp_path, capsys):
    out = tmp_path / "vq_only"
    argv = ["--vq", str(tiny_checkpoint / "vq"), "--holdout", str(holdout_folder), "--out", str(out)]
    code, _, stderr = _run(capsys, *argv, "--crop", str(CROP), "--seeds", "0", "--quiet")
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["bicubic", "vq", "copy"]
    code, _, stderr = _run(capsys, *argv, "--crop", str(CROP), "--methods", "pure", "--overwrite")
    assert code == 2 and "--methods" in stderr
    code, _, stderr = _run(capsys, "--holdout", str(holdout_folder), "--out", str(out))
    assert code == 2 and "--vq" in stderr
    assert isinstance(VQOnly(None).identity, dict)


def test_whole_pictures_restore_larger_images_whole(tiny_restorer, tmp_path):
    images = {"astronaut.png": astronaut(128, 128), "small.png": astronaut(64, 64)}
    results = measure_holdout(
        tiny_restorer, images, crop=CROP, seeds=[0], methods=["bicubic", "pure"], pictures_dir=tmp_path,
        whole_pictures=True, settings={"pure": SamplingConfig(max_text_tokens=4)},  # the random model's text
    )  # fmt: skip
    (whole,) = results["whole"]  # the 64 px image is its own crop: no whole picture
    assert whole["image"] == "astronaut.png" and whole["side"] == 128
    assert whole["bicubic"]["psnr_y"] > 10 and 0 < whole["pure"]["gms_y"] <= 1
    with Image.open(tmp_path / whole["picture"]) as picture:
        assert picture.width >= 4 * 128


def test_cli_quantize_is_checked_before_the_model_loads(
    tiny_checkpoint, holdout_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("pure.quant.torchao_available", lambda: False)
    monkeypatch.setattr("pure.restorer.PureRestorer.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    argv = ["--model", str(tiny_checkpoint), "--holdout", str(holdout_folder), "--out", str(tmp_path / "o")]
    code, _, stderr = _run(capsys, *argv, "--quantize", "int8")
    assert code == 2 and stderr.startswith("error: quantize='int8' needs torchao") and "pip install" in stderr
    code, _, stderr = _run(capsys, "--vq", str(tiny_checkpoint / "vq"), *argv[2:], "--quantize", "int8")
    assert code == 2 and "--quantize needs --model" in stderr
    assert not (tmp_path / "o").exists()


def test_cli_quantize_measures_the_quantised_model_and_records_it(
    tiny_checkpoint, holdout_folder, tmp_path, capsys
):
    pytest.importorskip("torchao", reason="needs the quant extra: pip install -e '.[quant]'")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_checkpoint), "--holdout", str(holdout_folder), "--out", str(out)]
    code, _, stderr = _run(
        capsys,
        *argv,
        "--crop",
        str(CROP),
        "--seeds",
        "0",
        "--methods",
        "pure-greedy",
        "--quantize",
        "int8",
        "--quiet",
    )
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"]["quantize"] == "int8"

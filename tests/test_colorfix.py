"""Tests for pure.colorfix: a-trous blur, wavelet decomposition, wavelet and AdaIN colour fixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pure.colorfix import (
    adain_color_fix,
    pil_to_tensor,
    tensor_to_pil,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decompose,
)


def _random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _numpy_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Independent reference: (B, C, H, W) edge-padded dilated 3x3 binomial filter as shifted sums."""
    weights = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16
    height, width = image.shape[2:]
    padded = np.pad(image, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    out = np.zeros_like(image, dtype=np.float64)
    for i, dy in enumerate((-1, 0, 1)):
        for j, dx in enumerate((-1, 0, 1)):
            top, left = radius + dy * radius, radius + dx * radius
            out += weights[i, j] * padded[:, :, top : top + height, left : left + width]
    return out


# ---------------------------------------------------------------- blur


@pytest.mark.parametrize("radius", [1, 2, 16])
def test_blur_hand_computed_2x2_with_replicate_padding(radius: int) -> None:
    # Separable [1, 2, 1] / 4 with replicated borders: row 0 -> (3 * row0 + row1) / 4 = [8, 24],
    # row 1 -> (row0 + 3 * row1) / 4 = [24, 40]; the same along columns gives [[12, 20], [28, 36]].
    # On a 2x2 image every far tap clamps to the same neighbours, so any radius gives the same result.
    image = torch.tensor([[0.0, 16.0], [32.0, 48.0]], dtype=torch.float64)[None, None]
    expected = torch.tensor([[12.0, 20.0], [28.0, 36.0]], dtype=torch.float64)[None, None]
    torch.testing.assert_close(wavelet_blur(image, radius), expected, rtol=0, atol=1e-12)


def test_blur_dilation_spreads_a_delta_to_every_other_pixel() -> None:
    image = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    image[0, 0, 2, 2] = 16.0
    expected = torch.tensor(
        [
            [1, 0, 2, 0, 1],
            [0, 0, 0, 0, 0],
            [2, 0, 4, 0, 2],
            [0, 0, 0, 0, 0],
            [1, 0, 2, 0, 1],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(wavelet_blur(image, 2)[0, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("radius", [1, 2, 4, 8, 16])
def test_blur_matches_numpy_reference(radius: int) -> None:
    image = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(radius), dtype=torch.float64)
    expected = _numpy_blur(image.numpy(), radius)
    np.testing.assert_allclose(wavelet_blur(image, radius).numpy(), expected, rtol=0, atol=1e-12)


def test_blur_is_depthwise() -> None:
    image = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    image[0, 0, 3, 3] = 1.0
    image[0, 1] = 0.7
    blurred = wavelet_blur(image, 1)
    torch.testing.assert_close(blurred[0, 1], torch.full((6, 6), 0.7, dtype=torch.float64))  # untouched
    assert blurred[0, 0].sum().item() == pytest.approx(1.0)  # the delta's mass stays in its own channel


# ---------------------------------------------------------------- decomposition


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_decomposition_reconstructs(dtype: torch.dtype, atol: float) -> None:
    image = torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(0), dtype=dtype)
    high, low = wavelet_decompose(image)
    assert high.shape == low.shape == image.shape
    torch.testing.assert_close(high + low, image, rtol=0, atol=atol)
    assert low.std() < image.std() / 2  # the low band really is smoother


def test_low_band_is_five_blurs() -> None:
    image = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = image.numpy()
    for radius in (1, 2, 4, 8, 16):
        reference = _numpy_blur(reference, radius)
    np.testing.assert_allclose(wavelet_decompose(image)[1].numpy(), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (16, 3)])
def test_small_images_need_no_special_case(size: tuple[int, int]) -> None:
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    high, low = wavelet_decompose(image)
    torch.testing.assert_close(high + low, image)
    if size == (1, 1):
        torch.testing.assert_close(low, image)  # a single pixel is its own low band
        assert high.abs().max() < 1e-12  # zero up to the blur's rounding


def test_constant_image_has_no_high_band() -> None:
    image = torch.full((1, 3, 9, 11), 0.3, dtype=torch.float64)
    high, low = wavelet_decompose(image)
    assert high.abs().max() < 1e-15
    torch.testing.assert_close(low, image)


# ---------------------------------------------------------------- wavelet colour fix


def test_colour_fix_against_itself_is_identity_pil() -> None:
    image = _random_rgb(40, 30)
    fixed = wavelet_color_fix(image, image)
    assert isinstance(fixed, Image.Image) and fixed.mode == "RGB" and fixed.size == image.size
    diff = np.asarray(fixed).astype(int) - np.asarray(image).astype(int)
    # high + low == image up to float error, then mul(255) truncates: k - tiny becomes k - 1, never k + 1.
    assert diff.min() >= -1 and diff.max() == 0
    assert (diff == 0).mean() > 0.5


def test_colour_fix_against_itself_is_identity_tensor() -> None:
    image = torch.rand(3, 24, 20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(wavelet_color_fix(image, image), image, rtol=0, atol=1e-6)


def test_colour_fix_takes_low_frequencies_from_source() -> None:
    source = 0.2 + 0.6 * torch.rand(
        2, 3, 48, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    shift = torch.tensor([0.1, -0.1, 0.05], dtype=torch.float64).view(1, 3, 1, 1)
    target = source + shift  # same detail, wrong colour cast
    fixed = wavelet_color_fix(target, source)
    torch.testing.assert_close(fixed, source, rtol=0, atol=1e-9)
    torch.testing.assert_close((target - fixed).mean(dim=(2, 3)), shift.view(1, 3).expand(2, 3))


def test_colour_fix_keeps_high_frequencies_of_target() -> None:
    # Target = flat grey + checkerboard; source = another flat colour. The checkerboard must survive on top of
    # the source's colour; away from the borders (replicate padding breaks the alternation there) exactly.
    height, width = 80, 80
    checker = 0.1 * (1 - 2 * ((torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2))
    target = (0.3 + checker).to(torch.float64).expand(1, 3, height, width)
    source = torch.tensor([0.6, 0.5, 0.4], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, height, width)
    fixed = wavelet_color_fix(target, source)
    interior = (slice(None), slice(None), slice(35, 45), slice(35, 45))
    expected = source + checker.to(torch.float64)
    torch.testing.assert_close(fixed[interior], expected[interior], rtol=0, atol=1e-3)


def test_colour_fix_preserves_type_shape_and_dtype() -> None:
    target = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fixed = wavelet_color_fix(target, target.flip(-1))
    assert fixed.shape == (3, 16, 12) and fixed.dtype == torch.float64
    assert fixed.min() >= 0.0 and fixed.max() <= 1.0
    half = wavelet_color_fix(target.half()[None], target[None])
    assert half.shape == (1, 3, 16, 12) and half.dtype == torch.float16
    # Mixed inputs: a PIL target gives a PIL result.
    image = _random_rgb(12, 16)
    assert isinstance(wavelet_color_fix(image, target), Image.Image)


def test_pil_path_equals_tensor_path_truncated() -> None:
    target, source = _random_rgb(33, 21, seed=6), _random_rgb(33, 21, seed=7)
    fixed = np.asarray(wavelet_color_fix(target, source))
    fixed_tensor = wavelet_color_fix(pil_to_tensor(target), pil_to_tensor(source))
    expected = np.floor(fixed_tensor.numpy().astype(np.float64) * 255).astype(np.uint8).transpose(1, 2, 0)
    # float32 x * 255 may round across an integer where float64 does not; allow a handful of such pixels.
    assert (fixed.astype(int) - expected.astype(int) <= 0).all()
    assert (fixed != expected).mean() < 0.01


def test_size_mismatch_names_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"target is 32x24 px but source is 16x12 px"):
        wavelet_color_fix(_random_rgb(32, 24), _random_rgb(16, 12))
    with pytest.raises(ValueError, match="batch"):
        wavelet_color_fix(torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8))


def test_bad_inputs_are_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"convert\('RGB'\)"):
        wavelet_color_fix(_random_rgb(8, 8).convert("RGBA"), _random_rgb(8, 8))
    with pytest.raises(ValueError, match="float tensor"):
        wavelet_color_fix(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        wavelet_color_fix(torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="levels"):
        wavelet_decompose(torch.rand(1, 3, 8, 8), levels=0)


# ---------------------------------------------------------------- PIL conversion


def test_tensor_to_pil_truncates_like_to_pil_image() -> None:
    values = torch.tensor([0.999, 0.5, 1.0, 0.0, 1.2, -0.3, 0.25], dtype=torch.float32)
    # x * 255 then truncation: 254.745 -> 254, 127.5 -> 127, 63.75 -> 63; clamp first for 1.2 and -0.3.
    expected = [254, 127, 255, 0, 255, 0, 63]
    image = tensor_to_pil(values.view(1, 1, 7).expand(3, 1, 7))
    assert image.mode == "RGB" and image.size == (7, 1)
    assert [image.getpixel((x, 0))[0] for x in range(7)] == expected


def test_pil_to_tensor_scales_by_255() -> None:
    image = Image.new("RGB", (4, 2), (255, 51, 0))
    tensor = pil_to_tensor(image)
    assert tensor.shape == (3, 2, 4) and tensor.dtype == torch.float32
    assert tensor[0].eq(1.0).all() and tensor[2].eq(0.0).all()
    torch.testing.assert_close(tensor[1], torch.full((2, 4), 0.2))


# ---------------------------------------------------------------- AdaIN


def test_adain_transfers_mean_and_std() -> None:
    generator = torch.Generator().manual_seed(8)
    target = 0.4 + 0.2 * torch.rand(2, 3, 30, 40, generator=generator, dtype=torch.float64)
    source = 0.2 + 0.6 * torch.rand(
        2, 3, 20, 25, generator=generator, dtype=torch.float64
    )  # other size: fine
    fixed = adain_color_fix(target, source)
    assert fixed.shape == target.shape
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), source.mean(dim=(2, 3)), rtol=0, atol=1e-9)
    # The 1e-5 added to both variances shifts the ratio slightly; exact std equality is not expected.
    torch.testing.assert_close(fixed.std(dim=(2, 3)), source.std(dim=(2, 3)), rtol=2e-2, atol=0)
    # Spatial structure is the target's: a per-channel affine map of it.
    corr = torch.corrcoef(torch.stack([fixed[0, 0].flatten(), target[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999


def test_adain_hand_computed() -> None:
    # target [0, 1]: mean 0.5, unbiased variance 0.5; source [0.2, 0.4]: mean 0.3, variance 0.02.
    # StableSR's rule adds 1e-5 to each variance: result = (t - 0.5) * sqrt(0.02001 / 0.50001) + 0.3.
    target = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    source = torch.tensor([0.2, 0.4], dtype=torch.float64).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    ratio = (0.02001 / 0.50001) ** 0.5  # 0.2000480..., not 0.2 exactly
    expected = torch.tensor([0.3 - 0.5 * ratio, 0.3 + 0.5 * ratio], dtype=torch.float64)
    torch.testing.assert_close(adain_color_fix(target, source)[0, 1, 0], expected, rtol=0, atol=1e-9)


def test_adain_pil_round_trip_and_errors() -> None:
    dark = Image.fromarray((np.asarray(_random_rgb(16, 16, seed=9)) // 4).astype(np.uint8))
    bright = Image.new("RGB", (16, 16), (200, 190, 180))
    bright.putpixel((0, 0), (210, 200, 190))  # needs some spread
    fixed = adain_color_fix(dark, bright)
    assert isinstance(fixed, Image.Image) and fixed.size == (16, 16)
    assert np.asarray(fixed).mean() > np.asarray(dark).mean() + 100
    with pytest.raises(ValueError, match="batch x channels"):
        adain_color_fix(torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="at least 2 pixels"):
        adain_color_fix(torch.rand(3, 1, 1), torch.rand(3, 4, 4))

"""The Real-ESRGAN degradation pipeline: presets, parameter statistics, kernels, determinism, crops."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pure.data.degradations import (
    KERNEL_TYPES,
    DegradationConfig,
    DegradationParams,
    KernelParams,
    NoiseParams,
    ResizeParams,
    StageParams,
    _luma,
    apply_degradation,
    available_presets,
    degrade,
    make_kernel,
    paired_random_crop,
    sample_degradation,
)

PRESETS = ("realesrgan", "seesr", "stablesr")
# The table: (stage-1 sigma, betag, betap, resize, noise sigma, poisson, jpeg, second-blur prob,
# stage-2 sigma, resize, noise sigma, poisson, jpeg).
TABLE = {
    "realesrgan": ((0.2, 3), (0.5, 4), (1, 2), (0.15, 1.5), (1, 30), (0.05, 3), (30, 95), 0.8,
                   (0.2, 1.5), (0.3, 1.2), (1, 25), (0.05, 2.5), (30, 95)),
    "seesr": ((0.2, 3), (0.5, 4), (1, 2), (0.3, 1.5), (1, 15), (0.05, 2), (60, 95), 0.5,
              (0.2, 1.5), (0.6, 1.2), (1, 12), (0.05, 1), (60, 100)),
    "stablesr": ((0.2, 1.5), (0.5, 2), (1, 1.5), (0.3, 1.5), (1, 15), (0.05, 2), (60, 95), 0.5,
                 (0.2, 1.0), (0.6, 1.2), (1, 12), (0.05, 1), (60, 100)),
}  # fmt: skip
KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
N_DRAWS = 4000


def _image(h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A smooth gradient plus texture: many distinct 8-bit values, like a photograph.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])
    return (0.7 * base + 0.3 * torch.rand((3, h, w), generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def draws():
    """N_DRAWS parameter records per preset (sampling only, no images)."""
    out = {}
    for name in PRESETS:
        config = DegradationConfig.from_yaml(name)
        g = torch.Generator().manual_seed(1234)
        out[name] = (config, [sample_degradation(config, g) for _ in range(N_DRAWS)])
    return out


def _close(freq: float, p: float, n: int) -> bool:
    return abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9


# ---------------------------------------------------------------------------------------------------------
# Presets as data
# ---------------------------------------------------------------------------------------------------------


def test_presets_are_listed():
    assert set(PRESETS) <= set(available_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_numbers_match_the_table(name):
    c = DegradationConfig.from_yaml(name)
    s1, s2 = c.stage1, c.stage2
    got = (s1.kernel.sigma_range, s1.kernel.betag_range, s1.kernel.betap_range, s1.resize_range,
           s1.noise_sigma_range, s1.poisson_scale_range, s1.jpeg_range, s2.blur_prob,
           s2.kernel.sigma_range, s2.resize_range, s2.noise_sigma_range, s2.poisson_scale_range,
           s2.jpeg_range)  # fmt: skip
    assert got == TABLE[name]
    assert c.name == name
    assert s1.blur_prob == 1.0
    assert s1.resize_probs == (0.2, 0.7, 0.1) and s2.resize_probs == (0.3, 0.4, 0.3)
    for stage in (s1, s2):
        assert stage.kernel.types == KERNEL_TYPES and stage.kernel.probs == KERNEL_PROBS
        assert stage.kernel.sizes == (7, 9, 11, 13, 15, 17, 19, 21)
        assert stage.kernel.sinc_prob == 0.1
        assert stage.gaussian_noise_prob == 0.5 and stage.gray_noise_prob == 0.4
    # Stage-2 betas equal stage 1's in all three originals.
    assert (s2.kernel.betag_range, s2.kernel.betap_range) == (s1.kernel.betag_range, s1.kernel.betap_range)
    assert c.final.sinc_prob == 0.8 and c.final.resize_first_prob == 0.5
    assert c.resize_modes == ("area", "bilinear", "bicubic")


def test_config_round_trips_through_dict():
    c = DegradationConfig.from_yaml("realesrgan")
    assert DegradationConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_unknown_key_fails_with_the_valid_keys():
    data = DegradationConfig.from_yaml("realesrgan").to_dict()
    data["stage1"]["noise_range"] = [1, 30]
    with pytest.raises(ValueError, match=r"unknown keys \['noise_range'\] in degradation config\.stage1.*"
                       r"valid keys are .*noise_sigma_range"):  # fmt: skip
        DegradationConfig.from_dict(data)


def test_missing_key_and_bad_values_fail_clearly(tmp_path):
    data = DegradationConfig.from_yaml("realesrgan").to_dict()
    del data["stage2"]["jpeg_range"]
    with pytest.raises(ValueError, match=r"missing keys \['jpeg_range'\] in degradation config\.stage2"):
        DegradationConfig.from_dict(data)
    data = DegradationConfig.from_yaml("realesrgan").to_dict()
    data["stage1"]["kernel"]["probs"] = [0.5, 0.5, 0.5, 0, 0, 0]
    with pytest.raises(ValueError, match="summing to 1"):
        DegradationConfig.from_dict(data)
    data = DegradationConfig.from_yaml("realesrgan").to_dict()
    data["stage1"]["kernel"]["size_range"] = [6, 21]
    with pytest.raises(ValueError, match="odd"):
        DegradationConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"unknown degradation preset 'nope'; available: .*realesrgan"):
        DegradationConfig.from_yaml("nope")
    path = tmp_path / "mine.yaml"
    path.write_text("name: x\nstage1: 3\nstage2: 3\n")
    with pytest.raises(ValueError, match=r"mine\.yaml: .*stage1 must be a mapping"):
        DegradationConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------------------
# Parameter statistics (sampling only)
# ---------------------------------------------------------------------------------------------------------


def _check_kernel_stats(kernels, kernel_cfg, n_total):
    sincs = [k for k in kernels if k.kind == "sinc"]
    assert _close(len(sincs) / n_total, kernel_cfg.sinc_prob, n_total)
    others = [k for k in kernels if k.kind != "sinc"]
    for kind, p in zip(kernel_cfg.types, kernel_cfg.probs, strict=True):
        freq = sum(k.kind == kind for k in others) / len(others)
        assert _close(freq, p, len(others)), (kind, freq, p)
    sizes = [k.size for k in kernels]
    assert set(sizes) == set(kernel_cfg.sizes)
    for size in kernel_cfg.sizes:
        assert _close(sizes.count(size) / len(sizes), 1 / 8, len(sizes))
    lo, hi = kernel_cfg.sigma_range
    for k in others:
        assert lo <= k.sigma_x <= hi and lo <= k.sigma_y <= hi
        if k.kind.endswith("aniso"):
            assert -math.pi <= k.rotation <= math.pi
        else:
            assert k.sigma_x == k.sigma_y and k.rotation == 0.0
        if k.kind.startswith("generalized"):
            assert kernel_cfg.betag_range[0] <= k.beta <= kernel_cfg.betag_range[1]
        elif k.kind.startswith("plateau"):
            assert kernel_cfg.betap_range[0] <= k.beta <= kernel_cfg.betap_range[1]
        else:
            assert k.beta is None
    rotations = [k.rotation for k in others if k.kind.endswith("aniso")]
    assert min(rotations) < -0.9 * math.pi and max(rotations) > 0.9 * math.pi
    betas = [k.beta for k in others if k.beta is not None]
    assert _close(sum(b < 1 for b in betas) / len(betas), 0.5 * 0.15 / 0.30, len(betas))  # only betag < 1
    # BasicSR draws beta from [low, 1] half of the time: for plateau ranges starting at 1 that is beta = 1.
    plateau = [k.beta for k in others if k.kind.startswith("plateau")]
    assert _close(sum(b == 1.0 for b in plateau) / len(plateau), 0.5, len(plateau))
    for k in sincs:
        low = math.pi / 3 if k.size < 13 else math.pi / 5
        assert low <= k.cutoff <= math.pi and k.sigma_x is None
    large = [k.cutoff for k in sincs if k.size >= 13]
    assert min(large) < math.pi / 3  # the wider cutoff range is used


def _check_stage_stats(stages, cfg, modes):
    n = len(stages)
    blurred = [s.blur for s in stages if s.blur is not None]
    assert _close(len(blurred) / n, cfg.blur_prob, n)
    _check_kernel_stats(blurred, cfg.kernel, len(blurred))
    for direction, p in zip(("up", "down", "keep"), cfg.resize_probs, strict=True):
        assert _close(sum(s.resize.direction == direction for s in stages) / n, p, n)
    for mode in modes:
        assert _close(sum(s.resize.mode == mode for s in stages) / n, 1 / len(modes), n)
    lo, hi = cfg.resize_range
    for s in stages:
        f = s.resize.factor
        assert {"up": 1 <= f <= hi, "down": lo <= f <= 1, "keep": f == 1.0}[s.resize.direction]
    gaussian = [s.noise for s in stages if s.noise.kind == "gaussian"]
    poisson = [s.noise for s in stages if s.noise.kind == "poisson"]
    assert len(gaussian) + len(poisson) == n
    assert _close(len(gaussian) / n, cfg.gaussian_noise_prob, n)
    assert _close(sum(s.noise.gray for s in stages) / n, cfg.gray_noise_prob, n)
    assert all(cfg.noise_sigma_range[0] <= z.level <= cfg.noise_sigma_range[1] for z in gaussian)
    assert all(cfg.poisson_scale_range[0] <= z.level <= cfg.poisson_scale_range[1] for z in poisson)
    qualities = [s.jpeg_quality for s in stages]
    assert all(isinstance(q, int) for q in qualities)
    assert min(qualities) == cfg.jpeg_range[0] and max(qualities) == cfg.jpeg_range[1]
    mean = (cfg.jpeg_range[0] + cfg.jpeg_range[1]) / 2
    assert abs(np.mean(qualities) - mean) < 1.5


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_statistics_match_the_preset(draws, name):
    config, records = draws[name]
    assert all(r.preset == name and r.scale == 4 for r in records)
    _check_stage_stats([r.stage1 for r in records], config.stage1, config.resize_modes)
    _check_stage_stats([r.stage2 for r in records], config.stage2, config.resize_modes)
    sincs = [r.final_sinc for r in records if r.final_sinc is not None]
    assert _close(len(sincs) / N_DRAWS, config.final.sinc_prob, N_DRAWS)
    assert all(k.kind == "sinc" and math.pi / 3 <= k.cutoff <= math.pi for k in sincs)
    assert all(k.size % 2 == 1 and 7 <= k.size <= 21 for k in sincs)
    first = sum(r.final_order == "resize_then_jpeg" for r in records) / N_DRAWS
    assert _close(first, config.final.resize_first_prob, N_DRAWS)
    assert {r.final_order for r in records} == {"resize_then_jpeg", "jpeg_then_resize"}
    for mode in config.resize_modes:
        assert _close(sum(r.final_resize_mode == mode for r in records) / N_DRAWS, 1 / 3, N_DRAWS)
    assert len({r.noise_seed for r in records}) == N_DRAWS


def test_statistics_check_can_fail(draws):
    """The frequency checks tell presets apart: realesrgan's second-blur rate is not seesr's."""
    _, records = draws["realesrgan"]
    seesr = DegradationConfig.from_yaml("seesr")
    with pytest.raises(AssertionError):
        _check_stage_stats([r.stage2 for r in records], seesr.stage2, seesr.resize_modes)


def test_records_are_json_round_trips(draws):
    for record in draws["realesrgan"][1][:200]:
        text = json.dumps(record.to_dict())
        assert DegradationParams.from_dict(json.loads(text)) == record


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


def test_kernels_are_normalised_odd_and_point_symmetric(draws):
    kernels = []
    for r in draws["realesrgan"][1][:400]:
        kernels += [k for k in (r.stage1.blur, r.stage2.blur, r.final_sinc) if k is not None]
    assert {k.kind for k in kernels} == {*KERNEL_TYPES, "sinc"}
    for params in kernels:
        k = make_kernel(params)
        assert k.shape == (params.size, params.size) and params.size % 2 == 1
        assert k.dtype == torch.float64 and torch.isfinite(k).all()
        assert abs(k.sum().item() - 1) < 1e-12
        assert torch.allclose(k, k.flip(0, 1), atol=1e-12)


def test_iso_gaussian_matches_a_hand_computed_kernel():
    size, sigma = 7, 1.3
    hand = [[math.exp(-(x * x + y * y) / (2 * sigma * sigma)) for x in range(-3, 4)] for y in range(-3, 4)]
    total = sum(map(sum, hand))
    expected = torch.tensor(hand, dtype=torch.float64) / total
    got = make_kernel(KernelParams("iso", size, sigma, sigma, 0.0))
    assert torch.allclose(got, expected, atol=1e-14)
    kornia = pytest.importorskip("kornia")
    reference = kornia.filters.get_gaussian_kernel2d(
        (7, 7), torch.tensor([[sigma, sigma]], dtype=torch.float64)
    )
    assert torch.allclose(got, reference[0], atol=1e-12)


def test_anisotropic_kernel_orientation():
    wide = make_kernel(KernelParams("aniso", 15, 3.0, 1.0, 0.0))
    ax = torch.arange(15, dtype=torch.float64) - 7
    var_x = (wide.sum(0) * ax**2).sum()  # along columns
    var_y = (wide.sum(1) * ax**2).sum()
    assert var_x > 3 * var_y
    turned = make_kernel(KernelParams("aniso", 15, 3.0, 1.0, math.pi / 2))
    assert torch.allclose(turned, wide.T, atol=1e-12)


def test_generalized_and_plateau_families():
    gauss = make_kernel(KernelParams("iso", 21, 2.0, 2.0, 0.0))
    assert torch.allclose(make_kernel(KernelParams("generalized_iso", 21, 2.0, 2.0, 0.0, beta=1.0)), gauss)
    # beta > 1 flattens the top and cuts the tails; plateau kernels have heavier tails than Gaussians.
    flat = make_kernel(KernelParams("generalized_iso", 21, 2.0, 2.0, 0.0, beta=4.0))
    assert flat[10, 10] / flat[10, 11] < gauss[10, 10] / gauss[10, 11] and flat[10, 17] < gauss[10, 17]
    plateau = make_kernel(KernelParams("plateau_iso", 21, 2.0, 2.0, 0.0, beta=1.0))
    assert plateau[10, 20] > 100 * gauss[10, 20]


def test_sinc_kernel_is_a_low_pass_at_its_cutoff():
    cutoff = math.pi / 2
    k = make_kernel(KernelParams("sinc", 21, cutoff=cutoff))
    response = torch.fft.fft2(k, s=(64, 64)).abs()  # frequencies 2 pi i / 64
    assert abs(response[0, 0].item() - 1) < 1e-9
    assert response[0, 8].item() > 0.9  # pi / 4: pass band
    assert response[0, 24].item() < 0.1 and response[0, 32].item() < 0.1  # 3 pi / 4 and pi: stop band


# ---------------------------------------------------------------------------------------------------------
# Applying degradations
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different():
    config = DegradationConfig.from_yaml("realesrgan")
    hq = torch.stack([_image(seed=0), _image(seed=1)])
    lq_a, params_a = degrade(hq, config, torch.Generator().manual_seed(7))
    lq_b, params_b = degrade(hq, config, torch.Generator().manual_seed(7))
    assert torch.equal(lq_a, lq_b) and params_a == params_b
    lq_c, params_c = degrade(hq, config, torch.Generator().manual_seed(8))
    assert params_c != params_a and not torch.equal(lq_a, lq_c)


def test_batch_equals_images_one_after_the_other():
    config = DegradationConfig.from_yaml("realesrgan")
    hq = torch.stack([_image(seed=i) for i in range(3)])
    lq, params = degrade(hq, config, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        lq_i, params_i = degrade(hq[i : i + 1], config, g)
        assert params_i == [params[i]]
        assert torch.equal(lq_i[0], lq[i])
    assert params[0] != params[1]  # each image has its own parameters


def test_record_replays_exactly():
    config = DegradationConfig.from_yaml("realesrgan")
    hq = torch.stack([_image(seed=i) for i in range(4)])
    lq, params = degrade(hq, config, torch.Generator().manual_seed(11))
    for image, out, record in zip(hq, lq, params, strict=True):
        replayed = DegradationParams.from_dict(json.loads(json.dumps(record.to_dict())))
        assert torch.equal(apply_degradation(image, replayed), out)


@pytest.mark.parametrize("scale", [4, 2, 1])
@pytest.mark.parametrize("name", PRESETS)
def test_output_shape_range_and_8_bit_values(name, scale):
    config = DegradationConfig.from_yaml(name)
    hq = torch.stack([_image(96, 64, seed=0), _image(96, 64, seed=1)])
    lq, params = degrade(hq, config, torch.Generator().manual_seed(0), scale=scale)
    assert lq.shape == (2, 3, 96 // scale, 64 // scale) and lq.dtype == hq.dtype
    assert lq.min() >= 0 and lq.max() <= 1
    assert torch.equal((lq * 255).round() / 255, lq)
    assert all(p.scale == scale for p in params)


def test_512_hq_gives_128_lq():
    config = DegradationConfig.from_yaml("realesrgan")
    lq, params = degrade(_image(512, 512)[None], config, torch.Generator().manual_seed(0))
    assert lq.shape == (1, 3, 128, 128) and len(params) == 1


def _plain_params(noise: NoiseParams, scale: int = 1) -> DegradationParams:
    """No blur, no resize, no stage-2 noise, quality-100 JPEGs: only `noise` does anything visible."""
    keep = ResizeParams("keep", 1.0, "bicubic")
    return DegradationParams(
        preset="test",
        scale=scale,
        stage1=StageParams(blur=None, resize=keep, noise=noise, jpeg_quality=100),
        stage2=StageParams(
            blur=None, resize=keep, noise=NoiseParams("gaussian", 0.0, False), jpeg_quality=100
        ),
        final_sinc=None,
        final_resize_mode="bicubic",
        final_order="resize_then_jpeg",
        noise_seed=0,
    )


def test_recorded_noise_level_is_what_is_applied():
    flat = torch.full((3, 128, 128), 0.5)
    clean = apply_degradation(flat, _plain_params(NoiseParams("gaussian", 0.0, False)))
    assert (clean - flat).abs().max() <= 1 / 255
    noisy = apply_degradation(flat, _plain_params(NoiseParams("gaussian", 20.0, True)))
    assert abs(noisy.std().item() * 255 - 20.0) < 2.0
    assert torch.allclose(noisy[0], noisy[1], atol=3 / 255)  # grey noise: the same in every channel
    colour = apply_degradation(flat, _plain_params(NoiseParams("gaussian", 20.0, False)))
    assert (colour[0] - colour[1]).abs().mean() > 5 / 255
    image = _image(128, 128)
    poisson = apply_degradation(image, _plain_params(NoiseParams("poisson", 2.0, False)))
    no_poisson = apply_degradation(image, _plain_params(NoiseParams("poisson", 0.0, False)))
    assert (poisson - no_poisson).std() > 2 / 255


def test_bad_inputs_fail_with_the_fix():
    config = DegradationConfig.from_yaml("realesrgan")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 64, 64), config, g)
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        degrade(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), config, g)
    with pytest.raises(ValueError, match="divisible by scale 4"):
        degrade(torch.rand(1, 3, 66, 64), config, g)
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        degrade(torch.rand(1, 3, 64, 64), config, g, scale=0)
    with pytest.raises(ValueError, match=r"CPU torch\.Generator"):
        sample_degradation(config, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_batch_follows_the_input_device():
    config = DegradationConfig.from_yaml("realesrgan")
    hq = torch.stack([_image(seed=i) for i in range(3)])
    _, params_cpu = degrade(hq, config, torch.Generator().manual_seed(5))
    lq_gpu, params_gpu = degrade(hq.cuda(), config, torch.Generator().manual_seed(5))
    assert lq_gpu.device.type == "cuda" and params_gpu == params_cpu
    again, _ = degrade(hq.cuda(), config, torch.Generator().manual_seed(5))
    assert torch.equal(again, lq_gpu)
    # Noise streams differ between devices; without noise the two paths agree to rounding.
    quiet = _plain_params(NoiseParams("gaussian", 0.0, False), scale=4)
    quiet.stage1.blur = KernelParams("aniso", 13, 2.0, 1.0, 0.4)
    quiet.final_sinc = KernelParams("sinc", 11, cutoff=1.5)
    diff = apply_degradation(hq[0].cuda(), quiet).cpu() - apply_degradation(hq[0], quiet)
    assert diff.abs().max() <= 2 / 255


# ---------------------------------------------------------------------------------------------------------
# Paired crops
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_paired_random_crop_keeps_lq_and_hq_aligned(scale):
    hq = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    lq = F.avg_pool2d(hq, scale)  # every LQ pixel is the mean of its HQ block
    g = torch.Generator().manual_seed(1)
    offsets = set()
    for _ in range(10):
        hq_crop, lq_crop = paired_random_crop(hq, lq, 32, scale, g)
        assert hq_crop.shape == (2, 3, 32, 32) and lq_crop.shape == (2, 3, 32 // scale, 32 // scale)
        assert torch.allclose(F.avg_pool2d(hq_crop, scale), lq_crop, atol=1e-6)
        offsets.add(hq_crop[0, 0, 0, 0].item())
    assert len(offsets) > 1  # the crops move


def test_paired_random_crop_detects_misalignment_in_the_check():
    """A crop one LQ pixel off fails the alignment check used above, so the test can fail."""
    hq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    lq = F.avg_pool2d(hq, 4)
    assert not torch.allclose(F.avg_pool2d(hq[..., 4:36, 4:36], 4), lq[..., 0:8, 0:8], atol=1e-6)


def test_paired_random_crop_rejects_inconsistent_sizes():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="times scale 4 must equal HQ"):
        paired_random_crop(torch.rand(3, 64, 64), torch.rand(3, 15, 16), 32, 4, g)
    with pytest.raises(ValueError, match="divisible by scale"):
        paired_random_crop(torch.rand(3, 64, 64), torch.rand(3, 16, 16), 30, 4, g)
    with pytest.raises(ValueError, match="between 4 and the HQ size 64"):
        paired_random_crop(torch.rand(3, 64, 64), torch.rand(3, 16, 16), 128, 4, g)


def test_the_cpu_path_needs_no_kornia_and_greys_as_kornia_does(monkeypatch):
    """The GPU machine has OpenCV but not kornia: grey Poisson noise on the CPU no longer imports it, and
    gives the same bits as kornia's rgb_to_grayscale did."""
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    kornia = pytest.importorskip("kornia")
    assert torch.equal(_luma(x), kornia.color.rgb_to_grayscale(x))
    config = DegradationConfig.from_yaml("realesrgan")
    hq = torch.stack([_image(seed=i) for i in range(12)])
    expected, params = degrade(hq, config, torch.Generator().manual_seed(5))
    grey_poisson = [s.noise for p in params for s in (p.stage1, p.stage2)]
    assert any(n.kind == "poisson" and n.gray for n in grey_poisson)  # the case that needed kornia
    monkeypatch.setitem(sys.modules, "kornia", None)  # as if not installed
    got, _ = degrade(hq, config, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)

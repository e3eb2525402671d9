"""Degradation labels: severities, calibration, binning at 1/3 and 2/3, and the answer text."""

import copy
import math
import re

import pytest
import torch

from pure.data.degradations import (
    DegradationConfig,
    DegradationParams,
    KernelParams,
    NoiseParams,
    ResizeParams,
    StageParams,
    sample_degradation,
)
from pure.data.labels import (
    CALIBRATION_PATH,
    DegradationEstimator,
    LabelCalibration,
    compute_calibration,
    default_calibration,
    degradation_label,
    degradation_scores,
    label_from_scores,
    main,
    score_to_level,
    severities,
)


def _params(**changes) -> DegradationParams:
    """Stage-1 iso blur sigma 1 (21 px, so untruncated), nothing else that blurs or adds noise."""
    keep = ResizeParams("keep", 1.0, "bicubic")
    quiet = NoiseParams("gaussian", 0.0, True)
    params = DegradationParams(
        preset="test",
        scale=4,
        stage1=StageParams(
            blur=KernelParams("iso", 21, 1.0, 1.0, 0.0), resize=keep, noise=quiet, jpeg_quality=100
        ),
        stage2=StageParams(blur=None, resize=keep, noise=copy.copy(quiet), jpeg_quality=100),
        final_sinc=None,
        final_resize_mode="bicubic",
        final_order="resize_then_jpeg",
        noise_seed=0,
    )
    for path, value in changes.items():
        obj = params
        *parents, leaf = path.split("__")
        for name in parents:
            obj = getattr(obj, name)
        setattr(obj, leaf, value)
    return params


def _draw(name: str, n: int, seed: int) -> list[DegradationParams]:
    config = DegradationConfig.from_yaml(name)
    g = torch.Generator().manual_seed(seed)
    return [sample_degradation(config, g) for _ in range(n)]


def test_levels_are_binned_at_one_third_and_two_thirds():
    assert score_to_level(0.0) == "small"
    assert score_to_level(math.nextafter(1 / 3, 0)) == "small"
    assert score_to_level(1 / 3) == "medium"
    assert score_to_level(math.nextafter(2 / 3, 0)) == "medium"
    assert score_to_level(2 / 3) == "large"
    assert score_to_level(1.0) == "large"
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            score_to_level(bad)


def test_text_is_the_pure_sentence():
    assert label_from_scores(0.5, 0.1) == "Medium blur, small noise."
    assert label_from_scores(0.9, 0.7) == "Large blur, large noise."
    assert label_from_scores(0.0, 0.4) == "Small blur, medium noise."
    pattern = re.compile(r"^(Small|Medium|Large) blur, (small|medium|large) noise\.$")
    for params in _draw("realesrgan", 50, seed=3):
        assert pattern.match(degradation_label(params))


def test_blur_severity_by_hand():
    # Sigma 1 in HQ pixels is 1/4 LQ pixel; the kernel is wide enough that truncation is negligible.
    assert severities(_params())[0] == pytest.approx(0.25, abs=1e-6)
    # A stage-2 kernel acts on stage-1 pixels: after a 0.5 down-resize it is 1 / (0.5 * 4) LQ pixel per pixel.
    two = _params(
        stage1__resize=ResizeParams("down", 0.5, "area"), stage2__blur=KernelParams("iso", 21, 2.0, 2.0, 0.0)
    )
    assert severities(two)[0] == pytest.approx(math.sqrt(0.25**2 + 1.0), abs=1e-4)
    # A stage-2 resize to half the LQ size is a resolution bottleneck: c^2 (1 / 0.5^2 - 1), c^2 = 2 ln2 / pi^2
    squeezed = _params(stage2__resize=ResizeParams("down", 0.5, "bicubic"))
    c2 = 2 * math.log(2) / math.pi**2
    assert severities(squeezed)[0] == pytest.approx(math.sqrt(0.25**2 + 3 * c2), abs=1e-6)
    # A final sinc at cutoff w: c^2 (pi^2 / w^2 - 1) in LQ pixels.
    sinc = _params(final_sinc=KernelParams("sinc", 11, cutoff=math.pi / 2))
    assert severities(sinc)[0] == pytest.approx(math.sqrt(0.25**2 + 3 * c2), abs=1e-6)


def test_noise_severity_by_hand():
    assert severities(_params())[1] == 0.0
    grey = _params(stage2__noise=NoiseParams("gaussian", 10.0, True))
    assert severities(grey)[1] == pytest.approx(10.0)
    colour = _params(stage2__noise=NoiseParams("gaussian", 10.0, False))
    assert severities(colour)[1] == pytest.approx(10.0 * math.sqrt(0.5))
    poisson = _params(stage2__noise=NoiseParams("poisson", 1.0, True))
    assert severities(poisson)[1] == pytest.approx(255 * math.sqrt(0.5 / 256))
    jpeg = _params(stage2__jpeg_quality=50)  # S(50) = 100
    assert severities(jpeg)[1] == pytest.approx(0.5 * 10)
    # Stage-1 noise is attenuated by what follows: an area down-resize to 1/4 of the stage-1 size.
    early = _params(
        stage1__noise=NoiseParams("gaussian", 10.0, True), stage2__resize=ResizeParams("keep", 1.0, "area")
    )
    assert severities(early)[1] == pytest.approx(10.0 * 0.25 / 1.25)


def test_severities_grow_with_the_parameters():
    base = _params(stage2__noise=NoiseParams("gaussian", 5.0, True))
    blurrier = _params(
        stage2__noise=NoiseParams("gaussian", 5.0, True), stage1__blur=KernelParams("iso", 21, 2.5, 2.5, 0.0)
    )
    noisier = _params(stage2__noise=NoiseParams("gaussian", 15.0, True))
    lower_quality = _params(stage2__noise=NoiseParams("gaussian", 5.0, True), stage2__jpeg_quality=40)
    assert severities(blurrier)[0] > severities(base)[0]
    assert severities(noisier)[1] > severities(base)[1]
    assert severities(lower_quality)[1] > severities(base)[1]
    b0, n0 = degradation_scores(base)
    b1, _ = degradation_scores(blurrier)
    assert 0 <= b0 < b1 <= 1 and 0 <= n0 <= 1


def test_stored_calibration_is_reproducible():
    stored = LabelCalibration.load()
    assert stored == default_calibration()
    assert (stored.preset, stored.scale) == ("realesrgan", 4)
    assert stored.levels[8] == pytest.approx(1 / 3) and stored.levels[16] == pytest.approx(2 / 3)
    again = compute_calibration(stored.preset, stored.num_draws, stored.seed, stored.scale)
    assert again.levels == stored.levels
    assert again.blur_quantiles == pytest.approx(stored.blur_quantiles, rel=1e-9, abs=1e-12)
    assert again.noise_quantiles == pytest.approx(stored.noise_quantiles, rel=1e-9, abs=1e-12)


def test_levels_hold_about_a_third_each_on_realesrgan():
    records = _draw("realesrgan", 2000, seed=2024)  # not the calibration's seed
    scores = [degradation_scores(p) for p in records]
    for axis in (0, 1):
        levels = [score_to_level(s[axis]) for s in scores]
        for level in ("small", "medium", "large"):
            share = levels.count(level) / len(levels)
            assert 0.25 <= share <= 0.42, (axis, level, share)


def test_milder_presets_get_lower_scores():
    def mean_scores(name):
        scores = [degradation_scores(p) for p in _draw(name, 400, seed=5)]
        return [sum(s[i] for s in scores) / len(scores) for i in (0, 1)]

    real_blur, real_noise = mean_scores("realesrgan")
    seesr_blur, seesr_noise = mean_scores("seesr")
    stable_blur, stable_noise = mean_scores("stablesr")
    assert seesr_noise < real_noise - 0.1 and stable_noise < real_noise - 0.1
    assert stable_blur < seesr_blur < real_blur


def test_calibration_cli_and_bad_files(tmp_path, capsys):
    out = tmp_path / "calibration.json"
    assert main(["--num-draws", "300", "--seed", "1", "--output", str(out)]) == 0
    small = LabelCalibration.load(out)
    assert small.num_draws == 300 and small == compute_calibration("realesrgan", 300, 1)
    assert "wrote" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"python -m pure\.data\.labels"):
        LabelCalibration.load(bad)
    assert main(["--preset", "nope", "--num-draws", "3", "--output", str(tmp_path / "x.json")]) == 1
    assert "unknown degradation preset" in capsys.readouterr().err
    assert CALIBRATION_PATH.is_file()


def test_estimator_interface():
    class Constant:
        def estimate(self, images):
            return [(0.5, 0.1)] * images.shape[0]

    estimator = Constant()
    assert isinstance(estimator, DegradationEstimator)
    scores = estimator.estimate(torch.rand(2, 3, 32, 32))
    assert [label_from_scores(*s) for s in scores] == ["Medium blur, small noise."] * 2
    assert not isinstance(object(), DegradationEstimator)

"""Degradation labels: blur and noise scores in [0, 1] and the "Medium blur, small noise." text.

PURE's answers start with a blur level and a noise level, each small / medium / large, binned from a
score in [0, 1] at 1/3 and 2/3 (spec 1.3). PURE got its scores from MM-RealSR's degradation estimator
run on the LQ image. For synthetic pairs we know what was applied, so the scores come from the recorded
`DegradationParams` in two steps:

1. A raw severity with a unit:

   - **blur severity**: the standard deviation, in LQ pixels, of the Gaussian equivalent to everything
     that blurred the image. Variances add under convolution, so::

         var = v(kernel1) / s^2 + v(kernel2) / (f1 s)^2 + v(final sinc) + c^2 (1 / r^2 - 1)

     with s the scale, f1 the stage-1 resize factor (kernel1 acts on HQ pixels, kernel2 on stage-1
     pixels, 1 / (f1 s) LQ pixels each, the final sinc on LQ pixels). v(k) is the kernel's per-axis
     second moment for the Gaussian families, measured on the kernel itself (so truncation counts), and
     c^2 (pi^2 / w^2 - 1) for a sinc of cutoff w, with c = sqrt(2 ln 2) / pi: a Gaussian whose response
     falls to 1/2 at the cutoff, minus what the Nyquist limit already imposes. The last term is the
     resolution bottleneck: r = min(1, f1 s, f2) is the lowest sampling density along the way relative
     to the LQ grid (f2 the stage-2 factor), treated as a low-pass at r times Nyquist in the same way.
   - **noise severity**: the standard deviation, on the 0-255 scale and at the LQ resolution, of all
     noise-like errors, summed in quadrature: each stage's noise and each JPEG, times the white-noise
     gain of everything applied after it (sqrt(sum k^2) for a kernel; for a resize the measured gain of
     `F.interpolate` on white noise: 2/3 bilinear, 0.86 bicubic, area r/(1+r) down and 1 - 1/(2r) up).
     Gaussian noise counts its sigma, Poisson noise 255 * scale * sqrt(0.5 / 256) (its RMS at mean
     intensity 0.5 with 256 levels); colour (not grey) noise counts sqrt(1/2) of that, because JPEG's
     4:2:0 subsampling averages its chroma part (2/3 of it) over 2x2 pixels. A JPEG at quality q counts
     0.5 * sqrt(S(q)), S being libjpeg's quality scaling (5000/q below 50, 200 - 2q above): OpenCV's
     error on sharp 128 px photographs is about 0.75 * sqrt(S(q)) (without the quality-independent
     chroma subsampling error), less on the already degraded images it compresses here.

   Checked once against measurements on 240 `realesrgan` pairs of scikit-image photographs: Spearman
   0.82 between blur severity and the sigma of the Gaussian blur that best matches the noise- and
   JPEG-free LQ to the area-downsampled HQ (median ratio 1.05), and 0.86 between noise severity and the
   RMS difference between the LQ and its noise- and JPEG-free twin (median ratio 1.2).

2. A calibration maps each severity to a score: the empirical CDF of the severity over draws of the
   `realesrgan` preset (piecewise linear between stored quantiles, 0 below the lowest, 1 above the
   highest). On that preset each score is uniform, so each level holds a third of the samples; milder
   presets (`seesr`, `stablesr`) get lower scores on the same scale. The quantiles are data:
   `recipes/degradations/label_calibration.json`, written by `python -m pure.data.labels` (see
   `compute_calibration`; a test recomputes them). The stored calibration is for scale 4 (PURE's 512 ->
   128); severities of other scales are still in LQ pixels but were not calibrated. The severities are a
   documented heuristic of what the LQ looks like, not a perceptual measurement.

Real LQ images without parameters need an estimator: `DegradationEstimator` is the interface (e.g. a
port of MM-RealSR's DEM); none ships here.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from pure.data.degradations import (
    PRESET_DIR,
    SINC,
    DegradationConfig,
    DegradationParams,
    KernelParams,
    NoiseParams,
    make_kernel,
    sample_degradation,
)
from pure.sequence import DEGRADATION_LEVELS, degradation_text

CALIBRATION_PATH = PRESET_DIR / "label_calibration.json"
LEVEL_EDGES = (1 / 3, 2 / 3)  # small = [0, 1/3), medium = [1/3, 2/3), large = [2/3, 1]
# Quantile levels stored by the calibration: multiples of 1/24, so 1/3 and 2/3 are knots.
QUANTILE_LEVELS = tuple(i / 24 for i in range(25))
# Gaussian sigma whose response is 1/2 at cutoff w is sqrt(2 ln 2) / w; at the Nyquist cutoff (pi):
_NYQUIST_VAR = 2 * math.log(2) / math.pi**2
# White-noise std gain of F.interpolate (measured on 600 px noise; nearly independent of the factor).
_RESAMPLE_NOISE_GAIN = {"bilinear": 2 / 3, "bicubic": 0.86}
_POISSON_RMS = 255.0 * math.sqrt(0.5 / 256)
_JPEG_NOISE = 0.5
# Colour noise is 2/3 chroma, which JPEG's 4:2:0 subsampling averages over 2x2: variance 1/3 + 2/3 / 4.
_COLOUR_NOISE_AFTER_JPEG = math.sqrt(0.5)


# ---------------------------------------------------------------------------------------------------------
# Raw severities from the recorded parameters
# ---------------------------------------------------------------------------------------------------------


def _kernel_stats(params: KernelParams) -> tuple[float, float]:
    """(Gaussian-equivalent per-axis variance in pixels^2, white-noise std gain sqrt(sum k^2))."""
    kernel = make_kernel(params).numpy()
    gain = float(np.sqrt((kernel**2).sum()))
    if params.kind == SINC:
        return _NYQUIST_VAR * (math.pi**2 / params.cutoff**2 - 1.0), gain
    ax = np.arange(params.size) - params.size // 2
    second_moment = float((kernel.sum(axis=0) * ax**2).sum() + (kernel.sum(axis=1) * ax**2).sum())
    return second_moment / 2.0, gain


def _resample_gain(ratio: float, mode: str) -> float:
    """Std gain of white noise resized by `ratio` (output / input size) with `F.interpolate`."""
    if abs(ratio - 1.0) < 1e-9:
        return 1.0
    if mode == "area":
        return ratio / (1.0 + ratio) if ratio < 1.0 else 1.0 - 1.0 / (2.0 * ratio)
    return _RESAMPLE_NOISE_GAIN[mode]


def _jpeg_noise(quality: int) -> float:
    q = max(1, quality)
    scaling = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    return _JPEG_NOISE * math.sqrt(scaling)


def _noise_std(noise: NoiseParams) -> float:
    std = noise.level if noise.kind == "gaussian" else _POISSON_RMS * noise.level
    return std if noise.gray else std * _COLOUR_NOISE_AFTER_JPEG


def severities(params: DegradationParams) -> tuple[float, float]:
    """(blur severity in LQ pixels, noise severity on the 0-255 scale); see the module docstring."""
    scale, s1, s2 = params.scale, params.stage1, params.stage2
    f1, f2 = s1.resize.factor, s2.resize.factor
    blur1 = _kernel_stats(s1.blur) if s1.blur is not None else (0.0, 1.0)
    blur2 = _kernel_stats(s2.blur) if s2.blur is not None else (0.0, 1.0)
    sinc = _kernel_stats(params.final_sinc) if params.final_sinc is not None else (0.0, 1.0)

    density = min(1.0, f1 * scale, f2)
    var = (
        blur1[0] / scale**2 + blur2[0] / (f1 * scale) ** 2 + sinc[0] + _NYQUIST_VAR * (1.0 / density**2 - 1.0)
    )
    blur = math.sqrt(max(var, 0.0))

    final_gain = _resample_gain(1.0 / f2, params.final_resize_mode) * sinc[1]
    after_stage1 = _resample_gain(f2 / (f1 * scale), s2.resize.mode) * blur2[1] * final_gain
    jpeg2_gain = final_gain if params.final_order == "jpeg_then_resize" else 1.0
    sources = (
        _noise_std(s1.noise) * after_stage1,
        _jpeg_noise(s1.jpeg_quality) * after_stage1,
        _noise_std(s2.noise) * final_gain,
        _jpeg_noise(s2.jpeg_quality) * jpeg2_gain,
    )
    return blur, math.sqrt(sum(s * s for s in sources))


# ---------------------------------------------------------------------------------------------------------
# Calibration: severities -> scores in [0, 1]
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelCalibration:
    """Quantiles of the raw severities over `num_draws` draws of `preset` (generator seeded `seed`)."""

    preset: str
    scale: int
    num_draws: int
    seed: int
    levels: tuple[float, ...]
    blur_quantiles: tuple[float, ...]
    noise_quantiles: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("blur_quantiles", "noise_quantiles"):
            values = getattr(self, name)
            if len(values) != len(self.levels) or any(b <= a for a, b in itertools.pairwise(values)):
                raise ValueError(f"{name} must be {len(self.levels)} strictly increasing values")

    def blur_score(self, severity: float) -> float:
        return float(np.interp(severity, self.blur_quantiles, self.levels))

    def noise_score(self, severity: float) -> float:
        return float(np.interp(severity, self.noise_quantiles, self.levels))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> LabelCalibration:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def load(cls, path: str | Path = CALIBRATION_PATH) -> LabelCalibration:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"cannot read label calibration {path}: {err}; rebuild it with `python -m pure.data.labels`"
            ) from None

    def save(self, path: str | Path = CALIBRATION_PATH) -> None:
        from pure.imageio import atomic_write

        lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in self.to_dict().items()]
        text = "{\n" + ",\n".join(lines) + "\n}\n"  # one line per field, diff-friendly
        atomic_write(path, lambda f: f.write(text.encode()), overwrite=True)


def compute_calibration(
    preset: str | DegradationConfig = "realesrgan", num_draws: int = 20000, seed: int = 0, scale: int = 4
) -> LabelCalibration:
    """Quantiles (at `QUANTILE_LEVELS`) of both severities over `num_draws` parameter draws of `preset`,
    sampled with `torch.Generator().manual_seed(seed)`. Deterministic; no images are degraded."""
    config = preset if isinstance(preset, DegradationConfig) else DegradationConfig.from_yaml(preset)
    generator = torch.Generator().manual_seed(seed)
    draws = np.array([severities(sample_degradation(config, generator, scale)) for _ in range(num_draws)])
    blur, noise = draws[:, 0], draws[:, 1]  # (num_draws,) each
    levels = np.asarray(QUANTILE_LEVELS)
    return LabelCalibration(
        preset=config.name,
        scale=scale,
        num_draws=num_draws,
        seed=seed,
        levels=QUANTILE_LEVELS,
        blur_quantiles=tuple(float(v) for v in np.quantile(blur, levels)),
        noise_quantiles=tuple(float(v) for v in np.quantile(noise, levels)),
    )


@functools.cache
def default_calibration() -> LabelCalibration:
    """The stored calibration, read once."""
    return LabelCalibration.load(CALIBRATION_PATH)


# ---------------------------------------------------------------------------------------------------------
# Scores -> levels -> text
# ---------------------------------------------------------------------------------------------------------


def degradation_scores(
    params: DegradationParams, calibration: LabelCalibration | None = None
) -> tuple[float, float]:
    """(blur score, noise score), each in [0, 1], for one recorded degradation."""
    calibration = calibration or default_calibration()
    blur, noise = severities(params)
    return calibration.blur_score(blur), calibration.noise_score(noise)


def score_to_level(score: float) -> str:
    """small for [0, 1/3), medium for [1/3, 2/3), large for [2/3, 1]."""
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"a degradation score must be in [0, 1]; got {score}")
    if score < LEVEL_EDGES[0]:
        return DEGRADATION_LEVELS[0]
    return DEGRADATION_LEVELS[1] if score < LEVEL_EDGES[1] else DEGRADATION_LEVELS[2]


def label_from_scores(blur_score: float, noise_score: float) -> str:
    """ "Medium blur, small noise." from two scores (also for estimator outputs)."""
    return degradation_text(score_to_level(blur_score), score_to_level(noise_score))


def degradation_label(params: DegradationParams, calibration: LabelCalibration | None = None) -> str:
    """The Perceive sentence for one recorded degradation, e.g. "Medium blur, small noise."."""
    return label_from_scores(*degradation_scores(params, calibration))


@runtime_checkable
class DegradationEstimator(Protocol):
    """Labels real LQ images, for which no parameters were recorded.

    `estimate(images)` takes (B, 3, H, W) float RGB in [0, 1] (any size, any device) and returns B
    (blur score, noise score) pairs in [0, 1] on the same scale as `degradation_scores`: an
    implementation should be calibrated so that on `realesrgan` LQ images its scores follow the
    parameter-based ones (e.g. fit a monotone map on pairs degraded with recorded parameters), so that
    `label_from_scores` bins them the same way. MM-RealSR's DEM, which PURE used, is one candidate.
    """

    def estimate(self, images: Tensor) -> list[tuple[float, float]]: ...


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pure.data.labels", description="Recompute and store the label calibration."
    )
    parser.add_argument("--preset", default="realesrgan")
    parser.add_argument("--num-draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=CALIBRATION_PATH)
    args = parser.parse_args(argv)
    try:
        calibration = compute_calibration(args.preset, args.num_draws, args.seed)
        calibration.save(args.output)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real-ESRGAN's second-order degradation pipeline, with the exact parameters of every LQ image recorded.

The algorithm follows Real-ESRGAN (xinntao/Real-ESRGAN: `realesrgan/models/realesrgan_model.py`
`feed_data`, `realesrgan/data/realesrgan_dataset.py`) and BasicSR's kernel families
(`basicsr/data/degradations.py`); the code is our own. For an HQ image of H x W and scale s:

    stage 1   blur (kernel1)          -> resize by f1 (up/down/keep)        -> noise1 -> JPEG(q1)
    stage 2   blur (kernel2, p=blur)  -> resize to (H/s * f2, W/s * f2)     -> noise2
    final     [resize to (H/s, W/s) + sinc (p=0.8)] and JPEG(q2), in random order
    output    clamp and round to 8 bits

Sampling and application are separate: `sample_degradation` draws a `DegradationParams` record from a
`torch.Generator` (no image needed), `apply_degradation` turns an HQ image and a record into the LQ image
and is deterministic given the record alone (the noise is seeded by `params.noise_seed`), so the JSON
record of a pair replays it exactly. `degrade` does both for a batch.

Libraries: OpenCV's `filter2D` (CPU; ~10x faster than a torch convolution for 7-21 px kernels) or
kornia's `filter2d` (GPU) for the blur, `torch.nn.functional.interpolate` for resizing (the calls
Real-ESRGAN makes), OpenCV's real JPEG codec. Only the kernel families (Gaussian, generalised Gaussian,
plateau, circular sinc) and the BT.601 grey of grey Poisson noise (kornia's arithmetic) are written here.
kornia and OpenCV come with the `data` extra (`pip install 'pure[data]'`) and are imported when first
needed; on the CPU kornia is not needed. On one CPU core a 512 px HQ
image takes about 50-100 ms (a few hundred ms at worst, for a 1.5x stage-1 up-resize with Poisson noise).

Deviations from Real-ESRGAN, on purpose:
- Every image of a batch gets its own parameters; Real-ESRGAN shares the resize factors, modes and the
  noise/JPEG choice across a GPU batch and uses a shuffling queue to hide that.
- JPEG is a real codec (libjpeg via OpenCV, 4:2:0, integer quality drawn uniformly from the inclusive
  range) instead of BasicSR's `DiffJPEG(differentiable=False)`, a PyTorch re-implementation that accepts
  fractional qualities. A real codec is what real LQ images went through; it runs on the CPU (a GPU
  image makes a round trip, small at these sizes).
- No unsharp masking of the HQ image before degrading (Real-ESRGAN degrades `gt_usm`); SeeSR, whose data
  recipe PURE follows, degrades the plain HQ image.
- Kernels are applied at their own size (7-21) instead of zero-padded to 21: the same result.
- Stage-1 resizing is done to an explicit size, floor(H * f1), rather than with `scale_factor`.
Kept on purpose although odd: for beta ranges like [1, 2] half of the draws give beta = 1 exactly
(BasicSR draws beta from [lo, 1] or [1, hi] with probability 1/2 each).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

PRESET_DIR = Path(__file__).resolve().parents[2] / "recipes" / "degradations"

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
SINC = "sinc"
RESIZE_DIRECTIONS = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")
NOISE_TYPES = ("gaussian", "poisson")
FINAL_ORDERS = ("resize_then_jpeg", "jpeg_then_resize")
# Sinc cutoffs (radians, pi = Nyquist), hard-coded in Real-ESRGAN for kernel sizes 7-21: the blur stages
# allow lower cutoffs for the larger kernels only; the final sinc always uses [pi/3, pi].
SINC_CUTOFF_SMALL_KERNEL = (math.pi / 3, math.pi)
SINC_CUTOFF_LARGE_KERNEL = (math.pi / 5, math.pi)
SINC_LARGE_KERNEL_FROM = 13
FINAL_SINC_CUTOFF = (math.pi / 3, math.pi)
# Upper bound of the per-image noise seed stored in the record (53 bits: one float64 uniform).
_NOISE_SEED_HIGH = 2**53 - 1
# Uniforms taken from the generator per record; a record uses at most 2 * 16 + 6 of them.
_DRAWS_PER_RECORD = 40


# ---------------------------------------------------------------------------------------------------------
# Configuration (presets are YAML files under recipes/degradations/)
# ---------------------------------------------------------------------------------------------------------


def _check_range(name: str, values: Sequence[float], low: float | None = None, high: float | None = None):
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high; got {list(values)}")
    if (low is not None and values[0] < low) or (high is not None and values[1] > high):
        raise ValueError(f"{name} must lie within [{low}, {high}]; got {list(values)}")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {p}")


def _check_distribution(name: str, probs: Sequence[float], n: int) -> None:
    if len(probs) != n or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1; got {list(probs)}")


def _check_size_range(name: str, sizes: Sequence[int]) -> None:
    _check_range(name, sizes, low=1)
    if any(s % 2 == 0 for s in sizes):
        raise ValueError(f"{name} must have odd bounds (kernel sizes are odd); got {list(sizes)}")


@dataclass(frozen=True)
class KernelConfig:
    """Blur kernel distribution of one stage. Sigmas in pixels of the image the kernel is applied to.

    A kernel size is drawn uniformly among the odd sizes in `size_range`; with probability `sinc_prob`
    the kernel is a circular sinc, otherwise one of `types` with probabilities `probs`. Beta ranges must
    contain 1 (half of the draws come from [low, 1], half from [1, high]).
    """

    sigma_range: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    size_range: tuple[int, int] = (7, 21)
    types: tuple[str, ...] = KERNEL_TYPES
    probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1

    def __post_init__(self) -> None:
        _check_range("sigma_range", self.sigma_range, low=1e-3)
        for name in ("betag_range", "betap_range"):
            values = getattr(self, name)
            _check_range(name, values, low=1e-3)
            if not values[0] <= 1.0 <= values[1]:
                raise ValueError(
                    f"{name} must contain 1 (draws are from [low, 1] or [1, high]); got {values}"
                )
        _check_size_range("size_range", self.size_range)
        unknown = sorted(set(self.types) - set(KERNEL_TYPES))
        if unknown:
            raise ValueError(f"unknown kernel types {unknown}; valid types are {list(KERNEL_TYPES)}")
        _check_distribution("probs", self.probs, len(self.types))
        _check_probability("sinc_prob", self.sinc_prob)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(range(self.size_range[0], self.size_range[1] + 1, 2))


@dataclass(frozen=True)
class StageConfig:
    """One degradation stage: blur (with probability `blur_prob`), resize, noise, JPEG.

    `resize_probs` are for (up, down, keep); up draws a factor in [1, high], down in [low, 1].
    Noise sigmas are on the 0-255 scale. `jpeg_range` is inclusive, integer qualities 0-100; stage 2's
    JPEG is the one applied in the final step.
    """

    blur_prob: float
    kernel: KernelConfig
    resize_probs: tuple[float, float, float]
    resize_range: tuple[float, float]
    noise_sigma_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    jpeg_range: tuple[int, int]
    gaussian_noise_prob: float = 0.5
    gray_noise_prob: float = 0.4

    def __post_init__(self) -> None:
        _check_probability("blur_prob", self.blur_prob)
        _check_distribution("resize_probs (up, down, keep)", self.resize_probs, 3)
        _check_range("resize_range", self.resize_range, low=1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1 (down below, up above); got {self.resize_range}")
        _check_range("noise_sigma_range", self.noise_sigma_range, low=0.0)
        _check_range("poisson_scale_range", self.poisson_scale_range, low=0.0)
        _check_range("jpeg_range", self.jpeg_range, low=0, high=100)
        _check_probability("gaussian_noise_prob", self.gaussian_noise_prob)
        _check_probability("gray_noise_prob", self.gray_noise_prob)


@dataclass(frozen=True)
class FinalConfig:
    """The final step: resize to H/scale plus a sinc filter (probability `sinc_prob`), and stage 2's JPEG,
    in the order resize-then-JPEG with probability `resize_first_prob`, else JPEG-then-resize."""

    sinc_prob: float = 0.8
    size_range: tuple[int, int] = (7, 21)
    resize_first_prob: float = 0.5

    def __post_init__(self) -> None:
        _check_probability("sinc_prob", self.sinc_prob)
        _check_size_range("size_range", self.size_range)
        _check_probability("resize_first_prob", self.resize_first_prob)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(range(self.size_range[0], self.size_range[1] + 1, 2))


@dataclass(frozen=True)
class DegradationConfig:
    """A degradation preset: `DegradationConfig.from_yaml("realesrgan")` or a path to a YAML file."""

    name: str
    stage1: StageConfig
    stage2: StageConfig
    final: FinalConfig = field(default_factory=FinalConfig)
    resize_modes: tuple[str, ...] = RESIZE_MODES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.resize_modes) - set(RESIZE_MODES))
        if unknown or not self.resize_modes:
            raise ValueError(
                f"resize_modes must be a non-empty subset of {list(RESIZE_MODES)}; got {unknown}"
            )

    @classmethod
    def from_dict(cls, data: Mapping) -> DegradationConfig:
        """Build from nested dicts; unknown or missing keys fail with the list of valid keys."""
        return _build_dataclass(cls, data, "degradation config")

    @classmethod
    def from_yaml(cls, path_or_name: str | Path) -> DegradationConfig:
        """Load a preset by name (`realesrgan`, `seesr`, `stablesr`) or from a YAML file path."""
        path = Path(path_or_name)
        if not path.suffix:
            path = PRESET_DIR / f"{path_or_name}.yaml"
            if not path.is_file():
                raise ValueError(
                    f"unknown degradation preset {str(path_or_name)!r}; available: {available_presets()}"
                )
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ValueError(f"cannot read degradation config {path}: {err}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        """Plain nested dicts and lists (YAML/JSON-ready); `from_dict(to_dict())` round-trips."""
        return _to_plain(dataclasses.asdict(self))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build_dataclass(cls, data, where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping; got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; valid keys are {sorted(fields)}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"missing keys {missing} in {where}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build_dataclass(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}.{name} must be a list; got {value!r}")
            element = typing.get_args(hint)[0]
            try:
                value = tuple(element(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}.{name} must hold {element.__name__} values; got {value!r}"
                ) from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# The record of what was applied
# ---------------------------------------------------------------------------------------------------------


@dataclass
class KernelParams:
    """One blur kernel. `kind` is one of `KERNEL_TYPES` or "sinc".

    Gaussian-family kernels use `sigma_x`, `sigma_y` (pixels) and `rotation` (radians; 0 and
    sigma_y == sigma_x for isotropic kinds), generalised and plateau kinds also `beta`; sinc kernels
    use only `cutoff` (radians, pi = Nyquist). Unused fields are None.
    """

    kind: str
    size: int
    sigma_x: float | None = None
    sigma_y: float | None = None
    rotation: float | None = None
    beta: float | None = None
    cutoff: float | None = None


@dataclass
class ResizeParams:
    """`direction` in up/down/keep, `factor` the drawn scale (1.0 for keep), `mode` for F.interpolate."""

    direction: str
    factor: float
    mode: str


@dataclass
class NoiseParams:
    """`kind` gaussian (`level` = sigma on the 0-255 scale) or poisson (`level` = BasicSR's scale);
    `gray` noise is the same in the three channels."""

    kind: str
    level: float
    gray: bool


@dataclass
class StageParams:
    """`blur` is None when the stage's blur was skipped. Stage 2's JPEG is applied in the final step."""

    blur: KernelParams | None
    resize: ResizeParams
    noise: NoiseParams
    jpeg_quality: int


@dataclass
class DegradationParams:
    """Everything applied to one image; `apply_degradation(hq, params)` reproduces its LQ exactly.

    `final_sinc` is None when no final sinc was applied; `final_order` is "resize_then_jpeg" or
    "jpeg_then_resize"; `noise_seed` seeds the noise draws of both stages.
    """

    preset: str
    scale: int
    stage1: StageParams
    stage2: StageParams
    final_sinc: KernelParams | None
    final_resize_mode: str
    final_order: str
    noise_seed: int

    def to_dict(self) -> dict:
        """JSON-serialisable nested dicts (floats, ints, strings, booleans, None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> DegradationParams:
        def kernel(d: Mapping | None) -> KernelParams | None:
            return None if d is None else KernelParams(**d)

        def stage(d: Mapping) -> StageParams:
            return StageParams(
                blur=kernel(d["blur"]),
                resize=ResizeParams(**d["resize"]),
                noise=NoiseParams(**d["noise"]),
                jpeg_quality=int(d["jpeg_quality"]),
            )

        return cls(
            preset=data["preset"],
            scale=int(data["scale"]),
            stage1=stage(data["stage1"]),
            stage2=stage(data["stage2"]),
            final_sinc=kernel(data["final_sinc"]),
            final_resize_mode=data["final_resize_mode"],
            final_order=data["final_order"],
            noise_seed=int(data["noise_seed"]),
        )


# ---------------------------------------------------------------------------------------------------------
# Kernels (Real-ESRGAN's families, written from their formulas)
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from the centre: x (1, size) along columns, y (size, 1) along rows, float64 (broadcast)."""
    ax = np.arange(size, dtype=np.float64) - (size // 2)
    ax.flags.writeable = False
    return ax[None, :], ax[:, None]


def make_kernel(params: KernelParams) -> Tensor:
    """The normalised (size, size) float64 kernel that `params` describes (sums to 1, size odd).

    With q the Mahalanobis form of the rotated covariance diag(sigma_x^2, sigma_y^2):
    Gaussian exp(-q/2); generalised Gaussian exp(-q^beta / 2); plateau 1 / (1 + q^beta).
    Sinc (circular low-pass): cutoff * J1(cutoff * r) / (2 pi r), cutoff^2 / (4 pi) at r = 0.
    All kernels are point-symmetric, so convolution and correlation agree. Built with numpy (they are
    tiny; numpy is several times faster than torch here), J1 from `torch.special`.
    """
    size = params.size
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive; got {size}")
    x, y = _grid(size)
    if params.kind == SINC:
        cutoff = float(params.cutoff)
        r = np.hypot(x, y)  # (size, size)
        r[size // 2, size // 2] = 1.0  # placeholder, the centre is set below
        j1 = torch.special.bessel_j1(torch.from_numpy(cutoff * r)).numpy()
        kernel = cutoff * j1 / (2 * math.pi * r)
        kernel[size // 2, size // 2] = cutoff**2 / (4 * math.pi)
    else:
        if params.kind not in KERNEL_TYPES:
            raise ValueError(f"unknown kernel kind {params.kind!r}; valid kinds are {[*KERNEL_TYPES, SINC]}")
        cos, sin = math.cos(params.rotation or 0.0), math.sin(params.rotation or 0.0)
        u = cos * x + sin * y  # coordinates in the kernel's principal axes
        v = -sin * x + cos * y
        q = (u / params.sigma_x) ** 2 + (v / params.sigma_y) ** 2
        if params.kind in ("iso", "aniso"):
            kernel = np.exp(-0.5 * q)
        elif params.kind.startswith("generalized"):
            kernel = np.exp(-0.5 * q**params.beta)
        else:
            kernel = 1.0 / (1.0 + q**params.beta)
    return torch.from_numpy(kernel / kernel.sum())


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


class _Draw:
    """Scalar draws for one record, from a block of uniforms taken from a CPU `torch.Generator` at once.

    One `torch.rand` call per record instead of one per draw keeps sampling fast (tens of microseconds),
    and every record consumes the same amount of the generator.
    """

    def __init__(self, generator: torch.Generator, block: int = _DRAWS_PER_RECORD) -> None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator, e.g. torch.Generator().manual_seed(0)")
        self.generator = generator
        self.block = block
        self._uniforms: list[float] = []

    def _next(self) -> float:
        if not self._uniforms:
            self._uniforms = torch.rand(self.block, dtype=torch.float64, generator=self.generator).tolist()[
                ::-1
            ]
        return self._uniforms.pop()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._next()

    def chance(self, p: float) -> bool:
        return self._next() < p

    def integer(self, low: int, high: int) -> int:
        """Uniform over low..high inclusive."""
        return min(high, low + int(self._next() * (high - low + 1)))

    def choice(self, options: Sequence, probs: Sequence[float] | None = None):
        if probs is None:
            return options[self.integer(0, len(options) - 1)]
        u = self._next()
        cumulative = 0.0
        for option, p in zip(options, probs, strict=True):
            cumulative += p
            if u < cumulative:
                return option
        return next(o for o, p in zip(reversed(options), reversed(probs), strict=True) if p > 0)


def _sample_kernel(cfg: KernelConfig, draw: _Draw) -> KernelParams:
    size = draw.choice(cfg.sizes)
    if draw.chance(cfg.sinc_prob):
        low, high = SINC_CUTOFF_SMALL_KERNEL if size < SINC_LARGE_KERNEL_FROM else SINC_CUTOFF_LARGE_KERNEL
        return KernelParams(kind=SINC, size=size, cutoff=draw.uniform(low, high))
    kind = draw.choice(cfg.types, cfg.probs)
    sigma_x = draw.uniform(*cfg.sigma_range)
    if kind.endswith("aniso"):
        sigma_y = draw.uniform(*cfg.sigma_range)
        rotation = draw.uniform(-math.pi, math.pi)
    else:
        sigma_y, rotation = sigma_x, 0.0
    beta = None
    if kind.startswith(("generalized", "plateau")):
        low, high = cfg.betag_range if kind.startswith("generalized") else cfg.betap_range
        beta = draw.uniform(low, 1.0) if draw.chance(0.5) else draw.uniform(1.0, high)
    return KernelParams(kind=kind, size=size, sigma_x=sigma_x, sigma_y=sigma_y, rotation=rotation, beta=beta)


def _sample_stage(cfg: StageConfig, modes: Sequence[str], draw: _Draw) -> StageParams:
    blur = _sample_kernel(cfg.kernel, draw) if draw.chance(cfg.blur_prob) else None
    direction = draw.choice(RESIZE_DIRECTIONS, cfg.resize_probs)
    if direction == "up":
        factor = draw.uniform(1.0, cfg.resize_range[1])
    elif direction == "down":
        factor = draw.uniform(cfg.resize_range[0], 1.0)
    else:
        factor = 1.0
    resize = ResizeParams(direction=direction, factor=factor, mode=draw.choice(modes))
    if draw.chance(cfg.gaussian_noise_prob):
        noise = NoiseParams(
            "gaussian", draw.uniform(*cfg.noise_sigma_range), draw.chance(cfg.gray_noise_prob)
        )
    else:
        noise = NoiseParams(
            "poisson", draw.uniform(*cfg.poisson_scale_range), draw.chance(cfg.gray_noise_prob)
        )
    return StageParams(blur=blur, resize=resize, noise=noise, jpeg_quality=draw.integer(*cfg.jpeg_range))


def sample_degradation(
    config: DegradationConfig, generator: torch.Generator, scale: int = 4
) -> DegradationParams:
    """Draw the parameters of one degradation; all randomness comes from `generator` (CPU)."""
    _check_scale(scale)
    draw = _Draw(generator)
    stage1 = _sample_stage(config.stage1, config.resize_modes, draw)
    stage2 = _sample_stage(config.stage2, config.resize_modes, draw)
    final_sinc = None
    if draw.chance(config.final.sinc_prob):
        final_sinc = KernelParams(
            kind=SINC, size=draw.choice(config.final.sizes), cutoff=draw.uniform(*FINAL_SINC_CUTOFF)
        )
    return DegradationParams(
        preset=config.name,
        scale=scale,
        stage1=stage1,
        stage2=stage2,
        final_sinc=final_sinc,
        final_resize_mode=draw.choice(config.resize_modes),
        final_order=FINAL_ORDERS[0] if draw.chance(config.final.resize_first_prob) else FINAL_ORDERS[1],
        noise_seed=draw.integer(0, _NOISE_SEED_HIGH),
    )


# ---------------------------------------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------------------------------------


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"the degradation pipeline needs {name}: pip install 'pure[data]'") from None


def _blur(x: Tensor, params: KernelParams) -> Tensor:
    """Filter (1, 3, h, w) with the kernel, reflect borders as BasicSR's filter2D (replicate when the
    image is smaller than half the kernel). CPU: OpenCV's filter2D, ~10x faster than a direct torch
    convolution for these kernel sizes; other devices: kornia's filter2d. They agree to float rounding."""
    kernel = make_kernel(params)
    small = min(x.shape[-2:]) <= params.size // 2
    if x.device.type == "cpu":
        cv2 = _import("cv2")
        image = x[0].permute(1, 2, 0).contiguous().numpy()  # (h, w, 3)
        border = cv2.BORDER_REPLICATE if small else cv2.BORDER_REFLECT_101
        out = cv2.filter2D(image, -1, kernel.numpy().astype(image.dtype), borderType=border)
        return torch.from_numpy(out).permute(2, 0, 1)[None]
    kornia = _import("kornia")
    weights = kernel.to(device=x.device, dtype=x.dtype)[None]  # (1, k, k)
    return kornia.filters.filter2d(x, weights, border_type="replicate" if small else "reflect")


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _luma(x: Tensor) -> Tensor:
    """(1, 3, h, w) RGB -> (1, 1, h, w) grey, BT.601 weights, as kornia's ``rgb_to_grayscale`` computes it
    (the same operations, so the same bits), without kornia: the CPU path needs only OpenCV, which the GPU
    machine has (kornia it has not)."""
    r, g, b = x.unbind(dim=-3)
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return torch.addcmul(torch.addcmul(r * weights[0], g, weights[1]), b, weights[2]).unsqueeze(-3)


def _add_noise(x: Tensor, noise: NoiseParams, generator: torch.Generator) -> Tensor:
    """Add BasicSR-style noise to (1, 3, h, w) and clip to [0, 1]."""
    _, _, h, w = x.shape
    if noise.kind == "gaussian":
        channels = 1 if noise.gray else 3
        n = torch.randn((1, channels, h, w), generator=generator, device=x.device, dtype=x.dtype)
        n = n * (noise.level / 255.0)
    elif noise.kind == "poisson":
        source = _luma(x) if noise.gray else x
        levels = (source.clamp(0, 1) * 255.0).round()
        # Photon count per unit intensity: the number of distinct 8-bit values, rounded up to a power of 2.
        distinct = int(torch.bincount(levels.flatten().long(), minlength=256).count_nonzero())
        vals = 2.0 ** math.ceil(math.log2(distinct))
        quantised = levels / 255.0
        n = (torch.poisson(quantised * vals, generator=generator) / vals - quantised) * noise.level
    else:
        raise ValueError(f"unknown noise kind {noise.kind!r}; valid kinds are {list(NOISE_TYPES)}")
    return (x + n).clamp(0, 1)  # a grey (1-channel) draw broadcasts to the 3 channels


def _jpeg(x: Tensor, quality: int) -> Tensor:
    """Real JPEG round trip of (1, 3, h, w) through OpenCV (libjpeg, 4:2:0) at an integer quality."""
    cv2 = _import("cv2")
    rgb = (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    ok, encoded = cv2.imencode(
        ".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {tuple(rgb.shape)}")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]  # BGR -> RGB
    out = torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1)[None]
    return out.to(device=x.device, dtype=x.dtype) / 255.0


def _check_scale(scale: int) -> None:
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive integer (4, 2 or 1 for PURE); got {scale!r}")


def _check_hq(hq: Tensor, scale: int, batched: bool) -> None:
    expected = "(B, 3, H, W)" if batched else "(3, H, W)"
    if not isinstance(hq, Tensor) or hq.dim() != (4 if batched else 3) or hq.shape[-3] != 3:
        shape = tuple(hq.shape) if isinstance(hq, Tensor) else type(hq).__name__
        raise ValueError(f"hq must be a {expected} RGB tensor in [0, 1]; got {shape}")
    if not hq.is_floating_point():
        raise ValueError(f"hq must be a float tensor in [0, 1]; got {hq.dtype} (divide uint8 images by 255)")
    h, w = hq.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HQ size {h}x{w} must be divisible by scale {scale}; crop it first")


def apply_degradation(hq: Tensor, params: DegradationParams) -> Tensor:
    """Degrade one image: hq (3, H, W) float in [0, 1] -> lq (3, H/scale, W/scale), 8-bit values.

    Deterministic given `params` (noise from `params.noise_seed`); runs on `hq.device` except the JPEG
    codec, which runs on the CPU.
    """
    scale = params.scale
    _check_scale(scale)
    _check_hq(hq, scale, batched=False)
    h, w = hq.shape[-2:]
    generator = torch.Generator(device=hq.device).manual_seed(params.noise_seed)
    x = hq[None].float()  # (1, 3, H, W)

    s1 = params.stage1
    if s1.blur is not None:
        x = _blur(x, s1.blur)
    x = _resize(x, (max(1, int(h * s1.resize.factor)), max(1, int(w * s1.resize.factor))), s1.resize.mode)
    x = _add_noise(x, s1.noise, generator)
    x = _jpeg(x, s1.jpeg_quality)

    s2 = params.stage2
    if s2.blur is not None:
        x = _blur(x, s2.blur)
    size2 = (max(1, int(h / scale * s2.resize.factor)), max(1, int(w / scale * s2.resize.factor)))
    x = _resize(x, size2, s2.resize.mode)
    x = _add_noise(x, s2.noise, generator)

    def resize_and_sinc(x: Tensor) -> Tensor:
        x = _resize(x, (h // scale, w // scale), params.final_resize_mode)
        return x if params.final_sinc is None else _blur(x, params.final_sinc)

    if params.final_order == "resize_then_jpeg":
        x = _jpeg(resize_and_sinc(x), s2.jpeg_quality)
    elif params.final_order == "jpeg_then_resize":
        x = resize_and_sinc(_jpeg(x, s2.jpeg_quality))
    else:
        raise ValueError(f"unknown final_order {params.final_order!r}; valid orders are {list(FINAL_ORDERS)}")
    lq = (x.clamp(0, 1) * 255.0).round() / 255.0
    return lq[0].to(hq.dtype)


def degrade(
    hq: Tensor, config: DegradationConfig, generator: torch.Generator, scale: int = 4
) -> tuple[Tensor, list[DegradationParams]]:
    """Degrade a batch: hq (B, 3, H, W) float in [0, 1] -> lq (B, 3, H/scale, W/scale) and B records.

    Each image gets its own parameters, drawn in batch order from `generator` (CPU); so degrading a
    batch equals degrading its images one after the other with the same generator. Output on hq.device.
    """
    _check_scale(scale)
    _check_hq(hq, scale, batched=True)
    params = [sample_degradation(config, generator, scale) for _ in range(hq.shape[0])]
    if not params:
        return hq.new_zeros((0, 3, hq.shape[-2] // scale, hq.shape[-1] // scale)), []
    lq = torch.stack([apply_degradation(image, p) for image, p in zip(hq, params, strict=True)])
    return lq, params


def paired_random_crop(
    hq: Tensor, lq: Tensor, hq_size: int, scale: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Crop the same region from both: hq (..., H, W) -> (..., hq_size, hq_size) and lq (..., H/scale,
    W/scale) -> (..., hq_size/scale, hq_size/scale). The offset is drawn on the LQ grid (CPU generator)
    and multiplied by `scale` for the HQ, so the pair stays pixel-aligned; a batch shares one offset."""
    _check_scale(scale)
    if hq_size % scale:
        raise ValueError(f"hq_size {hq_size} must be divisible by scale {scale}")
    h, w = hq.shape[-2:]
    lq_h, lq_w = lq.shape[-2:]
    if (lq_h * scale, lq_w * scale) != (h, w):
        raise ValueError(f"LQ {lq_h}x{lq_w} times scale {scale} must equal HQ {h}x{w}")
    lq_size = hq_size // scale
    if lq_size > min(lq_h, lq_w) or lq_size < 1:
        raise ValueError(f"hq_size {hq_size} must be between {scale} and the HQ size {min(h, w)}")
    draw = _Draw(generator, block=2)
    top, left = draw.integer(0, lq_h - lq_size), draw.integer(0, lq_w - lq_size)
    lq_crop = lq[..., top : top + lq_size, left : left + lq_size]
    hq_crop = hq[..., top * scale : top * scale + hq_size, left * scale : left * scale + hq_size]
    return hq_crop, lq_crop

"""``python -m pure.eval.holdout``: the honest held-out measurement of a trained PURE model.

Training scores say how well a model fits its own crops; this measures it on whole images it never saw,
with the degradations it was trained on, against the numbers that bound what it can do:

- ``bicubic``: the LQ upsampled bicubically, the floor a restoration must beat to be worth anything;
- ``vq``: the VQ tokenizer's own encode -> decode of the HQ crop, what the tokenizer keeps (PURE writes VQ
  codes, so its codes cannot be more faithful to the HQ than its tokenizer's);
- ``vq-fixed``: ``vq`` through the same colour fix as the PURE rows, the ceiling of those rows (a model that
  writes every HQ code right, through the restorer); measured where the PURE rows are colour-fixed;
- ``copy``: the VQ round trip of the bicubic-upsampled LQ, i.e. of exactly what the model is shown, through
  the same colour fix as the PURE rows: what a model that only copies its input tokens would give. A model
  that restores must beat it, not only bicubic;
- ``pure`` and its ablations (`SETTINGS`): the restorations under several sampling settings, so that the
  effect of the entropy-based top-k and of classifier-free guidance is measured, not assumed; and
  ``checkpoint``, the checkpoint's own decoding defaults (its ``sampling.json``), where they are none of
  those. The row of the checkpoint's defaults (`subject_method`) is the one the verdict, the paired
  differences and the pictures are of: what a user of the checkpoint gets.

Beside PSNR-Y and SSIM-Y every output gets ``gms_y``, the mean gradient-magnitude similarity (`gms_y`: the
GMSD paper's similarity map averaged, 1 = the HQ's edges exactly), which rewards sharp edges in the right
place and punishes both blur and invented edges, and every method that writes VQ codes gets ``token_acc``,
the share of its codes equal to the HQ crop's own codes (`token_accuracy`). The PURE rows also score the
model's text: Perceive (its blur and noise levels against the label of the LQ's true degradation
parameters, beside chance and the majority class: `perceive_summary`) and, for images whose true caption
is a generated one (`pure.data.synthetic_images`), Understand (the caption's attributes:
`understand_summary`). `paired_differences` says whether PURE's margin over ``copy`` and ``bicubic``
exceeds two paired standard errors, and ``vq-fixed`` minus ``copy`` (the ``headroom``) how much a model could
gain over copying at all, and whether the hold-out can resolve it.

For every held-out image, ``--crops-per-image`` crops of ``--crop`` px are taken on a fixed grid (one crop:
the centre; see `crop_boxes`); for every crop and every ``--seeds`` seed, an LQ of ``crop / 4`` px is made by
the training pipeline itself (`pure.data.pairs.make_pair`, the ``realesrgan`` Real-ESRGAN preset, x4), seeded
by ``(seed, image, crop index)`` exactly as training pairs are. The restoration seed is that same seed, so a
rerun gives the same numbers. Each method is scored against the HQ crop with PSNR and SSIM on the Y channel
(`psnr_y`, `ssim_y`: ITU-R BT.601 as in the SR literature, border of ``scale`` px cropped).

    python -m pure.eval.holdout --model outputs/pure-tiny --holdout data/holdout --crop 128 \\
        --crops-per-image 4 --seeds 0,1,2 --out outputs/holdout

writes ``OUT/results.json`` (every score, mean and std per method, settings, checkpoint identity, timing),
``OUT/results.md`` (the table and whether PURE beats bicubic, computed from it) and
``OUT/pictures/NAME_seedS.png`` for the first seed (LQ nearest | bicubic | copy | VQ ceiling | PURE |
HQ). The Python entry point is `measure_holdout`; `write_report` writes the two result files.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pure.colorfix import wavelet_color_fix
from pure.data import synthetic_images
from pure.data.degradations import DegradationConfig
from pure.data.pairs import PairSettings, crop_name, make_pair, pair_names
from pure.decoding.loop import SamplingConfig
from pure.imageio import ImageLoadError, atomic_write, list_images, load_image, save_image, save_json
from pure.quant import QUANTIZE_MODES, check_quantize
from pure.sequence import DEGRADATION_LEVELS
from pure.vq import pil_to_pixels, pixels_to_pil, to_rgb

__all__ = [
    "BASELINES",
    "CHECKPOINT_METHOD",
    "SETTINGS",
    "HoldoutError",
    "VQOnly",
    "crop_boxes",
    "gms_y",
    "measure_holdout",
    "native_size",
    "paired_differences",
    "per_image",
    "perceive_summary",
    "psnr_y",
    "render_markdown",
    "rgb_to_y",
    "ssim_y",
    "summarise",
    "token_accuracy",
    "understand_summary",
    "verdict",
    "write_report",
]

# -- protocol constants ------------------------------------------------------------------------------------

PRESET = "realesrgan"  # the degradation recipe PURE-tiny is trained with
SCALE = 4  # LQ side = crop / SCALE, restored x4 (PURE's native 128 -> 512 case)
BORDER = SCALE  # px cut from every side before scoring, as BasicSR's crop_border = scale
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_CROPS_PER_IMAGE = 1
FALLBACK_IMAGE_SIZE = 512  # PURE's native output side, when the checkpoint does not say otherwise
GRID_PX = 32  # crops must be a multiple of this: one grid token = 4 latents of the 8x VQ

# ITU-R BT.601 luma for RGB in [0, 1], on the 0-255 scale (studio range 16-235): MATLAB's rgb2ycbcr,
# BasicSR's to_y_channel. PSNR/SSIM on Y are what SR papers report.
Y_OFFSET = 16.0
Y_WEIGHTS = (65.481, 128.553, 24.966)
PIXEL_MAX = 255.0
# SSIM of Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, valid positions only.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# PURE's sampling settings under test. "no-entropy" fixes k at the entropy rule's upper bound, i.e. plain
# top-k sampling; "no-cfg" uses the conditional logits alone (guidance scale 1); "greedy" is temperature 0;
# "greedy-no-cfg" both (the most likely code of the conditional logits: what the model predicts, unpulled by
# guidance's unconditional branch, which a model never trained without its conditions has not learnt).
_DEFAULT = SamplingConfig()
NO_ENTROPY_TOP_K = _DEFAULT.max_k
NO_GUIDANCE = 1.0
GREEDY_TEMPERATURE = 0.0
SETTINGS: dict[str, SamplingConfig] = {
    "pure": SamplingConfig(),
    "pure-no-entropy": SamplingConfig(min_k=NO_ENTROPY_TOP_K, max_k=NO_ENTROPY_TOP_K),
    "pure-no-cfg": SamplingConfig(cfg_scale=NO_GUIDANCE),
    "pure-greedy": SamplingConfig(temperature=GREEDY_TEMPERATURE),
    "pure-greedy-no-cfg": SamplingConfig(temperature=GREEDY_TEMPERATURE, cfg_scale=NO_GUIDANCE),
}
# the checkpoint's own defaults (restorer.sampling, from its sampling.json), where they are none of SETTINGS
CHECKPOINT_METHOD = "checkpoint"
SETTING_NOTES: dict[str, str] = {
    "pure": "SamplingConfig defaults: entropy top-k (k from min_k to max_k), guidance cfg_scale",
    "pure-no-entropy": f"fixed top-k = {NO_ENTROPY_TOP_K} (min_k = max_k: no entropy-based k)",
    "pure-no-cfg": "cfg_scale = 1: the conditional logits alone, no guidance",
    "pure-greedy": "temperature 0: the most likely code at every step",
    "pure-greedy-no-cfg": "temperature 0 and cfg_scale = 1: the most likely code of the conditional logits",
    CHECKPOINT_METHOD: "the checkpoint's own decoding defaults (its sampling.json)",
}
BASELINES: dict[str, str] = {
    "bicubic": "the LQ upsampled bicubically to the crop size (PIL), what the model sees",
    "vq": "the VQ tokenizer's encode -> decode of the HQ crop: what the tokenizer keeps",
    "vq-fixed": "vq colour-fixed against the LQ as the PURE rows are: the ceiling of the PURE rows (every HQ "
    "code right, through the restorer)",
    "copy": "the VQ tokenizer's encode -> decode of the bicubic-upsampled LQ, colour-fixed as the PURE rows "
    "are: what a model that copies its input tokens gives",
}
# the baselines of a tokenizer alone (no restorer, so no colour fix: `VQOnly`)
TOKENIZER_BASELINES = ("bicubic", "vq", "copy")
CEILING = "vq-fixed"  # the PURE rows' ceiling: measured where they are colour-fixed
PICTURE_PANELS = ("LQ (nearest)", "bicubic", "copy", "VQ ceiling", "PURE", "HQ")
PICTURE_MIN_SIDE = 256  # small crops are shown magnified (nearest, whole factor) so that labels fit

METRIC_KEYS = ("psnr_y", "ssim_y")
# Scored too, shown in the table; kept apart from METRIC_KEYS, which the card's reproduction check pairs.
EXTRA_METRIC_KEYS = ("gms_y", "token_acc")
# Gradient-magnitude similarity (Xue et al. 2014, GMSD): Prewitt gradients of Y (0-255), c = 170.
GMS_C = 170.0
# Paired comparisons the report makes: PURE's default setting against these, per metric.
PAIRED_BASELINES = ("copy", "bicubic")
PAIRED_Z = 2.0
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PICTURES_DIR = "pictures"
HASH_LIMIT_BYTES = 256 * 2**20  # checkpoint files larger than this are identified by size, not sha256


class HoldoutError(ValueError):
    """Bad input to the measurement (no images, bad crop, bad seeds): one line, exit code 2 in the CLI."""


# -- metrics -----------------------------------------------------------------------------------------------


def rgb_to_y(image: Image.Image | np.ndarray) -> np.ndarray:
    """BT.601 luma (H, W) float64 on the 0-255 scale: ``16 + 65.481 R + 128.553 G + 24.966 B``, RGB in [0, 1].

    An array input is (H, W, 3) uint8 (0-255). Not rounded, as BasicSR's ``to_y_channel``.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image; got shape {rgb.shape}")
    return Y_OFFSET + (rgb / PIXEL_MAX) @ np.asarray(Y_WEIGHTS)


def _shave(y: np.ndarray, border: int) -> np.ndarray:
    if border < 0 or 2 * border >= min(y.shape):
        raise ValueError(f"border {border} px leaves nothing of a {y.shape[1]}x{y.shape[0]} image")
    return y[border : y.shape[0] - border, border : y.shape[1] - border] if border else y


def _pair_y(pred: Any, ref: Any, border: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = (rgb_to_y(x) if not (isinstance(x, np.ndarray) and x.ndim == 2) else x for x in (pred, ref))
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape[::-1]} vs {b.shape[::-1]}")
    return _shave(np.asarray(a, np.float64), border), _shave(np.asarray(b, np.float64), border)


def psnr_y(pred: Any, ref: Any, border: int = BORDER) -> float:
    """PSNR in dB on the Y channel (peak 255) after cutting ``border`` px from every side; inf if equal.

    ``pred`` and ``ref`` are RGB PIL images, (H, W, 3) uint8 arrays or (H, W) Y arrays on the 0-255 scale.
    """
    a, b = _pair_y(pred, ref, border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PIXEL_MAX**2 / mse)


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, 11, 11)


def ssim_y(pred: Any, ref: Any, border: int = BORDER) -> float:
    """SSIM on the Y channel (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, data range 255), the
    mean over the window positions that lie inside the image (as BasicSR and scikit-image), after cutting
    ``border`` px from every side. Same inputs as `psnr_y`."""
    a, b = _pair_y(pred, ref, border)
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW} px per side after the border; got {a.shape}")
    x = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(b))[None, None]
    window = _gaussian_window()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window)  # valid positions only

    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def gms_y(pred: Any, ref: Any, border: int = BORDER) -> float:
    """Mean gradient-magnitude similarity on Y (the GMSD paper's GMS map, Prewitt 3x3 gradients, c = 170 on
    the 0-255 scale, without its 2x average-pooling), after cutting ``border`` px: 1 when the gradient
    magnitudes match everywhere, lower for blurred edges (weaker gradients) and for invented ones.
    Same inputs as `psnr_y`."""
    a, b = _pair_y(pred, ref, border)
    prewitt = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=torch.float64) / 3.0
    kernels = torch.stack([prewitt, prewitt.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy

    def magnitude(y: np.ndarray) -> torch.Tensor:
        g = torch.nn.functional.conv2d(torch.from_numpy(np.ascontiguousarray(y))[None, None], kernels)
        return g.square().sum(1).sqrt()  # (1, H-2, W-2)

    ga, gb = magnitude(a), magnitude(b)
    return float(((2 * ga * gb + GMS_C) / (ga**2 + gb**2 + GMS_C)).mean())


def token_accuracy(codes: Any, reference: Any) -> float:
    """Share of positions where two ``(h, w)`` code grids agree (1.0 for identical grids)."""
    a, b = torch.as_tensor(codes).cpu(), torch.as_tensor(reference).cpu()
    if a.shape != b.shape:
        raise ValueError(f"code grids differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).double().mean())


class VQOnly:
    """A stand-in restorer that holds only a VQ tokenizer: `measure_holdout` with the baselines alone
    (``bicubic``, ``vq``, ``copy``), e.g. to follow a tokenizer's training against bicubic. Its copy row has
    no colour fix (there is no restorer to give one), as the tokenizer curves were measured."""

    def __init__(self, vq: Any, image_size: int = 128, identity: Mapping[str, Any] | None = None) -> None:
        self.vq = vq
        self.image_size = image_size
        self.identity = dict(identity or {})
        self.device = getattr(vq, "device", "cpu")

    def restore_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise HoldoutError("a VQ-only measurement has no model: choose methods among bicubic, vq, copy")


# -- crops and inputs --------------------------------------------------------------------------------------


def crop_boxes(width: int, height: int, crop: int, count: int) -> list[tuple[int, int]]:
    """``count`` (top, left) positions of ``crop`` px boxes on a fixed grid spread evenly over the image.

    The grid has ``ceil(sqrt(count))`` rows; one crop is the centre crop (StableSR's test protocol). Fixed
    positions rather than random ones: the same image gives the same crops in every run and checkpoint.
    """
    if crop > min(width, height):
        raise ValueError(f"image is {width}x{height} px, smaller than the {crop} px crop")
    rows = math.ceil(math.sqrt(count))
    cols = math.ceil(count / rows)

    def spread(n: int, room: int) -> list[int]:
        return [room // 2] if n == 1 else [round(i * room / (n - 1)) for i in range(n)]

    tops, lefts = spread(rows, height - crop), spread(cols, width - crop)
    # an image about the crop's size has fewer distinct places than `count`: each is measured once
    return list(dict.fromkeys((top, left) for top in tops for left in lefts))[:count]


def default_settings(restorer: Any) -> dict[str, SamplingConfig]:
    """`SETTINGS`, plus `CHECKPOINT_METHOD` (``restorer.sampling``, its checkpoint's defaults) where those
    are none of them: every measurement then has a row of what the checkpoint gives by default."""
    own = getattr(restorer, "sampling", None)
    if own is None or own in SETTINGS.values():
        return dict(SETTINGS)
    return {CHECKPOINT_METHOD: own, **SETTINGS}


def subject_method(
    restorer: Any, methods: Sequence[str], settings: Mapping[str, SamplingConfig]
) -> str | None:
    """The PURE method the report is about: the first of ``methods`` whose settings are the checkpoint's
    defaults (``restorer.sampling``), else the first PURE method measured (None: none was)."""
    own = getattr(restorer, "sampling", SamplingConfig())
    pure_methods = [m for m in methods if m in settings]
    return next((m for m in pure_methods if settings[m] == own), next(iter(pure_methods), None))


def native_size(restorer: Any) -> int:
    """The output side a checkpoint was trained at: ``restorer.image_size`` if the restorer has one, else
    the model config's ``pure_image_size``, else PURE's 512."""
    size = getattr(restorer, "image_size", None)
    if size is None:
        config = getattr(getattr(restorer, "model", None), "config", None)
        size = getattr(config, "pure_image_size", None)
    return int(size) if size else FALLBACK_IMAGE_SIZE


def _check_crop(crop: int) -> None:
    if crop < GRID_PX or crop % GRID_PX:
        raise HoldoutError(f"--crop must be a positive multiple of {GRID_PX} px; got {crop}")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (duplicates dropped, order kept)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            raise HoldoutError(f"--seeds must be comma-separated integers; got {text!r}") from None
        if seed < 0:
            raise HoldoutError(f"--seeds must be >= 0; got {seed}")
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise HoldoutError(f"--seeds names no seed: {text!r}")
    return seeds


def _default_color_fix(restorer: Any) -> Any:
    """The restorer's own default for ``color_fix`` (read, not assumed, so the report says what was used)."""
    parameter = inspect.signature(type(restorer).restore_batch).parameters.get("color_fix")
    return None if parameter is None else parameter.default


def _describe_color_fix(value: Any, chosen: bool = False) -> str:
    how = "chosen" if chosen else "restorer default"
    if value is True:
        return f"wavelet ({how})"
    if value is False or value is None:
        return f"none ({how})"
    return f"{value} ({how})"


@dataclass
class _Source:
    key: str  # seeds the degradations (as pure.data.pairs: the path relative to the folder)
    base: str  # name base of its crops
    path: Path | None = None
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        image = self.image if self.image is not None else load_image(self.path)
        return to_rgb(image)


def _sources(images: Mapping[str, Image.Image] | Sequence[str | Path]) -> list[_Source]:
    if isinstance(images, Mapping):
        return [
            _Source(key=str(k), base=Path(str(k)).stem.replace(" ", "_"), image=v) for k, v in images.items()
        ]
    paths = [Path(p) for p in images]
    names = pair_names(paths)
    return [_Source(key=names[p][0], base=names[p][1], path=p) for p in paths]


# -- measurement -------------------------------------------------------------------------------------------


def _vq_roundtrip(restorer: Any, hq: Image.Image) -> Image.Image:
    vq = restorer.vq
    pixels = pil_to_pixels(hq)[None].to(vq.device)
    return pixels_to_pil(vq.decode(vq.encode(pixels))[0].cpu())


def _encode(restorer: Any, image: Image.Image) -> torch.Tensor:
    """(h, w) codes of an image."""
    vq = restorer.vq
    return vq.encode(pil_to_pixels(image)[None].to(vq.device))[0].cpu()


def _decode(restorer: Any, codes: torch.Tensor) -> Image.Image:
    """The image of (h, w) codes."""
    vq = restorer.vq
    return pixels_to_pil(vq.decode(codes[None].to(vq.device))[0].cpu())


def codes_digest(codes: torch.Tensor) -> str:
    """A short fingerprint of a code grid. Two runs whose rows carry the same one showed the model the same
    input: the encoder's nearest code can flip at a near-tie on another CPU, and a sampled restoration
    with it."""
    return hashlib.sha1(codes.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:12]


def _model_input(restorer: Any, lq: Image.Image, size: int) -> Image.Image:
    """The LQ as the model is shown it: the restorer's own upsampling, else PIL bicubic."""
    upsample = getattr(restorer, "upsample_input", None)
    return upsample(lq, size)[0] if upsample is not None else lq.resize((size, size), Image.BICUBIC)


def _nonfinite_to_none(value: float) -> float | None:
    """JSON has no inf: a PSNR of identical images is written as null (and shown as inf in tables)."""
    return value if math.isfinite(value) else None


def measure_holdout(
    restorer: Any,
    images: Mapping[str, Image.Image] | Sequence[str | Path],
    crop: int | None = None,
    crops_per_image: int = DEFAULT_CROPS_PER_IMAGE,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    methods: Sequence[str] | None = None,
    settings: Mapping[str, SamplingConfig] | None = None,
    pictures_dir: str | Path | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    progress: bool = False,
    captions: Mapping[str, str] | None = None,
    whole_pictures: bool = False,
    color_fix: bool | None = None,
) -> dict:
    """Score bicubic, the VQ ceiling and PURE's sampling settings on held-out images; returns the results.

    Args:
        restorer: a `pure.restorer.PureRestorer` (anything with ``restore``, ``vq``, ``identity``).
        images: file paths (keys and names as `pure.data.pairs.pair_names`) or ``{name: PIL image}``.
        crop: HQ crop side (a multiple of 32); default the checkpoint's `native_size`.
        crops_per_image: crops per image, on the fixed grid of `crop_boxes`.
        seeds: degradation seeds; each gives another LQ of every crop and is the restoration seed.
        methods: which of ``bicubic``, ``vq`` and the ``settings`` names to run (default all).
        settings: name -> `SamplingConfig` of the PURE methods (default `SETTINGS`, and
            `CHECKPOINT_METHOD` where ``restorer.sampling`` is none of them: `default_settings`).
        pictures_dir: where to write ``NAME_seedS.png`` comparisons for the first seed (None: none).
        checkpoint: identity of the checkpoint to record (default ``restorer.identity``).
        captions: image key (as in the rows' ``image``) -> true caption; generated captions (whose
            attributes `pure.data.synthetic_images.caption_attributes` can read) are scored for Understand.
        whole_pictures: also restore every image larger than ``crop`` whole (centre square of at most
            `WHOLE_MAX_SIDE` px, its own Real-ESRGAN LQ, restored by tiles with the first PURE setting,
            first seed) into ``pictures_dir/NAME_whole_seedS.png``; scores in the result's ``whole``.
        color_fix: the wavelet colour fix on (True) or off (False) for the PURE and copy rows (default None:
            the restorer's default, on for `pure.restorer.PureRestorer`). The copy row always gets what the
            PURE rows get: a model that copies its input is colour-fixed too.

    Returns:
        A JSON-ready dict: ``methods`` (per method: mean, std and n of ``psnr_y``, ``ssim_y``, ``gms_y``,
        ``token_acc`` and ``seconds``, over all crops x seeds), ``rows`` (one per crop, seed and method; each
        with ``lq_codes``, a digest of the codes the model is shown: `codes_digest`),
        ``paired`` (`paired_differences`), ``perceive`` and ``understand`` (per PURE setting), ``settings``,
        ``protocol`` (crop, scale, border, preset, seeds, colour fix), ``checkpoint``, ``skipped`` images,
        ``timing``, ``subject`` (`subject_method`: the row of the checkpoint's defaults, which ``verdict``,
        ``paired`` and the pictures are of) and ``verdict`` (the sentence of `verdict`).

    Raises:
        HoldoutError: no usable image, bad crop, seeds or method names.
    """
    from tqdm import tqdm

    settings = default_settings(restorer) if settings is None else dict(settings)
    chosen_color_fix = color_fix is not None
    restore_options = {"color_fix": color_fix} if chosen_color_fix else {}
    color_fix = color_fix if chosen_color_fix else _default_color_fix(restorer)
    known = [*BASELINES, *settings]
    if methods is None:  # all; the colour-fixed ceiling only where the PURE rows are colour-fixed
        methods = [m for m in known if m != CEILING or color_fix is True]
    methods = list(methods)
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise HoldoutError(
            f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
        )
    if CEILING in methods and color_fix is not True:
        raise HoldoutError(f"{CEILING} is vq colour-fixed as the PURE rows are: it needs the colour fix on")
    crop = native_size(restorer) if crop is None else int(crop)
    _check_crop(crop)
    if crops_per_image < 1:
        raise HoldoutError(f"--crops-per-image must be at least 1; got {crops_per_image}")
    seeds = list(seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise HoldoutError(f"seeds must be a non-empty list of integers >= 0; got {seeds}")
    sources = _sources(images)
    if not sources:
        raise HoldoutError("no held-out images given")
    degradation = DegradationConfig.from_yaml(PRESET)
    pictures = Path(pictures_dir) if pictures_dir is not None else None
    picture_method = subject_method(restorer, methods, settings)

    # load every image once up front: bad files and too-small images are known before any restoration
    plan: list[tuple[_Source, Image.Image, list[tuple[int, int]]]] = []
    skipped: list[dict[str, str]] = []
    for source in sources:
        try:
            image = source.load()
            boxes = crop_boxes(*image.size, crop, crops_per_image)
        except (ImageLoadError, ValueError, OSError) as err:
            skipped.append({"image": source.key, "reason": str(err).splitlines()[0]})
            continue
        plan.append((source, image, boxes))
    if not plan:
        reasons = "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:3])
        raise HoldoutError(f"no usable held-out image ({reasons})")

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    total = sum(len(boxes) for _, _, boxes in plan) * len(seeds)
    bar = tqdm(total=total, unit="pair", desc="holdout", disable=not progress)
    try:
        for source, image, boxes in plan:
            for k, (top, left) in enumerate(boxes):
                name = crop_name(source.base, k)
                region = image.crop((left, top, left + crop, top + crop))
                vq_image: Image.Image | None = None
                vq_seconds = 0.0
                hq_codes: torch.Tensor | None = None  # the HQ crop's own codes: what token_acc counts
                focus: torch.Tensor | None = None  # entropy of the pictured restoration: where to zoom
                for seed in seeds:
                    pair_settings = PairSettings(
                        preset=PRESET, scale=SCALE, crop=crop, crops_per_image=crops_per_image, seed=seed
                    )  # flip stays off: a held-out crop is measured as it is
                    # the crop is the whole image, so make_pair's crop box is (0, 0) and the LQ comes from
                    # the same draws of the same generator as a training pair would
                    tick = time.perf_counter()
                    hq_array, lq_array, record = make_pair(region, degradation, pair_settings, source.key, k)
                    degrade_s = time.perf_counter() - tick
                    hq = Image.fromarray(hq_array, "RGB")
                    lq = Image.fromarray(lq_array, "RGB")
                    shown = _model_input(restorer, lq, crop)
                    lq_codes = _encode(restorer, shown)
                    base_row = {
                        "image": source.key,
                        "crop": name,
                        "crop_index": k,
                        "box": {"top": top, "left": left, "size": crop},
                        "seed": seed,
                        "label": record["label"],
                        "degrade_s": degrade_s,
                        "lq_codes": codes_digest(lq_codes),
                    }
                    outputs: dict[str, Image.Image] = {}
                    if hq_codes is None:
                        hq_codes = _encode(restorer, hq)
                    for method in methods:
                        extra: dict[str, Any] = {}
                        tick = time.perf_counter()
                        if method == "copy":
                            output = _decode(restorer, lq_codes)
                            if color_fix is True:  # as the restorer fixes the model's image
                                output = wavelet_color_fix(output, shown)
                            seconds = time.perf_counter() - tick
                            extra = {"token_acc": token_accuracy(lq_codes, hq_codes)}
                        elif method == "bicubic":
                            output = lq.resize((crop, crop), Image.BICUBIC)
                            seconds = time.perf_counter() - tick
                        elif method in ("vq", CEILING):
                            if vq_image is None:  # the round trip does not depend on the seed: once per crop
                                vq_image = _vq_roundtrip(restorer, hq)
                                vq_seconds = time.perf_counter() - tick
                            output, seconds = vq_image, vq_seconds
                            if method == CEILING:  # the fix takes the LQ's low frequencies: once per seed
                                fix_tick = time.perf_counter()
                                output = wavelet_color_fix(vq_image, shown)
                                seconds = vq_seconds + time.perf_counter() - fix_tick
                            extra = {"token_acc": 1.0}  # its codes are the HQ's own
                        else:
                            result = restorer.restore(
                                lq, seed=seed, sampling=settings[method], size=crop, **restore_options
                            )
                            seconds = time.perf_counter() - tick
                            output = result.image
                            extra = {
                                "degradation": result.degradation,
                                "caption": result.caption,
                                "entropy_mean": float(result.entropy.float().mean()),
                                "token_acc": token_accuracy(result.codes, hq_codes),
                                "image_passes": getattr(result, "timings", {}).get("image_forward_passes"),
                                "image_fed": getattr(result, "timings", {}).get("image_tokens_fed"),
                            }
                            if method == picture_method:
                                focus = result.entropy
                        outputs[method] = output
                        rows.append(
                            {
                                **base_row,
                                "method": method,
                                "psnr_y": _nonfinite_to_none(psnr_y(output, hq)),
                                "ssim_y": ssim_y(output, hq),
                                "gms_y": gms_y(output, hq),
                                "seconds": seconds,
                                **extra,
                            }
                        )
                    if pictures is not None and seed == seeds[0]:
                        picture = pictures / f"{name}_seed{seed}.png"
                        _save_picture(picture, lq, hq, outputs, picture_method, focus)
                    bar.update(1)
    finally:
        bar.close()
    whole: list[dict[str, Any]] = []
    if whole_pictures and pictures is not None and picture_method is not None:
        for source, image, _ in plan:
            if min(image.size) > crop:
                whole.append(
                    _whole_picture(
                        restorer,
                        source,
                        image,
                        degradation,
                        crop,
                        seeds[0],
                        settings[picture_method],
                        pictures,
                        restore_options,
                    )
                )
    elapsed = time.perf_counter() - start

    summary = summarise(rows, methods)
    pure_methods = [m for m in methods if m in settings]
    truth = {str(k): v for k, v in (captions or {}).items()}
    subject = picture_method or "pure"  # without a PURE row: the sentence says pure was not run
    results = {
        "methods": summary,
        "subject": subject,
        "per_image": per_image(rows),
        "verdict": verdict(summary, subject),
        "paired": paired_differences(rows, subject),
        "headroom": paired_differences(rows, CEILING, ("copy",)).get("copy", {}),
        "perceive": {m: perceive_summary(rows, m) for m in pure_methods},
        "understand": {m: understand_summary(rows, m, truth) for m in pure_methods},
        "measures": {
            "gms_y": f"mean gradient-magnitude similarity on Y (Prewitt, c = {GMS_C:g}), {BORDER} px "
            "border cut",
            "token_acc": "share of the output's VQ codes equal to the HQ crop's codes (vq: 1 by definition)",
            "paired": f"mean of per-(crop, seed) differences and its standard error; beyond {PAIRED_Z:g} "
            "SE = resolved (crops of one image are not independent: the SE is, if anything, too small)",
        },
        "settings": {
            **{m: {"kind": "baseline", "description": BASELINES[m]} for m in methods if m in BASELINES},
            **{
                m: {
                    "kind": "pure",
                    "description": SETTING_NOTES.get(m, "custom SamplingConfig"),
                    "sampling": asdict(settings[m]),
                    "color_fix": color_fix,
                }
                for m in methods
                if m in settings
            },
        },
        "protocol": {
            "crop": crop,
            "lq_size": crop // SCALE,
            "scale": SCALE,
            "crops_per_image": crops_per_image,
            "crop_positions": "fixed grid (crop_boxes): one crop = the centre",
            "seeds": seeds,
            "degradation_preset": PRESET,
            "degradation": "pure.data.pairs.make_pair, seeded by (seed, image key, crop index)",
            "restoration_seed": "the degradation seed",
            "color_fix": _describe_color_fix(color_fix, chosen_color_fix),
            "metrics": (
                f"PSNR and SSIM on BT.601 Y (16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0, 1], 0-255 "
                f"scale, not rounded), {BORDER} px border cut from every side; SSIM with an "
                f"{SSIM_WINDOW}x{SSIM_WINDOW} Gaussian window, sigma {SSIM_SIGMA}; std over crops x seeds "
                "(ddof 0); a PSNR of null means identical images (inf)"
            ),
            "native_size": native_size(restorer),
        },
        "checkpoint": dict(checkpoint if checkpoint is not None else getattr(restorer, "identity", {})),
        "images": [s.key for s, _, _ in plan],
        "skipped": skipped,
        "rows": rows,
        "whole": whole,
        "timing": {
            "total_s": elapsed,
            "pairs": total,
            "device": str(getattr(restorer, "device", "cpu")),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    return results


WHOLE_MAX_SIDE = 512  # px: whole-image pictures are of the centre square of at most this side
WHOLE_CROP_INDEX = 999  # seeds the whole image's degradation apart from the grid crops' (0, 1, ...)


def _whole_picture(
    restorer: Any,
    source: _Source,
    image: Image.Image,
    degradation: DegradationConfig,
    crop: int,
    seed: int,
    sampling: SamplingConfig,
    pictures: Path,
    restore_options: Mapping[str, Any],
) -> dict[str, Any]:
    """Degrade the image's centre square whole, restore it by tiles and save LQ | bicubic | PURE | HQ."""
    from pure import viz
    from pure.tiling import restore_tiled

    side = min(*image.size, WHOLE_MAX_SIDE) // crop * crop
    left, top = (image.width - side) // 2, (image.height - side) // 2
    region = image.crop((left, top, left + side, top + side))
    settings = PairSettings(preset=PRESET, scale=SCALE, crop=side, crops_per_image=1, seed=seed)
    hq_array, lq_array, _ = make_pair(region, degradation, settings, source.key, WHOLE_CROP_INDEX)
    hq, lq = Image.fromarray(hq_array, "RGB"), Image.fromarray(lq_array, "RGB")
    tick = time.perf_counter()
    # tiles of the crop size: the size every other PURE row of this measurement is restored at
    restored = restore_tiled(
        restorer, lq, scale=SCALE, tile=crop, seed=seed, sampling=sampling, **restore_options
    ).image
    restored = restored.convert("RGB")
    seconds = time.perf_counter() - tick
    bicubic = lq.resize((side, side), Image.BICUBIC)
    scores = {
        name: {"psnr_y": psnr_y(out, hq), "ssim_y": ssim_y(out, hq), "gms_y": gms_y(out, hq)}
        for name, out in (("bicubic", bicubic), ("pure", restored))
    }
    panels = [
        ("LQ (nearest)", lq.resize((side, side), Image.NEAREST)),
        (f"bicubic {scores['bicubic']['psnr_y']:.2f} dB", bicubic),
        (f"PURE {scores['pure']['psnr_y']:.2f} dB", restored),
        ("HQ", hq),
    ]
    name = f"{source.base}_whole_seed{seed}.png"
    save_image(viz.comparison(panels), pictures / name, overwrite=True)
    return {"image": source.key, "side": side, "seed": seed, "picture": name, "seconds": seconds, **scores}


def _save_picture(
    path: Path,
    lq: Image.Image,
    hq: Image.Image,
    outputs: Mapping[str, Image.Image],
    pure_method: str | None,
    focus: Any,
) -> None:
    """LQ (nearest) | bicubic | copy | VQ ceiling | PURE | HQ, each labelled with its PSNR-Y if it has one."""
    from pure import viz

    factor = -(-PICTURE_MIN_SIDE // max(hq.size))  # ceil
    size = (hq.width * factor, hq.height * factor)

    def shown(image: Image.Image) -> Image.Image:
        return image.resize(size, Image.NEAREST)  # nearest: every pixel as it is, only bigger

    panels: list[tuple[str, Image.Image]] = [(PICTURE_PANELS[0], shown(lq))]
    for label, method in zip(PICTURE_PANELS[1:5], ("bicubic", "copy", "vq", pure_method), strict=True):
        if method in outputs:
            name = label if method in ("bicubic", "copy", "vq", "pure") else f"{label} ({method})"
            panels.append((f"{name} {psnr_y(outputs[method], hq):.2f} dB", shown(outputs[method])))
    panels.append((PICTURE_PANELS[5], shown(hq)))
    save_image(viz.comparison(panels, focus=focus), path, overwrite=True)


# -- summaries and reports ---------------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    finite = np.asarray([math.inf if v is None else v for v in values], dtype=np.float64)
    if finite.size == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = float(finite.mean())
    std = float(finite.std()) if np.isfinite(finite).all() else None
    return {"mean": _nonfinite_to_none(mean), "std": std, "n": int(finite.size)}


def summarise(rows: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None) -> dict[str, dict]:
    """Per method: mean, std (ddof 0) and n of ``psnr_y``, ``ssim_y`` and ``seconds`` over its rows."""
    order = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in rows))
    summary = {}
    for method in order:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {key: _stats([r[key] for r in mine]) for key in (*METRIC_KEYS, "seconds")}
        for key in EXTRA_METRIC_KEYS:  # absent where a method has no such score (bicubic writes no codes)
            summary[method][key] = _stats([r[key] for r in mine if r.get(key) is not None])
    return summary


def paired_differences(
    rows: Sequence[Mapping[str, Any]],
    method: str = "pure",
    baselines: Sequence[str] = PAIRED_BASELINES,
    z: float = PAIRED_Z,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``method`` minus each baseline, per metric, over the (crop, seed) pairs both scored.

    Returns ``{baseline: {metric: {"mean", "se", "n", "resolved"}}}``: ``resolved`` is +1 when the mean
    difference exceeds ``z`` standard errors, -1 below minus that, 0 within it (and when n < 2). Infinite
    PSNRs (identical images) are left out of the pairs they occur in.
    """
    mine = {(r["crop"], r["seed"]): r for r in rows if r["method"] == method}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for baseline in baselines:
        theirs = {(r["crop"], r["seed"]): r for r in rows if r["method"] == baseline}
        shared = [k for k in mine if k in theirs]
        if not shared:
            continue
        out[baseline] = {}
        for key in (*METRIC_KEYS, *EXTRA_METRIC_KEYS):
            diffs = np.asarray(
                [
                    mine[k][key] - theirs[k][key]
                    for k in shared
                    if mine[k].get(key) is not None and theirs[k].get(key) is not None
                ],
                dtype=np.float64,
            )
            if diffs.size == 0:
                continue
            mean = float(diffs.mean())
            se = float(diffs.std(ddof=1) / math.sqrt(diffs.size)) if diffs.size > 1 else None
            resolved = 0 if not se else (1 if mean > z * se else -1 if mean < -z * se else 0)
            if se == 0.0 and mean != 0.0:
                resolved = 1 if mean > 0 else -1
            out[baseline][key] = {"mean": mean, "se": se, "n": int(diffs.size), "resolved": resolved}
    return out


def degradation_levels(sentence: str | None) -> tuple[str, str] | None:
    """``"Medium blur, small noise."`` -> ``("medium", "small")``; None if it is not such a sentence."""
    if not sentence:
        return None
    words = sentence.lower().replace(",", " ").replace(".", " ").split()
    if len(words) != 4 or words[1] != "blur" or words[3] != "noise":
        return None
    if words[0] not in DEGRADATION_LEVELS or words[2] not in DEGRADATION_LEVELS:
        return None
    return words[0], words[2]


def perceive_summary(rows: Sequence[Mapping[str, Any]], method: str = "pure") -> dict[str, Any]:
    """Perceive: how often ``method``'s degradation sentence names the true blur / noise level (the
    ``label`` of the LQ's recorded degradation parameters), beside two rates a model without sight gets:
    chance (1/3 per level, 1/9 for both) and the majority class (always answering the commonest true
    level of this hold-out). A missing or malformed sentence counts as wrong."""
    mine = [r for r in rows if r["method"] == method and degradation_levels(r.get("label")) is not None]
    if not mine:
        return {"n": 0}
    truth = [degradation_levels(r["label"]) for r in mine]
    said = [degradation_levels(r.get("degradation")) for r in mine]
    n = len(mine)

    def rate(hits: Sequence[bool]) -> float:
        return float(np.mean(hits))

    def majority(values: Sequence[Any]) -> float:
        return max(values.count(v) for v in set(values)) / len(values)

    levels = len(DEGRADATION_LEVELS)
    return {
        "n": n,
        "blur": rate([s is not None and s[0] == t[0] for s, t in zip(said, truth, strict=True)]),
        "noise": rate([s is not None and s[1] == t[1] for s, t in zip(said, truth, strict=True)]),
        "both": rate([s == t for s, t in zip(said, truth, strict=True)]),
        "chance": {"blur": 1 / levels, "noise": 1 / levels, "both": 1 / levels**2},
        "majority": {
            "blur": majority([t[0] for t in truth]),
            "noise": majority([t[1] for t in truth]),
            "both": majority(truth),
        },
        "unreadable": sum(s is None for s in said),
    }


def understand_summary(
    rows: Sequence[Mapping[str, Any]], method: str = "pure", captions: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Understand: on images whose true caption is a generated one (`pure.data.synthetic_images`), the mean
    of `synthetic_images.attribute_scores` of ``method``'s caption against it (shape kinds and colours:
    Jaccard overlap; background kind, background colours and text present: right or wrong)."""
    scores: list[dict[str, float]] = []
    for row in rows:
        if row["method"] != method:
            continue
        true_caption = (captions or {}).get(row["image"])
        if not true_caption:
            continue
        truth = synthetic_images.caption_attributes(true_caption)
        if truth["background"] is None:  # a photo's fixed caption: no attributes to check
            continue
        said = synthetic_images.caption_attributes(row.get("caption") or "")
        scores.append(synthetic_images.attribute_scores(said, truth))
    if not scores:
        return {"n": 0}
    return {"n": len(scores), **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]}}


def per_image(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Crop name -> method -> mean ``psnr_y`` / ``ssim_y`` over the seeds: which images a method fails on."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for crop in dict.fromkeys(r["crop"] for r in rows):
        mine = [r for r in rows if r["crop"] == crop]
        table[crop] = {
            method: {
                key: _stats([r[key] for r in mine if r["method"] == method])["mean"] for key in METRIC_KEYS
            }
            for method in dict.fromkeys(r["method"] for r in mine)
        }
    return table


def verdict(summary: Mapping[str, Mapping[str, Any]], method: str = "pure", baseline: str = "bicubic") -> str:
    """One sentence, computed from the means: does ``method`` beat ``baseline`` on both PSNR-Y and SSIM-Y?

    "Beats" is a strictly higher mean; the sentence quotes both means so that a reader can judge the margin.
    """
    if method not in summary or baseline not in summary:
        missing = method if method not in summary else baseline
        return f"{method} vs {baseline}: not measured ({missing} was not run)."

    def mean(m: str, key: str) -> float:
        value = summary[m][key]["mean"]
        return math.inf if value is None else float(value)

    p, pb = mean(method, "psnr_y"), mean(baseline, "psnr_y")
    s, sb = mean(method, "ssim_y"), mean(baseline, "ssim_y")
    numbers = f"PSNR-Y {p:.2f} vs {pb:.2f} dB, SSIM-Y {s:.4f} vs {sb:.4f}"
    if p > pb and s > sb:
        return f"{method} beats {baseline} on both PSNR-Y and SSIM-Y ({numbers})."
    worse = [name for name, better in (("PSNR-Y", p > pb), ("SSIM-Y", s > sb)) if not better]
    return f"{method} does not beat {baseline} on both: not on {' nor '.join(worse)} ({numbers})."


def _cell(stats: Mapping[str, Any], decimals: int) -> str:
    if stats["n"] == 0:
        return "-"
    mean = "inf" if stats["mean"] is None else f"{stats['mean']:.{decimals}f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.{decimals}f}"


def render_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: what was measured, the table (method | PSNR-Y | SSIM-Y | GMS-Y | token acc | s/image),
    the verdict, PURE's paired differences from copy and bicubic, and the Perceive and Understand lines."""
    protocol = results["protocol"]
    crops = len({r["crop"] for r in results.get("rows", [])})
    total = f" ({crops} in all: an image of the crop's size gives one)" if crops else ""
    lines = [
        "# Held-out measurement",
        "",
        f"- checkpoint: `{results['checkpoint'].get('model', '?')}`",
        f"- images: {len(results['images'])} ({len(results['skipped'])} skipped), up to "
        f"{protocol['crops_per_image']} crop(s) each{total} of {protocol['crop']} px, "
        f"LQ {protocol['lq_size']} px (x{protocol['scale']}, `{protocol['degradation_preset']}` "
        "degradations), "
        f"seeds {', '.join(map(str, protocol['seeds']))}",
        f"- PSNR/SSIM on the BT.601 Y channel, {BORDER} px border cut; mean ± std over crops x seeds",
        f"- colour fix: {protocol['color_fix']} on the PURE, copy and {CEILING} rows; bicubic and vq are "
        "shown as they are",
        "- s/image: wall time per crop and seed (PURE: one `restore` call, text + image; vq: once per crop)",
        *_subject_lines(results),
        "",
        "| method | PSNR-Y (dB) | SSIM-Y | GMS-Y | token acc | s/image |",
        "|---|---|---|---|---|---|",
    ]
    empty = {"mean": None, "std": None, "n": 0}
    for method, stats in results["methods"].items():
        seconds = stats["seconds"]["mean"]
        lines.append(
            f"| {method} | {_cell(stats['psnr_y'], 2)} | {_cell(stats['ssim_y'], 4)} | "
            f"{_cell(stats.get('gms_y', empty), 4)} | {_cell(stats.get('token_acc', empty), 3)} | "
            f"{'-' if seconds is None else f'{seconds:.3g}'} |"
        )
    lines += ["", results["verdict"], ""]
    lines += _paired_lines(results.get("paired") or {}, results.get("subject", "pure"))
    lines += _headroom_lines(results.get("headroom") or {})
    lines += _text_lines(results.get("perceive") or {}, results.get("understand") or {})
    return "\n".join(lines)


_METRIC_NAMES = {"psnr_y": "PSNR-Y", "ssim_y": "SSIM-Y", "gms_y": "GMS-Y", "token_acc": "token acc"}


def _subject_lines(results: Mapping[str, Any]) -> list[str]:
    """Which row is the checkpoint's default decoding, where that is not PURE's (``pure``)."""
    subject = results.get("subject", "pure")
    if subject == "pure" or subject not in results.get("settings", {}):
        return []
    fields = results["settings"][subject].get("sampling", {})
    differ = {k: v for k, v in fields.items() if getattr(_DEFAULT, k, v) != v}
    what = ", ".join(f"{k} {v}" for k, v in differ.items()) or "PURE's"
    return [
        f"- the checkpoint's default decoding (its sampling.json: {what}) is `{subject}`: the verdict, the "
        "paired differences and the pictures are of it; `pure` is PURE's defaults"
    ]


def _paired_lines(paired: Mapping[str, Mapping[str, Mapping[str, Any]]], subject: str = "pure") -> list[str]:
    if not paired:
        return []
    lines = [
        f"{subject} minus each baseline, paired by crop and seed (mean ± standard error; resolved beyond "
        f"{PAIRED_Z:g} SE):",
        "",
        "| vs | " + " | ".join(_METRIC_NAMES.values()) + " |",
        "|---" * (len(_METRIC_NAMES) + 1) + "|",
    ]
    for baseline, metrics in paired.items():
        cells = []
        for key in _METRIC_NAMES:
            entry = metrics.get(key)
            if entry is None:
                cells.append("-")
                continue
            mark = {1: "better", -1: "worse", 0: "within noise"}[entry["resolved"]]
            se = "-" if entry["se"] is None else f"{entry['se']:.3g}"
            cells.append(f"{entry['mean']:+.3g} ± {se} ({mark})")
        lines.append(f"| {baseline} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _headroom_lines(headroom: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence: what a model that writes every code right gains over copying, paired, per metric."""
    parts = []
    for key in METRIC_KEYS:
        entry = headroom.get(key)
        if entry is not None and entry["se"] is not None:
            mark = {1: "resolved", -1: "resolved, below", 0: "within noise"}[entry["resolved"]]
            parts.append(f"{_METRIC_NAMES[key]} {entry['mean']:+.3g} ± {entry['se']:.2g} ({mark})")
    if not parts:
        return []
    return [
        f"Headroom: {CEILING} minus copy, paired (what a model that writes every code right would gain over "
        f"copying its input): {', '.join(parts)}.",
        "",
    ]


def _text_lines(perceive: Mapping[str, Any], understand: Mapping[str, Any]) -> list[str]:
    lines = []
    for method, p in perceive.items():
        if not p.get("n"):
            continue
        lines.append(
            f"Perceive ({method}, {p['n']} LQs): blur level right {p['blur']:.0%}, "
            f"noise level {p['noise']:.0%}, both {p['both']:.0%}; "
            f"chance {p['chance']['blur']:.0%} / {p['chance']['noise']:.0%} / "
            f"{p['chance']['both']:.0%}, majority class {p['majority']['blur']:.0%} / "
            f"{p['majority']['noise']:.0%} / {p['majority']['both']:.0%}; {p['unreadable']} unreadable."
        )
    for method, u in understand.items():
        if not u.get("n"):
            continue
        lines.append(
            f"Understand ({method}, {u['n']} generated images): caption attributes right {u['mean']:.0%} "
            f"(shape kinds {u['kinds']:.0%}, shape colours {u['colours']:.0%}, "
            f"background {u['background']:.0%}, background colours {u['background_colours']:.0%}, "
            f"text present {u['text']:.0%})."
        )
    return [*lines, ""] if lines else []


def write_report(results: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``OUT/results.json`` and ``OUT/results.md`` atomically (replacing older ones)."""
    out = Path(out)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    save_json(results, json_path, overwrite=True)
    text = render_markdown(results).encode("utf-8")
    atomic_write(md_path, lambda f: f.write(text), overwrite=True)
    return json_path, md_path


def checkpoint_identity(folder: str | Path, identity: Mapping[str, Any] | None = None) -> dict:
    """What identifies a checkpoint folder: the restorer's identity plus the sha256 (or, above
    `HASH_LIMIT_BYTES`, the size) of its top-level and ``vq/`` files, so a result names its weights."""
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    if folder.is_dir():
        for path in sorted([*folder.glob("*"), *folder.glob("vq/*")]):
            if not path.is_file() or path.name.startswith("."):
                continue
            entry: dict[str, Any] = {"bytes": path.stat().st_size}
            if entry["bytes"] <= HASH_LIMIT_BYTES:
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            files[path.relative_to(folder).as_posix()] = entry
    return {**(identity or {}), "files": files}


# -- CLI ---------------------------------------------------------------------------------------------------


def read_captions(path: str | Path, paths: Sequence[str | Path]) -> dict[str, str]:
    """``{image key: caption}`` for the hold-out ``paths`` from a captions.jsonl (``{"file", "caption"}``
    lines, files matched by name, as `pure.data.records` does)."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        by_file = {json.loads(line)["file"]: json.loads(line)["caption"] for line in lines if line.strip()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HoldoutError(f"--captions {path}: {err}") from None
    names = pair_names([Path(p) for p in paths])
    return {names[Path(p)][0]: by_file[Path(p).name] for p in paths if Path(p).name in by_file}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.eval.holdout",
        description="Measure a trained PURE model on held-out HQ images: deterministic crops, Real-ESRGAN "
        "x4 degradations under several seeds, PSNR/SSIM on Y for bicubic, the VQ ceiling and PURE's "
        "sampling settings. Writes OUT/results.json, OUT/results.md and OUT/pictures/.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint folder (with vq/) or Hub id; without it, --vq alone measures the baselines "
        "(bicubic, vq, copy) of a tokenizer",
    )
    parser.add_argument("--vq", default=None, help="VQ tokenizer (default: the checkpoint's vq/ folder)")
    parser.add_argument("--holdout", required=True, help="folder (or glob) of held-out HQ images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="HQ crop side, a multiple of 32 (default: the checkpoint's size)",
    )
    parser.add_argument(
        "--crops-per-image", type=int, default=DEFAULT_CROPS_PER_IMAGE, help="crops per image (fixed grid)"
    )
    parser.add_argument(
        "--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="degradation seeds (default 0,1,2)"
    )
    parser.add_argument(
        "--methods",
        help=f"comma-separated subset of {', '.join([*BASELINES, *SETTINGS, CHECKPOINT_METHOD])} (default "
        f"all; {CHECKPOINT_METHOD}, the checkpoint's sampling.json, where it is none of the others; "
        f"{CEILING} only with the colour fix; with --vq alone: {', '.join(TOKENIZER_BASELINES)})",
    )
    parser.add_argument(
        "--captions",
        default=None,
        help="captions.jsonl of the hold-out images ({file, caption} per line): generated captions are "
        "scored for Understand",
    )
    parser.add_argument(
        "--whole-pictures",
        action="store_true",
        help="also restore each image larger than the crop whole (by tiles) for a comparison picture",
    )
    parser.add_argument(
        "--no-color-fix",
        dest="color_fix",
        action="store_false",
        default=None,
        help="score the PURE and copy rows without the wavelet colour fix (default: the restorer's, on): "
        "the model's own images, their low frequencies not taken from the LQ",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="weight-only quantisation of the decoder's linear layers, as pure.infer --quantize (torchao): "
        "measures what int8 or int4 costs in quality; recorded in results.json's checkpoint",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run(args: argparse.Namespace) -> int:
    from pure.restorer import PureRestorer

    if args.crop is not None:
        _check_crop(args.crop)
    if args.crops_per_image < 1:
        raise HoldoutError(f"--crops-per-image must be at least 1; got {args.crops_per_image}")
    if args.limit is not None and args.limit < 1:
        raise HoldoutError(f"--limit must be at least 1; got {args.limit}")
    seeds = parse_seeds(args.seeds)
    if args.model is None and args.vq is None:
        raise HoldoutError("give --model (a checkpoint), or --vq alone to measure a tokenizer's baselines")
    if args.quantize is not None:
        if args.model is None:
            raise HoldoutError("--quantize needs --model: it quantises the model, not the tokenizer")
        check_quantize(args.quantize)  # torchao there, before any weight loads
    known = [*BASELINES, *SETTINGS, CHECKPOINT_METHOD] if args.model is not None else [*TOKENIZER_BASELINES]
    methods = None  # all: the baselines and default_settings(restorer), or the baselines of --vq alone
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods or any(m not in known for m in methods):
            raise HoldoutError(f"--methods must name some of {', '.join(known)}; got {args.methods!r}")
    elif args.model is None:
        methods = list(TOKENIZER_BASELINES)
    out = Path(args.out)
    if (out / RESULTS_JSON).exists() and not args.overwrite:
        raise HoldoutError(f"{out / RESULTS_JSON} exists; pass --overwrite to replace it")
    try:
        paths = list_images(args.holdout)
    except ImageLoadError as err:
        raise HoldoutError(str(err)) from None
    paths = paths[: args.limit] if args.limit else paths

    captions = read_captions(args.captions, paths) if args.captions else None
    if args.model is None:
        from pure.vq import VQModel

        restorer = VQOnly(VQModel.from_pretrained(args.vq, device=args.device or "cpu"), args.crop or 128)
        identity = checkpoint_identity(args.vq, {"model": f"none (tokenizer {args.vq} only)"})
    else:
        restorer = PureRestorer.from_pretrained(
            args.model, vq=args.vq, device=args.device, quantize=args.quantize
        )
        identity = checkpoint_identity(args.model, restorer.identity)
    settings = default_settings(restorer)
    if CHECKPOINT_METHOD in (methods or ()):  # asked for by name: its row, even where it repeats another
        settings[CHECKPOINT_METHOD] = restorer.sampling
    results = measure_holdout(
        restorer,
        paths,
        crop=args.crop,
        crops_per_image=args.crops_per_image,
        seeds=seeds,
        methods=methods,
        settings=settings,
        pictures_dir=out / PICTURES_DIR,
        checkpoint=identity,
        progress=not args.quiet,
        captions=captions,
        whole_pictures=args.whole_pictures,
        color_fix=args.color_fix,
    )
    for entry in results["skipped"]:
        print(f"note: skipped {entry['image']}: {entry['reason']}", file=sys.stderr)
    json_path, md_path = write_report(results, out)
    if not args.quiet:
        print(render_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted: nothing written (the measurement is not resumable)", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line, never a traceback
        from pure.model import ModelLoadError

        if not isinstance(err, (HoldoutError, ModelLoadError, ImageLoadError, ValueError, OSError)):
            raise
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

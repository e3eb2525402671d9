"""``python -m pure.eval.holdout``: the honest held-out measurement of a trained PURE model.

Training scores say how well a model fits its own crops; this measures it on whole images it never saw,
with the degradations it was trained on, against the two numbers that bound what it can do:

- ``bicubic``: the LQ upsampled bicubically, the floor a restoration must beat to be worth anything;
- ``vq``: the VQ tokenizer's own encode -> decode of the HQ crop, the ceiling (PURE writes VQ codes, so it
  cannot be more faithful to the HQ than its tokenizer);
- ``pure`` and its ablations (`SETTINGS`): the restorations under several sampling settings, so that the
  effect of the entropy-based top-k and of classifier-free guidance is measured, not assumed.

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
``OUT/pictures/NAME_seedS.png`` for the first seed (LQ nearest | bicubic | VQ ceiling | PURE | HQ). The Python
entry point is `measure_holdout`; `write_report` writes the two result files.
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

from pure.data.degradations import DegradationConfig
from pure.data.pairs import PairSettings, crop_name, make_pair, pair_names
from pure.engine import SamplingConfig
from pure.imageio import ImageLoadError, atomic_write, list_images, load_image, save_image, save_json
from pure.vq import pil_to_pixels, pixels_to_pil, to_rgb

__all__ = [
    "BASELINES",
    "SETTINGS",
    "HoldoutError",
    "crop_boxes",
    "measure_holdout",
    "native_size",
    "per_image",
    "psnr_y",
    "render_markdown",
    "rgb_to_y",
    "ssim_y",
    "summarise",
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
# top-k sampling; "no-cfg" uses the conditional logits alone (guidance scale 1); "greedy" is temperature 0.
_DEFAULT = SamplingConfig()
NO_ENTROPY_TOP_K = _DEFAULT.max_k
NO_GUIDANCE = 1.0
GREEDY_TEMPERATURE = 0.0
SETTINGS: dict[str, SamplingConfig] = {
    "pure": SamplingConfig(),
    "pure-no-entropy": SamplingConfig(min_k=NO_ENTROPY_TOP_K, max_k=NO_ENTROPY_TOP_K),
    "pure-no-cfg": SamplingConfig(cfg_scale=NO_GUIDANCE),
    "pure-greedy": SamplingConfig(temperature=GREEDY_TEMPERATURE),
}
SETTING_NOTES: dict[str, str] = {
    "pure": "SamplingConfig defaults: entropy top-k (k from min_k to max_k), guidance cfg_scale",
    "pure-no-entropy": f"fixed top-k = {NO_ENTROPY_TOP_K} (min_k = max_k: no entropy-based k)",
    "pure-no-cfg": "cfg_scale = 1: the conditional logits alone, no guidance",
    "pure-greedy": "temperature 0: the most likely code at every step",
}
BASELINES: dict[str, str] = {
    "bicubic": "the LQ upsampled bicubically to the crop size (PIL), what the model sees",
    "vq": "the VQ tokenizer's encode -> decode of the HQ crop: the ceiling of any PURE output",
}
PICTURE_PANELS = ("LQ (nearest)", "bicubic", "VQ ceiling", "PURE", "HQ")
PICTURE_MIN_SIDE = 256  # small crops are shown magnified (nearest, whole factor) so that labels fit

METRIC_KEYS = ("psnr_y", "ssim_y")
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
    return [(top, left) for top in tops for left in lefts][:count]


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


def _describe_color_fix(value: Any) -> str:
    if value is True:
        return "wavelet (restorer default)"
    if value is False or value is None:
        return "none (restorer default)"
    return f"{value} (restorer default)"


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
) -> dict:
    """Score bicubic, the VQ ceiling and PURE's sampling settings on held-out images; returns the results.

    Args:
        restorer: a `pure.restorer.PureRestorer` (anything with ``restore``, ``vq``, ``identity``).
        images: file paths (keys and names as `pure.data.pairs.pair_names`) or ``{name: PIL image}``.
        crop: HQ crop side (a multiple of 32); default the checkpoint's `native_size`.
        crops_per_image: crops per image, on the fixed grid of `crop_boxes`.
        seeds: degradation seeds; each gives another LQ of every crop and is the restoration seed.
        methods: which of ``bicubic``, ``vq`` and the ``settings`` names to run (default all).
        settings: name -> `SamplingConfig` of the PURE methods (default `SETTINGS`).
        pictures_dir: where to write ``NAME_seedS.png`` comparisons for the first seed (None: none).
        checkpoint: identity of the checkpoint to record (default ``restorer.identity``).

    Returns:
        A JSON-ready dict: ``methods`` (per method: mean, std and n of ``psnr_y``, ``ssim_y`` and
        ``seconds``, over all crops x seeds), ``rows`` (one per crop, seed and method), ``settings``,
        ``protocol`` (crop, scale, border, preset, seeds, colour fix), ``checkpoint``, ``skipped`` images,
        ``timing`` and ``verdict`` (the sentence of `verdict`).

    Raises:
        HoldoutError: no usable image, bad crop, seeds or method names.
    """
    from tqdm import tqdm

    settings = dict(SETTINGS if settings is None else settings)
    known = [*BASELINES, *settings]
    methods = list(known if methods is None else methods)
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise HoldoutError(
            f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
        )
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
    color_fix = _default_color_fix(restorer)
    pictures = Path(pictures_dir) if pictures_dir is not None else None
    picture_method = next((m for m in methods if m in settings), None)

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
                    base_row = {
                        "image": source.key,
                        "crop": name,
                        "crop_index": k,
                        "box": {"top": top, "left": left, "size": crop},
                        "seed": seed,
                        "label": record["label"],
                        "degrade_s": degrade_s,
                    }
                    outputs: dict[str, Image.Image] = {}
                    for method in methods:
                        extra: dict[str, Any] = {}
                        tick = time.perf_counter()
                        if method == "bicubic":
                            output = lq.resize((crop, crop), Image.BICUBIC)
                            seconds = time.perf_counter() - tick
                        elif method == "vq":
                            if vq_image is None:  # the ceiling does not depend on the seed: once per crop
                                vq_image = _vq_roundtrip(restorer, hq)
                                vq_seconds = time.perf_counter() - tick
                            output, seconds = vq_image, vq_seconds
                        else:
                            result = restorer.restore(lq, seed=seed, sampling=settings[method], size=crop)
                            seconds = time.perf_counter() - tick
                            output = result.image
                            extra = {
                                "degradation": result.degradation,
                                "caption": result.caption,
                                "entropy_mean": float(result.entropy.float().mean()),
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
    elapsed = time.perf_counter() - start

    summary = summarise(rows, methods)
    results = {
        "methods": summary,
        "per_image": per_image(rows),
        "verdict": verdict(summary),
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
            "color_fix": _describe_color_fix(color_fix),
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
        "timing": {
            "total_s": elapsed,
            "pairs": total,
            "device": str(getattr(restorer, "device", "cpu")),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    return results


def _save_picture(
    path: Path,
    lq: Image.Image,
    hq: Image.Image,
    outputs: Mapping[str, Image.Image],
    pure_method: str | None,
    focus: Any,
) -> None:
    """LQ (nearest) | bicubic | VQ ceiling | PURE | HQ, each labelled with its PSNR-Y where it has one."""
    from pure import viz

    factor = -(-PICTURE_MIN_SIDE // max(hq.size))  # ceil
    size = (hq.width * factor, hq.height * factor)

    def shown(image: Image.Image) -> Image.Image:
        return image.resize(size, Image.NEAREST)  # nearest: every pixel as it is, only bigger

    panels: list[tuple[str, Image.Image]] = [(PICTURE_PANELS[0], shown(lq))]
    for label, method in zip(PICTURE_PANELS[1:4], ("bicubic", "vq", pure_method), strict=True):
        if method in outputs:
            name = label if method in ("bicubic", "vq", "pure") else f"{label} ({method})"
            panels.append((f"{name} {psnr_y(outputs[method], hq):.2f} dB", shown(outputs[method])))
    panels.append((PICTURE_PANELS[4], shown(hq)))
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
    return summary


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
    """``results.md``: what was measured, the table (method | PSNR-Y | SSIM-Y | s/image) and the verdict."""
    protocol = results["protocol"]
    lines = [
        "# Held-out measurement",
        "",
        f"- checkpoint: `{results['checkpoint'].get('model', '?')}`",
        f"- images: {len(results['images'])} ({len(results['skipped'])} skipped), "
        f"{protocol['crops_per_image']} crop(s) each of {protocol['crop']} px, LQ {protocol['lq_size']} px "
        f"(x{protocol['scale']}, `{protocol['degradation_preset']}` degradations), "
        f"seeds {', '.join(map(str, protocol['seeds']))}",
        f"- PSNR/SSIM on the BT.601 Y channel, {BORDER} px border cut; mean ± std over crops x seeds",
        f"- colour fix: {protocol['color_fix']} on the PURE rows; bicubic and vq are shown as they are",
        "- s/image: wall time per crop and seed (PURE: one `restore` call, text + image; vq: once per crop)",
        "",
        "| method | PSNR-Y (dB) | SSIM-Y | s/image |",
        "|---|---|---|---|",
    ]
    for method, stats in results["methods"].items():
        seconds = stats["seconds"]["mean"]
        lines.append(
            f"| {method} | {_cell(stats['psnr_y'], 2)} | {_cell(stats['ssim_y'], 4)} | "
            f"{'-' if seconds is None else f'{seconds:.3g}'} |"
        )
    lines += ["", results["verdict"], ""]
    return "\n".join(lines)


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.eval.holdout",
        description="Measure a trained PURE model on held-out HQ images: deterministic crops, Real-ESRGAN "
        "x4 degradations under several seeds, PSNR/SSIM on Y for bicubic, the VQ ceiling and PURE's "
        "sampling settings. Writes OUT/results.json, OUT/results.md and OUT/pictures/.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (with vq/) or Hub id")
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
        default=",".join([*BASELINES, *SETTINGS]),
        help=f"comma-separated subset of {', '.join([*BASELINES, *SETTINGS])} (default all)",
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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = [*BASELINES, *SETTINGS]
    if not methods or any(m not in known for m in methods):
        raise HoldoutError(f"--methods must name some of {', '.join(known)}; got {args.methods!r}")
    out = Path(args.out)
    if (out / RESULTS_JSON).exists() and not args.overwrite:
        raise HoldoutError(f"{out / RESULTS_JSON} exists; pass --overwrite to replace it")
    try:
        paths = list_images(args.holdout)
    except ImageLoadError as err:
        raise HoldoutError(str(err)) from None
    paths = paths[: args.limit] if args.limit else paths

    restorer = PureRestorer.from_pretrained(args.model, vq=args.vq, device=args.device)
    identity = checkpoint_identity(args.model, restorer.identity)
    results = measure_holdout(
        restorer,
        paths,
        crop=args.crop,
        crops_per_image=args.crops_per_image,
        seeds=seeds,
        methods=methods,
        pictures_dir=out / PICTURES_DIR,
        checkpoint=identity,
        progress=not args.quiet,
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

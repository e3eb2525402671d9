"""``python -m pure.bench --model DIR``: forward passes per image on a trained checkpoint, and what the lossy
way of saving them costs in fidelity.

Each decoding of the image block restores the same held-out LQ images (Real-ESRGAN x4 of HQ crops at the
checkpoint's size, :func:`pure.eval.holdout.measure_holdout`'s protocol) at one sampling (``--cfg``,
``--temperature``; PURE's by default, whatever the checkpoint's sampling.json says: sampled drafts are the
hard case for acceptance):

* one token per forward (the reference);
* speculative Jacobi decoding, window ``W``: independent drafts, coupled drafts (MC-SJD, the default), coupled
  drafts initialised from the LQ image's codes; all three lossless (the one-token loop's distribution);
* row-parallel decoding at several lags ``L`` (:mod:`pure.decoding.rows`): lossy; and each lag with
  speculative fronts of window ``W`` (:mod:`pure.decoding.fronts`): lossless with respect to row-parallel
  decoding at that lag (the same distribution), so as lossy as it against one token per forward.

Per decoding: image tokens per image forward (the ``<boi> <grid h> <grid w>`` forward included), image
forwards per image, tokens fed per forward (what a forward computes, per image: a window, a token per active
row, the fronts' tokens; a guidance twin's not counted; on a GPU a 7B forward costs about the same up to
several tens), seconds per image on this machine, and the hold-out PSNR-Y / SSIM-Y / token-accuracy
differences from one-token decoding, paired by crop and seed (mean and standard error; a difference beyond
2 SE is marked ``*``). The lossless rows' differences are those of two samples of one distribution: they
show the noise the lossy rows are judged against.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from pure.decoding.config import SamplingConfig

REFERENCE = "one-token"
DEFAULT_LAGS = (1, 2, 4, 8)
DEFAULT_SEEDS = (0, 1)
PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # scikit-image's, offline
SCENE_SEEDS = range(4)  # generated hold-out scenes (recipes/pure_tiny/data_v2.sh's hold-out seeds 0-15)


def decodings(
    window: int, lags: Sequence[int], base: SamplingConfig | None = None
) -> dict[str, SamplingConfig]:
    """Name -> sampling of every decoding the table compares, the reference first."""
    base = base or SamplingConfig()
    jacobi = replace(base, jacobi_window=window)
    out = {
        REFERENCE: base,
        f"Jacobi {window}": replace(jacobi, jacobi_coupled=False),
        f"Jacobi {window}, coupled": jacobi,
        f"Jacobi {window}, coupled, LQ drafts": replace(jacobi, jacobi_drafts="input"),
    }
    for lag in lags:
        out[f"rows, lag {lag}"] = replace(base, row_lag=lag)
        out[f"rows, lag {lag}, Jacobi {window}"] = replace(jacobi, row_lag=lag)
    return out


def lossless(sampling: SamplingConfig) -> bool:
    return sampling.row_lag == 0


def sampling_words(sampling: SamplingConfig) -> str:
    """The sampling every decoding of the table shares, e.g. ``guidance 0.8, temperature 0.9 (PURE's)``."""
    guidance = "no guidance" if sampling.cfg_scale == 1 else f"guidance {sampling.cfg_scale:g}"
    temperature = "greedy" if sampling.temperature == 0 else f"temperature {sampling.temperature:g}"
    pure = SamplingConfig()
    same = (sampling.cfg_scale, sampling.temperature) == (pure.cfg_scale, pure.temperature)
    return f"{guidance}, {temperature}" + (" (PURE's)" if same else "")


def builtin_images() -> dict[str, Image.Image]:
    """Four scikit-image photos and four generated scenes (offline, no files needed)."""
    from skimage import data

    from pure.data.synthetic_images import render_scene, sample_scene, scene_name

    images = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}
    images.update({scene_name(seed): render_scene(sample_scene(seed, 128)) for seed in SCENE_SEEDS})
    return images


def pass_table(
    restorer,
    images: Mapping[str, Image.Image] | Sequence[str | Path],
    settings: Mapping[str, SamplingConfig],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    crops_per_image: int = 1,
    crop: int | None = None,
    progress: bool = False,
) -> tuple[list[str], dict]:
    """Restore ``images`` with every decoding in ``settings`` (the first is the reference), ``crop`` px
    crops (default the checkpoint's size); returns the table's lines and the hold-out results
    (:func:`pure.eval.holdout.measure_holdout`'s, rows included)."""
    from pure.eval.holdout import measure_holdout, paired_differences

    start = time.perf_counter()
    results = measure_holdout(
        restorer,
        images,
        crop=crop,
        crops_per_image=crops_per_image,
        seeds=seeds,
        methods=list(settings),
        settings=settings,
        progress=progress,
    )
    reference = next(iter(settings))
    rows = results["rows"]
    crop = results["protocol"]["crop"]
    grid = crop // restorer.vq.config.downsample
    tokens = grid * (grid + 1) + 1  # the image block's body and <eoi>
    pairs = len({(r["crop"], r["seed"]) for r in rows})
    lines = [
        f"forward passes per image: {restorer.identity.get('model', 'checkpoint')}, {crop} px output "
        f"({grid}x{grid} codes, {tokens} image tokens), {pairs} hold-out pairs (crop x seed), "
        f"{sampling_words(settings[reference])}; differences: minus {reference}, paired by crop and seed, "
        "mean ± SE (* beyond 2 SE)",
        f"{'decoding':<34} {'lossless':>8} {'tokens/fwd':>10} {'fwd/image':>9} {'fed/fwd':>7} {'s/image':>8} "
        f"{'d PSNR-Y (dB)':>15} {'d SSIM-Y':>17} {'d token acc':>17}",
    ]
    for name, sampling in settings.items():
        mine = [r for r in rows if r["method"] == name]
        passes = float(np.mean([r["image_passes"] for r in mine]))
        fed = float(np.mean([r["image_fed"] for r in mine]))
        seconds = float(np.mean([r["seconds"] for r in mine]))
        cells = []
        if name == reference:
            cells = ["-"] * 3
        else:
            diff = paired_differences(rows, name, (reference,))[reference]
            for key, fmt in (("psnr_y", "+.2f"), ("ssim_y", "+.4f"), ("token_acc", "+.4f")):
                d = diff.get(key)
                if d is None or d["se"] is None:
                    cells.append("n/a")
                    continue
                mark = "*" if d["resolved"] else " "
                cells.append(f"{d['mean']:{fmt}} ± {d['se']:.{fmt[-2]}f}{mark}")
        lines.append(
            f"{name:<34} {'yes' if lossless(sampling) else 'no':>8} {tokens / passes:>10.2f} {passes:>9.0f} "
            f"{fed / passes:>7.1f} {seconds:>8.2f} {cells[0]:>15} {cells[1]:>17} {cells[2]:>17}"
        )
    lines.append(f"({time.perf_counter() - start:.0f} s in all)")
    return lines, results

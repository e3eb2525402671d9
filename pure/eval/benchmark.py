"""Benchmark mode: restore a test set's LQ folder with a model, resumably, with pictures; then score it.

Folder layout of a paired test set (RealSR / DRealSR after the StableSR protocol, synthetic DIV2K-Val):

    SET/lq/0001.png   128 px LQ centre crop       SET/gt/0001.png   512 px GT crop (same stem)

RealLQ250 has ``lq/`` only (no reference). Restorations go to ``--pred`` as ``<stem>.png``; an image
whose restoration exists is skipped, so an interrupted run continues where it stopped. Pictures go to
``RESULTS/pictures/`` (never into ``--pred``, whose every image is scored): ``<stem>_compare.png``
(LQ bicubic | restored | GT, with a zoomed crop where the token entropy is highest) and
``<stem>_entropy.png`` (the entropy of every image token, the quantity the sampler's top-k follows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pure.eval.score import EvalError, pair_images
from pure.imageio import ImageLoadError, load_image, save_image


def plan_restorations(
    lq_dir: str | Path, pred_dir: str | Path, overwrite: bool = False
) -> list[tuple[Path, Path]]:
    """``(lq, pred)`` paths still to restore: every LQ image whose ``pred_dir/<stem>.png`` is missing."""
    pairs = pair_images(lq_dir, None)
    pred_dir = Path(pred_dir)
    jobs = [(pair.pred, pred_dir / f"{pair.stem}.png") for pair in pairs]
    return [(lq, pred) for lq, pred in jobs if overwrite or not pred.exists()]


# StableSR's RealSR / DRealSR test protocol: 128 px LQ centre crops restored to 512 px.
PROTOCOL_LQ_SIDE = {"realsr": 128, "drealsr": 128}


def protocol_warnings(test_set: str | None, lq_paths: Sequence[Path]) -> list[str]:
    """One line per LQ image that breaks the test set's protocol (e.g. not 128 px for RealSR)."""
    from pure.eval.reported import canonical_set

    side = PROTOCOL_LQ_SIDE.get(canonical_set(test_set)) if test_set else None
    if side is None:
        return []
    warnings = []
    for path in lq_paths:
        size = load_image(path).size
        if size != (side, side):
            warnings.append(
                f"warning: {path.name} is {size[0]}x{size[1]}; the {test_set} protocol (StableSR) uses "
                f"{side} px LQ centre crops, so its scores are not comparable to the reported ones"
            )
    return warnings


def save_pictures(result: Any, stem: str, pictures_dir: Path, gt: Path | None) -> None:
    """Comparison grid and entropy map of one `RestoreResult` (replacing older pictures of `stem`)."""
    from pure import viz

    panels = [("LQ (bicubic)", result.lq_upsampled), ("restored", result.image)]
    if gt is not None:
        panels.append(("GT", load_image(gt).convert("RGB")))
    grid = viz.comparison(panels, focus=result.entropy)
    save_image(grid, pictures_dir / f"{stem}_compare.png", overwrite=True)
    heat = viz.entropy_map(result.entropy, size=result.image.size)
    save_image(heat, pictures_dir / f"{stem}_entropy.png", overwrite=True)


def restore_set(
    restorer: Any,
    jobs: Sequence[tuple[Path, Path]],
    seed: int = 0,
    size: int = 512,
    batch_size: int = 1,
    pictures_dir: Path | None = None,
    gt_dir: Path | None = None,
    log: Callable[[str], None] = print,
    **restore_kwargs: Any,
) -> int:
    """Restore `jobs` in batches with `restorer.restore_batch` (every image with `seed`); returns the count.

    Each restoration is written atomically as soon as its batch finishes, so an interrupted run loses at
    most one batch. An unreadable LQ file stops the run with its one-line reason.
    """
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1; got {batch_size}")
    gts = {pair.stem: pair.pred for pair in pair_images(gt_dir, None)} if gt_dir is not None else {}
    done = 0
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        try:
            images = [load_image(lq) for lq, _ in batch]
        except ImageLoadError as err:
            raise EvalError(str(err)) from err
        results = restorer.restore_batch(images, seeds=[seed] * len(images), size=size, **restore_kwargs)
        for (_, pred), result in zip(batch, results, strict=True):
            save_image(result.image, pred, overwrite=True)
            if pictures_dir is not None:
                save_pictures(result, pred.stem, pictures_dir, gts.get(pred.stem))
        done += len(batch)
        log(f"restored {done}/{len(jobs)}")
    return done

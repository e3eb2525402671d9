"""Benchmark mode: restore a test set's LQ folder with a model, resumably, with pictures; then score it.

Folder layout of a paired test set (RealSR / DRealSR after the StableSR protocol, synthetic DIV2K-Val):

    SET/lq/0001.png   128 px LQ centre crop       SET/gt/0001.png   512 px GT crop (same stem)

RealLQ250 has ``lq/`` only (no reference). Restorations go to ``--pred`` as ``<stem>.png``; an image
whose restoration exists is skipped, so an interrupted run continues where it stopped. Pictures go to
``RESULTS/pictures/`` (never into ``--pred``, whose every image is scored): ``<stem>_compare.png``
(LQ bicubic | restored | GT, with a zoomed crop where the token entropy is highest) and
``<stem>_entropy.png`` (the entropy of every image token, the quantity the sampler's top-k follows).

``--pred/restoration.json`` (`RECORD_FILE`, not an image, so never scored) records the settings the
restorations in that folder were made with and which images they are. A restoration counts as done only
when the record lists it under the same settings: a resumed run never mixes images made with different
models or sampling settings into one score, and the summary reports the settings the images really had.

Under ``torchrun --nproc-per-node N -m pure.eval ...`` (:mod:`pure.distributed`) every rank plans the same
jobs and restores every N-th one on its own device; rank 0 writes the record (the others their
`RANK_RECORD_FILE`, folded in at the end) and alone scores and writes the summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pure.eval.score import EvalError, pair_images
from pure.imageio import ImageLoadError, load_image, save_image, save_json

RECORD_FILE = "restoration.json"  # in --pred: the settings its restorations were made with, and which
RECORD_FORMAT = "pure.eval.restoration/1"
# Under torchrun, rank r > 0 records the images it restored in its own file beside RECORD_FILE (only rank 0
# writes that one); rank 0 folds them in at the end of the run, and read_record at the start of the next one
# (what an interrupted run left), so a resume counts every rank's finished images.
RANK_RECORD_FILE = "restoration.rank{rank}.json"


def _json_form(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists ...), so that records compare equal."""
    return json.loads(json.dumps(value))


def _read_record_file(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = isinstance(record, dict) and record.get("format") == RECORD_FORMAT
    return record if valid and isinstance(record.get("restored"), list) else None


def rank_records(pred_dir: str | Path) -> list[Path]:
    """The per-rank record files of `pred_dir` (see `RANK_RECORD_FILE`)."""
    return sorted(Path(pred_dir).glob(RANK_RECORD_FILE.format(rank="*")))


def read_record(pred_dir: str | Path) -> dict[str, Any] | None:
    """The restoration record of `pred_dir`, or None when it has none (or none that can be read). The
    images of its per-rank records made with the same settings count as restored too."""
    record = _read_record_file(Path(pred_dir) / RECORD_FILE)
    if record is None:
        return None
    for path in rank_records(pred_dir):
        part = _read_record_file(path)
        if part is not None and part.get("settings") == record.get("settings"):
            record["restored"] = sorted({*record["restored"], *part["restored"]})
    return record


def write_record(pred_dir: str | Path, record: dict[str, Any], rank: int = 0) -> None:
    """Replace the restoration record of `pred_dir` atomically (a reader sees the old or the new one);
    rank ``r > 0`` of a torchrun command writes its own (`RANK_RECORD_FILE`)."""
    name = RECORD_FILE if rank == 0 else RANK_RECORD_FILE.format(rank=rank)
    save_json(record, Path(pred_dir) / name, overwrite=True)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"name: OLD then, NEW now"`` for every setting that differs between two settings dicts."""
    return [
        f"{name}: {json.dumps(old.get(name))} then, {json.dumps(new.get(name))} now"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


def _how_to_proceed(pred_dir: Path) -> str:
    return (
        f"pass --overwrite to restore every image again with the new settings, or give a new --pred "
        f"folder (and --out) to keep both; or rerun with the settings of {pred_dir / RECORD_FILE}"
    )


def plan_restorations(
    lq_dir: str | Path, pred_dir: str | Path, settings: dict[str, Any], overwrite: bool = False
) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    """``(lq, pred)`` paths still to restore, and the record to keep up to date while restoring them.

    A restoration is done when ``pred_dir/<stem>.png`` exists and the folder's record lists it under
    these `settings`; any other LQ image is to restore (again). With `overwrite` every image is, under
    a fresh record. Nothing is written here.

    Raises:
        EvalError: without `overwrite`, `pred_dir` holds restorations of this set made with other
            settings (each difference named), or with settings nobody recorded; nothing is restored then,
            so one score never mixes images made with different settings.
    """
    pairs = pair_images(lq_dir, None)
    pred_dir = Path(pred_dir)
    settings = _json_form(settings)
    jobs = [(pair.pred, pred_dir / f"{pair.stem}.png") for pair in pairs]
    existing = [pred.stem for _, pred in jobs if pred.exists()]
    old = None if overwrite else read_record(pred_dir)
    if old is not None and old.get("settings") == settings:
        record = old
    elif existing and not overwrite:
        if old is None:
            raise EvalError(
                f"--pred {pred_dir} holds {len(existing)} restoration(s) of this set ({existing[0]} ...) "
                f"but no record ({RECORD_FILE}) of the settings they were made with, so resuming could "
                f"mix settings; {_how_to_proceed(pred_dir)}"
            )
        changed = differences(old.get("settings", {}), settings)
        raise EvalError(
            f"--pred {pred_dir} holds {len(existing)} restoration(s) made with other settings "
            f"({'; '.join(changed)}); resuming would mix them into one score; {_how_to_proceed(pred_dir)}"
        )
    else:
        record = {"format": RECORD_FORMAT, "settings": settings, "model_identity": {}, "restored": []}
    restored = set(record["restored"])
    return [(lq, pred) for lq, pred in jobs if not (pred.exists() and pred.stem in restored)], record


def check_identity(record: dict[str, Any], identity: dict[str, Any], pred_dir: str | Path) -> None:
    """Check the loaded model's identity (resolved VQ and tokenizer paths, dtype) against the one the
    record's restorations were made with, and record it. Called after loading, before restoring.

    Raises:
        EvalError: the record lists restorations made by a model of another identity (e.g. the default
            dtype resolved to bfloat16 on a GPU then, float32 on a CPU now).
    """
    identity = _json_form(identity)
    old = record.get("model_identity") or {}
    if old and record["restored"] and old != identity:
        raise EvalError(
            f"--pred {pred_dir} holds restorations made by a model loaded differently "
            f"({'; '.join(differences(old, identity))}); {_how_to_proceed(Path(pred_dir))}"
        )
    record["model_identity"] = identity


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
    on_batch: Callable[[list[Path]], None] | None = None,
    **restore_kwargs: Any,
) -> int:
    """Restore `jobs` in batches with `restorer.restore_batch` (every image with `seed`); returns the count.

    Each restoration is written atomically as soon as its batch finishes, so an interrupted run loses at
    most one batch; `on_batch` then hears of the batch's written files (benchmark mode records them).
    An unreadable LQ file stops the run with its one-line reason.
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
        if on_batch is not None:
            on_batch([pred for _, pred in batch])
        done += len(batch)
        log(f"restored {done}/{len(jobs)}")
    return done

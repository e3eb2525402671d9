"""Score a folder of restorations: pairing, per-image scores, summary JSON and Markdown table.

Layout of a results folder written by `evaluate`:

    RESULTS/
      per_image.csv       stem, pred, gt, one column per per-image metric
      summary.json        metric names, pyiqa names and settings, backend and version, means, counts
      table.md            this run next to the PURE paper's reported numbers for the same set
      scores_cache.json   per-image scores with file signatures, so a rerun only scores what is new

Pairing is by file stem: ``pred/0001.png`` goes with ``gt/0001.png`` (or ``.jpg`` ...). FID compares
the two folders as wholes (every image file in each).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pure.eval.metrics import METRICS, MetricBackend, MetricSpec, MetricUnavailable, one_line
from pure.eval.reported import REPORTED, SET_NAMES, SOURCE, canonical_set
from pure.imageio import ImageLoadError, atomic_write, list_images, load_image, save_json

RESULT_FORMAT = "pure.eval/1"
CHUNK = 16  # images scored between two cache writes: an interrupted run loses at most this many
PARTIAL_MARK = "*"  # after a mean in table.md that leaves out images a metric failed on
_SHOW = 5  # names listed in an error message before "... and N more"


class EvalError(ValueError):
    """A problem with the inputs, in one line that says what to do."""


@dataclass(frozen=True)
class Pair:
    """A restored image and its reference (None for no-reference evaluation), matched by file stem."""

    stem: str
    pred: Path
    gt: Path | None


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvalError(f"--{role} {folder}: not a folder; give the folder of {role} images")
    try:
        files = list_images(folder)
    except ImageLoadError as err:
        raise EvalError(f"--{role} {folder}: folder has no image files") from err
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise EvalError(
                f"--{role}: {stems[path.stem].name} and {path.name} share the stem {path.stem!r}; "
                "keep one image per name"
            )
        stems[path.stem] = path
    return stems


def pair_images(pred_dir: str | Path, gt_dir: str | Path | None) -> list[Pair]:
    """Match restorations to references by file stem, sorted by stem.

    Raises:
        EvalError: a folder is missing or empty, two files share a stem, a reference has no restoration
            (the restoration run is incomplete) or a restoration has no reference.
    """
    preds = _by_stem(Path(pred_dir), "pred")
    if gt_dir is None:
        return [Pair(stem, preds[stem], None) for stem in sorted(preds)]
    gts = _by_stem(Path(gt_dir), "gt")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise EvalError(
            f"{len(missing)} reference image(s) in {gt_dir} have no restoration in {pred_dir}: "
            f"{_names(missing)}; restore them first (or drop them from --gt)"
        )
    extra = sorted(set(preds) - set(gts))
    if extra:
        raise EvalError(
            f"{len(extra)} restoration(s) in {pred_dir} have no reference in {gt_dir}: {_names(extra)}; "
            "pairs are matched by file stem"
        )
    return [Pair(stem, preds[stem], gts[stem]) for stem in sorted(preds)]


def check_sizes(pairs: Sequence[Pair]) -> None:
    """Full-reference metrics compare pixels: each restoration must have its reference's size.

    Raises:
        EvalError: sizes differ (listed), or an image cannot be read (its one-line reason).
    """
    wrong: list[str] = []
    for pair in pairs:
        if pair.gt is None:
            continue
        try:
            pred_size, gt_size = load_image(pair.pred).size, load_image(pair.gt).size
        except ImageLoadError as err:
            raise EvalError(str(err)) from err
        if pred_size != gt_size:
            wrong.append(f"{pair.stem} ({pred_size[0]}x{pred_size[1]} vs GT {gt_size[0]}x{gt_size[1]})")
    if wrong:
        raise EvalError(
            f"{len(wrong)} restoration(s) differ in size from their reference: {_names(wrong)}; "
            "restore at the GT size (e.g. --size 512 for the StableSR RealSR/DRealSR protocol)"
        )


def _signature(path: Path | None) -> str:
    if path is None:
        return ""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _load_cache(path: Path, protocol: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Cached per-image scores whose metric settings and backend still match `protocol`."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
        old_protocol = data["protocol"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable cache: score again rather than trust it
    stale = {name for name, desc in protocol.items() if old_protocol.get(name) != desc}
    for entry in images.values():
        entry["scores"] = {k: v for k, v in entry.get("scores", {}).items() if k not in stale}
    return images


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def evaluate(
    pred_dir: str | Path,
    gt_dir: str | Path | None,
    metrics: Sequence[MetricSpec],
    backend: MetricBackend,
    out_dir: str | Path,
    test_set: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    restoration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score `pred_dir` (against `gt_dir`) and write per_image.csv, summary.json and table.md in `out_dir`.

    Scores already in ``out_dir/scores_cache.json`` for unchanged files and settings are reused unless
    `overwrite`. `restoration` (model and sampling settings, benchmark mode) is copied into the summary.
    A metric the backend cannot set up is logged and listed under ``"skipped"``; the others
    go on. Full-reference metrics are skipped (with the reason) when `gt_dir` is None.

    A metric that raises while scoring (a CUDA out-of-memory on one large image, a pyiqa error on one
    file) costs only the cells it could not fill: a failing chunk is retried image by image, every
    failure is recorded under ``"failures"`` as ``{"metric", "image", "error"}`` (``image`` is None for a
    folder-level metric), its CSV cell stays empty, and the table marks the affected means. Failures
    are not cached, so a rerun retries exactly those cells. Hours of restoration and the other metrics'
    scores are never thrown away because of one bad cell.

    Returns:
        The summary (also written to summary.json).
    """
    pred_dir = Path(pred_dir)
    gt_dir = Path(gt_dir) if gt_dir is not None else None
    out_dir = Path(out_dir)
    pairs = pair_images(pred_dir, gt_dir)
    skipped: dict[str, str] = {}
    runnable: list[MetricSpec] = []
    for spec in metrics:
        if spec.needs_reference and gt_dir is None:
            skipped[spec.name] = "needs reference images (--gt)"
        else:
            runnable.append(spec)
    if any(spec.needs_reference for spec in runnable):
        check_sizes(pairs)

    protocol = {
        spec.name: {**spec.describe(), "backend": f"{backend.name} {backend.version}"} for spec in metrics
    }
    cache_path = out_dir / "scores_cache.json"
    cache = {} if overwrite else _load_cache(cache_path, protocol)
    entries: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        sig = {"pred": str(pair.pred), "pred_sig": _signature(pair.pred), "gt": str(pair.gt or "")}
        sig["gt_sig"] = _signature(pair.gt)
        old = cache.get(pair.stem)
        same = old is not None and all(old.get(k) == v for k, v in sig.items())
        entries[pair.stem] = {**sig, "scores": dict(old["scores"]) if same else {}}

    def save_cache() -> None:
        save_json({"protocol": protocol, "images": entries}, cache_path, overwrite=True)

    folder_scores: dict[str, float] = {}
    failures: list[dict[str, Any]] = []

    def record(spec: MetricSpec, stem: str | None, err: Exception) -> None:
        failures.append({"metric": spec.name, "image": stem, "error": one_line(err)})
        shown = sum(1 for f in failures if f["metric"] == spec.name)
        if shown <= _SHOW:
            log(f"{spec.name}: could not score {stem or 'the folders'}: {one_line(err)}")
        elif shown == _SHOW + 1:
            log(f"{spec.name}: more images failed; every failure is listed in summary.json")

    for spec in runnable:
        try:
            if spec.folder_level:
                assert gt_dir is not None
                log(f"{spec.name}: {pred_dir} against {gt_dir}")
                try:
                    folder_scores[spec.name] = float(backend.score_folders(spec, pred_dir, gt_dir))
                except MetricUnavailable:
                    raise
                except Exception as err:  # one metric's runtime error must not end the run
                    record(spec, None, err)
                continue
            todo = [p for p in pairs if spec.name not in entries[p.stem]["scores"]]
            log(f"{spec.name}: {len(todo)} to score, {len(pairs) - len(todo)} reused")
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start : start + CHUNK]
                for stem, score in _score_chunk(backend, spec, chunk, record).items():
                    entries[stem]["scores"][spec.name] = score
                save_cache()
        except MetricUnavailable as err:
            log(f"skipped {spec.name}: {err.reason}")
            skipped[spec.name] = err.reason
    save_cache()

    per_image = [spec for spec in runnable if not spec.folder_level and spec.name not in skipped]
    _write_csv(out_dir / "per_image.csv", pairs, entries, per_image)
    summary = _summary(
        pred_dir, gt_dir, test_set, pairs, entries, metrics, per_image, folder_scores, skipped, backend
    )
    summary["failures"] = [f for f in failures if f["metric"] not in skipped]
    for name, entry in summary["metrics"].items():
        failed = [f for f in summary["failures"] if f["metric"] == name]
        entry["failed"] = len(pairs) if failed and failed[0]["image"] is None else len(failed)
    if restoration is not None:
        summary["restoration"] = restoration
    save_json(summary, out_dir / "summary.json", overwrite=True)
    table = format_table(summary)
    atomic_write(out_dir / "table.md", lambda f: f.write(table.encode("utf-8")), overwrite=True)
    return summary


def _score_chunk(
    backend: MetricBackend,
    spec: MetricSpec,
    chunk: Sequence[Pair],
    record: Callable[[MetricSpec, str | None, Exception], None],
) -> dict[str, float]:
    """Scores of `chunk` by stem. If the backend raises on the whole chunk, each image is tried alone,
    so one bad image (or one that runs out of memory) loses only its own cell; `record` hears of each
    image that still fails. `MetricUnavailable` passes through: the metric cannot run at all."""

    def score(part: Sequence[Pair]) -> dict[str, float]:
        gts = [p.gt for p in part] if spec.needs_reference else None
        scores = backend.score_pairs(spec, [p.pred for p in part], gts)
        if len(scores) != len(part):
            raise RuntimeError(f"{backend.name} returned {len(scores)} scores for {len(part)} images")
        return {pair.stem: float(value) for pair, value in zip(part, scores, strict=True)}

    try:
        return score(chunk)
    except MetricUnavailable:
        raise
    except Exception as err:  # any runtime error of one metric: isolate the image(s) that cause it
        if len(chunk) == 1:
            record(spec, chunk[0].stem, err)
            return {}
    scored: dict[str, float] = {}
    for pair in chunk:
        try:
            scored.update(score([pair]))
        except MetricUnavailable:
            raise
        except Exception as err:
            record(spec, pair.stem, err)
    return scored


def _write_csv(path: Path, pairs: Sequence[Pair], entries: dict, specs: Sequence[MetricSpec]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stem", "pred", "gt", *(spec.name for spec in specs)])
    for pair in pairs:
        scores = entries[pair.stem]["scores"]
        writer.writerow(
            [pair.stem, pair.pred, pair.gt or "", *(_csv_cell(scores.get(spec.name)) for spec in specs)]
        )
    data = buffer.getvalue().encode("utf-8")
    atomic_write(path, lambda f: f.write(data), overwrite=True)


def _csv_cell(value: float | None) -> str:
    """Full precision for a score; empty for a cell whose metric failed on that image."""
    return "" if value is None else repr(value)


def _summary(pred_dir, gt_dir, test_set, pairs, entries, metrics, per_image, folder_scores, skipped, backend):
    results: dict[str, Any] = {}
    for spec in metrics:
        if spec.name in skipped:
            continue
        if spec.folder_level:
            mean = folder_scores.get(spec.name)
            count = len(pairs) if mean is not None else 0
        else:
            values = [entries[p.stem]["scores"].get(spec.name) for p in pairs]
            mean = _mean(values)
            count = sum(1 for v in values if v is not None and math.isfinite(v))
        results[spec.name] = {"label": spec.label, "mean": mean, "count": count, **spec.describe()}
    key = canonical_set(test_set) if test_set else None
    summary: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir) if gt_dir is not None else None,
        "set": key,
        "count": len(pairs),
        "backend": {"name": backend.name, "version": backend.version},
        "metrics": results,
        "skipped": skipped,
    }
    if key in REPORTED:
        summary["reported"] = {"source": SOURCE, "scores": dict(REPORTED[key])}
    return summary


def _cell(value: float | None, spec: MetricSpec) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{spec.decimals}f}"


def partial_means(summary: dict[str, Any]) -> dict[str, int]:
    """``{metric: images its mean covers}`` for each metric whose mean leaves out some of the run's
    ``summary["count"]`` images (a failed cell, a non-finite score): such a mean is not comparable with
    full-set numbers, so the table marks it and ``python -m pure.hub`` keeps it out of the model-index."""
    total = summary["count"]
    return {
        name: entry["count"]
        for name, entry in summary["metrics"].items()
        if entry.get("mean") is not None and entry.get("count", total) < total
    }


def _run_cell(name: str, summary: dict[str, Any], spec: MetricSpec) -> str:
    """This run's mean; `PARTIAL_MARK` when it covers only some of the images (see `partial_means`)."""
    cell = _cell(summary["metrics"].get(name, {}).get("mean"), spec)
    return cell + PARTIAL_MARK if name in partial_means(summary) else cell


def _failure_notes(summary: dict[str, Any]) -> list[str]:
    """One note per metric that failed at runtime: how many images, which, and the first error."""
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for failure in summary.get("failures", []):
        by_metric.setdefault(failure["metric"], []).append(failure)
    notes = []
    for name, failed in by_metric.items():
        if failed[0]["image"] is None:
            notes.append(f"{name} failed: {failed[0]['error']}.")
            continue
        stems = _names([f["image"] for f in failed])
        partial = (
            f" ({PARTIAL_MARK} = mean over the others)"
            if summary["metrics"].get(name, {}).get("mean") is not None
            else ""
        )
        notes.append(
            f"{name} could not score {len(failed)} of {summary['count']} images{partial}: {stems}; "
            f"first error: {failed[0]['error']}."
        )
    for name, count in partial_means(summary).items():
        if name not in by_metric:  # no failure recorded: some scores were NaN or infinite
            notes.append(
                f"{name} gave a finite score for {count} of {summary['count']} images "
                f"({PARTIAL_MARK} = mean over those)."
            )
    return notes


def format_table(summary: dict[str, Any], run_label: str | None = None) -> str:
    """Markdown table: this run's means, and the PURE paper's reported row for the same set, if known."""
    names = [name for name in METRICS if name in summary["metrics"] or name in summary.get("skipped", {})]
    specs = [METRICS[name] for name in names]
    header = "| | " + " | ".join(f"{spec.label} {spec.arrow}" for spec in specs) + " |"
    lines = [header, "|---|" + "---|" * len(specs)]
    n = summary["count"]
    label = run_label or f"this run ({n} image{'s' * (n != 1)})"
    run = [_run_cell(s.name, summary, s) for s in specs]
    lines.append(f"| {label} | " + " | ".join(run) + " |")
    reported = summary.get("reported")
    set_name = SET_NAMES.get(summary.get("set") or "", summary.get("set"))
    if reported:
        row = [_cell(reported["scores"].get(s.name), s) for s in specs]
        lines.append(f"| PURE, reported ({set_name}) | " + " | ".join(row) + " |")
    protocol = [f"{summary['backend']['name']} {summary['backend']['version']}"]
    if {"psnr", "ssim"} & set(summary["metrics"]):
        protocol.append("PSNR/SSIM on the Y channel (BT.601 YCbCr)")
    if "fid" in summary["metrics"]:
        protocol.append("FID folder against folder")
    notes = [f"Test set: {set_name or 'not given'}. Metrics: {'; '.join(protocol)}."]
    if reported:
        notes.append(f'"reported" rows are copied from the {reported["source"]}, not measured here.')
    notes += [f"{name} skipped: {reason}." for name, reason in summary.get("skipped", {}).items()]
    notes += _failure_notes(summary)
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"

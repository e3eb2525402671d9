"""Command line for `python -m pure.eval`: parse arguments, call `pure.eval.score.evaluate`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pure.eval.metrics import (
    FULL_REFERENCE,
    METRICS,
    NO_REFERENCE,
    MetricBackend,
    PyiqaBackend,
    parse_metrics,
)
from pure.eval.reported import SET_NAMES
from pure.eval.score import EvalError, evaluate, pair_images
from pure.imageio import ImageLoadError

EPILOG = f"""\
metrics (↓ lower is better, ↑ higher is better; FR needs --gt):
  {", ".join(f"{n} {s.arrow}{' FR' if s.needs_reference else ''}" for n, s in METRICS.items())}
  default: all of them with --gt, the no-reference ones ({", ".join(NO_REFERENCE)}) without.

folders: restorations and references are paired by file stem (pred/0001.png <-> gt/0001.png).
  RealSR / DRealSR (StableSR protocol): gt/ holds the 512 px GT crops, lq/ the 128 px LQ centre crops;
  restore lq/ at --size 512, then score against gt/. RealLQ250 has no reference: omit --gt.

outputs in --out: per_image.csv, summary.json, table.md (next to the PURE paper's reported numbers
  for --set {{{",".join(SET_NAMES)}}}), scores_cache.json (a rerun only scores new or changed images).

a metric that fails while scoring (e.g. CUDA out of memory or a pyiqa error on one image) does not stop
  the run: its cell is left empty, the failure (metric, image, one-line error) is listed in summary.json
  under "failures" and in table.md (a mean over fewer images is marked *), and a rerun retries exactly
  those cells. A metric that cannot load at all (no pyiqa, weights unreachable) is listed under "skipped".

benchmark mode resumes: an image whose restoration is in --pred is not restored again.
  --pred/restoration.json records the settings its restorations were made with (model, VQ, tokenizer,
  dtype, LQ folder, seed, size, sampling, colour fix) and which images they are; resuming with other
  settings is refused (exit 2, the differences named) rather than mixing two kinds of restoration in one
  score: pass --overwrite to restore everything again, or give a new --pred (and --out). summary.json
  reports the recorded settings under "restoration" (also when scoring such a --pred without --model).

exit status: 0 scored (possibly with failed cells, reported as above); 1 nothing could be scored, or
  --strict and a requested score is missing (failed cell or skipped metric); 2 bad input; 130 interrupted.

test sets in their raw download form (RealSR v3, DRealSR): cut the StableSR centre crops first with
  python -m pure.eval.prepare {{realsr,drealsr}} RAW_DIR OUT_DIR   (writes OUT_DIR/gt and OUT_DIR/lq)

examples:
  python -m pure.eval --pred out/realsr --gt RealSR/gt --out results/realsr --set realsr
  python -m pure.eval --pred out/reallq250 --metrics niqe,musiq,maniqa,clipiqa,topiq_nr --out results/lq250
  python -m pure.eval --model nonwhy/PURE --vq vq_ds8_c2i.pt --lq RealSR/lq --gt RealSR/gt \\
      --pred out/realsr --out results/realsr --set realsr --jacobi --dtype bfloat16
"""

# The names `python -m pure.infer --dtype` takes (its DTYPES maps them to torch dtypes); spelled out here
# so that `--help` needs no torch import.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
JACOBI_DEFAULT_WINDOW = 16  # tokens per forward for a bare --jacobi, as in python -m pure.infer
QUANTIZE_MODES = ("int8", "int4")  # pure.quant.QUANTIZE_MODES, spelled out for the same reason


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.eval",
        description="Score restored images with pyiqa metrics and write per-image CSV, JSON summary "
        "and a Markdown table next to the PURE paper's reported numbers. With --model, restore --lq "
        "into --pred first (benchmark mode).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, help="folder of restored images (benchmark mode: written here)")
    p.add_argument("--gt", help="folder of reference images (needed by full-reference metrics)")
    p.add_argument("--metrics", help="comma-separated metric names (default: see below)")
    p.add_argument("--out", required=True, help="results folder (created)")
    p.add_argument(
        "--set", dest="test_set", help=f"test set name for the reported row: {', '.join(SET_NAMES)}"
    )
    p.add_argument("--device", help="device for the model and pyiqa (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="score (and restore) everything again")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 unless every requested metric scored every image (for CI); without it a failed "
        "cell is reported and the exit status is 0",
    )
    bench = p.add_argument_group("benchmark mode (restore the test set first; done images are skipped)")
    bench.add_argument("--model", help="checkpoint folder or Hub id to restore --lq with")
    bench.add_argument("--lq", help="folder of LQ inputs (required with --model)")
    bench.add_argument("--vq", help="VQ tokenizer (default: <model>/vq)")
    bench.add_argument("--tokenizer", help="tokenizer.json overriding the checkpoint's own")
    bench.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="model dtype (default bfloat16 on CUDA, float32 on CPU)"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of every image (default 0)")
    bench.add_argument("--size", type=int, default=512, help="output side in px (default 512)")
    bench.add_argument("--batch-size", type=int, default=1, help="images restored together (default 1)")
    bench.add_argument(
        "--cfg", type=float, help="guidance scale (default: the checkpoint's sampling.json, else PURE's 0.8)"
    )
    bench.add_argument(
        "--temperature", type=float, help="image temperature (default: the checkpoint's, else PURE's 0.9)"
    )
    bench.add_argument(
        "--max-text-tokens",
        type=int,
        help="budget of the degradation/caption text (default: the checkpoint's, else PURE's 768)",
    )
    bench.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    bench.add_argument(
        "--jacobi",
        type=int,
        nargs="?",
        const=JACOBI_DEFAULT_WINDOW,
        metavar="N",
        help=f"speculative Jacobi decoding of the image, N tokens per forward (N default "
        f"{JACOBI_DEFAULT_WINDOW}): fewer forward passes, same output distribution",
    )
    bench.add_argument(
        "--row-lag",
        type=int,
        metavar="L",
        help="row-parallel decoding of the image (lossy; as python -m pure.infer --row-lag): a row starts "
        "once the row above has L codes",
    )
    bench.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="capture the per-token image step with torch.compile (as python -m pure.infer --compile)",
    )
    bench.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="weight-only quantisation of the decoder's linears (as pure.infer --quantize; needs torchao)",
    )
    bench.add_argument(
        "--no-pictures", action="store_true", help="skip <out>/pictures/ (comparison grids, entropy maps)"
    )
    return p


def _path_or_id(value: str | None) -> str | None:
    """An existing path made absolute (so that ``RealSR/lq`` and ``./RealSR/lq`` record the same); a Hub
    id or a missing path as given."""
    if value is None:
        return None
    path = Path(value)
    return str(path.resolve()) if path.exists() else value


def _restore(args: argparse.Namespace) -> dict | None:
    """Benchmark mode: restore what is missing in --pred; returns the settings for the summary (those
    the restorations in --pred were made with, from its record; see `_recorded_restoration`)."""
    from pure.decoding.config import SamplingConfig, read_sampling
    from pure.distributed import Ranks
    from pure.eval.benchmark import (
        check_identity,
        plan_restorations,
        protocol_warnings,
        rank_records,
        restore_set,
        write_record,
    )
    from pure.infer import load_restorer, sampling_config
    from pure.model import ModelLoadError, resolve_checkpoint

    if not args.lq:
        raise EvalError("--model needs --lq, the folder of LQ inputs to restore")
    try:  # the checkpoint's decoding defaults (sampling.json) for what is not given, recorded as numbers
        defaults = read_sampling(resolve_checkpoint(args.model))
    except ModelLoadError:  # no such checkpoint: loading it, below, says so where there is work to do
        defaults = SamplingConfig()
    except ValueError as err:
        raise EvalError(str(err)) from None
    given = {
        "cfg_scale": args.cfg,
        "temperature": args.temperature,
        "max_text_tokens": args.max_text_tokens,
        "jacobi_window": args.jacobi,
        "row_lag": args.row_lag,
    }
    sampling = sampling_config(**{**asdict(defaults), **{k: v for k, v in given.items() if v is not None}})
    # everything that changes the restored pixels (not --batch-size, --device or --no-pictures)
    settings = {
        "model": _path_or_id(args.model),
        "vq": _path_or_id(args.vq),
        "tokenizer": _path_or_id(args.tokenizer),
        "dtype": args.dtype,
        "lq_dir": _path_or_id(args.lq),
        "seed": args.seed,
        "size": args.size,
        "color_fix": not args.no_color_fix,
    }
    # the sampling settings as numbers: these four always, the others (row_lag, a sampling.json's
    # text_top_k...) only where they are not PURE's, so that earlier records keep their settings
    pures = SamplingConfig()
    always = ("cfg_scale", "temperature", "max_text_tokens", "jacobi_window")
    settings.update({k: v for k, v in asdict(sampling).items() if k in always or v != getattr(pures, k)})
    if args.quantize:  # only when set: the records of unquantised runs keep their settings
        settings["quantize"] = args.quantize
    pred_dir = Path(args.pred)
    ranks = Ranks.from_env()  # under torchrun: each rank restores every N-th image, on its own device
    args.device = ranks.device(args.device)
    jobs, record = plan_restorations(args.lq, pred_dir, settings, overwrite=args.overwrite)
    ranks.gather(None)  # every rank has planned (the same jobs) before any rank writes
    if ranks.is_main:
        for line in protocol_warnings(args.test_set, [lq for lq, _ in jobs])[:5]:
            print(line)
        print(f"{len(jobs)} image(s) to restore into {args.pred}")
    if jobs:
        restorer = load_restorer(args, EvalError)
        check_identity(record, dict(getattr(restorer, "identity", {})), pred_dir)
        if ranks.is_main:
            pred_dir.mkdir(parents=True, exist_ok=True)
            write_record(pred_dir, record)  # before the first image: no restoration without its settings
            for path in rank_records(pred_dir):  # what an interrupted run's ranks recorded: folded in now
                path.unlink()
        ranks.gather(None)  # the record exists before any rank's first image

        def on_batch(preds: list[Path]) -> None:
            record["restored"] = sorted({*record["restored"], *(pred.stem for pred in preds)})
            write_record(pred_dir, record, ranks.rank)

        restore_set(
            restorer,
            ranks.shard(jobs),
            seed=args.seed,
            size=args.size,
            batch_size=args.batch_size,
            pictures_dir=None if args.no_pictures else Path(args.out) / "pictures",
            gt_dir=Path(args.gt) if args.gt else None,
            on_batch=on_batch,
            sampling=sampling,
            color_fix=not args.no_color_fix,
        )
        restored = ranks.gather(record["restored"])  # every rank has finished
        if ranks.is_main and ranks.world > 1:
            record["restored"] = sorted({stem for stems in restored for stem in stems})
            write_record(pred_dir, record)
            for path in rank_records(pred_dir):
                path.unlink()
    return _recorded_restoration(args.pred)


def _recorded_restoration(pred: str) -> dict | None:
    """The settings recorded (by benchmark mode) for the restorations in `pred`, for the summary; None
    unless the record covers every image there, so a summary never claims settings an image lacks."""
    from pure.eval.benchmark import read_record

    record = read_record(pred)
    if record is None:
        return None
    try:
        stems = {pair.stem for pair in pair_images(pred, None)}
    except EvalError:
        return None  # no images: evaluate() says so
    if not stems <= set(record["restored"]):
        return None
    restoration = dict(record.get("settings", {}))
    if record.get("model_identity"):
        restoration["model_identity"] = record["model_identity"]  # resolved paths and dtype
    return restoration


def _is_main_rank() -> bool:
    from pure.distributed import Ranks

    return Ranks.from_env().is_main


def _leave_process_group() -> None:
    """The end of a torchrun command's collectives (nothing to do in a single process)."""
    if "pure.distributed" in sys.modules:  # imported by benchmark mode only: scoring alone needs no torch
        sys.modules["pure.distributed"].finish()


def _failure_report(summary: dict[str, Any]) -> str | None:
    """One stderr line when some cells could not be scored, or None."""
    failures = summary.get("failures", [])
    if not failures:
        return None
    counts: dict[str, int] = {}
    for failure in failures:
        counts[failure["metric"]] = counts.get(failure["metric"], 0) + 1
    per_metric = ", ".join(f"{name} {n}" for name, n in counts.items())
    return (
        f"warning: {len(failures)} score(s) could not be computed ({per_metric}); their cells are empty, "
        'listed under "failures" in summary.json and in table.md; a rerun retries them'
    )


def main(argv: list[str] | None = None, backend: MetricBackend | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.metrics:
            specs = parse_metrics(args.metrics)
        else:
            specs = parse_metrics(list(FULL_REFERENCE + NO_REFERENCE) if args.gt else list(NO_REFERENCE))
        restoration = _restore(args) if args.model else _recorded_restoration(args.pred)
        if args.model and not _is_main_rank():  # under torchrun, rank 0 alone scores and writes the summary
            return 0
        summary = evaluate(
            args.pred,
            args.gt,
            specs,
            backend or PyiqaBackend(device=args.device),
            args.out,
            test_set=args.test_set,
            overwrite=args.overwrite,
            restoration=restoration,
        )
    except (EvalError, ImageLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished restorations and scores are kept, a rerun continues", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    print(f"wrote {args.out}/per_image.csv, summary.json, table.md")
    report = _failure_report(summary)
    if report:
        print(report, file=sys.stderr)
    if not any(entry.get("count") for entry in summary["metrics"].values()):
        print(f"error: no metric could be computed; see {args.out}/summary.json", file=sys.stderr)
        return 1
    if args.strict and (summary.get("failures") or summary.get("skipped")):
        missing = sorted({f["metric"] for f in summary.get("failures", [])} | set(summary.get("skipped", {})))
        print(f"error: --strict: scores missing for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0

"""Command line for `python -m pure.eval`: parse arguments, call `pure.eval.score.evaluate`."""

from __future__ import annotations

import argparse
import sys

from pure.eval.metrics import (
    FULL_REFERENCE,
    METRICS,
    NO_REFERENCE,
    MetricBackend,
    PyiqaBackend,
    parse_metrics,
)
from pure.eval.reported import SET_NAMES
from pure.eval.score import EvalError, evaluate
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

examples:
  python -m pure.eval --pred out/realsr --gt RealSR/gt --out results/realsr --set realsr
  python -m pure.eval --pred out/reallq250 --metrics niqe,musiq,maniqa,clipiqa,topiq_nr --out results/lq250
"""


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
    bench = p.add_argument_group("benchmark mode (restore the test set first; done images are skipped)")
    bench.add_argument("--model", help="checkpoint folder or Hub id to restore --lq with")
    bench.add_argument("--lq", help="folder of LQ inputs (required with --model)")
    bench.add_argument("--vq", help="VQ tokenizer (default: <model>/vq)")
    bench.add_argument("--seed", type=int, default=0, help="seed of every image (default 0)")
    bench.add_argument("--size", type=int, default=512, help="output side in px (default 512)")
    bench.add_argument("--batch-size", type=int, default=1, help="images restored together (default 1)")
    bench.add_argument("--cfg", type=float, default=0.8, help="guidance scale (default 0.8)")
    bench.add_argument("--temperature", type=float, default=0.9, help="image temperature (default 0.9)")
    bench.add_argument(
        "--max-text-tokens",
        type=int,
        default=256,
        help="budget of the degradation/caption text (default 256)",
    )
    bench.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    bench.add_argument(
        "--no-pictures", action="store_true", help="skip <out>/pictures/ (comparison grids, entropy maps)"
    )
    return p


def _restore(args: argparse.Namespace) -> dict:
    """Benchmark mode: restore what is missing in --pred; returns the settings recorded in the summary."""
    from pathlib import Path

    from pure.engine import SamplingConfig
    from pure.eval.benchmark import plan_restorations, protocol_warnings, restore_set
    from pure.restorer import PureRestorer

    if not args.lq:
        raise EvalError("--model needs --lq, the folder of LQ inputs to restore")
    sampling = SamplingConfig(
        cfg_scale=args.cfg, temperature=args.temperature, max_text_tokens=args.max_text_tokens
    )
    settings = {
        "model": args.model,
        "lq_dir": args.lq,
        "seed": args.seed,
        "size": args.size,
        "cfg_scale": args.cfg,
        "temperature": args.temperature,
        "max_text_tokens": args.max_text_tokens,
        "color_fix": not args.no_color_fix,
    }
    Path(args.pred).mkdir(parents=True, exist_ok=True)
    jobs = plan_restorations(args.lq, args.pred, overwrite=args.overwrite)
    for line in protocol_warnings(args.test_set, [lq for lq, _ in jobs])[:5]:
        print(line)
    print(f"{len(jobs)} image(s) to restore into {args.pred}")
    if jobs:
        restorer = PureRestorer.from_pretrained(args.model, vq=args.vq, device=args.device)
        restore_set(
            restorer,
            jobs,
            seed=args.seed,
            size=args.size,
            batch_size=args.batch_size,
            pictures_dir=None if args.no_pictures else Path(args.out) / "pictures",
            gt_dir=Path(args.gt) if args.gt else None,
            sampling=sampling,
            color_fix=not args.no_color_fix,
        )
    return settings


def main(argv: list[str] | None = None, backend: MetricBackend | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.metrics:
            specs = parse_metrics(args.metrics)
        else:
            specs = parse_metrics(list(FULL_REFERENCE + NO_REFERENCE) if args.gt else list(NO_REFERENCE))
        restoration = _restore(args) if args.model else None
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
    if not summary["metrics"]:
        print(f"error: no metric could be computed; see {args.out}/summary.json", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/per_image.csv, summary.json, table.md")
    return 0

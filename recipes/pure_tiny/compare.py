"""Does a PURE-tiny run reproduce another's hold-out scores? (the last step of ``reproduce.sh``)

    .venv/bin/python recipes/pure_tiny/compare.py outputs/pure_tiny/holdout/results.json \
        examples/pure-tiny/holdout_results.json

Both files are ``python -m pure.eval.holdout`` results under the same protocol (same images, crops and
degradation seeds), so every score of one run has a twin in the other: the same crop, seed and method.
For each method and metric the twins' differences give a mean and its standard error; a mean difference
within ``--z`` (2) standard errors is one this hold-out set cannot tell from zero: *within noise*. The
crops of one image and its seeds are not independent, so the standard error is, if anything, too small,
and the test errs towards calling a difference real.

The bicubic rows are the control: they do not depend on the checkpoint, so their twins must be equal;
if they are not, the two runs did not measure the same thing and the comparison stops.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS = ("psnr_y", "ssim_y", "gms_y")  # each where both rows have it (older results lack GMS-Y)
CONTROL = "bicubic"  # a method that does not depend on the checkpoint
CONTROL_TOLERANCE = 1e-6


def _scores(results: dict) -> dict[tuple[str, str, int], dict[str, float]]:
    """``{(method, crop, seed): {metric: value}}`` from a results file's rows."""
    return {
        (r["method"], r["crop"], r["seed"]): {m: r[m] for m in METRICS if r.get(m) is not None}
        for r in results["rows"]
    }


def compare(run: dict, reference: dict, z: float = 2.0) -> list[dict]:
    """One entry per (method, metric) present in both: means, mean difference, its standard error, verdict.

    Raises ``ValueError`` when the protocols differ or the control rows do not match.
    """
    if run["protocol"] != reference["protocol"]:
        raise ValueError("the two results were measured under different protocols; nothing to compare")
    a, b = _scores(run), _scores(reference)
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise ValueError("the two results share no (method, crop, seed) rows")
    for key in shared:
        if key[0] == CONTROL and any(
            abs(a[key][m] - b[key][m]) > CONTROL_TOLERANCE for m in a[key].keys() & b[key]
        ):
            raise ValueError(
                f"control rows differ ({key}): the hold-out sets or degradations are not the same"
            )
    methods = [
        m for m in dict.fromkeys(r["method"] for r in reference["rows"]) if any(k[0] == m for k in shared)
    ]
    entries = []
    for method in methods:
        keys = [key for key in shared if key[0] == method]
        for metric in (m for m in METRICS if all(m in a[k] and m in b[k] for k in keys)):
            diffs = [a[k][metric] - b[k][metric] for k in keys]
            n = len(diffs)
            mean = sum(diffs) / n
            se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.inf
            entries.append(
                {
                    "method": method,
                    "metric": metric,
                    "n": n,
                    "run": sum(a[k][metric] for k in keys) / n,
                    "reference": sum(b[k][metric] for k in keys) / n,
                    "difference": mean,
                    "se": se,
                    "within_noise": abs(mean) <= z * se,  # a zero difference with zero spread too
                }
            )
    return entries


def to_markdown(entries: list[dict], z: float) -> str:
    lines = [
        "| method | metric | run | reference | difference | paired SE | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        verdict = "within noise" if e["within_noise"] else f"differs (> {z:g} SE)"
        lines.append(
            f"| {e['method']} | {e['metric']} | {e['run']:.4f} | {e['reference']:.4f} "
            f"| {e['difference']:+.4f} | {e['se']:.4f} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare two `python -m pure.eval.holdout` results crop by crop (paired differences).",
    )
    parser.add_argument("run", type=Path, help="results.json of the run to check")
    parser.add_argument(
        "reference", type=Path, help="results.json to check it against (e.g. the shipped one)"
    )
    parser.add_argument(
        "--z", type=float, default=2.0, help="standard errors a difference may span (default 2)"
    )
    args = parser.parse_args(argv)
    try:
        entries = compare(json.loads(args.run.read_text()), json.loads(args.reference.read_text()), args.z)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(entries, args.z))
    same = all(e["within_noise"] for e in entries)
    verdict = "reproduced: every" if same else "NOT reproduced: not every"
    print(f"\n{verdict} score is within noise of the reference")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

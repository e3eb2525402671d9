"""Choose a checkpoint's decoding defaults (its ``sampling.json``) on a validation set, not on its hold-out.

    .venv/bin/python recipes/pure_tiny/choose_sampling.py --model examples/pure-tiny

Draws ``--count`` fresh procedural scenes (`pure.data.synthetic_images`, seeds from ``--first-seed``: 200000,
apart from training's 100000-107999 and the hold-out's 0-15), measures every sampling setting of
``python -m pure.eval.holdout`` on them (one crop each, degradation seed 0), and prints each setting minus
the copy baseline and minus bicubic, paired by crop (mean ± standard error; beyond 2 SE = resolved). The
hold-out then reports the setting chosen here without having chosen it (PURE-tiny's choice and its figures:
the README). Takes about 6 min for 32 scenes on an idle CPU thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pure.eval.holdout import BASELINES, SETTINGS, paired_differences

KEYS = {"psnr_y": "PSNR-Y", "ssim_y": "SSIM-Y", "gms_y": "GMS-Y", "token_acc": "token acc"}


def table(results: dict) -> str:
    """Markdown: every PURE setting minus copy and minus bicubic, paired by crop and seed."""
    lines = ["| setting | vs | " + " | ".join(KEYS.values()) + " |", "|---" * (len(KEYS) + 2) + "|"]
    for method in results["methods"]:
        if method in BASELINES:
            continue
        for baseline, metrics in paired_differences(results["rows"], method, ("copy", "bicubic")).items():
            cells = []
            for key in KEYS:
                e = metrics.get(key)
                mark = {1: " (better)", -1: " (worse)", 0: ""}[e["resolved"]] if e else ""
                cells.append("-" if e is None else f"{e['mean']:+.3g} ± {e['se']:.2g}{mark}")
            lines.append(f"| {method} | {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="examples/pure-tiny", help="checkpoint folder")
    p.add_argument("--out", default="outputs/choose_sampling", help="output folder (scenes, results)")
    p.add_argument("--count", type=int, default=32, help="validation scenes (default 32)")
    p.add_argument("--first-seed", type=int, default=200000, help="seed of the first scene (default 200000)")
    args = p.parse_args()
    out = Path(args.out)
    py = sys.executable
    subprocess.run(
        [py, "-m", "pure.data.synthetic_images", "--out", str(out), "--split", "val", "--first-seed",
         str(args.first_seed), "--count", str(args.count), "--size", "128"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [py, "-m", "pure.eval.holdout", "--model", args.model, "--holdout", str(out / "val"), "--seeds", "0",
         "--crops-per-image", "1", "--captions", str(out / "captions.jsonl"), "--overwrite", "--quiet",
         "--methods", ",".join(["bicubic", "copy", *SETTINGS]), "--out", str(out / "measured")],
        check=True,
    )  # fmt: skip
    print(table(json.loads((out / "measured" / "results.json").read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Hold-out scores of a checkpoint with quantised weights, for recipes/pure_tiny/compare.py to pair with the
unquantised model's (until ``python -m pure.eval.holdout`` takes ``--quantize`` itself):

    python recipes/quant/holdout.py --quantize none --out outputs/holdout_fp32
    python recipes/quant/holdout.py --quantize int8 --out outputs/holdout_int8
    python recipes/pure_tiny/compare.py outputs/holdout_int8/results.json outputs/holdout_fp32/results.json

The hold-out images: ``python -m pure.data.sample_images recipes/pure_tiny/sources.yaml --out DIR`` writes
them to ``DIR/holdout``. torchao must be importable: ``PYTHONPATH=.venv/torchao-site`` once
``bash recipes/quant/test.sh`` has put it there.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pure.eval.holdout import measure_holdout, write_report
from pure.imageio import list_images
from pure.restorer import PureRestorer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="examples/pure-tiny", help="checkpoint folder (default PURE-tiny)")
    p.add_argument("--holdout", default="data/pure_tiny/sources/holdout", help="folder of hold-out images")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], required=True)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md)")
    p.add_argument("--methods", default="bicubic,pure,pure-greedy", help="comma-separated hold-out methods")
    p.add_argument("--seeds", default="0,1,2", help="degradation seeds (default 0,1,2)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quantize = None if args.quantize == "none" else args.quantize
    try:
        restorer = PureRestorer.from_pretrained(args.model, device="cpu", quantize=quantize)
        results = measure_holdout(
            restorer,
            list_images(args.holdout),
            seeds=[int(s) for s in args.seeds.split(",")],
            methods=args.methods.split(","),
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in write_report(results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

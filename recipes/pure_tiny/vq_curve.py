"""One point of a tokenizer's training curve against bicubic, on the hold-out protocol.

    .venv/bin/python recipes/pure_tiny/vq_curve.py outputs/pure_tiny_v2/vq data/pure_tiny_v2/sources/holdout

measures RUN/vq (the export of the run's last chunk) with ``python -m pure.eval.holdout``'s baselines
(bicubic, vq = the tokenizer's ceiling, copy = the VQ round trip of the bicubic LQ) on the same crops,
Real-ESRGAN LQs and seeds as the model card, appends one line to RUN/curve.jsonl (step, training seconds,
mean PSNR-Y / SSIM-Y / GMS-Y per method) and redraws RUN/curve.png. Run by vq_v2_curve.sh after every chunk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pure.eval.holdout import VQOnly, measure_holdout
from pure.imageio import list_images
from pure.vq import VQModel

METHODS = ("bicubic", "vq", "copy")
KEYS = ("psnr_y", "ssim_y", "gms_y", "token_acc")


def measure(run: Path, holdout: Path, crop: int, crops: int, seeds: list[int]) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    vq = VQModel.from_pretrained(run / "vq")
    results = measure_holdout(
        VQOnly(vq, crop), list_images(holdout), crop=crop, crops_per_image=crops, seeds=seeds, methods=METHODS
    )
    point = {"step": metrics["step"], "seconds": metrics["seconds"]}
    for method, stats in results["methods"].items():
        point[method] = {k: stats[k]["mean"] for k in KEYS if stats[k]["n"]}
    return point


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [p["step"] for p in points]
    for ax, key, label in zip(
        axes, ("psnr_y", "ssim_y", "gms_y"), ("PSNR-Y (dB)", "SSIM-Y", "GMS-Y"), strict=True
    ):
        for method, style in (("bicubic", "k--"), ("vq", "b-o"), ("copy", "r-o")):
            ax.plot(steps, [p[method][key] for p in points], style, label=method, markersize=3)
        ax.set_xlabel("VQ training step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="train_vq output_dir")
    p.add_argument("holdout", type=Path, help="hold-out image folder")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--crops-per-image", type=int, default=4)
    p.add_argument("--seeds", default="0")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        point = measure(
            args.run, args.holdout, args.crop, args.crops_per_image, [int(s) for s in args.seeds.split(",")]
        )
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    curve = args.run / "curve.jsonl"
    points = [json.loads(line) for line in curve.read_text().splitlines()] if curve.is_file() else []
    points = [q for q in points if q["step"] != point["step"]] + [point]
    points.sort(key=lambda q: q["step"])
    curve.write_text("".join(json.dumps(q) + "\n" for q in points))
    plot(points, args.run / "curve.png")
    print(json.dumps(point))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pure.bench_tiles``: tiled restoration's memory does not grow with the image. See ``--help``.

Issue #7 asks that a 3000x2000 photo restore at x2 on a tiny model without seams, in memory independent
of its size. This restores a large and a small synthetic photo-like image with the same checkpoint, each
by ``python -m pure.infer --scale`` (the real code path: loading, the tiles, stitching, the PNG
written) in a fresh Python process of its own, so each peak RSS (``ru_maxrss``, read in that process
when it is done) is that image's alone. :func:`pure.tiling.tiled_memory` predicts the buffers that must
grow with the image (the input, the upsampled input and the output, one band of tile rows); peak RSS minus
that prediction is everything else (Python, torch, the model, one batch of tiles) and must be flat: the
same for both images. The seam figure of the large output compares the steps across tile overlaps with
the steps elsewhere (:func:`pure.tiling.step_gradients`).

By default the checkpoint is a random one built here (``pure.make_random_checkpoint``) at PURE's native
size, 512 px, so the tiles are PURE's 512 px; its language model is tiny so that a tile decodes in a few
seconds on a CPU. Its "restorations" are noise: the figures are about memory, time and stitching.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pure.imageio import MIN_SIDE
from pure.restorer import DEFAULT_IMAGE_SIZE as NATIVE_SIZE  # PURE's native size: 512 px tiles

DEFAULT_SIZES = "3000x2000,600x400"  # the photo, and one with 6 tiles at x2 (a full tile batch)
# A language model small enough for a 512 px tile (8,192 positions with the LQ image) in a few seconds
# on one CPU thread: attention over those positions is most of the time, so one head, one layer.
TINY_MODEL = {"hidden": 32, "layers": 1, "heads": 1}
# The text --fixed-text forces into every tile instead of the model's description of the whole image.
STEER_DEGRADATION, STEER_CAPTION = "Small noise.", "A synthetic photograph of smooth colours and edges."
RESULT_PREFIX = "bench_tiles_result: "  # the child's one line of JSON on stdout
MIB = 2**20
RU_MAXRSS_BYTES = 1024  # Linux reports ru_maxrss in KiB
# Seam figure: a seam is a step across a tile overlap that stands out from the image's usual steps; a
# ratio under this many is no visible seam (tests/test_tiling.py: hard pastes give 5-20, blending <= 3).
SEAM_RATIO_OK = 2.0


@dataclass
class Run:
    """One image restored in its own process."""

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    tiles: int
    tile: int
    overlap: int
    seconds: float
    peak_rss: int  # bytes
    predicted: int  # bytes of image-sized buffers (pure.tiling.tiled_memory)
    output: Path

    @property
    def flat(self) -> int:
        """Peak RSS less the image-sized buffers: what must not grow with the image."""
        return self.peak_rss - self.predicted


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"3000x2000,600x400"`` -> ``[(3000, 2000), (600, 400)]``; the first is the large image."""
    sizes = []
    for part in text.split(","):
        try:
            width, height = (int(side) for side in part.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"sizes are WIDTHxHEIGHT separated by commas, e.g. 3000x2000,600x400; got {text!r}"
            ) from None
        if min(width, height) < MIN_SIDE:
            raise ValueError(f"each side must be at least {MIN_SIDE} px; got {width}x{height}")
        sizes.append((width, height))
    if len(sizes) != 2:
        raise ValueError(f"give two sizes, the large image first: e.g. {DEFAULT_SIZES}; got {text!r}")
    return sizes


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """``(height, width, 3)`` uint8: smooth colour fields, edges and fine texture, like a photo (which a
    tile boundary could cut anywhere). Made in row blocks to stay small for large images."""
    rng = np.random.default_rng(seed)
    waves = rng.uniform(0.5, 6.0, size=(3, 2)) * 2 * np.pi / np.array([width, height])  # cycles per image
    phases = rng.uniform(0, 2 * np.pi, size=(3, 2))
    x = np.arange(width)[None, :]
    out = np.empty((height, width, 3), dtype=np.uint8)
    block = 256
    for top in range(0, height, block):
        y = np.arange(top, min(top + block, height))[:, None]
        for c in range(3):
            field = 128 + 60 * np.sin(waves[c, 0] * x + phases[c, 0]) * np.cos(waves[c, 1] * y + phases[c, 1])
            field = field + 40 * (((x + 2 * y) // max(1, width // 7)) % 2)  # a few hard diagonal edges
            field = field + rng.normal(0, 6, size=field.shape)  # grain
            out[top : top + len(y), :, c] = np.clip(field, 0, 255).astype(np.uint8)
    return out


def build_checkpoint(folder: Path, native: int) -> Path:
    from pure.make_random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(folder, seed=0, image_size=native, **TINY_MODEL)


def run_child(args: argparse.Namespace, model: Path, size: tuple[int, int], workdir: Path) -> Run:
    """Restore a ``size`` photo-like image in a fresh process (``--child``); its figures."""
    from PIL import Image

    from pure.tiling import tiled_memory

    source = workdir / f"photo_{size[0]}x{size[1]}.png"
    Image.fromarray(photo_like(*size)).save(source)
    output = workdir / f"photo_{size[0]}x{size[1]}_pure.png"
    infer_args = [
        "--model", str(model), "--input", str(source), "--output", str(output), "--overwrite",
        "--scale", str(args.scale), "--tile-batch", str(args.tile_batch), "--cfg", str(args.cfg),
        "--device", "cpu", "--quiet",
    ]  # fmt: skip
    if args.fixed_text:  # else the model describes the image once and that text goes into every tile
        infer_args += ["--degradation", STEER_DEGRADATION, "--caption", STEER_CAPTION]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "pure.bench_tiles", "--child", json.dumps(infer_args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"restoring {source.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    child = json.loads(lines[-1][len(RESULT_PREFIX) :])
    settings = child["sidecar"]["settings"]
    return Run(
        input_size=size,
        output_size=tuple(settings["size"]),
        tiles=settings["tiles"],
        tile=settings["tile"],
        overlap=settings["tile_overlap"],
        seconds=child["sidecar"]["timings"]["total_s"],
        peak_rss=child["peak_rss"],
        predicted=tiled_memory(size, settings["tile"], scale=args.scale),
        output=output,
    )


def child(infer_args: list[str]) -> int:
    """In the fresh process: run ``pure.infer`` and report its sidecar and this process's peak RSS."""
    from pure import infer

    code = infer.main(infer_args)
    if code != 0:
        return code
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_BYTES
    output = Path(infer_args[infer_args.index("--output") + 1])
    sidecar = json.loads(output.with_suffix(".json").read_text())
    print(RESULT_PREFIX + json.dumps({"peak_rss": peak, "sidecar": sidecar}), flush=True)
    return 0


def seam_figure(run: Run) -> tuple[float, float]:
    """``(worst mean step across a tile overlap, mean step elsewhere)`` of ``run``'s output, in grey levels,
    over both directions (columns and rows)."""
    from PIL import Image

    from pure.tiling import plan_tiles, seam_steps, step_gradients

    with Image.open(run.output) as image:
        pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    boxes = plan_tiles(max(width, run.tile), max(height, run.tile), run.tile, run.overlap)
    worst, usual = 0.0, []
    for axis, length in ((1, width), (0, height)):
        steps = step_gradients(pixels, axis)
        band = seam_steps(boxes, length, run.tile, axis)
        if band.any():
            worst = max(worst, float(steps[band].max()))
        if (~band).any():
            usual.append(float(steps[~band].mean()))
    return worst, float(np.mean(usual))


def table(runs: list[Run]) -> str:
    """The figures as a Markdown table."""
    header = "| input | output | tiles | seconds | peak RSS MiB | image buffers MiB | peak - buffers MiB |"
    rows = [header, "|---|---|---|---|---|---|---|"]
    for run in runs:
        rows.append(
            f"| {run.input_size[0]}x{run.input_size[1]} | {run.output_size[0]}x{run.output_size[1]} "
            f"| {run.tiles} | {run.seconds:.1f} | {run.peak_rss / MIB:.0f} | {run.predicted / MIB:.0f} "
            f"| {run.flat / MIB:.0f} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.bench_tiles",
        description=__doc__.split("\n\n")[1].replace("``", "").replace(":func:", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m pure.bench_tiles                          # 3000x2000 and 600x400 at x2, 512 px tiles\n"
        "  python -m pure.bench_tiles --sizes 96x64,48x32 --native 64   # seconds: a smoke test\n"
        "  python -m pure.bench_tiles --model examples/pure-tiny --sizes 1200x800,300x200 --scale 4",
    )
    p.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"the large and the small input, WIDTHxHEIGHT (default {DEFAULT_SIZES})",
    )
    p.add_argument("--scale", type=int, choices=(1, 2, 4), default=2, help="x1, x2 or x4 (default 2)")
    p.add_argument("--model", help="a checkpoint folder (default: a tiny random one built in a temp folder)")
    p.add_argument(
        "--native",
        type=int,
        default=NATIVE_SIZE,
        help=f"native size (the tile side) of the random checkpoint (default {NATIVE_SIZE})",
    )
    p.add_argument(
        "--tile-batch", type=int, default=4, help="tiles restored together (default 4, as pure.infer)"
    )
    p.add_argument(
        "--cfg",
        type=float,
        default=1.0,
        help="guidance scale (default 1: no guidance, half the decoding; PURE's 0.8 doubles the rows of a "
        "tile batch, which is flat either way)",
    )
    p.add_argument(
        "--fixed-text",
        action="store_true",
        help="force a fixed degradation and caption into the tiles instead of the model's description of "
        "the whole image (one describe pass per image, as pure.infer does)",
    )
    p.add_argument("--threads", type=int, help="torch threads in each restoring process (default: torch's)")
    p.add_argument("--workdir", help="keep the inputs, outputs and checkpoint here (default: a temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: the restoring process's pure.infer argv
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.child is not None:
        return child(json.loads(args.child))
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as err:
        p.error(str(err))
    if args.tile_batch < 1:
        p.error(f"--tile-batch must be >= 1; got {args.tile_batch}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1; got {args.threads}")
    if args.model is None and (args.native <= 0 or args.native % 32):
        p.error(f"--native must be a positive multiple of 32; got {args.native}")
    with tempfile.TemporaryDirectory(prefix="bench_tiles-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = Path(args.model) if args.model else None
        if model is None:
            model = workdir / f"random-{args.native}"
            if not model.exists():  # a kept --workdir reuses its checkpoint
                build_checkpoint(model, args.native)
        start = time.perf_counter()
        try:
            runs = [run_child(args, model, size, workdir) for size in sizes]
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        big, small = runs
        print(
            f"x{args.scale} by {big.tile} px tiles ({big.overlap} px overlap), {args.tile_batch} at a time, "
            f"model {args.model or 'tiny random'}; each image in a fresh process"
        )
        print(table(runs))
        print(f"flat part (peak - buffers), large / small: {big.flat / small.flat:.2f}")
        if small.tiles < args.tile_batch:
            print(
                f"note: the small image has {small.tiles} tiles, under one batch of {args.tile_batch}: "
                "its tile batch took less memory"
            )
        worst, usual = seam_figure(big)
        verdict = "no seam" if worst < SEAM_RATIO_OK * usual else "SEAMS"
        print(
            f"seams in the {big.output_size[0]}x{big.output_size[1]} output: worst mean step across a tile "
            f"overlap {worst:.2f}, elsewhere {usual:.2f} (ratio {worst / usual:.2f}: {verdict})"
        )
        print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

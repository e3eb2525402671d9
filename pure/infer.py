"""``python -m pure.infer``: restore images with a PURE model. See ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

import pure
from pure import viz
from pure.imageio import ImageLoadError, list_images, load_image, save_image, save_json
from pure.model import HUB_MODEL_ID, ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPILOG = f"""
examples:
  python -m pure.infer --input lq.png                       # {HUB_MODEL_ID} + LlamaGen VQ, writes lq_pure.png
  python -m pure.infer --input photos/ --output restored/ --vq vq_ds8_c2i.pt --batch-size 4
  python -m pure.infer --input lq.png --caption "A red brick wall with ivy."   # steer the restoration
  python -m pure.infer --input photo.jpg --scale 2          # any size: overlapping 512 px tiles, blended

Inputs of 128, 256 or 512 px square give a 512x512 restoration (x4, x2, x1); other sizes are resized to
512x512 (with a notice), unless tiling is on: --scale or --outscale always tiles (output = input size x
factor, aspect ratio kept); --tile alone tiles every input that is not a native square, at x1.
Each output PNG gets a JSON sidecar with the degradation estimate, the caption,
every sampling setting, the seed, the model identity and timings.
"""


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.infer",
        description="Restore real-world low-quality images with PURE: the model Perceives the degradation, "
        "Understands the content (a caption) and REstores a high-quality image token by token.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="an image file, a folder of images, or a glob pattern")
    io.add_argument(
        "--output",
        help="output PNG for one input (default: <input>_pure.png beside it); "
        "an output folder for several (default: ./outputs)",
    )
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    model = p.add_argument_group("model")
    model.add_argument(
        "--model", default=HUB_MODEL_ID, help=f"checkpoint folder or Hub id (default {HUB_MODEL_ID})"
    )
    model.add_argument(
        "--vq", help="VQ tokenizer: LlamaGen's vq_ds8_c2i.pt or a folder (default: <model>/vq)"
    )
    model.add_argument("--tokenizer", help="tokenizer.json overriding the checkpoint's own")
    model.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument(
        "--cfg", type=float, default=0.8, help="classifier-free guidance scale (default 0.8)"
    )
    sampling.add_argument(
        "--temperature", type=float, default=0.9, help="image-token temperature (default 0.9)"
    )
    sampling.add_argument(
        "--text-top-k", type=int, default=1, help="top-k for text tokens; 1 = greedy (default)"
    )
    sampling.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same output"
    )
    sampling.add_argument("--size", type=int, default=512, help="output side in px (default 512, as trained)")
    sampling.add_argument("--batch-size", type=int, default=1, help="images restored together (default 1)")
    sampling.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    sampling.add_argument(
        "--jacobi",
        type=int,
        nargs="?",
        const=16,
        default=0,
        metavar="N",
        help="speculative Jacobi decoding of the image, N tokens per forward (N default 16): fewer "
        "forward passes, same output distribution (same image when greedy)",
    )
    tiling = p.add_argument_group("any size and scale (tiled restoration, see pure.tiling)")
    tiling.add_argument(
        "--scale", type=int, choices=(1, 2, 4), help="output = input size x 1, 2 or 4, restored by tiles"
    )
    tiling.add_argument("--outscale", type=float, help="output = input size x any factor, restored by tiles")
    tiling.add_argument(
        "--tile",
        type=int,
        help="tile side in px (default --size); given alone, it tiles inputs that are not native squares",
    )
    tiling.add_argument("--tile-overlap", type=int, help="px shared by neighbouring tiles (default tile / 8)")
    tiling.add_argument("--tile-batch", type=int, default=4, help="tiles restored together (default 4)")
    pictures = p.add_argument_group("pictures (written beside each output)")
    pictures.add_argument(
        "--compare",
        action="store_true",
        help="<output>_compare.png: bicubic input | restored, with a zoomed crop",
    )
    pictures.add_argument(
        "--entropy-map",
        action="store_true",
        help="<output>_entropy.png: the entropy of every image token (what sets its top-k) as a heat map",
    )
    steer = p.add_argument_group("steering (use your text instead of the model's)")
    steer.add_argument(
        "--describe-only",
        action="store_true",
        help="only Perceive and Understand: print each image's degradation estimate and caption, no image",
    )
    steer.add_argument(
        "--caption",
        help='the image description, e.g. "A lion standing in tall grass."; or a .json file mapping '
        "file names (or stems) to per-image captions",
    )
    steer.add_argument(
        "--degradation",
        help='the degradation estimate, e.g. "Large blur, small noise."; or a .json file of per-image texts',
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def plan_outputs(inputs: list[Path], output: str | None, single: bool) -> list[tuple[Path, Path]]:
    if single:
        out = Path(output) if output else inputs[0].with_name(inputs[0].stem + "_pure.png")
        if out.suffix.lower() != ".png":
            raise CliError(f"--output must end in .png for a single input; got {out}")
        return [(inputs[0], out)]
    folder = Path(output or "outputs")
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--output must be a folder when restoring several images; {folder} is a file")
    names = [src.stem for src in inputs]
    if len(set(names)) != len(names):
        raise CliError("several inputs share a file name stem; restore them into separate --output folders")
    return [(src, folder / (src.stem + ".png")) for src in inputs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, none is half-written", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from pure.engine import SamplingConfig
    from pure.restorer import GRID_PX

    checks = (
        ("--cfg", args.cfg, 0),
        ("--temperature", args.temperature, 0),
        ("--text-top-k", args.text_top_k, 1),
    )
    for flag, value, low in checks:
        if not value >= low:  # also rejects NaN
            raise CliError(f"{flag} must be >= {low}; got {value}")
    if args.jacobi == 1 or args.jacobi < 0:
        raise CliError(f"--jacobi must be 0 (off) or a window of >= 2 tokens; got {args.jacobi}")
    sampling = SamplingConfig(
        cfg_scale=args.cfg,
        temperature=args.temperature,
        text_top_k=args.text_top_k,
        jacobi_window=args.jacobi,
    )
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.size <= 0 or args.size % GRID_PX:
        raise CliError(f"--size must be a positive multiple of {GRID_PX}; got {args.size}")
    check_tiling(args)
    try:
        inputs = list_images(args.input)
    except ImageLoadError as err:
        raise CliError(err) from None
    single = len(inputs) == 1 and Path(args.input).is_file()
    args.caption_for = per_image_texts(args.caption, "--caption")
    args.degradation_for = per_image_texts(args.degradation, "--degradation")
    if args.describe_only:
        return describe(args, inputs, sampling)
    jobs = plan_outputs(inputs, args.output, single)
    todo = [(src, dst) for src, dst in jobs if args.overwrite or not dst.exists()]
    skipped = len(jobs) - len(todo)
    if single and skipped:
        raise CliError(f"{jobs[0][1]} exists; pass --overwrite to replace it")
    if not todo:
        print(f"nothing to do: all {len(jobs)} outputs exist (pass --overwrite to redo them)")
        return 0
    for folder in sorted({dst.parent for _, dst in todo}):  # fail before hours of work, not after
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CliError(f"cannot create the output folder {folder}: {err.strerror or err}") from None

    restorer = load_restorer(args)

    failed: list[str] = []
    done = 0
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet or len(todo) == 1)
    for start in range(0, len(todo), args.batch_size):
        batch = []
        for src, dst in todo[start : start + args.batch_size]:
            try:
                batch.append((src, dst, load_image(src)))
            except ImageLoadError as err:
                failed.append(f"{src}: {err}")
                print(f"error: {src}: {err}", file=sys.stderr)
                bar.update(1)
        if not batch:
            continue
        try:
            results = restore_images(restorer, args, sampling, [(src, image) for src, _, image in batch])
        except ValueError as err:  # e.g. steering text that spells special tokens
            raise CliError(err) from None
        for (src, dst, image), result in zip(batch, results, strict=True):
            notices = [n for n in (image.info.get("pure_notice"),) if n] + result.notices
            for notice in notices:
                print(f"note: {src.name}: {notice}", file=sys.stderr)
            try:
                save_image(result.image, dst, overwrite=args.overwrite)
                save_json(
                    sidecar(src, dst, result, restorer, notices), dst.with_suffix(".json"), overwrite=True
                )
                for path, picture in pictures(args, dst, result):
                    save_image(picture, path, overwrite=True)
            except OSError as err:  # full disk, permissions, a file appearing meanwhile ...
                failed.append(f"{src}: {err}")
                print(f"error: {dst}: cannot write: {err.strerror or err}", file=sys.stderr)
                bar.update(1)
                continue
            done += 1
            bar.update(1)
            if single or args.quiet:
                continue
            tqdm.write(f"{src.name}: {result.degradation or '-'} {result.caption[:60]}")
    bar.close()
    if single and done:
        print(f"{todo[0][1]}: {results[0].degradation or '(no degradation sentence)'} {results[0].caption}")
    if len(jobs) > 1 or failed:
        print(f"restored {done}, skipped {skipped} existing, failed {len(failed)}")
    return 1 if failed else 0


def check_tiling(args: argparse.Namespace) -> None:
    """Validate the tiling options and fill in their defaults (tile = --size, overlap = tile / 8)."""
    from pure.restorer import GRID_PX

    if args.scale is not None and args.outscale is not None:
        raise CliError("give either --scale or --outscale, not both")
    if args.outscale is not None and not (0 < args.outscale < float("inf")):
        raise CliError(f"--outscale must be a positive number; got {args.outscale}")
    tile = args.size if args.tile is None else args.tile
    if tile <= 0 or tile % GRID_PX:
        raise CliError(f"--tile must be a positive multiple of {GRID_PX}; got {tile}")
    overlap = tile // 8 if args.tile_overlap is None else args.tile_overlap
    if not 0 <= overlap < tile:
        raise CliError(f"--tile-overlap must be >= 0 and smaller than the tile ({tile}); got {overlap}")
    if args.tile_batch < 1:
        raise CliError(f"--tile-batch must be >= 1; got {args.tile_batch}")
    args.tiling = args.scale is not None or args.outscale is not None or args.tile is not None
    args.tile, args.tile_overlap = tile, overlap


def uses_tiling(args: argparse.Namespace, image: Image.Image) -> bool:
    """--scale / --outscale: always; --tile alone: inputs that are not a native square (--size x 1, 1/2,
    1/4); otherwise never, so the default behaviour is the single 512 px restoration."""
    from pure.restorer import NATIVE_SCALES

    if args.scale is not None or args.outscale is not None:
        return True
    w, h = image.size
    native = w == h and args.size % w == 0 and args.size // w in NATIVE_SCALES
    return args.tiling and not native


def restore_images(
    restorer, args: argparse.Namespace, sampling, batch: list[tuple[Path, Image.Image]]
) -> list:
    """Restore one batch of loaded images: together at --size, or one by one by tiles (see uses_tiling)."""
    from pure.tiling import restore_tiled

    images = [image for _, image in batch]
    tiled = [uses_tiling(args, image) for image in images]
    whole = [src for (src, _), t in zip(batch, tiled, strict=True) if not t]
    results = iter(
        restorer.restore_batch(
            [image for image, t in zip(images, tiled, strict=True) if not t],
            sampling=sampling,
            seeds=[args.seed] * len(whole),
            captions=[args.caption_for(src) for src in whole],
            degradations=[args.degradation_for(src) for src in whole],
            color_fix=not args.no_color_fix,
            size=args.size,
            progress=not args.quiet,
        )
    )
    out = []
    for (src, image), t in zip(batch, tiled, strict=True):
        if not t:
            out.append(next(results))
            continue
        out.append(
            restore_tiled(
                restorer,
                image,
                scale=args.scale,
                outscale=args.outscale,
                tile=args.tile,
                overlap=args.tile_overlap,
                tile_batch=args.tile_batch,
                seed=args.seed,
                color_fix=not args.no_color_fix,
                sampling=sampling,
                progress=not args.quiet,
                caption=args.caption_for(src),
                degradation=args.degradation_for(src),
            )
        )
    return out


def per_image_texts(value: str | None, flag: str) -> Callable[[Path], str | None]:
    """``--caption``/``--degradation``: one text for every image, or a ``.json`` file of per-image texts
    (``{"photo.jpg": "A red brick wall.", ...}``, keyed by file name or stem; missing images get none)."""
    path = Path(value) if value else None
    if path is None or path.suffix.lower() != ".json" or not path.is_file():
        return lambda src: value
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"{flag} {path}: cannot read it as JSON ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise CliError(f'{flag} {path}: expected a JSON object of file name -> text, e.g. {{"a.png": "..."}}')
    return lambda src: mapping.get(src.name, mapping.get(src.stem))


def load_restorer(args: argparse.Namespace):
    from pure.restorer import PureRestorer

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    try:
        return PureRestorer.from_pretrained(
            args.model, vq=args.vq, tokenizer=args.tokenizer, device=args.device, dtype=DTYPES.get(args.dtype)
        )
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        raise CliError(err) from None


def describe(args: argparse.Namespace, inputs: list[Path], sampling) -> int:
    """``--describe-only``: one line per image, ``file: degradation | caption``; nothing is written."""
    restorer = load_restorer(args)
    failed = 0
    for src in inputs:
        try:
            image = load_image(src)
        except ImageLoadError as err:
            print(f"error: {src}: {err}", file=sys.stderr)
            failed += 1
            continue
        ((degradation, caption),) = restorer.describe([image], sampling, seeds=[args.seed], size=args.size)
        caption = " ".join(caption.split())  # one line per image, whatever the model wrote
        print(f"{src.name}: {degradation or '(no degradation sentence)'} | {caption}")
    return 1 if failed else 0


def pictures(args: argparse.Namespace, dst: Path, result) -> list[tuple[Path, Image.Image]]:
    """The optional pictures of one restoration, with their paths."""
    out = []
    if args.compare:
        panels = [("input (bicubic)", result.lq_upsampled), ("restored", result.image)]
        out.append((dst.with_name(dst.stem + "_compare.png"), viz.comparison(panels, focus=result.entropy)))
    if args.entropy_map:
        heat = viz.entropy_map(result.entropy, size=result.image.size)
        out.append((dst.with_name(dst.stem + "_entropy.png"), heat))
    return out


def sidecar(src: Path, dst: Path, result, restorer, notices: list[str]) -> dict:
    return {
        "input": str(src),
        "output": str(dst),
        "degradation": result.degradation,
        "caption": result.caption,
        "text": result.text,
        "seed": result.seed,
        "settings": result.settings,
        "model": restorer.identity,
        "timings": result.timings,
        "notices": notices,
        "pure_version": pure.__version__,
    }


if __name__ == "__main__":
    raise SystemExit(main())

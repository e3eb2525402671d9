"""``python -m pure.infer``: restore images with a PURE model. See ``--help``."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pure

INTERRUPTED = "interrupted; finished outputs are kept, none is half-written"

# torch and transformers take ~10 s to import: Ctrl-C meanwhile ends with the same one line as later
try:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from pure import distributed, viz
    from pure.decoding.config import SAMPLING_FILE, SamplingConfig
    from pure.imageio import ImageLoadError, check_writable, find_images, load_image, save_image, save_json
    from pure.model import HUB_MODEL_ID, ModelLoadError
    from pure.quant import QUANTIZE_MODES
    from pure.restorer import IMAGE_SIZE_KEY, ONE_THREAD_PARAMETERS
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported by a program: its Ctrl-C is its own
        raise
    print(INTERRUPTED, file=sys.stderr)
    raise SystemExit(130) from None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPILOG = f"""
examples:
  python -m pure.infer --input lq.png                       # {HUB_MODEL_ID} + LlamaGen VQ, writes lq_pure.png
  python -m pure.infer --input photos/ --output restored/ --vq vq_ds8_c2i.pt --batch-size 4
  python -m pure.infer --input lq.png --caption "A red brick wall with ivy."   # steer the restoration
  python -m pure.infer --input photo.jpg --scale 2          # any size: overlapping native-size tiles

The native size N is the checkpoint's (config.json "{IMAGE_SIZE_KEY}"; 512 for PURE). Inputs of N/4, N/2 or
N px square give an NxN restoration (x4, x2, x1: 128, 256, 512 px for PURE); other sizes are resized to
--size (with a notice), unless tiling is on: --scale or --outscale always tiles (output = input size x
factor, aspect ratio kept); --tile alone tiles every input that is not a native square, at x1.
Each output PNG gets a JSON sidecar with the degradation estimate, the caption,
every sampling setting, the seed, the model identity and timings.

exit codes:
  0    every input restored (or nothing left to do)
  1    some inputs failed (each has an error: line; the others were restored)
  2    usage or set-up error, before any work: a bad option, no model, an unwritable output folder
  130  interrupted (Ctrl-C): finished outputs are kept, none is half-written
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
    model.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of torch (default: OMP_NUM_THREADS if set, else 1 for a model under "
        f"{ONE_THREAD_PARAMETERS // 1_000_000} M parameters on a CPU, whose decoding more threads only slow "
        "down, and torch's one per core for a bigger one); the sidecar's timings say which",
    )
    model.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="capture the per-token image step with torch.compile: CUDA graphs on CUDA (ignored on CPU); "
        "with a BACKEND (e.g. inductor) on any device. The first image pays for it, the next ones reuse it",
    )
    model.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="weight-only quantisation of the decoder's linear layers, from the bf16 checkpoint (torchao: "
        'pip install -e ".[quant]"): int8 halves the weights (the 7B model fits a 16 GB card), int4 quarters '
        "them on CUDA",
    )
    sampling = p.add_argument_group(
        "sampling",
        f"Each setting not given is the checkpoint's, from its {SAMPLING_FILE} (PURE-tiny's: greedy, no "
        "guidance), else PURE's default named below. The sidecar records every setting used.",
    )
    default = SamplingConfig()
    sampling.add_argument(
        "--cfg", type=float, help=f"classifier-free guidance scale; 1 = none (PURE: {default.cfg_scale})"
    )
    sampling.add_argument(
        "--temperature", type=float, help=f"image-token temperature; 0 = greedy (PURE: {default.temperature})"
    )
    sampling.add_argument("--text-top-k", type=int, help="top-k for text tokens; 1 = greedy (PURE: 1)")
    sampling.add_argument(
        "--max-text-tokens",
        type=int,
        metavar="N",
        help="the model's answer text (degradation sentence and caption) is cut after N tokens and the image "
        f"starts (PURE: {default.max_text_tokens}); a cut text is marked in the sidecar (text_cut)",
    )
    sampling.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same output"
    )
    sampling.add_argument(
        "--size",
        type=int,
        help="output side in px (default: the checkpoint's native size, its config.json "
        f"{IMAGE_SIZE_KEY}; 512 for PURE, which names none)",
    )
    sampling.add_argument("--batch-size", type=int, default=1, help="images restored together (default 1)")
    sampling.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    sampling.add_argument(
        "--jacobi",
        type=int,
        nargs="?",
        const=16,
        metavar="N",
        help="speculative Jacobi decoding of the image, N tokens per forward (N default 16): fewer "
        "forward passes, same output distribution (same image when greedy)",
    )
    sampling.add_argument(
        "--row-lag",
        type=int,
        metavar="L",
        help="row-parallel decoding of the image (lossy, off by default): a grid row starts once the row "
        "above has L codes, and the rows advance together: about 64 L + 64 forwards at 512 px instead of "
        "4,161. An approximation (each code misses the part of the rows above that is not written yet); "
        "L >= the grid's width gives the normal image. With --jacobi N, each row advances by speculative "
        "windows of N: what --row-lag alone gives (the same image when greedy, the same distribution when "
        "sampling), in fewer forwards (a 7B model on a GPU at 512 px: N = 4 keeps each forward as cheap as "
        "one token's)",
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
    tiling.add_argument(
        "--tile-overlap",
        type=int,
        help="px shared by neighbouring tiles (default tile / 8, whole 8 px latents)",
    )
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
    p.add_argument("--version", action="version", version=f"%(prog)s {pure.__version__}")
    return p


# The command-line option that sets each `SamplingConfig` field (here and in ``python -m pure.eval``).
SAMPLING_OPTIONS = {
    "cfg_scale": "--cfg",
    "temperature": "--temperature",
    "text_top_k": "--text-top-k",
    "max_text_tokens": "--max-text-tokens",
    "jacobi_window": "--jacobi",
    "row_lag": "--row-lag",
}


def given_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The `SamplingConfig` fields the command line set (the options not given are ``None``)."""
    given = {field: getattr(args, option[2:].replace("-", "_")) for field, option in SAMPLING_OPTIONS.items()}
    return {field: value for field, value in given.items() if value is not None}


def sampling_config(**fields: Any) -> SamplingConfig:
    """``SamplingConfig(**fields)`` for a command line: its ``__post_init__`` stays the one place these
    values are checked, and its ValueError is raised again naming the option the user typed rather than
    the field (``--jacobi must be 0 (off) or >= 2 ...; got 1``, not ``jacobi_window must be ...``)."""
    try:
        return SamplingConfig(**fields)
    except ValueError as err:
        message = str(err)
        field, _, rest = message.partition(" ")
        if field in SAMPLING_OPTIONS and field in fields:
            message = f"{SAMPLING_OPTIONS[field]} {rest}"
        raise ValueError(message) from None


def plan_outputs(inputs: list[Path], output: str | None, single: bool) -> list[tuple[Path, Path]]:
    if single:
        out = Path(output) if output else inputs[0].with_name(inputs[0].stem + "_pure.png")
        if out.suffix.lower() != ".png":
            raise CliError(f"--output must end in .png for a single input; got {out}")
        return [(inputs[0], out)]
    folder = Path(output or "outputs")
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--output must be a folder when restoring several images; {folder} is a file")
    by_stem: dict[str, list[Path]] = {}
    for src in inputs:
        by_stem.setdefault(src.stem, []).append(src)
    clashes = [" and ".join(str(src) for src in group) for group in by_stem.values() if len(group) > 1]
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise CliError(
            f"inputs that share a file name stem would write one output: {'; '.join(clashes[:3])}{more}; "
            "restore them into separate --output folders"
        )
    return [(src, folder / (src.stem + ".png")) for src in inputs]


def per_file(src: Path, message: str) -> str:
    """``src: message``, unless the message names the file first already (pure.imageio's errors do)."""
    return message if message.startswith(f"{src}:") else f"{src}: {message}"


def shorten(text: str, width: int = 60) -> str:
    """``text`` on one line, at most ``width`` characters, or cut between words and ended with " ..."."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return (text[: width + 1].rsplit(" ", 1)[0] or text[:width]) + " ..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        distributed.finish()  # the process group of a torchrun command, if it started one


def run(args: argparse.Namespace) -> int:
    from pure.restorer import GRID_PX

    try:
        sampling_config(**given_sampling(args))  # the values typed, checked before any work
    except ValueError as err:
        raise CliError(err) from None
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1; got {args.threads}")
    if args.size is not None and (args.size <= 0 or args.size % GRID_PX):
        raise CliError(f"--size must be a positive multiple of {GRID_PX}; got {args.size}")
    check_tiling(args)
    resolve_sizes(args, native=None)  # what --size already settles, before hours of work
    try:
        listing = find_images(args.input)
    except ImageLoadError as err:
        raise CliError(err) from None
    inputs = listing.images
    single = len(inputs) == 1 and Path(args.input).is_file()
    args.caption_for = per_image_texts(args.caption, "--caption")
    args.degradation_for = per_image_texts(args.degradation, "--degradation")
    try:
        ranks = distributed.Ranks.from_env()  # under torchrun: this process's share of the images
    except ValueError as err:
        raise CliError(err) from None
    args.device = ranks.device(args.device)
    args.quiet = args.quiet or not ranks.is_main  # one set of progress bars
    # named like images but no files (a folder "x.png", a broken link): a line each, counted as failed
    not_files = [per_file(path, why) for path, why in listing.not_files] if ranks.is_main else []
    for line in not_files:
        print(f"error: {line}", file=sys.stderr)
    if args.describe_only:
        return max(describe(args, ranks.shard(inputs)), 1 if not_files else 0)
    jobs = plan_outputs(inputs, args.output, single)
    mine = ranks.shard(jobs)  # of the whole list, before anything is written: the same split on every rank
    todo = [(src, dst) for src, dst in mine if args.overwrite or not dst.exists()]
    skipped = len(mine) - len(todo)
    if single and skipped:
        raise CliError(f"{jobs[0][1]} exists; pass --overwrite to replace it")
    if not ranks.sum(len(todo)):
        if not_files:
            print(f"restored 0, skipped {len(jobs)} existing, failed {len(not_files)}")
            return 1
        if ranks.is_main:
            print(f"nothing to do: all {len(jobs)} outputs exist (pass --overwrite to redo them)")
        return 0
    for folder in sorted({dst.parent for _, dst in todo}):  # fail before hours of work, not after
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CliError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
        try:
            check_writable(folder)
        except OSError as err:
            raise CliError(f"cannot write into the output folder {folder}: {err.strerror or err}") from None

    restorer = load_restorer(args)
    resolve_sizes(args, native=restorer.image_size)
    sampling = checkpoint_sampling(restorer, args)

    failed: list[str] = list(not_files)
    done = 0
    summary = ""  # the single-file summary line

    def fail(src: Path, message: str) -> None:
        failed.append(per_file(src, message))
        print(f"error: {failed[-1]}", file=sys.stderr)
        bar.update(1)

    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet or len(todo) == 1)
    tokens = TokenBar(disable=args.quiet, below=not bar.disable)
    for start in range(0, len(todo), args.batch_size):
        batch = []
        for src, dst in todo[start : start + args.batch_size]:
            try:
                batch.append((src, dst, load_image(src)))
            except ImageLoadError as err:
                fail(src, str(err))
        whole = [item for item in batch if not uses_tiling(args, item[2])]
        tiled = [item for item in batch if uses_tiling(args, item[2])]
        # whole images restore together; a tiled image is restored and written before the next one starts,
        # so at most one output canvas is held however large --batch-size is
        outcomes = itertools.chain(
            zip(whole, restore_whole(restorer, args, sampling, whole, tokens), strict=True),
            ((item, restore_one_tiled(restorer, args, sampling, item, tokens)) for item in tiled),  # lazily
        )
        for (src, dst, image), result in outcomes:
            error = str(result) if isinstance(result, Exception) else None
            if error and single:
                raise CliError(error)
            error = error or write_outputs(args, restorer, src, dst, image, result)
            if error:  # this file only: the run goes on with the others
                fail(src, error)
            else:
                done += 1
                bar.update(1)
                if single:
                    summary = f"{dst}: {result.degradation or '(no degradation sentence)'} {result.caption}"
                elif not args.quiet:
                    tqdm.write(f"{src.name}: {result.degradation or '-'} {shorten(result.caption)}")
            del result  # a tiled output is big: let it go before the next one is restored
    tokens.close()
    bar.close()
    done, skipped = ranks.sum(done), ranks.sum(skipped)
    failed = [line for rank_failed in ranks.gather(failed) for line in rank_failed]
    if summary:
        print(summary)
    if ranks.is_main and (len(jobs) > 1 or failed):
        print(f"restored {done}, skipped {skipped} existing, failed {len(failed)}")
    return 1 if failed else 0


# What restoring one image may raise that is that image's fault or too big for this machine, not the run's:
# steering text spelling special tokens, an output over tiling's size cap, running out of (device) memory.
PER_IMAGE_ERRORS = (ValueError, RuntimeError, MemoryError)


# Where a non-square input was squashed to the native square, the options that would have kept its shape.
SHAPE_HINT = " (--scale 2|4 or --outscale F restore it by tiles and keep its shape)"


def write_outputs(args: argparse.Namespace, restorer, src: Path, dst: Path, image, result) -> str | None:
    """Write one restoration, its sidecar and pictures, with the notices; the error message on failure."""
    from pure.restorer import ASPECT_NOT_KEPT

    notices = [n for n in (image.info.get("pure_notice"),) if n] + result.notices
    for notice in notices:
        hint = SHAPE_HINT if notice.endswith(ASPECT_NOT_KEPT) else ""
        print(f"note: {src.name}: {notice}{hint}", file=sys.stderr)
    try:
        save_image(result.image, dst, overwrite=args.overwrite)
        save_json(sidecar(src, dst, result, restorer, notices), dst.with_suffix(".json"), overwrite=True)
        for path, picture in pictures(args, dst, result):
            save_image(picture, path, overwrite=True)
    except OSError as err:  # full disk, permissions, a file appearing meanwhile ...
        return f"cannot write {dst}: {err.strerror or err}"
    return None


class TokenBar:
    """The second bar, under the one over images: the image tokens of the batch or tiled image being
    restored (a 512 px image is 4096 of them), fed by ``restore_batch``'s progress callback."""

    def __init__(self, disable: bool, below: bool):
        """``below``: under the images bar (its second line), else on the first line."""
        self.disable = disable
        self.position = 1 if below else 0
        self.bar = None  # drawn at the first start: no empty bar when nothing is decoded

    def start(self, total: int, what: str) -> None:
        if self.bar is None:
            self.bar = tqdm(unit="tok", leave=False, position=self.position, disable=self.disable)
        self.bar.reset(total=total)
        self.bar.set_description(what, refresh=False)

    def __call__(self, tokens: int) -> None:
        self.bar.update(tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_tiling(args: argparse.Namespace) -> None:
    """Validate the tiling options given; their defaults follow the model (see :func:`resolve_sizes`)."""
    from pure.restorer import GRID_PX

    if args.scale is not None and args.outscale is not None:
        raise CliError("give either --scale or --outscale, not both")
    if args.outscale is not None and not (0 < args.outscale < float("inf")):
        raise CliError(f"--outscale must be a positive number; got {args.outscale}")
    if args.tile is not None and (args.tile <= 0 or args.tile % GRID_PX):
        raise CliError(f"--tile must be a positive multiple of {GRID_PX}; got {args.tile}")
    if args.tile_overlap is not None and args.tile_overlap < 0:
        raise CliError(f"--tile-overlap must be >= 0; got {args.tile_overlap}")
    if args.tile_batch < 1:
        raise CliError(f"--tile-batch must be >= 1; got {args.tile_batch}")
    args.tiling = args.scale is not None or args.outscale is not None or args.tile is not None


def resolve_sizes(args: argparse.Namespace, native: int | None) -> None:
    """Fill in --size (the checkpoint's ``native`` size), --tile (--size) and --tile-overlap (tile / 8, see
    :func:`pure.tiling.default_overlap`); a no-op while --size is neither given nor known (``native`` None).
    Run once before the model loads (to fail early on what --size settles) and once after."""
    from pure.tiling import default_overlap

    size = args.size if args.size is not None else native
    if size is None:
        return
    tile = size if args.tile is None else args.tile
    overlap = default_overlap(tile) if args.tile_overlap is None else args.tile_overlap
    if not 0 <= overlap < tile:
        raise CliError(f"--tile-overlap must be >= 0 and smaller than the tile ({tile}); got {overlap}")
    args.size, args.tile, args.tile_overlap = size, tile, overlap


def uses_tiling(args: argparse.Namespace, image: Image.Image) -> bool:
    """--scale / --outscale: always; --tile alone: inputs that are not a native square (--size x 1, 1/2,
    1/4); otherwise never, so the default behaviour is the single restoration at --size."""
    from pure.restorer import is_native_input

    if args.scale is not None or args.outscale is not None:
        return True
    return args.tiling and not is_native_input(image.size, args.size)


Job = tuple[Path, Path, Image.Image]  # input, output, the loaded image


def restore_whole(restorer, args: argparse.Namespace, sampling, items: list[Job], tokens: TokenBar) -> list:
    """Restore whole images together at --size: a result or, for a failed image, its exception, in order.

    When the batch fails, each image is retried alone, so one image's error (its steering text, say) does
    not fail its batch neighbours.
    """
    latents = (args.size // restorer.vq.config.downsample) ** 2

    def restore(chunk):
        tokens.start(len(chunk) * latents, "image tokens" if len(chunk) > 1 else f"{chunk[0][0].name} tokens")
        return restorer.restore_batch(
            [image for _, _, image in chunk],
            sampling=sampling,
            seeds=[args.seed] * len(chunk),
            captions=[args.caption_for(src) for src, _, _ in chunk],
            degradations=[args.degradation_for(src) for src, _, _ in chunk],
            color_fix=not args.no_color_fix,
            size=args.size,
            progress=tokens,
        )

    if not items:
        return []
    try:
        return restore(items)
    except PER_IMAGE_ERRORS as err:
        if len(items) == 1:
            return [err]
    out = []
    for item in items:
        try:
            out.extend(restore([item]))
        except PER_IMAGE_ERRORS as err:
            out.append(err)
    return out


def restore_one_tiled(restorer, args: argparse.Namespace, sampling, item: Job, tokens: TokenBar):
    """Restore one image by tiles (see :mod:`pure.tiling`): its result, or the exception that stopped it."""
    from pure.tiling import count_tiles, restore_tiled

    src, _, image = item
    try:
        tiles = count_tiles(image.size, args.tile, args.tile_overlap, args.scale, args.outscale)
        latents = (args.tile // restorer.vq.config.downsample) ** 2
        tokens.start(tiles * latents, f"{src.name} tokens ({tiles} tiles)")
        return restore_tiled(
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
            caption=args.caption_for(src),
            degradation=args.degradation_for(src),
            token_progress=tokens,
        )
    except PER_IMAGE_ERRORS as err:
        return err


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


def load_restorer(args: argparse.Namespace, error: type[Exception] = CliError):
    """The restorer the options ``--model --vq --tokenizer --device --dtype --compile --quantize`` name; a
    model that cannot be loaded raises ``error`` with the reason (this CLI's and ``pure.eval``'s own error
    types)."""
    from pure.restorer import PureRestorer

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    try:
        return PureRestorer.from_pretrained(
            args.model,
            vq=args.vq,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=DTYPES.get(args.dtype) if args.dtype else None,
            compile=args.compile,
            quantize=getattr(args, "quantize", None),
            threads=getattr(args, "threads", None) or "auto",
        )
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        raise error(str(err)) from None


def checkpoint_sampling(restorer, args: argparse.Namespace) -> SamplingConfig:
    """The checkpoint's decoding defaults (``restorer.sampling``) with the options the user gave over them."""
    try:
        return sampling_config(**{**asdict(restorer.sampling), **given_sampling(args)})
    except ValueError as err:  # a combination the two make together, e.g. a lag with the file's window
        raise CliError(err) from None


def describe(args: argparse.Namespace, inputs: list[Path]) -> int:
    """``--describe-only``: one line per image, ``file: degradation | caption``; nothing is written."""
    from pure.restorer import text_notices

    restorer = load_restorer(args)
    resolve_sizes(args, native=restorer.image_size)
    sampling = checkpoint_sampling(restorer, args)
    failed = 0
    for src in inputs:
        try:
            image = load_image(src)
        except ImageLoadError as err:
            print(f"error: {per_file(src, str(err))}", file=sys.stderr)
            failed += 1
            continue
        (answer,) = restorer.describe_answers([image], sampling, seeds=[args.seed], size=args.size)
        for notice in text_notices(answer.text_cut, sampling):
            print(f"note: {src.name}: {notice}", file=sys.stderr)
        caption = " ".join(answer.caption.split())  # one line per image, whatever the model wrote
        print(f"{src.name}: {answer.degradation or '(no degradation sentence)'} | {caption}")
    return 1 if failed else 0


# Long side of the --compare / --entropy-map pictures at most: a comparison holds its panels twice (row and
# zoomed crops) plus float maps, so a full-size one of a big tiled output would take several times its memory.
PICTURE_MAX_SIDE = 2048


def pictures(args: argparse.Namespace, dst: Path, result) -> list[tuple[Path, Image.Image]]:
    """The optional pictures of one restoration, with their paths (at most PICTURE_MAX_SIDE px long)."""
    out = []
    size = result.image.size
    if max(size) > PICTURE_MAX_SIDE:
        ratio = PICTURE_MAX_SIDE / max(size)
        size = (max(1, round(size[0] * ratio)), max(1, round(size[1] * ratio)))
    if args.compare:
        panels = [
            (label, image if image.size == size else image.resize(size, Image.BICUBIC))
            for label, image in (("input (bicubic)", result.lq_upsampled), ("restored", result.image))
        ]
        out.append((dst.with_name(dst.stem + "_compare.png"), viz.comparison(panels, focus=result.entropy)))
    if args.entropy_map:
        heat = viz.entropy_map(result.entropy, size=size)
        out.append((dst.with_name(dst.stem + "_entropy.png"), heat))
    return out


def sidecar(src: Path, dst: Path, result, restorer, notices: list[str]) -> dict:
    return {
        "input": str(src),
        "output": str(dst),
        "degradation": result.degradation,
        "caption": result.caption,
        "text": result.text,
        "text_cut": result.text_cut,  # the text reached --max-text-tokens and was cut there
        "seed": result.seed,
        "settings": result.settings,
        "model": restorer.identity,
        "timings": result.timings,
        "notices": notices,
        "pure_version": pure.__version__,
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pure.data.pairs``: a folder of HQ images -> aligned HQ crops, degraded LQ images, parameters.

For every readable source image of ``--hq`` and every crop index ``k < --crops-per-image``::

    OUT/hq/NAME.png       the HQ crop, --crop x --crop px (PURE: 512)
    OUT/lq/NAME.png       its degradation, (--crop / --scale) px (PURE: 128), made by `degrade`
    OUT/params/NAME.json  the record (see `pair_record`): source file and crop box, the exact
                          `DegradationParams`, the degradation label text and its blur / noise scores

with ``NAME = <source stem>_<k:03d>`` (stems that collide are told apart, see `pair_names`). Everything
about a pair (crop position and degradation) is drawn from a generator seeded by ``(--seed, source file,
k)`` alone (the file's path relative to the sources' folder: its name for a flat folder; a glob such as
``'LSDIR/HR/**/*.png'`` reads subfolders), so a rerun, a resume or a different ``--workers`` writes
byte-identical files; the recorded parameters replay the LQ exactly (`apply_degradation(hq, params)`).

Bad input: unreadable, truncated or corrupt files and images smaller than ``--crop`` on a side are
skipped with the reason printed and counted in the summary (also written to ``OUT/pairs_summary.json``).

Resume: each file is written atomically (`atomic_write`) and the JSON record last, so a pair whose record
exists is complete and is skipped; anything else of an interrupted pair is rewritten (identically). The
arguments that decide the content are stored in ``OUT/pairs_config.json``; a rerun with different ones
is refused rather than mixing two kinds of pairs in one folder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pure.data.degradations import DegradationConfig, DegradationParams, degrade
from pure.data.labels import degradation_scores, label_from_scores
from pure.imageio import ImageLoadError, atomic_write, list_images, load_image, save_json
from pure.vq import to_rgb

HQ_DIR, LQ_DIR, PARAMS_DIR = "hq", "lq", "params"
CONFIG_FILE = "pairs_config.json"
SUMMARY_FILE = "pairs_summary.json"
PNG_COMPRESS_LEVEL = 1
_SEED_BITS = 63
FLIP_PROBABILITY = 0.5


@dataclass(frozen=True)
class PairSettings:
    """What decides the content of a pair folder (stored in ``pairs_config.json``)."""

    preset: str = "realesrgan"
    scale: int = 4
    crop: int = 512
    crops_per_image: int = 1
    seed: int = 0
    flip: bool = False
    """Mirror each crop left-right with probability 1/2 (augmentation for small source sets)."""

    def __post_init__(self) -> None:
        if self.scale not in (1, 2, 4):
            raise ValueError(f"--scale must be 1, 2 or 4; got {self.scale}")
        if self.crop < 8 or self.crop % self.scale:
            raise ValueError(
                f"--crop must be at least 8 and divisible by --scale {self.scale}; got {self.crop}"
            )
        if self.crops_per_image < 1:
            raise ValueError(f"--crops-per-image must be at least 1; got {self.crops_per_image}")

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "scale": self.scale,
            "crop": self.crop,
            "crops_per_image": self.crops_per_image,
            "seed": self.seed,
            "flip": self.flip,
        }


@dataclass
class ImageResult:
    """What happened to one source image: pairs written now, pairs already there, or why it was skipped."""

    source: str
    written: int = 0
    existing: int = 0
    skipped: str | None = None
    notices: list[str] = field(default_factory=list)


def pair_seed(seed: int, source_key: str, crop_index: int) -> int:
    """The generator seed of one pair: a hash of (seed, source key, crop index), 63 bits."""
    digest = hashlib.sha256(f"{seed}\0{source_key}\0{crop_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - _SEED_BITS)


def pair_names(sources: list[Path]) -> dict[Path, tuple[str, str]]:
    """Source file -> (its key, the name base of its pairs).

    The key is the path relative to the sources' common folder (the file name for one folder); it seeds
    the pairs and is recorded as ``source``. The name base is the file's stem, made unique where stems
    collide by the folders of its key (``a/x.png`` -> ``a_x``) and, if needed, its extension (``x_jpg``).
    Names depend on the whole set of sources: keep the source folder as it is between runs.
    """
    root = Path(os.path.commonpath([p.parent.resolve() for p in sources])) if sources else Path()
    keys = {p: p.resolve().relative_to(root).as_posix() for p in sources}
    stems = Counter(p.stem for p in sources)
    bases = {
        p: p.stem if stems[p.stem] == 1 else keys[p].rsplit(".", 1)[0].replace("/", "_") for p in sources
    }
    counts = Counter(bases.values())
    bases = {p: b if counts[b] == 1 else f"{b}_{p.suffix.lstrip('.').lower()}" for p, b in bases.items()}
    return {p: (keys[p], bases[p]) for p in sources}


def crop_name(base: str, crop_index: int) -> str:
    return f"{base}_{crop_index:03d}"


def random_crop_box(width: int, height: int, crop: int, generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a ``crop`` x ``crop`` box, uniform over the image; the image must be large enough."""
    top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    return top, left


def make_pair(
    image: Image.Image,
    config: DegradationConfig,
    settings: PairSettings,
    source_key: str,
    crop_index: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One pair from a decoded RGB image: HQ crop (crop, crop, 3) uint8, LQ (crop/s, crop/s, 3) uint8 and
    the record (without file paths). Deterministic given (settings.seed, source_key, crop_index)."""
    generator = torch.Generator().manual_seed(pair_seed(settings.seed, source_key, crop_index))
    width, height = image.size
    top, left = random_crop_box(width, height, settings.crop, generator)
    hq = np.array(
        np.asarray(image)[top : top + settings.crop, left : left + settings.crop]
    )  # (crop, crop, 3)
    flipped = settings.flip and bool(torch.rand((), generator=generator) < FLIP_PROBABILITY)
    if flipped:
        hq = hq[:, ::-1]
    hq_tensor = torch.from_numpy(np.ascontiguousarray(hq)).permute(2, 0, 1).float() / 255.0  # (3, crop, crop)
    lq_tensor, (params,) = degrade(hq_tensor[None].to(device), config, generator, settings.scale)
    lq = (lq_tensor[0].cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return (
        np.ascontiguousarray(hq),
        np.ascontiguousarray(lq),
        pair_record(params, source_key, crop_index, top, left, settings, flipped),
    )


def pair_record(
    params: DegradationParams,
    source: str,
    crop_index: int,
    top: int,
    left: int,
    settings: PairSettings,
    flipped: bool = False,
) -> dict:
    """The JSON record of a pair (``params/NAME.json``)::

    {"source": file name, "crop_index": k, "crop": {"top", "left", "size", "flipped"}, "seed": --seed,
     "scale": s, "label": "Medium blur, small noise.", "blur_score": [0, 1], "noise_score": [0, 1],
     "params": DegradationParams.to_dict()}

    `pairs_folder` adds ``"id"``, ``"hq"`` and ``"lq"`` (paths relative to the pair folder).
    """
    blur_score, noise_score = degradation_scores(params)
    return {
        "source": source,
        "crop_index": crop_index,
        "crop": {"top": top, "left": left, "size": settings.crop, "flipped": flipped},
        "seed": settings.seed,
        "scale": settings.scale,
        "label": label_from_scores(blur_score, noise_score),
        "blur_score": blur_score,
        "noise_score": noise_score,
        "params": params.to_dict(),
    }


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes. zlib level 1: 4x faster than Pillow's default 6 (which is about half
    of a 512 px pair's time on one core) for files about 20% larger; lossless either way."""
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), overwrite=True)


def _is_complete(out: Path, name: str) -> bool:
    return all(
        (out / sub / f"{name}{ext}").is_file()
        for sub, ext in ((PARAMS_DIR, ".json"), (HQ_DIR, ".png"), (LQ_DIR, ".png"))
    )


def process_image(
    source: Path, key: str, base: str, out: Path, settings: PairSettings, device: str = "cpu"
) -> ImageResult:
    """All crops of one source image (`key`, `base` from `pair_names`); complete pairs are left alone."""
    result = ImageResult(source=key)
    names = [crop_name(base, k) for k in range(settings.crops_per_image)]
    todo = [k for k, name in enumerate(names) if not _is_complete(out, name)]
    result.existing = len(names) - len(todo)
    if not todo:
        return result
    try:
        image = load_image(source)
    except ImageLoadError as err:
        result.skipped = str(err)
        return result
    if image.info.get("pure_notice"):
        result.notices.append(f"{key}: {image.info['pure_notice']}")
    image = to_rgb(image)  # transparency blended onto white, as everywhere else in PURE
    width, height = image.size
    if min(width, height) < settings.crop:
        result.skipped = (
            f"{source}: image is {width}x{height} px, smaller than the {settings.crop} px crop; "
            "use a smaller --crop or larger images"
        )
        return result
    config = _config(settings.preset)
    for k in todo:
        hq, lq, record = make_pair(image, config, settings, key, k, device)
        name = names[k]
        record = {
            "id": name,
            "hq": f"{HQ_DIR}/{name}.png",
            "lq": f"{LQ_DIR}/{name}.png",
            **record,
        }
        _write_bytes(out / HQ_DIR / f"{name}.png", png_bytes(hq))
        _write_bytes(out / LQ_DIR / f"{name}.png", png_bytes(lq))
        save_json(record, out / PARAMS_DIR / f"{name}.json", overwrite=True)  # last: marks the pair complete
        result.written += 1
    return result


_CONFIGS: dict[str, DegradationConfig] = {}


def _config(preset: str) -> DegradationConfig:
    if preset not in _CONFIGS:
        _CONFIGS[preset] = DegradationConfig.from_yaml(preset)
    return _CONFIGS[preset]


def _check_settings(out: Path, settings: PairSettings) -> None:
    """Refuse to mix pairs made with different settings in one folder; record them on the first run."""
    path = out / CONFIG_FILE
    wanted = settings.to_dict()
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != wanted:
            diff = ", ".join(
                f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v
            )
            raise ValueError(
                f"{out} holds pairs made with other settings ({diff}); rerun with the stored settings "
                f"(see {path}) or use a new --out"
            )
    else:
        save_json(wanted, path, overwrite=True)


def _init_worker() -> None:
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def _process_task(task: tuple[Path, str, str, Path, PairSettings, str]) -> ImageResult:
    return process_image(*task)


def make_pairs(
    hq: str | os.PathLike,
    out: str | os.PathLike,
    settings: PairSettings,
    workers: int = 1,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Make (or complete) a pair folder; returns the summary (also written to ``OUT/pairs_summary.json``).

    ``workers > 1`` runs that many processes, each taking whole source images; the output does not depend
    on it. Raises `ImageLoadError` when ``hq`` has no images and `ValueError` for bad settings.
    """
    from tqdm import tqdm

    out = Path(out)
    _config(settings.preset)  # fail on a bad preset before touching the output folder
    sources = list_images(hq)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    names = pair_names(sources)
    tasks = [(src, *names[src], out, settings, device) for src in sources]
    start = time.perf_counter()
    results: list[ImageResult] = []
    bar = tqdm(total=len(tasks), unit="img", desc="pairs", disable=not progress)

    def collect(results_iter: Iterator[ImageResult]) -> None:
        for result in results_iter:
            results.append(result)
            for notice in result.notices:
                bar.write(f"note: {notice}")
            if result.skipped:
                bar.write(f"skipped: {result.skipped}")
            bar.update(1)
            bar.set_postfix(pairs=sum(r.written + r.existing for r in results))

    try:
        if workers <= 1:
            collect(_process_task(t) for t in tasks)
        else:
            context = get_context("spawn")  # no fork of a process holding torch / OpenMP threads
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
            try:
                collect(pool.map(_process_task, tasks, chunksize=1))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on an interrupt: drop what has not started
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    summary = {
        **settings.to_dict(),
        "images": len(sources),
        "images_used": sum(1 for r in results if not r.skipped),
        "images_skipped": sum(1 for r in results if r.skipped),
        "pairs_written": sum(r.written for r in results),
        "pairs_existing": sum(r.existing for r in results),
        "pairs_total": sum(r.written + r.existing for r in results),
        "seconds": round(elapsed, 2),
        "skipped": [{"file": r.source, "reason": r.skipped} for r in results if r.skipped],
    }
    save_json(summary, out / SUMMARY_FILE, overwrite=True)
    return summary


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.data.pairs",
        description="Make degraded LQ/HQ training pairs from a folder of HQ images: random HQ crops, "
        "their Real-ESRGAN degradation, and a JSON record of the exact parameters and the degradation "
        "label per pair. Deterministic and resumable: rerun the same command after an interruption.",
    )
    parser.add_argument("--hq", required=True, help="folder (or glob) of HQ source images")
    parser.add_argument("--out", required=True, help="output folder: hq/, lq/, params/ are created in it")
    parser.add_argument(
        "--preset", default="realesrgan", help="degradation preset name or YAML path (default realesrgan)"
    )
    parser.add_argument("--scale", type=int, default=4, help="LQ is crop/scale px: 1, 2 or 4 (default 4)")
    parser.add_argument("--crop", type=int, default=512, help="HQ crop size in px (default 512)")
    parser.add_argument(
        "--crops-per-image", type=int, default=1, help="random crops per source image (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of crops and degradations (default 0)")
    parser.add_argument(
        "--flip", action="store_true", help="mirror each crop left-right with probability 1/2"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--device", default="cpu", help="torch device for the degradations, e.g. cuda (default cpu)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        settings = PairSettings(
            args.preset, args.scale, args.crop, args.crops_per_image, args.seed, args.flip
        )
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1; got {args.workers}")
        summary = make_pairs(args.hq, args.out, settings, workers=args.workers, device=args.device)
    except KeyboardInterrupt:
        print("interrupted: complete pairs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"pairs: {summary['pairs_total']} in {args.out} ({summary['pairs_written']} written now, "
        f"{summary['pairs_existing']} already there) from {summary['images_used']} of "
        f"{summary['images']} images; {summary['images_skipped']} skipped; {summary['seconds']:.1f} s"
    )
    for entry in summary["skipped"]:
        print(f"  skipped: {entry['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cut the raw RealSR (v3) and DRealSR (×4 test) downloads into StableSR-style test folders.

    python -m pure.eval.prepare realsr  "RealSR(V3)"  RealSR     # -> RealSR/gt/*.png, RealSR/lq/*.png
    python -m pure.eval.prepare drealsr DRealSR       DRealSR

Why: the PURE paper's RealSR / DRealSR numbers follow StableSR's test protocol, which scores 512 px GT
crops restored from 128 px LQ centre crops, not the full photographs. Scores on other crops (or on full
images) are not comparable to the reported row, so this module makes the crops once, reproducibly, in
the ``gt/`` + ``lq/`` layout (same stems) that ``python -m pure.eval`` pairs by stem.

Raw layouts read (the archives as their authors publish them):

    RealSR v3   RAW/Canon/Test/4/Canon_001_HR.png  RAW/Canon/Test/4/Canon_001_LR4.png
                RAW/Nikon/Test/4/Nikon_001_HR.png  RAW/Nikon/Test/4/Nikon_001_LR4.png
                (RAW may also be one such folder holding the *_HR.png / *_LR4.png pairs itself)
    DRealSR     RAW/Test_x4/test_HR/<name>_x4.png  RAW/Test_x4/test_LR/<name>_x1.png
                (RAW may also be Test_x4 itself, or hold Test_x4/Test_x4 as some archives unpack; the
                 ``_x1`` / ``_x4`` suffix is dropped from both names, whichever folder carries which)

Crop: one centre crop per pair. The LQ crop is the ``LQ_SIDE`` (128) px square at the centre of the LR
image (left = (w - 128) // 2, top = (h - 128) // 2); the GT crop is exactly the ``SCALE`` (4) times larger
box of the HR image, 512 px, so the pair stays aligned pixel for pixel. For LR images of even size this
is also the HR image's own centre crop.

Source of the protocol (StableSR publishes no cropping script; these are its statements and its files):

- StableSR paper (Wang et al., arXiv 2305.07015, IJCV 2024), Sec. 4.2, as quoted in IceClear/StableSR
  issue #65: the RealSR, DRealSR and DPED-iPhone test images are cropped "at the center to obtain
  patches with 128x128 resolution".
- IceClear/StableSR issue #65, the author's answer (2023-08-25): that 128 px crop is taken from the LR
  image and paired with a 512 px crop of the HR image, on the x4 data of both sets.
- The crops themselves: the Hub dataset ``Iceclear/StableSR-TestSets`` (``StableSR_testsets.zip``,
  folders ``RealSRVal_crop128/`` and ``DrealSRVal_crop128/``, each ``test_LR/`` + ``test_HR/``), which
  SeeSR's README points to for RealSR/DRealSR and OSEDiff's README says its benchmarks were "directly
  copied from". OSEDiff ships a copy (cswry/OSEDiff, ``preset/datasets/benchmark_{realsr,drealsr}/``):
  100 RealSR and 93 DRealSR pairs (`PROTOCOL_PAIRS`), LR 128 px and HR 512 px, the two files of a pair
  under one name. Measured on that copy (box-downscaled HR against LR, phase correlation): every pair
  but one DRealSR outlier is aligned within 0.1 LR px, so the GT crop is the 4x box of the LR crop
  (never half an LR pixel off, as an HR crop centred on its own would be for an odd LR side); and the LR
  is the real LR photo, not a downscaled GT crop (median PSNR between the two: 29 dB RealSR, 31 dB
  DRealSR).

So this module follows the released protocol: crop both images of the real pair, aligned. What no
source says is how an odd centre margin was rounded; this module floors it, so where an LR side has an
odd margin a crop here may sit one LR pixel away from the released one. Prefer the released crops when
you have them (as ``lq/`` = ``test_LR/`` and ``gt/`` = ``test_HR/``: their names already match), and use
this when you have the raw sets only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pure.imageio import ImageLoadError, list_images, load_image, save_image

LQ_SIDE = 128  # StableSR protocol: 128 px LQ centre crops ...
SCALE = 4  # ... of ×4 pairs, so 512 px GT crops
GT_SIDE = LQ_SIDE * SCALE
# Pairs in StableSR's released test sets (the x4 test splits of RealSR v3 and DRealSR, see above).
PROTOCOL_PAIRS = {"realsr": 100, "drealsr": 93}

REALSR_CAMERAS = ("Canon", "Nikon")
REALSR_TEST_DIR = ("Test", str(SCALE))  # RAW/<camera>/Test/4/
REALSR_HR_SUFFIX = "_HR"
REALSR_LR_SUFFIX = f"_LR{SCALE}"
REALSR_LAYOUT = (
    f"RAW/{{{','.join(REALSR_CAMERAS)}}}/Test/{SCALE}/*{REALSR_HR_SUFFIX}.png with *{REALSR_LR_SUFFIX}.png "
    "beside them (RealSR v3)"
)

DREALSR_TEST_DIR = f"Test_x{SCALE}"
DREALSR_HR_DIR, DREALSR_LR_DIR = "test_HR", "test_LR"
DREALSR_SUFFIX = re.compile(r"_x[1-9]$")  # DRealSR names end in _x1 (one focal length) or _x4 (another)
DREALSR_LAYOUT = (
    f"RAW/{DREALSR_TEST_DIR}/{DREALSR_HR_DIR}/*_x4.png and RAW/{DREALSR_TEST_DIR}/{DREALSR_LR_DIR}/*_x1.png "
    f"(DRealSR x{SCALE} test set)"
)


class PrepareError(ValueError):
    """A raw folder that is not laid out as expected, or a pair that cannot be cropped; one line."""


@dataclass(frozen=True)
class RawPair:
    """One HR / LR pair of a raw test set, under the stem both crops will be written as."""

    stem: str
    hr: Path
    lr: Path


def _images(folder: Path) -> list[Path]:
    try:
        return list_images(folder)
    except ImageLoadError:
        return []


def _pair_by_stem(hr: dict[str, Path], lr: dict[str, Path], what: str) -> list[RawPair]:
    """Pairs for the stems both sides have; an unmatched file on either side is an error (a partial
    download would otherwise give a silently smaller test set, and numbers not comparable to others)."""
    missing_lr, missing_hr = sorted(set(hr) - set(lr)), sorted(set(lr) - set(hr))
    if missing_lr or missing_hr:
        side, stems = ("LR", missing_lr) if missing_lr else ("HR", missing_hr)
        shown = ", ".join(stems[:5]) + (f" ... and {len(stems) - 5} more" if len(stems) > 5 else "")
        raise PrepareError(f"{what}: {len(stems)} image(s) have no {side} partner: {shown}")
    return [RawPair(stem, hr[stem], lr[stem]) for stem in sorted(hr)]


def _strip(path: Path, suffix: str) -> str | None:
    return path.stem[: -len(suffix)] if path.stem.endswith(suffix) else None


def find_realsr(raw: str | Path) -> list[RawPair]:
    """The ×4 test pairs of RealSR v3 under `raw` (see the module docstring), stems like ``Canon_001``.

    Raises:
        PrepareError: no Canon/Nikon ``Test/4`` folder and no ``*_HR.png`` in `raw` itself; an HR file
            without its LR4 file or the reverse; two files with one stem.
    """
    raw = Path(raw)
    folders = [raw.joinpath(camera, *REALSR_TEST_DIR) for camera in REALSR_CAMERAS]
    folders = [folder for folder in folders if folder.is_dir()]
    if not folders and any(_strip(p, REALSR_HR_SUFFIX) for p in _images(raw)):
        folders = [raw]  # RAW is one camera's Test/4 folder
    if not folders:
        raise PrepareError(f"{raw}: not a RealSR v3 folder; expected {REALSR_LAYOUT}")
    hr: dict[str, Path] = {}
    lr: dict[str, Path] = {}
    for folder in folders:
        for path in _images(folder):
            for suffix, side in ((REALSR_HR_SUFFIX, hr), (REALSR_LR_SUFFIX, lr)):
                stem = _strip(path, suffix)
                if stem is None:
                    continue
                if stem in side:
                    raise PrepareError(f"{side[stem]} and {path} give the same name {stem!r}")
                side[stem] = path
    if not hr:
        raise PrepareError(
            f"{raw}: no *{REALSR_HR_SUFFIX}.png in {', '.join(map(str, folders))}; expected {REALSR_LAYOUT}"
        )
    return _pair_by_stem(hr, lr, f"RealSR {raw}")


def find_drealsr(raw: str | Path) -> list[RawPair]:
    """The ×4 test pairs of DRealSR under `raw` (see the module docstring), ``_x1``/``_x4`` dropped.

    Raises:
        PrepareError: no ``test_HR`` + ``test_LR`` folders where expected, an empty one, an image without
            its partner, or a name without the ``_x<N>`` suffix.
    """
    raw = Path(raw)
    candidates = (raw, raw / DREALSR_TEST_DIR, raw / DREALSR_TEST_DIR / DREALSR_TEST_DIR)
    root = next(
        (c for c in candidates if (c / DREALSR_HR_DIR).is_dir() and (c / DREALSR_LR_DIR).is_dir()), None
    )
    if root is None:
        raise PrepareError(f"{raw}: not a DRealSR folder; expected {DREALSR_LAYOUT}")
    sides: list[dict[str, Path]] = []
    for name in (DREALSR_HR_DIR, DREALSR_LR_DIR):
        side: dict[str, Path] = {}
        files = _images(root / name)
        if not files:
            raise PrepareError(f"{root / name}: no image files; expected {DREALSR_LAYOUT}")
        for path in files:
            if not DREALSR_SUFFIX.search(path.stem):
                raise PrepareError(f"{path}: name does not end in _x1 or _x4; expected {DREALSR_LAYOUT}")
            stem = DREALSR_SUFFIX.sub("", path.stem)
            if stem in side:
                raise PrepareError(f"{side[stem]} and {path} give the same name {stem!r}")
            side[stem] = path
        sides.append(side)
    return _pair_by_stem(sides[0], sides[1], f"DRealSR {root}")


FINDERS: dict[str, Callable[[str | Path], list[RawPair]]] = {"realsr": find_realsr, "drealsr": find_drealsr}


def centre_crops(hr: Image.Image, lr: Image.Image, name: str) -> tuple[Image.Image, Image.Image]:
    """``(gt, lq)``: the `LQ_SIDE` px centre crop of `lr` and the aligned `GT_SIDE` px box of `hr`.

    Raises:
        PrepareError: `lr` is smaller than `LQ_SIDE`, or `hr` is not `SCALE` times `lr` (up to SCALE - 1 px
            of rounding), e.g. RealSR v1/v2, whose LR images were upsampled to the HR size.
    """
    (w, h), (big_w, big_h) = lr.size, hr.size
    if not (SCALE * w <= big_w < SCALE * (w + 1) and SCALE * h <= big_h < SCALE * (h + 1)):
        raise PrepareError(
            f"{name}: HR is {big_w}x{big_h} and LR {w}x{h}; expected HR = {SCALE} x LR (RealSR v3, DRealSR "
            f"x{SCALE}; RealSR v1/v2 store LR at the HR size and are not this protocol)"
        )
    if w < LQ_SIDE or h < LQ_SIDE:
        raise PrepareError(f"{name}: LR is {w}x{h}, smaller than the {LQ_SIDE} px crop of the protocol")
    left, top = (w - LQ_SIDE) // 2, (h - LQ_SIDE) // 2
    lq = lr.crop((left, top, left + LQ_SIDE, top + LQ_SIDE))
    gt = hr.crop((SCALE * left, SCALE * top, SCALE * left + GT_SIDE, SCALE * top + GT_SIDE))
    return gt.convert("RGB"), lq.convert("RGB")


def prepare(
    test_set: str,
    raw: str | Path,
    out: str | Path,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> int:
    """Write ``out/gt/<stem>.png`` and ``out/lq/<stem>.png`` for every pair of the raw `test_set`.

    Every pair is found and checked before the first file is written, and each file is written
    atomically, so a layout problem leaves nothing behind and an interrupted run leaves no torn image.

    Returns:
        The number of pairs written.

    Raises:
        PrepareError: unknown set, raw layout not as documented, a pair that cannot be cropped, or an
            output that exists without `overwrite`.
    """
    key = test_set.strip().lower().replace("-", "").replace("_", "")
    if key not in FINDERS:
        raise PrepareError(f"unknown test set {test_set!r}; choose from: {', '.join(FINDERS)}")
    pairs = FINDERS[key](raw)
    if len(pairs) != PROTOCOL_PAIRS[key]:
        log(
            f"warning: {raw} has {len(pairs)} {key} test pairs; StableSR's released set has "
            f"{PROTOCOL_PAIRS[key]}, so means over these are not comparable with the reported ones"
        )
    out = Path(out)
    targets = [(pair, out / "gt" / f"{pair.stem}.png", out / "lq" / f"{pair.stem}.png") for pair in pairs]
    if not overwrite:
        existing = [path for _, gt, lq in targets for path in (gt, lq) if path.exists()]
        if existing:
            raise PrepareError(f"{existing[0]} exists ({len(existing)} output(s) do); pass --overwrite")
    crops = []
    for pair, gt_path, lq_path in targets:  # read and crop everything first: fail before writing
        try:
            gt, lq = centre_crops(load_image(pair.hr), load_image(pair.lr), pair.stem)
        except ImageLoadError as err:
            raise PrepareError(str(err)) from err
        crops.append((gt, gt_path, lq, lq_path))
    for gt, gt_path, lq, lq_path in crops:
        save_image(gt, gt_path, overwrite=overwrite)
        save_image(lq, lq_path, overwrite=overwrite)
    log(f"wrote {len(crops)} pairs: {out / 'gt'} ({GT_SIDE} px) and {out / 'lq'} ({LQ_SIDE} px)")
    return len(crops)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.eval.prepare",
        description=f"Cut a raw RealSR v3 or DRealSR x{SCALE} test set into StableSR-protocol centre crops "
        f"({LQ_SIDE} px LQ, {GT_SIDE} px GT) as OUT/lq and OUT/gt with matching names, the layout "
        "python -m pure.eval scores.",
        epilog=f"""\
raw layouts expected:
  realsr   {REALSR_LAYOUT}
  drealsr  {DREALSR_LAYOUT}
           (names lose _HR/_LR{SCALE} or _x1/_x4, so OUT/gt/Canon_001.png pairs with OUT/lq/Canon_001.png)

crop: the {LQ_SIDE} px square at the centre of each LR image, and the {SCALE}x larger box of its HR
  image ({GT_SIDE} px), aligned pixel for pixel.

then:
  python -m pure.eval --model nonwhy/PURE --lq OUT/lq --gt OUT/gt --pred restored --out results --set SET
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("set", choices=sorted(FINDERS), help="which test set RAW holds")
    p.add_argument("raw", help="the raw download's folder (see below)")
    p.add_argument("out", help="output folder; gets gt/ and lq/")
    p.add_argument("--overwrite", action="store_true", help="replace crops already in OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args.set, args.raw, args.out, overwrite=args.overwrite)
    except (PrepareError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; crops already written are whole, rerun with --overwrite", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

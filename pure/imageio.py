"""Image reading and writing for a CLI that must never crash with a traceback.

`load_image` returns a fully decoded RGB or RGBA `PIL.Image.Image` with its EXIF orientation applied, or
raises `ImageLoadError` with one line that says what is wrong and, where possible, what to do. `save_image`
and `save_json` write atomically (temporary file in the same folder, fsync, rename), so a failed or
interrupted write never leaves a half-written output behind.

Conversions done by `load_image` (a notice is a short text the CLI can print; it is stored in
``image.info["pure_notice"]``, several notices joined by ``"; "``; a converted image keeps the file's mode in
``image.info["pure_source_mode"]``, so that later notices can name it: a palette file, not "RGBA"):

| input mode                        | result                                                  | notice |
|-----------------------------------|---------------------------------------------------------|--------|
| RGB                               | RGB                                                     | no     |
| RGBA                              | RGBA, alpha kept (callers decide how to blend)          | no     |
| L (grayscale), 1 (bilevel)        | RGB (1-bit: 0 -> black, 1 -> white)                     | no     |
| LA, La, PA, RGBa                  | RGBA                                                    | no     |
| P (palette)                       | RGBA if it has transparency, else RGB                   | no     |
| RGB / L with a transparent colour | RGBA                                                    | no     |
| RGBX, YCbCr                       | RGB                                                     | no     |
| CMYK                              | RGB, naive (no colour management)                       | yes    |
| I;16, I;16L, I;16B, I;16N         | RGB gray, round(v / 257) half up: 65535 -> 255,         | yes    |
|                                   | 32768 -> 128, 257 -> 1 (a scale, never a clip at 255)   |        |
| I (32-bit integer)                | values within 0..65535 (how older Pillow stored 16-bit  | yes    |
|                                   | files): as I;16; otherwise min..max stretched to 0..255 |        |
| F (32-bit float)                  | values within 0..1: round(v * 255); otherwise min..max  | yes    |
|                                   | stretched to 0..255 (NaN and inf -> 0 first)            |        |
| animated GIF / APNG / WebP,       | the first frame (page), then converted as above         | yes    |
| multi-page TIFF / MPO             |                                                         |        |
| LAB, HSV, other modes             | ImageLoadError: convert the file to RGB first           | --     |

ICC profiles are kept only where they still describe the RGB(A) result (RGB and palette inputs).

Errors (`ImageLoadError`, a `ValueError`): missing path, a folder, not a regular file, unreadable, zero bytes,
not an image, truncated or corrupt data, decompression bomb, smaller than `MIN_SIDE` px on a side, unsupported
mode. Size limits are checked from the header, before any pixel is decoded. PIL's global
``Image.MAX_IMAGE_PIXELS`` is never modified; PIL's own `DecompressionBombWarning` (more than
``Image.MAX_IMAGE_PIXELS`` = 89,478,485 px by default) is turned into an error for the duration of the
call, so a `max_pixels` above PIL's limit does not lift PIL's limit.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "NOTICE_KEY",
    "SOURCE_MODE_KEY",
    "ImageListing",
    "ImageLoadError",
    "atomic_write",
    "check_writable",
    "find_images",
    "list_images",
    "load_image",
    "save_image",
    "save_json",
]

# 64 MP = 8000 x 8000: above every consumer camera (a 61 MP full-frame sensor is 9504 x 6336), while one
# decoded RGBA copy stays <= 256 MB. PURE resizes every input to 512 x 512 anyway, so nothing useful is lost.
MAX_PIXELS: int = 64_000_000

# The VQ tokenizer downsamples by 8: a smaller side would not even give one latent code.
MIN_SIDE: int = 8

NOTICE_KEY = "pure_notice"
SOURCE_MODE_KEY = "pure_source_mode"

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

_SUFFIX_LIST = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
_GLOB_MAGIC = re.compile(r"[*?[]")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes Pillow converts to RGB(A) itself without losing anything worth a notice.
_RGBA_MODES = frozenset({"RGBA", "LA", "La", "PA", "RGBa"})
_PLAIN_MODES = frozenset({"RGB", "L", "1", "P", "RGBX", "YCbCr"}) | _RGBA_MODES
# Modes whose embedded ICC profile (if any) still describes the RGB(A) result.
_RGB_PROFILE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})


class ImageLoadError(ValueError):
    """A bad input image; the message is one line (newlines and runs of spaces are collapsed)."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s+", " ", message).strip())


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file as a fully decoded RGB or RGBA image.

    Args:
        path: the image file.
        max_pixels: largest accepted width * height, checked from the header before decoding.

    Returns:
        A detached (file closed) RGB or RGBA image, uint8 per channel, EXIF orientation applied, of size
        (W, H) with W, H >= `MIN_SIDE`. Lossy conversions (see the module docstring) leave a one-line text in
        ``image.info["pure_notice"]``.

    Raises:
        ImageLoadError: any problem with the file, with a one-line message naming the path.
        ValueError: `max_pixels` is not a positive integer.
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer; got {max_pixels!r}")
    path = Path(path)
    _check_regular_file(path)
    notices: list[str] = []
    try:
        fp = open(path, "rb")  # noqa: SIM115 -- closed by the `with` right below
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot open ({exc.strerror or exc}); check its permissions") from None
    # We own the file handle, so it is closed even when PIL raises half-way through Image.open.
    with fp, warnings.catch_warnings():
        # PIL's bomb warning becomes an error for this call only; the filter is restored on exit.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open_and_decode(fp, path, max_pixels, notices)
    image = _apply_exif_orientation(image, notices)
    source_mode = image.mode
    image = _to_rgb_or_rgba(image, path, notices)
    if image.mode != source_mode:
        image.info[SOURCE_MODE_KEY] = source_mode
    if notices:
        image.info[NOTICE_KEY] = "; ".join(notices)
    return image


def _check_regular_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file; check the path") from None
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot access ({exc.strerror or exc}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(f"{path}: is a folder, not an image file; pass the image files inside it")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or device would block or read garbage.
        raise ImageLoadError(f"{path}: not a regular file; pass an image file")
    if st.st_size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes); re-export or re-download it")


def _open_and_decode(fp: IO[bytes], path: Path, max_pixels: int, notices: list[str]) -> Image.Image:
    """Identify, check the header size, pick frame 0 and decode; returns an image detached from `fp`."""
    try:
        image = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image file Pillow can read; use one of: {_SUFFIX_LIST}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"{path}: refused as a possible decompression bomb ({exc}); downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{path}: corrupt image header ({exc}); re-export or re-download it") from None

    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{path}: image is {width}x{height} px = {width * height / 1e6:.1f} MP, over the limit of "
            f"{max_pixels / 1e6:.1f} MP (a guard against decompression bombs); downscale it first"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(
            f"{path}: image is {width}x{height} px; PURE needs at least {MIN_SIDE}x{MIN_SIDE}"
        )

    try:
        n_frames = getattr(image, "n_frames", 1)
        if n_frames > 1:
            image.seek(0)
            unit = "pages" if image.format in ("TIFF", "MPO") else "frames"
            kind = "multi-page" if unit == "pages" else "animated"
            notices.append(f"{kind} file: used the first of {n_frames} {unit}")
        image.load()
    except MemoryError:
        raise ImageLoadError(f"{path}: not enough memory to decode it; downscale it first") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"{path}: refused as a possible decompression bomb ({exc}); downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(
            f"{path}: image data is truncated or corrupt ({exc}); re-export or re-download it"
        ) from None
    # Pixels are in memory now (no mmap: PIL only maps files it opens by name); the copy drops the link to fp.
    return image.copy()


def _apply_exif_orientation(image: Image.Image, notices: list[str]) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        notices.append("unreadable EXIF orientation: used the image as stored")
        return image


def _to_rgb_or_rgba(image: Image.Image, path: Path, notices: list[str]) -> Image.Image:
    mode = image.mode
    if mode in ("RGB", "RGBA") and "transparency" not in image.info:
        return image
    if mode in _PLAIN_MODES:
        target = "RGBA" if mode in _RGBA_MODES or image.has_transparency_data else "RGB"
        converted = image.convert(target)
    elif mode == "CMYK":
        notices.append("CMYK image: converted to RGB without colour management; colours may shift")
        converted = image.convert("RGB")
    elif mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray, notice = _high_bit_depth_to_uint8(np.asarray(image), mode)
        notices.append(notice)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # (H, W, 3) uint8 -> RGB, no metadata
    else:
        raise ImageLoadError(
            f"{path}: unsupported colour mode {mode}; convert the image to RGB (e.g. PNG) first"
        )
    if mode not in _RGB_PROFILE_MODES:
        # A gray or CMYK ICC profile no longer describes the pixels, and PNG/WebP writers would embed it.
        converted.info.pop("icc_profile", None)
    return converted


def _high_bit_depth_to_uint8(values: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """(H, W) 16/32-bit values -> (H, W) uint8 and the notice that says how."""
    if mode == "F":
        v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if v.min() >= 0.0 and v.max() <= 1.0:
            return np.rint(v * 255.0).astype(np.uint8), "32-bit float image: scaled 0..1 to 0..255"
        return _stretch(v), "32-bit float image with values outside 0..1: stretched its min..max to 0..255"
    v = values.astype(np.int64)  # also normalises the byte order of I;16B
    if v.min() >= 0 and v.max() <= 65535:
        # Integer round-half-up of v * 255 / 65535 (= v / 257): exact, and 65535 lands on 255.
        gray = ((v * 255 + 32767) // 65535).astype(np.uint8)
        return gray, "16-bit image: scaled to 8 bits per channel (value / 257, rounded)"
    return _stretch(v.astype(np.float64)), "32-bit integer image: stretched its min..max to 0..255"


def _stretch(v: np.ndarray) -> np.ndarray:
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else 1.0  # a constant image becomes black rather than dividing by zero
    return np.rint((v - lo) * (255.0 / span)).astype(np.uint8)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (a caption's cache key; what made a shard set)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(
    path: str | os.PathLike[str], write_fn: Callable[[IO[bytes]], None], overwrite: bool = False
) -> None:
    """Write a file so that readers see either nothing (or the old file) or the complete new file.

    `write_fn` receives a binary file object opened on ``.{name}.tmp-{pid}-{random}`` in the destination
    folder; the data is fsynced and then renamed onto `path`. On any exception (including KeyboardInterrupt)
    the temporary file is removed and the exception propagates. Parent folders are created.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False (also if it appears while writing).
        IsADirectoryError: `path` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name to write")
    if not overwrite and path.exists():
        raise FileExistsError(_exists_message(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide, unlike mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create and remove a probe file in ``folder``, so that a folder outputs cannot be written to (read-only,
    no permission, a full disk's inode table) fails now, before any work is spent on what would go there.

    Raises:
        OSError: from creating or removing the probe.
    """
    probe = Path(folder) / f".pure-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    probe.unlink()


def _exists_message(path: Path) -> str:
    return f"{path} exists; pass --overwrite to replace it"


def _move_no_clobber(tmp: Path, path: Path) -> None:
    # A hard link fails if `path` appeared meanwhile, which os.replace would silently clobber.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(_exists_message(path)) from None
    except OSError:
        # Filesystem without hard links: check then rename (a tiny race window remains).
        if path.exists():
            raise FileExistsError(_exists_message(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (not possible on Windows or some filesystems)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_image(image: Image.Image, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Save `image` atomically (see `atomic_write`); the format comes from the suffix, PNG when there is none.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError: the suffix names no format Pillow can write.
        OSError: Pillow cannot write this mode in this format (e.g. RGBA as JPEG); nothing is left behind.
    """
    path = Path(path)
    image_format = _format_from_suffix(path)
    atomic_write(path, lambda f: image.save(f, format=image_format), overwrite=overwrite)


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if not suffix:
        return "PNG"
    image_format = Image.registered_extensions().get(suffix)
    if image_format is None or image_format not in Image.SAVE:
        raise ValueError(f"cannot write images with suffix {suffix!r}; use one of: {_SUFFIX_LIST}")
    return image_format


def save_json(obj: Any, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Write `obj` as indented UTF-8 JSON atomically (see `atomic_write`).

    Raises:
        TypeError: `obj` is not JSON-serialisable (raised before anything touches the disk).
        FileExistsError: `path` exists and `overwrite` is False.
    """
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


class ImageListing(NamedTuple):
    """What :func:`find_images` found: image files, and entries named like images that are not files."""

    images: list[Path]
    not_files: list[tuple[Path, str]]  # (entry, why it is no image file): a folder, a broken link, a FIFO


def list_images(path_or_dir_or_glob: str | os.PathLike[str]) -> list[Path]:
    """Expand a CLI input argument into image files.

    An existing file is returned as is (whatever its suffix: `load_image` will judge it). A folder gives
    its image files (suffix in `IMAGE_SUFFIXES`, any case; hidden files such as macOS ``._x.jpg`` skipped),
    sorted, not recursive. Anything else containing ``*``, ``?`` or ``[`` is a glob pattern (``**``
    recurses): its matching image files, sorted. Entries named like images that are not files (a folder
    ``x.png``, a broken symbolic link) are left out: :func:`find_images` lists them too.

    Raises:
        ImageLoadError: nothing found, with a one-line message.
    """
    images = find_images(path_or_dir_or_glob).images
    if not images:
        raise ImageLoadError(_nothing_found(path_or_dir_or_glob))
    return images


def find_images(path_or_dir_or_glob: str | os.PathLike[str]) -> ImageListing:
    """:func:`list_images`, and the entries it leaves out because they are named like images but are no files,
    each with a one-line reason, so that a caller can say what it skipped.

    Raises:
        ImageLoadError: nothing found, not even such an entry, with a one-line message.
    """
    path = Path(path_or_dir_or_glob)
    if path.is_file():
        return ImageListing([path], [])
    pattern = os.fspath(path_or_dir_or_glob)
    if path.is_dir():
        named = sorted(p for p in path.iterdir() if _named_like_image(p))
    elif _GLOB_MAGIC.search(pattern):
        named = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if _named_like_image(Path(p)))
    else:
        raise ImageLoadError(f"{path}: no such file or folder; check the path")
    listing = ImageListing(
        [p for p in named if p.is_file()], [(p, _not_a_file(p)) for p in named if not p.is_file()]
    )
    if not listing.images and not listing.not_files:
        raise ImageLoadError(_nothing_found(path_or_dir_or_glob))
    return listing


def _nothing_found(path_or_dir_or_glob: str | os.PathLike[str]) -> str:
    path = Path(path_or_dir_or_glob)
    if path.is_dir():
        return f"{path}: folder has no image files ({_SUFFIX_LIST})"
    if _GLOB_MAGIC.search(os.fspath(path_or_dir_or_glob)):
        return f"no image files ({_SUFFIX_LIST}) match {os.fspath(path_or_dir_or_glob)!r}"
    return f"{path}: no such file or folder; check the path"


def _named_like_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _not_a_file(path: Path) -> str:
    """Why an entry named like an image is not an image file, in a few words."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist); skipped"
    if path.is_dir():
        return "a folder named like an image, not an image file; skipped"
    return "not a regular file; skipped"

"""Builds a corpus of awkward and broken input images for the image-loading and CLI tests.

Not a test module: import it (``from bad_inputs import EXPECTED, make_bad_inputs``) and call `make_bad_inputs`
on a temporary folder. Everything is generated in code (nothing is downloaded) in well under a second.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (64, 48)  # (W, H) of every "ok" case, small so the whole corpus stays fast
BOMB_SIZE = (20_000, 20_000)  # 400 MP: over MAX_PIXELS and over twice PIL's own limit

# name -> "ok" (load_image succeeds, with a conversion documented in pure.imageio) or "error" (ImageLoadError)
EXPECTED: dict[str, str] = {
    "zero_byte.png": "error",
    "truncated.png": "error",
    "not_an_image.png": "error",
    "bomb.png": "error",
    "tiny_1x1.png": "error",
    "sixteen_bit.png": "ok",
    "palette.png": "ok",
    "palette_transparent.png": "ok",
    "cmyk.jpg": "ok",
    "grayscale.png": "ok",
    "rgba.png": "ok",
    "animated.gif": "ok",
    "exif_rotated.jpg": "ok",
}

# Pixels of sixteen_bit.png's first row that pin the 16 -> 8 bit rule: (x, 16-bit value).
SIXTEEN_BIT_PROBES = ((0, 0), (1, 257), (2, 32768), (3, 65535))
ANIMATED_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # frame 0 is red
EXIF_ORIENTATION = 6  # "rotate 90 degrees clockwise to display"
EXIF_MARKER = (slice(0, 16), slice(0, 16))  # (rows, cols) of the red block in the stored (unrotated) pixels


def make_bomb_png(path: Path, width: int, height: int) -> Path:
    """Write a valid, all-black 1-bit PNG of `width` x `height` px without ever holding it in memory.

    Each row is a filter byte plus ceil(width / 8) zero bytes; zlib squeezes 20000 x 20000 into about 50 KB.
    """
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    parts = [compressor.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
    parts.append(compressor.compress(row * (height % rows_per_chunk)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit gray, deflate, no filter/interlace
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    )
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_bad_inputs(folder: Path) -> dict[str, Path]:
    """Write one file per `EXPECTED` case into `folder` (created if needed); returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = SIZE
    rng = np.random.default_rng(0)
    paths = {name: folder / name for name in EXPECTED}

    paths["zero_byte.png"].write_bytes(b"")

    # Noise does not compress, so the cut lands inside the pixel data, not in the header.
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    noise.save(paths["truncated.png"])
    data = paths["truncated.png"].read_bytes()
    paths["truncated.png"].write_bytes(data[: len(data) // 2])

    paths["not_an_image.png"].write_text("This is a text file with an image suffix.\n")

    make_bomb_png(paths["bomb.png"], *BOMB_SIZE)

    Image.new("RGB", (1, 1), (200, 100, 50)).save(paths["tiny_1x1.png"])

    # Horizontal 16-bit gradient (0..65520) with probe values in the first row.
    gradient = np.tile((np.arange(width, dtype=np.uint32) * 1040).astype(np.uint16), (height, 1))
    for x, value in SIXTEEN_BIT_PROBES:
        gradient[0, x] = value
    sixteen = Image.fromarray(gradient)
    assert sixteen.mode == "I;16", sixteen.mode  # internal check on Pillow's array mapping
    sixteen.save(paths["sixteen_bit.png"])

    stripes = np.zeros((height, width, 3), dtype=np.uint8)
    stripes[:, : width // 2] = (255, 0, 0)
    stripes[:, width // 2 :] = (0, 0, 255)
    Image.fromarray(stripes).quantize(colors=4).save(paths["palette.png"])

    # Palette index 0 is transparent (left half), index 1 is opaque green (right half).
    indices = np.zeros((height, width), dtype=np.uint8)
    indices[:, width // 2 :] = 1
    palette_image = Image.frombytes("P", SIZE, indices.tobytes())
    palette_image.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette_image.save(paths["palette_transparent.png"], transparency=0)

    Image.new("CMYK", SIZE, (0, 255, 255, 0)).save(paths["cmyk.jpg"], quality=95)  # red ink mix

    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    Image.frombytes("L", SIZE, ramp.tobytes()).save(paths["grayscale.png"])

    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, width // 2 :, 3] = 255  # left half fully transparent, right half opaque
    Image.frombytes("RGBA", SIZE, rgba.tobytes()).save(paths["rgba.png"])

    # Distinct frames: Pillow drops consecutive identical frames when writing GIFs.
    frames = [Image.new("RGB", SIZE, colour) for colour in ANIMATED_COLOURS]
    frames[0].save(paths["animated.gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)

    stored = np.zeros((height, width, 3), dtype=np.uint8)
    stored[...] = (0, 0, 255)
    stored[EXIF_MARKER] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = EXIF_ORIENTATION  # Orientation tag
    Image.fromarray(stored).save(paths["exif_rotated.jpg"], exif=exif, quality=95)

    return paths

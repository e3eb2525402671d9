"""``python -m pure.data.sample_images SOURCES.yaml --out DIR``: an image set that exists on any machine.

PURE-tiny (``recipes/pure_tiny/``) is trained where no dataset can be downloaded. Its HQ images are the
samples shipped inside the scikit-image and matplotlib wheels plus images drawn here from a seed; each
comes with a short fixed caption. The sources file (see ``recipes/pure_tiny/sources.yaml``) lists::

    images:
      - {name: astronaut, split: holdout, source: "skimage:astronaut", caption: "A portrait of ..."}

and this writes ``DIR/train/NAME.png``, ``DIR/holdout/NAME.png`` (RGB; grey and boolean images are
expanded, alpha is blended onto white) and ``DIR/captions.jsonl`` (``{"file": "NAME.png", "caption": ...}``
per image, the shape ``pure.data.records`` looks captions up in by source name). Everything is written
to a temporary folder first and renamed, so ``DIR`` is complete or absent.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from pure.vq import to_rgb

SPLITS = ("train", "holdout")
GENERATED_SIZE = 512  # px, the side of every drawn image
_SKIMAGE_RE = re.compile(r"^(\w+)(?:\[(\d+)\])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SourceError(ValueError):
    """A sources file entry that cannot be built; the message names the entry."""


# -- drawn images ----------------------------------------------------------------------------------------


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour diagonal gradient, (size, size, 3) float in [0, 1]."""
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * x + np.sin(angle) * y - min(0, np.cos(angle)) - min(0, np.sin(angle))) / (
        abs(np.cos(angle)) + abs(np.sin(angle))
    )
    return a + (b - a) * t[..., None]


def draw_shapes(seed: int, size: int = GENERATED_SIZE) -> Image.Image:
    """Filled circles, rectangles and thick lines in random colours on a gradient: sharp edges."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray((_gradient(rng, size) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(12, 24))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = (int(v) for v in rng.integers(-size // 8, size, 2))
        w, h = (int(v) for v in rng.integers(size // 16, size // 3, 2))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + w), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(2, 12)))
    return image


def draw_waves(seed: int, size: int = GENERATED_SIZE) -> Image.Image:
    """Sums of oriented sinusoids per channel: smooth colour, stripes of many frequencies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        field = np.zeros((size, size))
        for _ in range(3):
            freq, angle, phase = rng.uniform(1, 8), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
        channels.append(field)
    pixels = np.stack(channels, -1)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    return Image.fromarray((pixels * 255).astype(np.uint8))


_WORDS = [
    "image",
    "restore",
    "sharp",
    "noise",
    "blur",
    "pixel",
    "token",
    "model",
    "train",
    "photo",
    "light",
    "shadow",
    "colour",
    "detail",
]


def draw_text(seed: int, size: int = GENERATED_SIZE) -> Image.Image:
    """Lines of dark words in several font sizes on a light background: thin strokes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    y = 4
    while y < size:
        font_size = int(rng.integers(12, 40))
        font = ImageFont.load_default(font_size)
        line = " ".join(rng.choice(_WORDS, 8))
        draw.text((4, y), line, fill=tuple(int(c) for c in rng.integers(0, 80, 3)), font=font)
        y += int(font_size * 1.3)
    return image


GENERATORS: dict[str, Callable[[int], Image.Image]] = {
    "shapes": draw_shapes,
    "waves": draw_waves,
    "text": draw_text,
}

# -- loading ---------------------------------------------------------------------------------------------


def _from_array(array: np.ndarray) -> Image.Image:
    """A skimage array (bool, uint8 or float in [0, 1]; grey, RGB or RGBA) as an RGB image."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return to_rgb(Image.fromarray(array))


def load_source(source: str) -> Image.Image:
    """The RGB image a ``source`` string names (see the module docstring)."""
    kind, _, rest = source.partition(":")
    if kind == "skimage":
        match = _SKIMAGE_RE.match(rest)
        data = importlib.import_module("skimage.data")
        if match is None or not hasattr(data, match.group(1)):
            raise SourceError(f"{source!r}: no such scikit-image sample")
        value = getattr(data, match.group(1))()
        if match.group(2) is not None:
            value = value[int(match.group(2))]
        return _from_array(np.asarray(value))
    if kind == "matplotlib":
        cbook = importlib.import_module("matplotlib.cbook")
        with cbook.get_sample_data(rest) as handle, Image.open(handle) as image:
            image.load()  # read before the file closes
            return to_rgb(image)
    if kind == "generated":
        name, _, seed = rest.partition(":")
        if name not in GENERATORS or not seed.isdigit():
            raise SourceError(f"{source!r}: expected generated:KIND:SEED with KIND in {sorted(GENERATORS)}")
        return GENERATORS[name](int(seed))
    raise SourceError(f"{source!r}: the source must start with skimage:, matplotlib: or generated:")


def read_sources(path: str | Path) -> list[dict]:
    """The checked entries of a sources file: unique names, known splits, non-empty captions."""
    entries = (yaml.safe_load(Path(path).read_text()) or {}).get("images") or []
    seen = set()
    for entry in entries:
        missing = {"name", "split", "source", "caption"} - set(entry)
        if missing:
            raise SourceError(f"{path}: entry {entry} lacks {sorted(missing)}")
        if not _NAME_RE.match(entry["name"]) or entry["name"] in seen:
            raise SourceError(f"{path}: name {entry['name']!r} is repeated or not [A-Za-z0-9_-]+")
        if entry["split"] not in SPLITS:
            raise SourceError(f"{path}: {entry['name']}: split must be one of {SPLITS}")
        if not str(entry["caption"]).strip():
            raise SourceError(f"{path}: {entry['name']}: empty caption")
        seen.add(entry["name"])
    if not entries:
        raise SourceError(f"{path}: no images listed")
    return entries


def build_sources(sources: str | Path, out: str | Path) -> dict[str, int]:
    """Write the image set; returns the number of images per split."""
    entries = read_sources(sources)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it to rebuild")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SPLITS, 0)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staging = Path(tmp) / "sources"
        lines = []
        for entry in entries:
            image = load_source(entry["source"])
            (staging / entry["split"]).mkdir(parents=True, exist_ok=True)
            image.save(staging / entry["split"] / f"{entry['name']}.png")
            lines.append(json.dumps({"file": f"{entry['name']}.png", "caption": entry["caption"]}))
            counts[entry["split"]] += 1
        (staging / "captions.jsonl").write_text("\n".join(lines) + "\n")
        shutil.move(staging, out)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pure.data.sample_images",
        description="Write the offline image set a sources file lists (train/, holdout/, captions.jsonl).",
    )
    p.add_argument("sources", help="sources YAML, e.g. recipes/pure_tiny/sources.yaml")
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    args = p.parse_args(argv)
    try:
        counts = build_sources(args.sources, args.out)
    except (SourceError, FileExistsError, OSError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} training and {counts['holdout']} hold-out images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Procedural HQ images with captions written from their own parameters: data without limits, offline.

``python -m pure.data.synthetic_images --out DIR --split train --first-seed 1000 --count 2000 --size 128``

PURE-tiny cannot download a dataset or run a captioning model. Its images are drawn here instead, each from
one seed, and each caption is written from the parameters that drew it, so the Understand part of the
task has a right answer that can be checked (`caption_attributes`). A scene (`sample_scene`) is:

- a **background**: a two-colour gradient, a plain colour, stripes, a checkerboard, a mottled 1/f-noise
  texture (the power spectrum of natural images), or a dead-leaves clutter: many occluding shapes whose
  sizes follow the r^-3 law of the dead-leaves model, which reproduces natural images' scale invariance;
- one to four **featured shapes** on top (disc, square, triangle, ring, star), each of a named colour, flat
  or striped;
- optionally a few **words of text** in a named colour.

Rendering (`render_scene`) draws at ``SUPERSAMPLE`` times the size and box-filters down, so every edge is
anti-aliased as a camera's would be; named colours are jittered a little around their reference so that
the colour words stay right. The caption (`caption_for`) reads, for example, "Three red discs and a blue
square over a green-to-white gradient, with black text."

The CLI writes ``DIR/SPLIT/scene_SEED.png`` and appends ``{"file", "caption"}`` lines to
``DIR/captions.jsonl`` (the format of `pure.data.sample_images`, so the two share a folder); images that
are already there are skipped, so a rerun or a larger ``--count`` only adds what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pure.imageio import atomic_write

SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
COLOUR_JITTER = 14  # +- per channel around a named colour's reference (0-255)

# Named colours: reference RGB. Far enough apart that a jittered sample is still nearest its own name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "blue": (35, 75, 210),
    "purple": (130, 50, 170),
    "pink": (245, 140, 190),
    "brown": (120, 75, 35),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
}
SHAPE_KINDS = ("disc", "square", "triangle", "ring", "star")
BACKGROUND_KINDS = ("gradient", "plain", "stripes", "checks", "mottled", "leaves")
_BACKGROUND_WEIGHTS = (0.2, 0.1, 0.15, 0.1, 0.2, 0.25)
NUMBER_WORDS = ("no", "a", "two", "three", "four")
PLACEMENT_TRIES = 16  # candidate centres per featured shape; the one farthest from the others is kept
OVERLAP_ALLOWED = 0.8  # centres at least 0.8 * (r1 + r2) apart where possible
WORDS = (
    "image", "sharp", "pixel", "token", "model", "light", "shadow", "colour", "detail", "edge", "river",
    "stone", "cloud", "bird", "tree", "house", "road", "paper", "glass", "water", "north", "green", "open",
    "seven", "music", "table", "window", "garden", "winter", "summer", "yes", "stop", "cafe", "book",
)  # fmt: skip


@dataclass
class Shape:
    """One featured shape; centre and radius are fractions of the image side."""

    kind: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float
    angle: float  # degrees
    striped: bool = False
    stripe_rgb: tuple[int, int, int] = (255, 255, 255)
    stripe_period: float = 0.05  # fraction of the side
    stripe_angle: float = 0.0


@dataclass
class Text:
    words: list[str]
    colour: str
    rgb: tuple[int, int, int]
    x: float  # top-left, fraction of the side
    y: float
    height: float  # font size, fraction of the side


@dataclass
class Scene:
    """Everything that determines an image and its caption (JSON-ready with `dataclasses.asdict`)."""

    seed: int
    size: int
    background: str
    colours: list[str]  # the background's named colours (one or two)
    rgbs: list[tuple[int, int, int]]
    texture_seed: int  # the random field of mottled / leaves backgrounds
    background_angle: float = 0.0
    background_period: float = 0.1
    shapes: list[Shape] = field(default_factory=list)
    text: Text | None = None


# -- sampling ----------------------------------------------------------------------------------------------


def _jittered(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[name])
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def _pick_colour(rng: np.random.Generator, avoid: Iterable[str] = ()) -> str:
    names = [c for c in COLOURS if c not in set(avoid)]
    return str(names[int(rng.integers(len(names)))])


def sample_scene(seed: int, size: int = 128) -> Scene:
    """The parameters of scene ``seed`` at ``size`` px: the same seed always gives the same scene."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px; got {size}")
    rng = np.random.default_rng([seed, 0x5CE4E])
    background = str(rng.choice(BACKGROUND_KINDS, p=_BACKGROUND_WEIGHTS))
    first = _pick_colour(rng)
    two = background in ("gradient", "stripes", "checks")
    colours = [first, _pick_colour(rng, avoid=[first])] if two else [first]
    scene = Scene(
        seed=seed,
        size=size,
        background=background,
        colours=colours,
        rgbs=[_jittered(rng, c) for c in colours],
        texture_seed=int(rng.integers(2**31)),
        background_angle=float(rng.uniform(0, 180)),
        background_period=float(rng.uniform(0.06, 0.25)),
    )
    count = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.25, 0.15]))
    largest = 0.26 if count <= 2 else 0.2
    for _ in range(count):
        kind = str(SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))])
        # a featured shape's colour is not the background's, so that it stands out
        colour = _pick_colour(rng, avoid=colours if background != "leaves" else ())
        striped = bool(rng.random() < 0.2)
        stripe = _pick_colour(rng, avoid=[colour])
        radius = float(rng.uniform(0.1, largest))
        # the best-separated of a few candidate centres: a shape the caption names must stay visible
        candidates = rng.uniform(0.15, 0.85, size=(PLACEMENT_TRIES, 2))

        def clearance(c: np.ndarray, r: float = radius) -> float:
            gaps = [
                math.hypot(c[0] - o.cx, c[1] - o.cy) - OVERLAP_ALLOWED * (r + o.radius) for o in scene.shapes
            ]
            return min(gaps, default=0.0)

        cx, cy = max(candidates, key=clearance)
        scene.shapes.append(
            Shape(
                kind=kind,
                colour=colour,
                rgb=_jittered(rng, colour),
                cx=float(cx),
                cy=float(cy),
                radius=radius,
                angle=float(rng.uniform(0, 360)),
                striped=striped,
                stripe_rgb=_jittered(rng, stripe),
                stripe_period=float(rng.uniform(0.04, 0.1)),
                stripe_angle=float(rng.uniform(0, 180)),
            )
        )
    if rng.random() < 0.4:
        colour = _pick_colour(rng, avoid=[colours[0]])
        n_words = int(rng.integers(1, 3))
        scene.text = Text(
            words=[str(w) for w in rng.choice(WORDS, n_words)],
            colour=colour,
            rgb=_jittered(rng, colour),
            x=float(rng.uniform(0.02, 0.3)),
            y=float(rng.uniform(0.02, 0.75)),
            height=float(rng.uniform(0.12, 0.22)),
        )
    return scene


# -- rendering ---------------------------------------------------------------------------------------------


def _coords(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of pixel centres as fractions of the side, (n, n) each."""
    t = (np.arange(n) + 0.5) / n
    return np.meshgrid(t, t, indexing="ij")


def _wave(n: int, angle: float, period: float, phase: float = 0.0) -> np.ndarray:
    """(n, n) bool: half-periods of a square wave along direction ``angle``."""
    y, x = _coords(n)
    a = math.radians(angle)
    return np.floor((x * math.cos(a) + y * math.sin(a)) / period + phase) % 2 == 0


def _fractal_noise(n: int, seed: int, slope: float = 2.0) -> np.ndarray:
    """(n, n) field in [0, 1] with a 1/f^slope power spectrum (slope 2: natural images)."""
    rng = np.random.default_rng([seed, 1])
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** (slope / 2)
    spectrum[0, 0] = 0.0
    field_ = np.fft.irfft2(spectrum, s=(n, n))
    return (field_ - field_.min()) / max(1e-12, field_.max() - field_.min())


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    a = math.radians(angle)
    if kind == "square":
        corners, radii = 4, [r * 1.2] * 4
    elif kind == "triangle":
        corners, radii = 3, [r * 1.3] * 3
    else:  # star: 5 points
        corners, radii = 10, [r * (1.3 if i % 2 == 0 else 0.55) for i in range(10)]
    return [
        (
            cx + rad * math.cos(a + 2 * math.pi * i / corners),
            cy + rad * math.sin(a + 2 * math.pi * i / corners),
        )
        for i, rad in enumerate(radii)
    ]


def _shape_mask(kind: str, n: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """An (n, n) 'L' mask (255 inside) of a shape with centre/radius in px of the n-px canvas."""
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=255)
    return mask


def _paste(canvas: np.ndarray, mask: Image.Image, fill: np.ndarray | tuple[int, int, int]) -> None:
    """canvas[mask] = fill (an RGB triple or an (n, n, 3) texture), in place."""
    m = np.asarray(mask, dtype=bool)
    canvas[m] = fill[m] if isinstance(fill, np.ndarray) else fill


def _leaves(canvas: np.ndarray, seed: int) -> None:
    """Dead leaves: occluding discs, squares and triangles of random named colours, radii ~ r^-3."""
    n = canvas.shape[0]
    rng = np.random.default_rng([seed, 2])
    r_min, r_max = n * 0.012, n * 0.2
    count = 350
    # inverse CDF of p(r) ~ r^-3 on [r_min, r_max]
    u = rng.random(count)
    radii = 1.0 / np.sqrt(1.0 / r_min**2 - u * (1.0 / r_min**2 - 1.0 / r_max**2))
    names = list(COLOURS)
    for r in radii:
        cx, cy = rng.uniform(-0.1, 1.1, 2) * n
        kind = ("disc", "square", "triangle")[int(rng.integers(3))]
        rgb = _jittered(rng, names[int(rng.integers(len(names)))])
        box = (max(0, int(cx - 1.4 * r)), max(0, int(cy - 1.4 * r)))
        side = (min(n, int(cx + 1.4 * r) + 2) - box[0], min(n, int(cy + 1.4 * r) + 2) - box[1])
        if side[0] <= 0 or side[1] <= 0:
            continue
        local = Image.new("L", side, 0)
        draw = ImageDraw.Draw(local)
        lx, ly = cx - box[0], cy - box[1]
        if kind == "disc":
            draw.ellipse((lx - r, ly - r, lx + r, ly + r), fill=255)
        else:
            draw.polygon(_polygon(kind, lx, ly, r, float(rng.uniform(0, 360))), fill=255)
        m = np.asarray(local, dtype=bool)
        canvas[box[1] : box[1] + side[1], box[0] : box[0] + side[0]][m] = rgb


def _background(scene: Scene, n: int) -> np.ndarray:
    """(n, n, 3) uint8 background at the supersampled size."""
    rgbs = [np.asarray(c, dtype=np.float64) for c in scene.rgbs]
    if scene.background == "gradient":
        y, x = _coords(n)
        a = math.radians(scene.background_angle)
        t = x * math.cos(a) + y * math.sin(a)
        t = (t - t.min()) / max(1e-12, t.max() - t.min())
        pixels = rgbs[0] + (rgbs[1] - rgbs[0]) * t[..., None]
    elif scene.background in ("stripes", "checks"):
        on = _wave(n, scene.background_angle, scene.background_period)
        if scene.background == "checks":
            on = on ^ _wave(n, scene.background_angle + 90, scene.background_period)
        pixels = np.where(on[..., None], rgbs[0], rgbs[1])
    elif scene.background == "mottled":
        shade = _fractal_noise(n, scene.texture_seed)
        pixels = rgbs[0] * (0.55 + 0.8 * shade[..., None])
    else:  # plain, and the base under the leaves
        pixels = np.broadcast_to(rgbs[0], (n, n, 3)).copy()
    canvas = np.clip(pixels, 0, 255).round().astype(np.uint8)
    if scene.background == "leaves":
        _leaves(canvas, scene.texture_seed)
    return canvas


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(px)


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene, ``scene.size`` px square, anti-aliased by supersampling."""
    n = scene.size * SUPERSAMPLE
    canvas = _background(scene, n)
    for shape in scene.shapes:
        mask = _shape_mask(shape.kind, n, shape.cx * n, shape.cy * n, shape.radius * n, shape.angle)
        if shape.striped:
            on = _wave(n, shape.stripe_angle, shape.stripe_period)
            fill = np.where(on[..., None], np.asarray(shape.rgb), np.asarray(shape.stripe_rgb)).astype(
                np.uint8
            )
            _paste(canvas, mask, fill)
        else:
            _paste(canvas, mask, shape.rgb)
    image = Image.fromarray(canvas)
    if scene.text is not None:
        text = scene.text
        ImageDraw.Draw(image).text(
            (text.x * n, text.y * n), " ".join(text.words), fill=text.rgb, font=_font(round(text.height * n))
        )
    return image.resize((scene.size, scene.size), Image.Resampling.BOX)


# -- captions ----------------------------------------------------------------------------------------------

_PLURAL = {"disc": "discs", "square": "squares", "triangle": "triangles", "ring": "rings", "star": "stars"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background_phrase(scene: Scene) -> str:
    c = scene.colours
    return {
        "gradient": f"{_article(c[0])} {c[0]}-to-{c[-1]} gradient",
        "plain": f"a plain {c[0]} background",
        "stripes": f"{c[0]} and {c[-1]} stripes",
        "checks": f"{_article(c[0])} {c[0]} and {c[-1]} checkerboard",
        "mottled": f"a mottled {c[0]} texture",
        "leaves": "a clutter of small coloured shapes",
    }[scene.background]


def shape_groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(colour, kind, count) of the featured shapes, in order of first appearance."""
    counts: dict[tuple[str, str], int] = {}
    for shape in scene.shapes:
        key = (("striped " if shape.striped else "") + shape.colour, shape.kind)
        counts[key] = counts.get(key, 0) + 1
    return [(colour, kind, n) for (colour, kind), n in counts.items()]


def caption_for(scene: Scene) -> str:
    """The caption written from the scene's parameters, e.g. "Two red discs and a blue square over a
    green-to-white gradient, with black text."."""
    parts = []
    for colour, kind, n in shape_groups(scene):
        number = _article(colour) if n == 1 else NUMBER_WORDS[n]
        parts.append(f"{number} {colour} {kind if n == 1 else _PLURAL[kind]}")
    shapes = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    sentence = f"{shapes} over {_background_phrase(scene)}"
    if scene.text is not None:
        sentence += f", with {scene.text.colour} text"
    return sentence[0].upper() + sentence[1:] + "."


def scene_attributes(scene: Scene) -> dict[str, object]:
    """What a caption of this scene must get right: the set of shape kinds, the set of shape colours, the
    background kind and colours, and whether there is text (and its colour)."""
    return {
        "kinds": sorted({s.kind for s in scene.shapes}),
        "colours": sorted({s.colour for s in scene.shapes}),
        "background": scene.background,
        "background_colours": sorted(set(scene.colours)) if scene.background != "leaves" else [],
        "text": scene.text is not None,
        "text_colour": scene.text.colour if scene.text is not None else None,
    }


_COLOUR_RE = "|".join(COLOURS)
_SINGULAR = {v: k for k, v in _PLURAL.items()}
_GROUP_RE = re.compile(rf"\b(?:striped )?({_COLOUR_RE}) (discs?|squares?|triangles?|rings?|stars?)\b")


def caption_attributes(caption: str) -> dict[str, object]:
    """The attributes a caption states (the inverse of `caption_for`, tolerant of other wording): the
    shape words with their colours before " over ", the background phrase after it, and "with C text"."""
    text = caption.strip().rstrip(".").lower()
    head, _, tail = text.partition(" over ")
    tail, _, text_part = tail.partition(", with ")
    groups = _GROUP_RE.findall(head)
    background = None
    for kind, pattern in (
        ("gradient", r"gradient"),
        ("plain", r"plain"),
        ("stripes", r"stripes"),
        ("checks", r"checkerboard"),
        ("mottled", r"mottled"),
        ("leaves", r"clutter"),
    ):
        if re.search(pattern, tail):
            background = kind
            break
    text_match = re.search(rf"\b({_COLOUR_RE}) text\b", text_part or "")
    return {
        "kinds": sorted({_SINGULAR.get(k, k) for _, k in groups}),
        "colours": sorted({c for c, _ in groups}),
        "background": background,
        "background_colours": sorted(set(re.findall(rf"\b({_COLOUR_RE})\b", tail)))
        if background != "leaves"
        else [],
        "text": "text" in (text_part or ""),
        "text_colour": text_match.group(1) if text_match else None,
    }


def attribute_scores(predicted: Mapping[str, object], truth: Mapping[str, object]) -> dict[str, float]:
    """How much of ``truth`` (from `scene_attributes` or `caption_attributes`) ``predicted`` gets right:
    Jaccard overlap of the shape kinds and of the shape colours, and 0/1 for the background kind, the
    background colours and text presence. ``mean`` averages the five."""

    def jaccard(a: Iterable, b: Iterable) -> float:
        a, b = set(a), set(b)
        return 1.0 if not a and not b else len(a & b) / len(a | b)

    scores = {
        "kinds": jaccard(predicted["kinds"], truth["kinds"]),
        "colours": jaccard(predicted["colours"], truth["colours"]),
        "background": float(predicted["background"] == truth["background"]),
        "background_colours": float(set(predicted["background_colours"]) == set(truth["background_colours"])),
        "text": float(bool(predicted["text"]) == bool(truth["text"])),
    }
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


# -- files -------------------------------------------------------------------------------------------------


def scene_name(seed: int) -> str:
    return f"scene_{seed:06d}"


def write_scenes(out: str | Path, split: str, seeds: Iterable[int], size: int = 128) -> int:
    """Write ``out/split/scene_SEED.png`` for every seed not yet there and append their captions to
    ``out/captions.jsonl``; returns how many were written. Each PNG is written atomically before its
    caption line, so an interrupted run leaves no caption without its image."""
    out = Path(out)
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    captions = out / "captions.jsonl"
    have = set()
    if captions.is_file():
        have = {json.loads(line)["file"] for line in captions.read_text().splitlines() if line.strip()}
    written = 0
    for seed in seeds:
        name = scene_name(seed) + ".png"
        if name in have:
            continue
        scene = sample_scene(seed, size)
        image = render_scene(scene)
        atomic_write(folder / name, lambda f, im=image: im.save(f, format="PNG"), overwrite=True)
        with open(captions, "a", encoding="utf-8") as f:
            f.write(json.dumps({"file": name, "caption": caption_for(scene), "scene": asdict(scene)}) + "\n")
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pure.data.synthetic_images",
        description="Draw procedural scenes (dead leaves, textures, shapes, text) with captions from their "
        "parameters into DIR/SPLIT/scene_SEED.png and DIR/captions.jsonl; existing ones are kept.",
    )
    p.add_argument("--out", required=True, help="folder holding SPLIT/ and captions.jsonl")
    p.add_argument("--split", default="train", help="subfolder (train or holdout)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, default=128, help="side in px")
    args = p.parse_args(argv)
    if args.count < 1 or args.first_seed < 0:
        print("error: --count must be >= 1 and --first-seed >= 0", file=sys.stderr)
        return 2
    try:
        n = write_scenes(
            args.out, args.split, range(args.first_seed, args.first_seed + args.count), args.size
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} scenes to {Path(args.out) / args.split} ({args.count - n} were there)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

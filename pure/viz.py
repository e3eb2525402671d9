"""Pictures to look at rather than read: comparison strips with a zoomed crop, and token-entropy heat maps.

Everything here is a pure function of its arguments (no I/O, no randomness): the same inputs give the same
pixels. Text uses PIL's built-in font (nothing is downloaded); colours come from a small look-up table.

- :func:`comparison`: labelled panels side by side (``"LQ (bicubic)"``, ``"restored"``, ``"GT"``), the same
  zoom box drawn on each, and a row of the zoomed crops below.
- :func:`entropy_map`: the per-token entropy of a restoration (``RestoreResult.entropy``, ``(h, w)`` nats)
  as a heat map with a colour bar and its min/max labels; :func:`overlay` blends a heat map onto the image.
- :func:`stack`: several such pictures one under the other (a grid over a test set).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BOX_COLOR",
    "HEAT_MIN_SIDE",
    "INFERNO_ANCHORS",
    "auto_zoom_box",
    "colorize",
    "colormap_lut",
    "comparison",
    "entropy_map",
    "overlay",
    "stack",
]

Box = tuple[int, int, int, int]  # (left, top, right, bottom), PIL's convention: right/bottom exclusive

BOX_COLOR = (255, 40, 40)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)

# Nine evenly spaced samples of matplotlib's "inferno" colour map (CC0): black -> purple -> orange -> pale
# yellow. Its lightness rises monotonically, so "brighter" reads as "more entropy" even in greyscale.
INFERNO_ANCHORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 4),
    (31, 12, 72),
    (85, 15, 109),
    (136, 34, 106),
    (186, 54, 85),
    (227, 89, 51),
    (249, 142, 9),
    (249, 203, 53),
    (252, 255, 164),
)
LUT_SIZE = 256
HEAT_MIN_SIDE = 256  # default heat map: the token grid magnified by a whole factor to at least this


# -- colour ----------------------------------------------------------------------------------------------


@cache
def colormap_lut(n: int = LUT_SIZE) -> np.ndarray:
    """``(n, 3)`` uint8 RGB: :data:`INFERNO_ANCHORS` linearly interpolated; entry 0 is the lowest value."""
    anchors = np.asarray(INFERNO_ANCHORS, dtype=np.float64)  # (9, 3)
    at = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, n)
    lut = np.stack([np.interp(t, at, anchors[:, c]) for c in range(3)], axis=1)  # (n, 3)
    lut = np.rint(lut).astype(np.uint8)
    lut.flags.writeable = False  # shared by every call
    return lut


def _as_map(values: Any, name: str = "values") -> np.ndarray:
    """A 2-D float64 array from a tensor (any device/dtype) or array-like; rejects NaN/inf."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (h, w) map; got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values; pass a finite map")
    return arr


def _value_range(arr: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    lo = float(arr.min()) if vmin is None else float(vmin)
    hi = float(arr.max()) if vmax is None else float(vmax)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        raise ValueError(f"need finite vmin <= vmax; got vmin={lo}, vmax={hi}")
    return lo, hi


def colorize(values: Any, vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Map a 2-D array or tensor ``(h, w)`` to an RGB image ``(w, h)`` through :func:`colormap_lut`.

    ``vmin``/``vmax`` (default: the map's own min and max) go to the first/last colour; values outside are
    clipped. A constant map (``vmin == vmax``) gets the first colour everywhere.
    """
    arr = _as_map(values)
    lo, hi = _value_range(arr, vmin, vmax)
    span = hi - lo
    t = np.clip((arr - lo) / span, 0.0, 1.0) if span > 0 else np.zeros_like(arr)
    lut = colormap_lut()
    index = np.rint(t * (len(lut) - 1)).astype(np.intp)  # (h, w)
    return Image.fromarray(lut[index])


# -- text ------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, _, right, bottom = font.getbbox(text)
    return right - left, bottom


def _fit(font, text: str, width: int) -> str:
    """``text``, shortened with "..." until it fits in ``width`` px."""
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "...")[0] > width:
        text = text[:-1]
    return text + "..." if text else ""


def _font_px(width: int) -> int:
    return int(min(32, max(10, width // 20)))


# -- zoom box --------------------------------------------------------------------------------------------


def _detail(image: Image.Image) -> np.ndarray:
    """``(H, W)`` local detail: absolute luminance differences to the right and below neighbours."""
    y = np.asarray(image.convert("L"), dtype=np.float64)
    d = np.zeros_like(y)
    d[:, :-1] += np.abs(np.diff(y, axis=1))
    d[:-1, :] += np.abs(np.diff(y, axis=0))
    return d


def auto_zoom_box(weights: Any, box_size: tuple[int, int]) -> Box:
    """The ``(w, h)`` window with the largest sum of ``weights`` (a 2-D ``(H, W)`` map).

    Ties go to the first window in reading order; a map without any variation gives the centred window.
    """
    arr = _as_map(weights, "weights")
    height, width = arr.shape
    bw, bh = min(int(box_size[0]), width), min(int(box_size[1]), height)
    if bw < 1 or bh < 1:
        raise ValueError(f"box_size must be at least 1x1 px; got {box_size}")
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = arr.cumsum(0).cumsum(1)
    sums = integral[bh:, bw:] - integral[:-bh, bw:] - integral[bh:, :-bw] + integral[:-bh, :-bw]
    # (H - bh + 1, W - bw + 1): the sum inside each window, indexed by its top-left corner
    if np.ptp(sums) <= 1e-9 * max(1.0, float(np.abs(sums).max())):
        top, left = (height - bh) // 2, (width - bw) // 2
    else:
        top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(left), int(top), int(left) + bw, int(top) + bh


def _check_box(box: Sequence[int], size: tuple[int, int]) -> Box:
    if len(box) != 4:
        raise ValueError(f"zoom_box must be (left, top, right, bottom); got {box!r}")
    left, top, right, bottom = (int(v) for v in box)
    width, height = size
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(
            f"zoom_box {tuple(box)} must satisfy 0 <= left < right <= {width} and 0 <= top < bottom <= "
            f"{height} (pixels of the {width}x{height} panels)"
        )
    return left, top, right, bottom


# -- pictures --------------------------------------------------------------------------------------------


def _rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is blended onto white (as the restorer does), not dropped to black."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def comparison(
    panels: Sequence[tuple[str, Image.Image]],
    zoom_box: Sequence[int] | None = None,
    zoom: float = 4.0,
    focus: Any = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    box_color: tuple[int, int, int] = BOX_COLOR,
) -> Image.Image:
    """Labelled panels side by side with a zoomed-crop row below, e.g. ``[("LQ (bicubic)", lq_up),
    ("restored", hq), ("GT", gt)]``.

    Args:
        panels: ``(label, image)`` pairs, left to right. Every image is shown at the size of the largest one
            (others are resized with ``resample``); pass the bicubic-upsampled LQ to show what the model saw.
        zoom_box: ``(left, top, right, bottom)`` in pixels of the common panel size; outlined on every panel
            and shown magnified below. Default: a box of side ``panel side / zoom`` where ``focus`` is
            largest, or where the panels have the most detail (summed luminance gradients).
        zoom: magnification of the default box (>= 1). A given ``zoom_box`` is magnified to fill a panel.
        focus: an optional 2-D map (any resolution, e.g. ``RestoreResult.entropy``) stretched over the panel
            to choose the default box.
        resample: filter used to bring the panels to a common size.
        box_color: RGB of the box outline and of the frame around the crops.

    Returns:
        An RGB image: label band, panel row, crop row, on white.
    """
    if not panels:
        raise ValueError("comparison needs at least one (label, image) panel")
    if not zoom >= 1:
        raise ValueError(f"zoom must be >= 1; got {zoom}")
    images = [_rgb(image) for _, image in panels]
    width, height = max((im.size for im in images), key=lambda s: (s[0] * s[1], s))
    images = [im if im.size == (width, height) else im.resize((width, height), resample) for im in images]

    if zoom_box is None:
        box_size = (max(1, round(width / zoom)), max(1, round(height / zoom)))
        if focus is not None:
            grid = _as_map(focus, "focus").astype(np.float32)
            weights = np.asarray(Image.fromarray(grid).resize((width, height), Image.NEAREST))
        else:
            weights = sum(_detail(im) for im in images)
        box = auto_zoom_box(weights, box_size)
    else:
        box = _check_box(zoom_box, (width, height))
    left, top, right, bottom = box
    bw, bh = right - left, bottom - top
    scale = min(width / bw, height / bh)
    crop_size = (max(1, round(bw * scale)), max(1, round(bh * scale)))

    pad = max(4, width // 64)
    line = max(1, round(min(width, height) / 170))
    font = _font(_font_px(width))
    label_h = _text_size(font, "Ag")[1] + pad
    n = len(images)
    canvas_size = (pad + n * (width + pad), 3 * pad + label_h + height + crop_size[1])
    canvas = Image.new("RGB", canvas_size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    row_y = pad + label_h
    crop_y = row_y + height + pad
    for i, ((label, _), image) in enumerate(zip(panels, images, strict=True)):
        x = pad + i * (width + pad)
        text = _fit(font, str(label), width)
        draw.text((x + (width - _text_size(font, text)[0]) // 2, pad // 2), text, fill=TEXT_COLOR, font=font)
        canvas.paste(image, (x, row_y))
        outline = [x + left, row_y + top, x + right - 1, row_y + bottom - 1]
        draw.rectangle(outline, outline=box_color, width=line)
        crop = image.crop(box).resize(crop_size, Image.NEAREST)  # nearest: show the pixels as they are
        cx = x + (width - crop_size[0]) // 2
        canvas.paste(crop, (cx, crop_y))
        draw.rectangle(
            [cx, crop_y, cx + crop_size[0] - 1, crop_y + crop_size[1] - 1], outline=box_color, width=line
        )
    return canvas


def _heat_size(shape: tuple[int, int], size: int | tuple[int, int] | None) -> tuple[int, int]:
    h, w = shape
    if size is None:
        factor = -(-HEAT_MIN_SIDE // max(h, w))  # ceil: whole token blocks, no blur
        return w * factor, h * factor
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"size must be >= 1 px; got {size}")
        return (size, max(1, round(size * h / w))) if w >= h else (max(1, round(size * w / h)), size)
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be (width, height) >= 1 px; got {size}")
    return width, height


def entropy_map(
    entropy: Any,
    size: int | tuple[int, int] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    unit: str = "nats",
) -> Image.Image:
    """A heat map of per-token entropy with a colour bar underneath labelled with its range.

    Args:
        entropy: ``(h, w)`` tensor or array, e.g. ``RestoreResult.entropy`` (nats, one value per image token).
        size: the heat map's size: ``(width, height)``, or an int for the longer side (aspect kept); default
            the token grid magnified by a whole factor to at least 256 px. Tokens are enlarged with nearest
            neighbour, so each stays a crisp block (pass the restored image's size to line them up).
        vmin, vmax: values of the first and last colour (default: the map's min and max); fix them to
            compare several maps on one scale.
        unit: written after the max label.

    Returns:
        An RGB image: the heat map on top, the colour bar and ``min``/``max`` labels below; as wide as the
        heat map (at least 128 px, the heat map centred).
    """
    arr = _as_map(entropy, "entropy")
    lo, hi = _value_range(arr, vmin, vmax)
    width, height = _heat_size(arr.shape, size)
    heat = colorize(arr, lo, hi).resize((width, height), Image.NEAREST)

    canvas_w = max(width, 128)
    pad = max(3, canvas_w // 80)
    font = _font(_font_px(canvas_w) if canvas_w < 400 else 14)
    text_h = _text_size(font, "0.9")[1]
    bar_h = max(8, text_h)
    canvas = Image.new("RGB", (canvas_w, height + 3 * pad + bar_h + text_h), BACKGROUND)
    canvas.paste(heat, ((canvas_w - width) // 2, 0))
    bar_w = canvas_w - 2 * pad
    ramp = colormap_lut()[np.rint(np.linspace(0, LUT_SIZE - 1, bar_w)).astype(np.intp)]  # (bar_w, 3)
    bar = Image.fromarray(np.repeat(ramp[None], bar_h, axis=0))
    bar_y = height + pad
    canvas.paste(bar, (pad, bar_y))
    draw = ImageDraw.Draw(canvas)
    low_text, high_text = f"{lo:.3g}", f"{hi:.3g} {unit}".strip()
    text_y = bar_y + bar_h + pad // 2
    draw.text((pad, text_y), low_text, fill=TEXT_COLOR, font=font)
    high_x = canvas_w - pad - _text_size(font, high_text)[0]
    draw.text((high_x, text_y), high_text, fill=TEXT_COLOR, font=font)
    return canvas


def overlay(
    image: Image.Image,
    heat: Image.Image | Any,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """``image`` with a heat map blended on top (``alpha`` 0 = only the image, 1 = only the heat map).

    ``heat`` is an image (e.g. from :func:`colorize`) or a 2-D map (coloured with ``vmin``/``vmax``); it is
    stretched over ``image`` with nearest neighbour.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be within 0..1; got {alpha}")
    base = _rgb(image)
    colored = _rgb(heat) if isinstance(heat, Image.Image) else colorize(heat, vmin, vmax)
    return Image.blend(base, colored.resize(base.size, Image.NEAREST), alpha)


def stack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Images one under the other, left-aligned on white, ``gap`` px apart (e.g. one comparison per image)."""
    if not images:
        raise ValueError("stack needs at least one image")
    if gap < 0:
        raise ValueError(f"gap must be >= 0; got {gap}")
    rgb = [_rgb(im) for im in images]
    canvas = Image.new(
        "RGB", (max(im.width for im in rgb), sum(im.height for im in rgb) + gap * (len(rgb) - 1)), BACKGROUND
    )
    y = 0
    for im in rgb:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas

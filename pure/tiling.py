"""Any size, any scale: restore an image tile by tile and blend the tiles without seams.

The input is bicubic-upsampled to the target size (``input size x scale``), cut into overlapping square
tiles of ``tile`` px (the last tile of a row or column flush with the border), and the tiles are restored in
batches of ``tile_batch`` with :meth:`pure.restorer.PureRestorer.restore_batch` at ``size=tile``, so each
crop is restored at its native size and colour-fixed against itself (the upsampled input crop).

The tile side defaults to the checkpoint's native size (:attr:`~pure.restorer.PureRestorer.image_size`,
512 for PURE) and the overlap to an eighth of it (:func:`default_overlap`).

Every tile gets the same global understanding: the degradation text and the caption are produced once,
by :meth:`~pure.restorer.PureRestorer.describe` on a downscaled view of the whole image, and the answer
text they make is forced verbatim into every tile (``restore_batch(forced_text=...)``), also when the model
wrote no degradation sentence: then the tiles get its whole text, not a caption after which each tile
would write a degradation sentence of its own. Tiles are weighted by :func:`blend_window` (raised-cosine
ramps over the overlap) and divided by the summed weights, so neighbouring tiles fade into each other.

Memory: only one band of tile rows is blended in floats (``tile`` rows by the output's width); rows that no
later tile touches are normalised, rounded and pasted into the output as soon as the next row of tiles
starts. The summed weights are separable (the window is an outer product of two ramps and the tiles form a
grid), so they are two vectors, not an image. What grows with the output is then the upsampled input (kept
for the result; tiles are cropped from it) and the output, both RGB PIL images, which Pillow stores at 4
bytes a pixel: 8 bytes per output pixel (5 more with an alpha channel), plus the band
(:func:`tiled_memory`), plus the input as the caller holds it. The rest (the model, one batch of tiles) does
not grow with the image or the number of tiles.

Targets smaller than a tile (in either direction) are padded by edge replication up to one tile, restored,
and cropped back, so a 100x60 target with 64 px tiles is two tiles wide and one tile high after padding
to 100x64. Transparency is blended onto white for the restoration, and the alpha channel, upsampled
bicubically, is attached again to the result.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pure.restorer import GRID_PX, LATENT_PX, NATIVE_SCALES, text_notices
from pure.sequence import SequenceFormat
from pure.vq import to_rgb

__all__ = [
    "TiledResult",
    "blend_window",
    "count_tiles",
    "default_overlap",
    "plan_tiles",
    "restore_tiled",
    "seam_steps",
    "step_gradients",
    "target_size",
    "tiled_memory",
]

OVERLAP_FRACTION = 8  # default overlap = tile / 8: 64 px for PURE's 512 px tiles, 16 px for 128 px ones
PIL_RGB_BYTES = 4  # Pillow keeps an RGB image at 32 bits a pixel (RGBX), as it does RGBA
# The upsampled input and the output (RGB PIL images), and with alpha its upsampled channel (1) and the
# RGBA result (4) made from the RGB one.
BYTES_PER_OUTPUT_PIXEL = 2 * PIL_RGB_BYTES
ALPHA_BYTES_PER_OUTPUT_PIXEL = 1 + PIL_RGB_BYTES
# Per pixel of the band of tile rows: float32 RGB sums (12), and while a finished strip is pasted, its
# uint8 copy (3) and that copy as a PIL image (4).
BAND_BYTES_PER_PIXEL = 12 + 3 + PIL_RGB_BYTES


@dataclass
class TiledResult:
    """A tiled restoration.

    Attributes:
        image: the stitched restoration, ``(W * factor, H * factor)`` px; RGBA when the input had alpha.
        lq_upsampled: the RGB input after bicubic upsampling to the output size (what the tiles saw).
        degradation, caption: the texts forced into every tile (described once, or given by the caller).
        tiles: how many tiles were restored.
        entropy: ``(h, w)`` float nats per image token over the whole output (latent grid, 1/8 px).
        notices: what was done to the input or the text, one line each.
        text_cut: the described text reached ``max_text_tokens`` and was cut there (every tile got it so).
    """

    image: Image.Image
    lq_upsampled: Image.Image
    degradation: str | None
    caption: str
    tiles: int
    entropy: torch.Tensor
    seed: int
    settings: dict
    timings: dict
    text: str | None = None
    notices: list[str] = field(default_factory=list)
    text_cut: bool = False


def plan_tiles(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``(left, top)`` of every ``tile x tile`` tile covering a ``width x height`` image, row by row.

    Neighbours overlap by at least ``overlap`` px (stride ``tile - overlap``); the last tile of each row and
    column is flush with the right / bottom border, so it may overlap its neighbour by more. A side shorter
    than ``tile`` gets one tile at 0 that reaches past the border: the caller pads the image to ``tile``.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive; got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be >= 0 and smaller than the tile ({tile}); got {overlap}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    return [(left, top) for top in _starts(height, tile, overlap) for left in _starts(width, tile, overlap)]


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def default_overlap(tile: int) -> int:
    """The overlap of ``tile`` px tiles when none is given: ``tile / 8`` rounded down to whole latents
    (8 px), at least one latent and less than the tile (64 for 512, 16 for 128, 8 for 64 and 32)."""
    overlap = max(LATENT_PX, tile // OVERLAP_FRACTION // LATENT_PX * LATENT_PX)
    return min(overlap, tile - 1)


def count_tiles(
    size: tuple[int, int],
    tile: int,
    overlap: int,
    scale: int | None = None,
    outscale: float | None = None,
) -> int:
    """How many tiles :func:`restore_tiled` restores for an input of ``size`` (raises as it would)."""
    (width, height), _ = target_size(size, scale, outscale)
    return len(plan_tiles(max(width, tile), max(height, tile), tile, overlap))


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """``(tile, tile)`` float32 blending weights: 1 in the middle, raised-cosine ramps ``overlap`` px wide
    at each edge, strictly positive everywhere (so pixels at the image border, covered by one tile only,
    still have a weight to divide by). It is the outer product of :func:`_blend_ramp` with itself."""
    ramp = _blend_ramp(tile, overlap)
    return np.outer(ramp, ramp).astype(np.float32)  # (tile, tile)


def _blend_ramp(tile: int, overlap: int) -> np.ndarray:
    """``(tile,)`` float64: one side of :func:`blend_window`."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be >= 0 and smaller than the tile ({tile}); got {overlap}")
    ramp = np.ones(tile, dtype=np.float64)
    if overlap:
        # sample the half cosine at pixel centres: (0, 1) exclusive, so never 0
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        ramp[:overlap] = rise
        ramp[tile - overlap :] = rise[::-1]
    return ramp


def _summed_ramps(starts: list[int], ramp: np.ndarray, length: int) -> np.ndarray:
    """``(length,)`` float32: the ramps of tiles starting at ``starts`` added up along one side. The tiles
    form a grid, so the summed 2-D windows are the outer product of the two sides' sums."""
    total = np.zeros(length, dtype=np.float64)
    for start in starts:
        total[start : start + len(ramp)] += ramp
    return total.astype(np.float32)


def tiled_memory(
    size: tuple[int, int],
    tile: int,
    scale: int | None = None,
    outscale: float | None = None,
    alpha: bool = False,
) -> int:
    """Bytes of the buffers that grow with the image while :func:`restore_tiled` restores an input of
    ``size``: the input as given (an RGB PIL image the caller holds), the upsampled input and the output
    (:data:`BYTES_PER_OUTPUT_PIXEL`, plus :data:`ALPHA_BYTES_PER_OUTPUT_PIXEL` with ``alpha``), and the
    float band of one row of tiles. Not in it: what is the same for any image (the model, one batch of
    tiles), the point of tiling."""
    (width, height), _ = target_size(size, scale, outscale)
    per_pixel = BYTES_PER_OUTPUT_PIXEL + (ALPHA_BYTES_PER_OUTPUT_PIXEL if alpha else 0)
    band = BAND_BYTES_PER_PIXEL * tile * max(width, tile)
    return PIL_RGB_BYTES * size[0] * size[1] + per_pixel * width * height + band


def step_gradients(image, axis: int) -> np.ndarray:
    """Mean absolute difference of neighbouring pixels for each step along ``axis`` (1: between columns,
    0: between rows), over the other axis and the channels: shape ``(W - 1,)`` or ``(H - 1,)``, step ``c``
    between pixels ``c`` and ``c + 1``. A seam shows as a step far above the image's usual ones."""
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (rows) or 1 (columns); got {axis}")
    pixels = np.asarray(image, dtype=np.float32)  # exact for 8-bit values; half the memory of float64
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return np.abs(np.diff(pixels, axis=axis)).mean(axis=(1 - axis, 2), dtype=np.float64)


def seam_steps(boxes: list[tuple[int, int]], length: int, tile: int, axis: int) -> np.ndarray:
    """``(length - 1,)`` bool: the steps of :func:`step_gradients` along ``axis`` where tiles at ``boxes``
    (as :func:`plan_tiles` gives them) could leave a seam: from the step into each tile that starts inside
    the image to the end of the tile before it (the whole overlap, which is wider for a tile flush with the
    border)."""
    starts = sorted({box[1 - axis] for box in boxes})
    band = np.zeros(max(length - 1, 0), dtype=bool)
    for previous, start in itertools.pairwise(starts):
        band[start - 1 : min(previous + tile, length - 1)] = True
    return band


MAX_OUTPUT_PIXELS = 256_000_000  # 16000x16000: ~2 GB of input and output images (tiled_memory)


def target_size(size: tuple[int, int], scale: int | None = None, outscale: float | None = None):
    """``(W, H)`` of the output for an input of ``size``: x ``scale`` (1, 2 or 4) or x ``outscale`` (any
    positive factor, rounded to whole pixels); x1 when neither is given. Returns ``((W, H), factor)``."""
    if scale is not None and outscale is not None:
        raise ValueError("give either scale or outscale, not both")
    if scale is not None and scale not in NATIVE_SCALES:
        raise ValueError(f"scale must be 1, 2 or 4; got {scale} (use outscale for other factors)")
    if outscale is not None and not (math.isfinite(outscale) and outscale > 0):
        raise ValueError(f"outscale must be a positive number; got {outscale}")
    factor = float(outscale if outscale is not None else (scale or 1))
    w, h = size
    out = (max(1, round(w * factor)), max(1, round(h * factor)))
    if out[0] * out[1] > MAX_OUTPUT_PIXELS:
        raise ValueError(
            f"a {w}x{h} px input at x{factor:g} would be {out[0]}x{out[1]} px, over the "
            f"{MAX_OUTPUT_PIXELS // 1_000_000} MP limit of one output; use a smaller scale"
        )
    return out, factor


@torch.inference_mode()
def restore_tiled(
    restorer,
    image: Image.Image,
    scale: int | None = None,
    outscale: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    tile_batch: int = 4,
    seed: int = 0,
    color_fix: bool = True,
    sampling=None,
    progress: bool = False,
    caption: str | None = None,
    degradation: str | None = None,
    token_progress: Callable[[int], None] | None = None,
) -> TiledResult:
    """Restore ``image`` of any size at ``x scale`` (1, 2, 4) or ``x outscale`` (any factor) by tiles.

    Args:
        restorer: a :class:`~pure.restorer.PureRestorer` (or anything with its ``image_size``, ``sampling``,
            ``describe_answers`` and ``restore_batch``).
        sampling: decoding settings of the description and every tile (default ``restorer.sampling``, the
            checkpoint's).
        image: RGB or RGBA PIL image (EXIF orientation already applied, as by ``load_image``).
        tile: tile side in px, a multiple of 32; default the restorer's native ``image_size`` (the crops
            it was trained on). overlap: px shared by neighbours; default :func:`default_overlap`.
        tile_batch: tiles restored together; memory for restorations never exceeds one batch.
        seed: tile ``i`` (row by row) uses seed ``seed + i``.
        caption, degradation: steering text; what is not given is described once from the whole image
            (resized to ``tile`` px on its long side; ``describe`` stretches that to a square).
        token_progress: called with each increment of image tokens decoded (for a caller's bar).
    """
    tile = restorer.image_size if tile is None else tile
    overlap = default_overlap(tile) if overlap is None else overlap
    if tile <= 0 or tile % GRID_PX:
        raise ValueError(f"tile must be a positive multiple of {GRID_PX}; got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be >= 0 and smaller than the tile ({tile}); got {overlap}")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1; got {tile_batch}")
    (width, height), factor = target_size(image.size, scale, outscale)
    start = time.perf_counter()
    notices = []
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    rgb = to_rgb(image)
    if image.mode not in ("RGB", "RGBA"):
        notices.append(f"{image.mode} input converted to RGB")

    if caption is None or degradation is None:
        long_side = max(rgb.size)
        view_size = (
            max(1, round(rgb.width * tile / long_side)),
            max(1, round(rgb.height * tile / long_side)),
        )
        view = rgb.resize(view_size, Image.BICUBIC)  # the whole image, `tile` px on its long side
        (answer,) = restorer.describe_answers([view], sampling, seeds=[seed], size=tile)
        text_cut = answer.text_cut and caption is None  # a cut caption of the model's that the tiles get
        degradation = answer.degradation if degradation is None else degradation
        caption = answer.caption if caption is None else caption
    else:
        text_cut = False
    sampling = sampling or restorer.sampling
    notices += text_notices(text_cut, sampling)
    described = time.perf_counter()
    has_text = any(t and t.strip() for t in (degradation, caption))
    forced_text = SequenceFormat.answer_text(degradation, caption) if has_text else ""

    lq_up = rgb.resize((width, height), Image.BICUBIC) if rgb.size != (width, height) else rgb
    padded_w, padded_h = max(width, tile), max(height, tile)
    source = lq_up  # what the tiles are cropped from
    if (padded_w, padded_h) != (width, height):  # then one side is under a tile: a small image
        pad = ((0, padded_h - height), (0, padded_w - width), (0, 0))
        source = Image.fromarray(np.pad(np.asarray(lq_up), pad, mode="edge"), "RGB")
        notices.append(f"{width}x{height} px output is smaller than a {tile} px tile: padded, then cropped")

    boxes = plan_tiles(padded_w, padded_h, tile, overlap)  # row by row, as the stitcher needs them
    lefts, tops = _starts(padded_w, tile, overlap), _starts(padded_h, tile, overlap)
    ramp = _blend_ramp(tile, overlap)
    stitcher = _BandStitcher(
        (width, height),
        tile,
        window=blend_window(tile, overlap)[..., None],  # (tile, tile, 1)
        row_weights=_summed_ramps(tops, ramp, padded_h),
        column_weights=_summed_ramps(lefts, ramp, padded_w),
    )
    entropy = None
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", disable=not progress)
    for first in range(0, len(boxes), tile_batch):
        batch = boxes[first : first + tile_batch]
        crops = [source.crop((left, top, left + tile, top + tile)) for left, top in batch]
        results = restorer.restore_batch(
            crops,
            sampling=sampling,
            seeds=[seed + first + i for i in range(len(batch))],
            forced_text=forced_text,
            color_fix=color_fix,
            size=tile,
            progress=token_progress or False,
        )
        del crops
        for (left, top), result in zip(batch, results, strict=True):
            stitcher.add(np.asarray(result.image.convert("RGB"), dtype=np.float32), left, top)
            entropy = _paste_entropy(entropy, result.entropy, left, top, tile, padded_w, padded_h)
        bar.update(len(batch))
    bar.close()
    del source

    per = tile // results[0].entropy.shape[-1]  # px per latent
    out = stitcher.finish()
    if alpha is not None:
        out.putalpha(alpha.resize((width, height), Image.BICUBIC))  # RGB -> RGBA in place: no split copies
    settings = {
        **asdict(sampling),  # every tile's: the same settings as a whole image's sidecar
        "color_fix": color_fix,
        "tile": tile,
        "tile_overlap": overlap,
        "tile_batch": tile_batch,
        "scale": factor,
        "size": [width, height],
        "tiles": len(boxes),
    }
    timings = {"describe_s": described - start, "total_s": time.perf_counter() - start}
    # the CPU threads the tiles were restored with, and why (see pure.restorer.choose_cpu_threads)
    timings.update({k: v for k, v in results[-1].timings.items() if k.startswith("cpu_threads")})
    return TiledResult(
        image=out,
        lq_upsampled=lq_up,
        degradation=degradation.strip() if degradation else degradation,
        caption=caption.strip(),
        text=forced_text.strip(),
        text_cut=text_cut,
        tiles=len(boxes),
        entropy=entropy[: math.ceil(height / per), : math.ceil(width / per)],
        seed=seed,
        settings=settings,
        timings=timings,
        notices=notices,
    )


class _BandStitcher:
    """Blends tiles, given row by row, into an output image while holding only one band of tile rows in
    floats: when a tile starts a new row of tiles, the rows above it are final (no later tile reaches
    them), so they are normalised by the summed weights, rounded and pasted into the output."""

    def __init__(self, size, tile, window, row_weights, column_weights):
        self.width, self.height = size
        self.tile, self.window = tile, window
        self.row_weights, self.column_weights = row_weights, column_weights
        self.band = np.zeros((tile, len(column_weights), 3), dtype=np.float32)  # rows top .. top + tile
        self.top = 0
        self.image = Image.new("RGB", size)

    def add(self, restored: np.ndarray, left: int, top: int) -> None:
        """Add one ``(tile, tile, 3)`` float tile at ``(left, top)``; ``top`` never decreases."""
        if top < self.top:
            raise ValueError(f"tiles must come row by row: top {top} after {self.top}")
        if top > self.top:
            shift = top - self.top
            self._flush(shift)
            self.band[: self.tile - shift] = self.band[shift:]  # numpy copies overlapping ranges safely
            self.band[self.tile - shift :] = 0
            self.top = top
        self.band[:, left : left + self.tile] += restored * self.window

    def finish(self) -> Image.Image:
        """The output: the last band flushed."""
        self._flush(self.tile)
        return self.image

    def _flush(self, rows: int) -> None:
        """Normalise, round and paste the band's first ``rows`` rows (those past the output are padding)."""
        strip = self.band[:rows]
        strip /= self.row_weights[self.top : self.top + rows, None, None]  # > 0: see blend_window
        strip /= self.column_weights[None, :, None]
        np.rint(strip, out=strip)
        np.clip(strip, 0, 255, out=strip)
        keep = min(rows, self.height - self.top)
        if keep > 0:
            pixels = strip[:keep, : self.width].astype(np.uint8)
            self.image.paste(Image.fromarray(pixels, "RGB"), (0, self.top))


def _paste_entropy(canvas, tile_entropy, left, top, tile, width, height):
    """Paste one tile's ``(h, w)`` entropy into the whole image's latent grid (later tiles win)."""
    tile_entropy = torch.as_tensor(tile_entropy, dtype=torch.float32).cpu()
    per = tile // tile_entropy.shape[-1]  # px per latent
    if canvas is None:
        canvas = torch.zeros(math.ceil(height / per), math.ceil(width / per))
    y, x = top // per, left // per
    h, w = tile_entropy.shape
    canvas[y : y + h, x : x + w] = tile_entropy[: canvas.shape[0] - y, : canvas.shape[1] - x]
    return canvas

"""pure.viz: comparison strips and entropy heat maps (pure functions of their inputs)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pure import viz

GREY = (128, 128, 128)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def panel_origin(picture: Image.Image, color=GREY) -> tuple[int, int]:
    """Top-left corner of the first panel: the first pixel of ``color`` in reading order."""
    ys, xs = np.nonzero((np.asarray(picture) == color).all(-1))
    return int(xs.min()), int(ys.min())


def red_box(picture: Image.Image, origin: tuple[int, int], size: tuple[int, int]) -> tuple[int, ...]:
    """Bounding box (PIL convention) of the box colour inside the panel at ``origin``, relative to it."""
    x0, y0 = origin
    region = np.asarray(picture)[y0 : y0 + size[1], x0 : x0 + size[0]]
    ys, xs = np.nonzero((region == viz.BOX_COLOR).all(-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# -- colour map --------------------------------------------------------------------------------------------


def test_lut_runs_from_dark_to_bright_monotonically():
    lut = viz.colormap_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    lightness = luma(lut.astype(np.float64))
    assert np.all(np.diff(lightness) >= 0)
    assert lightness[0] < 10 and lightness[-1] > 230
    assert not lut.flags.writeable


def test_higher_values_get_later_colours():
    values = torch.linspace(0.0, 5.0, 50).reshape(1, 50)
    rgb = np.asarray(viz.colorize(values), dtype=np.float64)[0]  # (50, 3)
    lut = viz.colormap_lut().astype(np.float64)
    # index of each pixel's colour in the LUT: must rise with the value
    index = [int(np.argmin(np.abs(lut - px).sum(1))) for px in rgb]
    assert index == sorted(index) and index[0] == 0 and index[-1] == 255
    assert np.all(np.diff(luma(rgb)) >= 0)


def test_colorize_range_and_clipping():
    values = np.array([[-1.0, 0.0, 1.0, 2.0]])
    rgb = np.asarray(viz.colorize(values, vmin=0.0, vmax=1.0))[0]
    lut = viz.colormap_lut()
    assert (rgb[0] == lut[0]).all() and (rgb[1] == lut[0]).all()
    assert (rgb[2] == lut[-1]).all() and (rgb[3] == lut[-1]).all()


def test_constant_map_has_no_division_by_zero():
    with np.errstate(all="raise"):
        heat = viz.colorize(torch.full((3, 4), 4.2))
        picture = viz.entropy_map(torch.full((3, 4), 4.2))
    assert heat.size == (4, 3)
    assert (np.asarray(heat) == viz.colormap_lut()[0]).all()
    assert picture.width >= 256


@pytest.mark.parametrize(
    "bad, message",
    [(np.zeros(5), "2-D"), (np.zeros((0, 3)), "2-D"), (np.array([[1.0, np.nan]]), "NaN")],
)
def test_colorize_rejects_bad_maps(bad, message):
    with pytest.raises(ValueError, match=message):
        viz.colorize(bad)


def test_colorize_rejects_inverted_range():
    with pytest.raises(ValueError, match="vmin <= vmax"):
        viz.colorize(np.zeros((2, 2)), vmin=2, vmax=1)


# -- entropy map -------------------------------------------------------------------------------------------


def test_entropy_map_default_size_is_whole_token_blocks():
    picture = viz.entropy_map(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)))
    assert picture.mode == "RGB"
    assert picture.width == 256 and picture.height > 256  # heat map 256x256, colour bar below
    heat = np.asarray(picture)[:256]
    assert (heat[:32, :32] == heat[0, 0]).all()  # one token = one 32x32 block
    assert not (heat == heat[0, 0]).all()


@pytest.mark.parametrize(
    "size, heat_size",
    [((512, 512), (512, 512)), (256, (256, 128)), ((300, 100), (300, 100)), (64, (64, 32))],
)
def test_entropy_map_sizes(size, heat_size):
    grid = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    picture = viz.entropy_map(grid, size=size)
    width, height = heat_size
    assert picture.width == max(width, 128)  # narrow maps get a wider canvas for the labels
    assert picture.height > height
    column = np.asarray(picture)[:, (picture.width - width) // 2 + width // 2]
    assert (column[height - 1] != viz.BACKGROUND).any()  # the heat map's last row
    assert (column[height] == viz.BACKGROUND).all()  # then the gap before the colour bar


def test_entropy_map_high_entropy_is_brighter():
    picture = np.asarray(viz.entropy_map(torch.tensor([[1.0, 3.0]]), size=(200, 100)), dtype=np.float64)
    lut = viz.colormap_lut()
    assert (picture[50, 50] == lut[0]).all()
    assert (picture[50, 150] == lut[-1]).all()


def test_entropy_map_labels_show_the_range():
    grid = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    a = np.asarray(viz.entropy_map(grid, size=256, vmin=0, vmax=1))
    b = np.asarray(viz.entropy_map(grid * 9, size=256, vmin=0, vmax=9))
    assert a.shape == b.shape
    assert (a[:256] == b[:256]).all()  # same colours ...
    assert (a[256:] != b[256:]).any()  # ... different labels under the bar
    unlabeled = np.asarray(viz.entropy_map(grid, size=256, vmin=0, vmax=1, unit=""))
    assert (a[256:] != unlabeled[256:]).any()


def test_entropy_map_is_deterministic():
    grid = torch.rand(6, 5, generator=torch.Generator().manual_seed(2))
    assert viz.entropy_map(grid).tobytes() == viz.entropy_map(grid.clone()).tobytes()
    assert viz.entropy_map(grid).tobytes() == viz.entropy_map(grid.numpy()).tobytes()


# -- comparison --------------------------------------------------------------------------------------------


def test_comparison_layout_and_common_size():
    small = Image.new("RGB", (32, 32), GREY)
    big = Image.new("RGB", (64, 64), GREY)
    picture = viz.comparison([("LQ", small), ("restored", big), ("GT", big)])
    assert picture.mode == "RGB"
    assert 3 * 64 < picture.width < 3 * 64 + 40
    assert 2 * 64 < picture.height < 2 * 64 + 60  # panel row + zoomed crop row (zoomed to panel width)


def test_zoom_box_drawn_where_asked():
    panel = Image.new("RGB", (64, 64), GREY)
    box = (10, 20, 30, 44)
    picture = viz.comparison([("a", panel), ("b", panel)], zoom_box=box)
    origin = panel_origin(picture)
    assert red_box(picture, origin, (64, 64)) == box
    x0, y0 = origin
    assert picture.getpixel((x0 + 20, y0 + 30)) == GREY  # outline only, inside untouched
    assert picture.getpixel((x0 + 5, y0 + 5)) == GREY
    # the second panel carries the same box
    second = (x0 + 64 + (picture.width - 2 * 64) // 3, y0)
    assert red_box(picture, second, (64, 64)) == box


def test_zoom_row_shows_the_box_magnified():
    panel = Image.new("RGB", (64, 64), (0, 0, 0))
    panel.paste((255, 255, 0), (40, 8, 56, 24))  # a yellow square, exactly the box
    picture = np.asarray(viz.comparison([("x", panel)], zoom_box=(40, 8, 56, 24)))
    yellow = (picture == (255, 255, 0)).all(-1)
    ys, xs = np.nonzero(yellow)
    below = ys > ys.min() + 20  # the crop row: magnified 4x to 64x64 (less the frame)
    assert below.sum() > 55 * 55
    assert xs[below].max() - xs[below].min() + 1 >= 60


def test_default_box_follows_detail():
    panel = Image.new("RGB", (64, 64), GREY)
    checker = np.indices((16, 16)).sum(0) % 2 * 255
    panel.paste(Image.fromarray(np.stack([checker] * 3, -1).astype(np.uint8)), (44, 40))
    picture = viz.comparison([("a", panel)], zoom=4)
    box = red_box(picture, panel_origin(picture), (64, 64))
    assert box[2] - box[0] == 16 and box[3] - box[1] == 16
    assert 44 - 16 < box[0] <= 48 and 40 - 16 < box[1] <= 48  # overlaps the textured square


def test_default_box_follows_focus_map():
    panel = Image.new("RGB", (64, 64), GREY)
    focus = torch.zeros(4, 4)
    focus[3, 0] = 5.0  # bottom-left token
    picture = viz.comparison([("a", panel)], zoom=4, focus=focus)
    assert red_box(picture, panel_origin(picture), (64, 64)) == (0, 48, 16, 64)


def test_auto_zoom_box_ties_and_flat_maps():
    assert viz.auto_zoom_box(np.zeros((64, 64)), (16, 16)) == (24, 24, 40, 40)  # flat: centred
    weights = np.zeros((10, 20))
    weights[2, 15] = 1
    assert viz.auto_zoom_box(weights, (4, 4)) == (12, 0, 16, 4)  # first window (reading order) holding it
    assert viz.auto_zoom_box(np.ones((8, 8)), (100, 100)) == (0, 0, 8, 8)  # clipped to the map


def test_labels_are_drawn():
    panel = Image.new("RGB", (64, 64), GREY)
    labelled = np.asarray(viz.comparison([("restored", panel)], zoom_box=(0, 0, 8, 8)))
    blank = np.asarray(viz.comparison([("", panel)], zoom_box=(0, 0, 8, 8)))
    assert labelled.shape == blank.shape
    _, y0 = panel_origin(Image.fromarray(labelled))
    assert (labelled[:y0] != blank[:y0]).any()  # the label band differs
    assert (labelled[y0:] == blank[y0:]).all()  # the rest is the same
    assert (blank[:y0] == viz.BACKGROUND).all()


def test_comparison_is_deterministic():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    panels = [("LQ (bicubic)", a), ("restored", b)]
    assert viz.comparison(panels).tobytes() == viz.comparison(panels).tobytes()


def test_transparent_panels_go_onto_white():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    picture = viz.comparison([("a", clear)], zoom_box=(0, 0, 4, 4))
    assert (np.asarray(picture)[40:50, 10:20] == 255).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zoom_box": (10, 10, 5, 20)}, "zoom_box"),
        ({"zoom_box": (0, 0, 65, 10)}, "zoom_box"),
        ({"zoom_box": (0, 0, 10)}, "zoom_box"),
        ({"zoom": 0.5}, "zoom must be >= 1"),
    ],
)
def test_comparison_rejects_bad_arguments(kwargs, message):
    panel = Image.new("RGB", (64, 64), GREY)
    with pytest.raises(ValueError, match=message):
        viz.comparison([("a", panel)], **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        viz.comparison([])


# -- overlay and stack -------------------------------------------------------------------------------------


def test_overlay_blends_and_resizes():
    image = Image.new("RGB", (64, 32), GREY)
    grid = torch.tensor([[0.0, 1.0]])
    assert viz.overlay(image, grid, alpha=0).tobytes() == image.tobytes()
    full = viz.overlay(image, grid, alpha=1)
    assert full.size == (64, 32)
    assert full.tobytes() == viz.colorize(grid).resize((64, 32), Image.NEAREST).tobytes()
    half = np.asarray(viz.overlay(image, viz.colorize(grid), alpha=0.5), dtype=int)
    assert abs(half[0, 0] - (np.array(GREY) + viz.colormap_lut()[0]) / 2).max() <= 1
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, grid, alpha=1.5)


def test_stack_puts_pictures_under_each_other():
    a, b = Image.new("RGB", (30, 10), (1, 2, 3)), Image.new("L", (50, 20), 7)
    out = viz.stack([a, b], gap=5)
    assert out.size == (50, 35)
    assert out.getpixel((0, 0)) == (1, 2, 3) and out.getpixel((0, 15)) == (7, 7, 7)
    assert out.getpixel((40, 5)) == viz.BACKGROUND

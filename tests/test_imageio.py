"""Tests for pure.imageio: the bad-input corpus, conversions, atomic writes and input listing."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import (
    ANIMATED_COLOURS,
    EXIF_MARKER,
    EXPECTED,
    SIXTEEN_BIT_PROBES,
    SIZE,
    make_bad_inputs,
    make_bomb_png,
)
from PIL import Image, ImageFile

from pure.imageio import (
    MAX_PIXELS,
    NOTICE_KEY,
    ImageLoadError,
    atomic_write,
    check_writable,
    find_images,
    list_images,
    load_image,
    save_image,
    save_json,
)

OK_CASES = sorted(name for name, outcome in EXPECTED.items() if outcome == "ok")
ERROR_CASES = sorted(name for name, outcome in EXPECTED.items() if outcome == "error")

# What each "ok" case must turn into: (mode, (W, H)).
EXPECTED_RESULT = {
    "sixteen_bit.png": ("RGB", SIZE),
    "palette.png": ("RGB", SIZE),
    "palette_transparent.png": ("RGBA", SIZE),
    "cmyk.jpg": ("RGB", SIZE),
    "grayscale.png": ("RGB", SIZE),
    "rgba.png": ("RGBA", SIZE),
    "animated.gif": ("RGB", SIZE),
    "exif_rotated.jpg": ("RGB", (SIZE[1], SIZE[0])),  # orientation 6 swaps width and height
}

# A word of the one-line message each error case must contain.
EXPECTED_MESSAGE = {
    "zero_byte.png": "empty",
    "truncated.png": "truncated or corrupt",
    "not_an_image.png": "not an image",
    "bomb.png": "decompression bomb",
    "tiny_1x1.png": "image is 1x1 px; PURE needs at least 8x8",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad_inputs"))


def test_corpus_covers_every_case(corpus: dict[str, Path]) -> None:
    assert set(corpus) == set(EXPECTED) == set(EXPECTED_RESULT) | set(EXPECTED_MESSAGE)
    assert all(path.is_file() for path in corpus.values())
    assert corpus["bomb.png"].stat().st_size < 100_000  # cheap to build and to keep in a temp folder


@pytest.mark.parametrize("name", OK_CASES)
def test_ok_cases_load_as_rgb_or_rgba(corpus: dict[str, Path], name: str) -> None:
    image = load_image(corpus[name])
    mode, size = EXPECTED_RESULT[name]
    assert image.mode == mode
    assert image.size == size
    assert np.asarray(image).dtype == np.uint8


@pytest.mark.parametrize("name", ERROR_CASES)
def test_error_cases_raise_one_line(corpus: dict[str, Path], name: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(corpus[name])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(corpus[name]))  # says which file
    assert EXPECTED_MESSAGE[name] in message


def test_sixteen_bit_is_scaled_not_clipped(corpus: dict[str, Path]) -> None:
    image = load_image(corpus["sixteen_bit.png"])
    pixels = np.asarray(image)  # (H, W, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    # The documented rule is round(v / 257), half up.
    expected = {0: 0, 257: 1, 32768: 128, 65535: 255}
    for x, value in SIXTEEN_BIT_PROBES:
        assert pixels[0, x, 0] == expected[value], (x, value)
    # Row 1 is the plain gradient x * 1040: a clip at 255 would make all but the first pixel white.
    row = pixels[1, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == round(63 * 1040 / 257)
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) > 50
    assert "16-bit" in image.info[NOTICE_KEY]


def test_palette_transparency_becomes_alpha(corpus: dict[str, Path]) -> None:
    pixels = np.asarray(load_image(corpus["palette_transparent.png"]))
    width = SIZE[0]
    assert (pixels[:, : width // 2, 3] == 0).all()
    assert (pixels[:, width // 2 :, 3] == 255).all()
    assert (pixels[:, width // 2 :, :3] == (0, 255, 0)).all()


def test_palette_without_transparency_keeps_colours(corpus: dict[str, Path]) -> None:
    pixels = np.asarray(load_image(corpus["palette.png"]))
    assert (pixels[:, 0] == (255, 0, 0)).all() and (pixels[:, -1] == (0, 0, 255)).all()


def test_rgba_alpha_is_kept(corpus: dict[str, Path]) -> None:
    pixels = np.asarray(load_image(corpus["rgba.png"]))
    assert (pixels[:, : SIZE[0] // 2, 3] == 0).all() and (pixels[:, SIZE[0] // 2 :, 3] == 255).all()


def test_grayscale_is_replicated_to_rgb(corpus: dict[str, Path]) -> None:
    pixels = np.asarray(load_image(corpus["grayscale.png"])).astype(int)
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255


def test_cmyk_becomes_red_with_notice(corpus: dict[str, Path]) -> None:
    image = load_image(corpus["cmyk.jpg"])
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=255, K=0 is red
    assert "CMYK" in image.info[NOTICE_KEY]


def test_animated_uses_first_frame_with_notice(corpus: dict[str, Path]) -> None:
    image = load_image(corpus["animated.gif"])
    assert (np.asarray(image) == ANIMATED_COLOURS[0]).all()
    assert image.info[NOTICE_KEY] == "animated file: used the first of 3 frames"


def test_exif_orientation_is_applied(corpus: dict[str, Path]) -> None:
    pixels = np.asarray(load_image(corpus["exif_rotated.jpg"])).astype(int)  # (W, H) of the stored image
    stored_height = SIZE[1]
    rows, cols = EXIF_MARKER
    # Rotating 90 degrees clockwise maps stored (x, y) to (stored_height - 1 - y, x).
    marker_y = (cols.start + cols.stop) // 2
    marker_x = stored_height - 1 - (rows.start + rows.stop) // 2
    assert pixels[marker_y, marker_x, 0] > 200 and pixels[marker_y, marker_x, 2] < 60  # red
    assert pixels[8, 8, 2] > 200 and pixels[8, 8, 0] < 60  # the unrotated marker position is blue


@pytest.mark.parametrize(
    "name", ["palette.png", "palette_transparent.png", "grayscale.png", "exif_rotated.jpg"]
)
def test_no_notice_for_lossless_conversions(corpus: dict[str, Path], name: str) -> None:
    assert NOTICE_KEY not in load_image(corpus[name]).info


def test_bomb_leaves_pil_global_and_warning_filters_alone(corpus: dict[str, Path]) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    with pytest.raises(ImageLoadError):
        load_image(corpus["bomb.png"])
    with pytest.raises(ImageLoadError):
        load_image(corpus["bomb.png"], max_pixels=10**12)
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert list(warnings.filters) == filters_before


def test_pil_bomb_warning_becomes_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 MP is between PIL's warning (89.5 MP) and error (179 MP) limits; our own limit is lifted.
    path = make_bomb_png(tmp_path / "warning_bomb.png", 10_000, 10_000)

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a caller that merely records warnings must still get the error
        with pytest.raises(ImageLoadError, match="decompression bomb"):
            load_image(path, max_pixels=10**12)
    assert caught == []


def test_max_pixels_is_checked_before_decoding(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match=r"64x48 px = 0\.0 MP, over the limit"):
        load_image(corpus["grayscale.png"], max_pixels=1000)
    assert MAX_PIXELS == 64_000_000


@pytest.mark.parametrize("bad", [0, -5, 1.5])
def test_max_pixels_must_be_positive_int(corpus: dict[str, Path], bad: object) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(corpus["grayscale.png"], max_pixels=bad)  # type: ignore[arg-type]


def test_min_side_boundary(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "eight.png")
    Image.new("RGB", (7, 100)).save(tmp_path / "narrow.png")
    assert load_image(tmp_path / "eight.png").size == (8, 8)
    with pytest.raises(ImageLoadError, match="image is 7x100 px; PURE needs at least 8x8"):
        load_image(tmp_path / "narrow.png")


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="no such file") as missing:
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="is a folder") as folder:
        load_image(tmp_path)
    assert "\n" not in str(missing.value) + str(folder.value)


def test_more_modes(tmp_path: Path) -> None:
    bilevel = Image.new("1", (10, 9), 1)
    bilevel.putpixel((0, 0), 0)
    bilevel.save(tmp_path / "bilevel.png")
    Image.new("LA", (10, 9), (100, 50)).save(tmp_path / "la.png")
    floats = np.full((9, 10), 0.25, dtype=np.float32)
    floats[0, :3] = (0.0, 0.5, 1.0)
    Image.fromarray(floats).save(tmp_path / "float.tif")

    image = load_image(tmp_path / "bilevel.png")
    assert (
        image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((1, 0)) == (255,) * 3
    )
    image = load_image(tmp_path / "la.png")
    assert image.mode == "RGBA" and image.getpixel((3, 3)) == (100, 100, 100, 50)
    image = load_image(tmp_path / "float.tif")
    # round(v * 255): 0.25 -> 63.75 -> 64, 0.5 -> 127.5 -> 128 (round half to even), 1.0 -> 255
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 64]
    assert "float" in image.info[NOTICE_KEY]


def test_files_are_closed(corpus: dict[str, Path]) -> None:
    fd_folder = Path("/proc/self/fd")
    if not fd_folder.is_dir():
        pytest.skip("needs /proc/self/fd")
    before = len(list(fd_folder.iterdir()))
    for name, path in corpus.items():
        try:
            load_image(path)
        except ImageLoadError:
            assert EXPECTED[name] == "error"
    assert len(list(fd_folder.iterdir())) == before


# ---------------------------------------------------------------- writing


def _rgb(colour: tuple[int, int, int] = (1, 2, 3)) -> Image.Image:
    return Image.new("RGB", (16, 12), colour)


def test_save_image_round_trip_and_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.png"
    save_image(_rgb(), path)
    assert Image.open(path).format == "PNG" and Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    save_image(_rgb(), tmp_path / "out.jpg")
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"
    save_image(_rgb(), tmp_path / "no_suffix")
    assert Image.open(tmp_path / "no_suffix").format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "no_suffix", "out.jpg"]  # no temp files


def test_save_image_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    save_image(_rgb((1, 2, 3)), path)
    with pytest.raises(FileExistsError) as info:
        save_image(_rgb((9, 9, 9)), path)
    assert str(info.value) == f"{path} exists; pass --overwrite to replace it"
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    save_image(_rgb((9, 9, 9)), path, overwrite=True)
    assert Image.open(path).getpixel((0, 0)) == (9, 9, 9)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 12))
    with pytest.raises(OSError, match="RGBA"):  # JPEG has no alpha
        save_image(rgba, tmp_path / "out.jpg")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")

    def half_then_fail(f: object) -> None:
        f.write(b"half")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail, overwrite=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_no_clobber_when_the_file_appears_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "out.png"

    def racing_write(f: object) -> None:
        f.write(b"mine")  # type: ignore[attr-defined]
        path.write_bytes(b"theirs")  # another process creates the output meanwhile

    with pytest.raises(FileExistsError, match="pass --overwrite"):
        atomic_write(path, racing_write)
    assert path.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_unknown_suffix_and_folder_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"suffix '\.xyz'"):
        save_image(_rgb(), tmp_path / "out.xyz")
    with pytest.raises(IsADirectoryError):
        save_image(_rgb(), tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_save_json(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    save_json({"psnr": 21.5, "name": "café"}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"psnr": 21.5, "name": "café"}
    with pytest.raises(FileExistsError):
        save_json({}, path)
    with pytest.raises(TypeError):
        save_json({"bad": object()}, tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_saved_file_permissions_follow_umask(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    save_image(_rgb(), tmp_path / "out.png")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------- listing


def test_list_images(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.webp", "notes.txt", "._a.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"x")

    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # an explicit file is taken as is
    assert list_images(tmp_path) == [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "c.webp"]
    assert list_images(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    assert list_images(str(tmp_path / "**" / "*.png")) == [tmp_path / "b.png", tmp_path / "sub" / "d.png"]


def test_list_images_nothing_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(ImageLoadError, match="no image files"):
        list_images(str(tmp_path / "*.png"))
    with pytest.raises(ImageLoadError, match="no such file or folder"):
        list_images(tmp_path / "missing")


def test_check_writable_leaves_nothing_behind_and_raises_where_nothing_can_be_written(tmp_path: Path) -> None:
    check_writable(tmp_path)

    assert list(tmp_path.iterdir()) == []
    if Path("/proc").is_dir():  # no one, root included, can create a file there
        with pytest.raises(OSError):
            check_writable("/proc")


def test_find_images_names_what_is_named_like_an_image_but_is_no_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "notes.txt").write_text("not named like an image")

    listing = find_images(tmp_path)

    assert listing.images == [tmp_path / "a.png"] == list_images(tmp_path)
    assert [path for path, _ in listing.not_files] == [tmp_path / "folder.png", tmp_path / "gone.jpg"]
    folder_why, link_why = (why for _, why in listing.not_files)
    assert "folder" in folder_why and "broken symbolic link" in link_why and "deleted.jpg" in link_why
    assert find_images(str(tmp_path / "*.jpg")).not_files == listing.not_files[1:]

"""``python -m pure.bench_tiles`` in its small mode: two tiny images, each restored by ``pure.infer`` in a
fresh process on a random 64 px checkpoint; the printed table is parsed and checked against the tiling
module's own plan and memory model."""

from __future__ import annotations

import re

import pytest

from pure import bench_tiles
from pure.tiling import count_tiles, default_overlap, tiled_memory

NATIVE = 64  # tile side of the random checkpoint the bench builds: 64 tokens a tile, fast
SIZES = [(96, 64), (48, 32)]  # x2: 192x128 (4 x 3 = 12 tiles) and 96x64 (2 tiles)
TILE_BATCH = 2  # so that the small image too restores a full batch
ROW = re.compile(
    r"^\| (\d+)x(\d+) \| (\d+)x(\d+) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \| (-?\d+) \|$", re.MULTILINE
)


def run_bench(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = bench_tiles.main(list(args))
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_small_mode_prints_both_runs_with_the_planned_tiles_and_flat_memory(capsys, tmp_path):
    sizes = ",".join(f"{w}x{h}" for w, h in SIZES)

    code, out, err = run_bench(
        capsys,
        *("--sizes", sizes, "--native", str(NATIVE), "--tile-batch", str(TILE_BATCH), "--threads", "1"),
        *("--workdir", str(tmp_path)),
    )

    assert code == 0, err
    rows = ROW.findall(out)
    assert len(rows) == 2, out
    overlap = default_overlap(NATIVE)
    for (width, height), row in zip(SIZES, rows, strict=True):
        in_w, in_h, out_w, out_h, tiles, seconds, peak, buffers, flat = row
        assert (int(in_w), int(in_h)) == (width, height)
        assert (int(out_w), int(out_h)) == (2 * width, 2 * height)
        assert int(tiles) == count_tiles((width, height), NATIVE, overlap, scale=2)
        assert float(seconds) > 0
        assert int(buffers) == round(tiled_memory((width, height), NATIVE, scale=2) / 2**20)
        assert 100 < int(peak) < 4000  # MiB: Python, torch and a tiny model, not nothing, not gigabytes
        assert abs(int(flat) - (int(peak) - int(buffers))) <= 1  # each figure rounded on its own
    assert [int(row[4]) for row in rows] == [12, 2]
    ratio = float(re.search(r"large / small: ([\d.]+)", out).group(1))
    assert 0.8 < ratio < 1.25  # the same code, model and tile batch: the same memory but for the images
    seams = re.search(r"seams in the 192x128 output: .* \(ratio ([\d.]+): (.*)\)", out)
    assert seams and float(seams.group(1)) > 0 and seams.group(2) == "no seam"
    assert (tmp_path / "photo_96x64_pure.png").exists() and (tmp_path / "photo_96x64_pure.json").exists()


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("--sizes", "3000x2000"), "two sizes"),
        (("--sizes", "3000by2000,600x400"), "WIDTHxHEIGHT"),
        (("--sizes", "4x4,600x400"), "at least"),
        (("--native", "100"), "--native"),
        (("--tile-batch", "0"), "--tile-batch"),
    ],
)
def test_bad_arguments_are_one_error_and_exit_2(capsys, args, word):
    code, _, err = run_bench(capsys, *args)

    assert code == 2
    assert word in err.splitlines()[-1]


def test_photo_like_image_has_smooth_fields_edges_and_grain():
    pixels = bench_tiles.photo_like(300, 200).astype(int)

    assert pixels.shape == (200, 300, 3) and pixels.dtype.kind == "i"
    steps = abs(pixels[:, 1:] - pixels[:, :-1])
    assert 2 < steps.mean() < 20  # grain, not flat, not noise
    assert steps.max() > 30  # hard edges somewhere
    assert (bench_tiles.photo_like(300, 200) == bench_tiles.photo_like(300, 200)).all()  # seeded

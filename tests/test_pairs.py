"""pure.data.pairs: deterministic, resumable LQ/HQ pairs with their parameter records; bad files skipped."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from bad_inputs import EXPECTED, make_bad_inputs
from PIL import Image

import pure.data.pairs as pairs_module
from pure.data.degradations import PRESET_DIR, DegradationParams, apply_degradation
from pure.data.labels import degradation_label, degradation_scores
from pure.data.pairs import CONFIG_FILE, SUMMARY_FILE, PairSettings, main, make_pairs, pair_names

LABEL_RE = re.compile(r"^(Small|Medium|Large) blur, (small|medium|large) noise\.$")
CROP = 64


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth gradient with some texture: (h, w, 3) uint8, many distinct values like a photograph."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + 25
    return (base + g.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for i, (h, w) in enumerate([(80, 96), (72, 72), (100, 70)]):
        Image.fromarray(_photo(h, w, i)).save(folder / f"img{i}.png")
    return folder


def _snapshot(folder):
    """Relative path -> bytes of every pair file (hq/, lq/, params/)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for sub in ("hq", "lq", "params")
        for p in sorted((folder / sub).glob("*"))
    }


SETTINGS = PairSettings(crop=CROP, crops_per_image=2, seed=5)


def test_pairs_are_deterministic_and_laid_out(sources, tmp_path):
    summary = make_pairs(sources, tmp_path / "a", SETTINGS, progress=False)
    assert summary["pairs_written"] == 6 and summary["images_skipped"] == 0
    make_pairs(sources, tmp_path / "b", SETTINGS, progress=False)
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert a == b and len(a) == 18
    assert sorted(p.name for p in (tmp_path / "a" / "hq").iterdir()) == [
        f"img{i}_{k:03d}.png" for i in range(3) for k in range(2)
    ]
    with (
        Image.open(tmp_path / "a" / "hq" / "img0_000.png") as hq,
        Image.open(tmp_path / "a" / "lq" / "img0_000.png") as lq,
    ):
        assert hq.size == (CROP, CROP) and lq.size == (CROP // 4, CROP // 4) and lq.mode == "RGB"
    # Another seed gives other crops and degradations.
    make_pairs(sources, tmp_path / "c", PairSettings(crop=CROP, crops_per_image=2, seed=6), progress=False)
    c = _snapshot(tmp_path / "c")
    assert all(a[k] != c[k] for k in a if k.startswith("lq/"))


def test_resume_after_an_interrupt_and_lost_files_gives_the_same_files(sources, tmp_path, monkeypatch):
    make_pairs(sources, tmp_path / "ref", SETTINGS, progress=False)
    reference = _snapshot(tmp_path / "ref")

    # Interrupted while writing the 4th record: everything before is complete, nothing half-written.
    real_save_json = pairs_module.save_json
    calls = {"n": 0}

    def failing_save_json(obj, path, overwrite=False):
        if path.parent.name == "params":
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real_save_json(obj, path, overwrite)

    monkeypatch.setattr(pairs_module, "save_json", failing_save_json)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_pairs(sources, out, SETTINGS, progress=False)
    monkeypatch.setattr(pairs_module, "save_json", real_save_json)
    assert len(list((out / "params").glob("*.json"))) == 3
    assert not list(out.rglob(".*.tmp-*"))  # no temporary files left behind
    # A "kill" that lost some outputs of complete pairs.
    (out / "params" / "img0_001.json").unlink()
    (out / "lq" / "img0_000.png").unlink()

    # Resumed with two worker processes: the files do not depend on who made them.
    summary = make_pairs(sources, out, SETTINGS, workers=2, progress=False)
    assert summary["pairs_existing"] == 1 and summary["pairs_written"] == 5
    assert _snapshot(out) == reference
    # And a complete folder is left alone.
    again = make_pairs(sources, out, SETTINGS, progress=False)
    assert again["pairs_written"] == 0 and again["pairs_existing"] == 6


def test_other_settings_in_the_same_folder_are_refused(sources, tmp_path):
    make_pairs(sources, tmp_path / "out", SETTINGS, progress=False)
    assert json.loads((tmp_path / "out" / CONFIG_FILE).read_text())["seed"] == 5
    with pytest.raises(ValueError, match=r"other settings.*seed"):
        make_pairs(
            sources, tmp_path / "out", PairSettings(crop=CROP, crops_per_image=2, seed=1), progress=False
        )


def test_record_holds_label_scores_and_replays_the_aligned_crop(sources, tmp_path):
    out = tmp_path / "out"
    make_pairs(sources, out, SETTINGS, progress=False)
    for path in sorted((out / "params").glob("*.json")):
        record = json.loads(path.read_text())
        params = DegradationParams.from_dict(record["params"])
        assert LABEL_RE.match(record["label"]) and record["label"] == degradation_label(params)
        assert (record["blur_score"], record["noise_score"]) == pytest.approx(degradation_scores(params))
        assert record["id"] == path.stem and record["hq"] == f"hq/{path.stem}.png"
        # The HQ file is the recorded crop of the source ...
        source = np.asarray(Image.open(sources / record["source"]).convert("RGB"))
        top, left, size = record["crop"]["top"], record["crop"]["left"], record["crop"]["size"]
        hq = np.asarray(Image.open(out / record["hq"]))
        assert np.array_equal(hq, source[top : top + size, left : left + size])
        # ... and the LQ file is exactly its degradation with the recorded parameters.
        lq = np.asarray(Image.open(out / record["lq"]))
        hq_tensor = torch.from_numpy(hq.copy()).permute(2, 0, 1).float() / 255
        replayed = (apply_degradation(hq_tensor, params) * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(lq, replayed)


def test_flip_mirrors_some_crops_and_records_it(sources, tmp_path):
    out = tmp_path / "out"
    settings = PairSettings(crop=CROP, crops_per_image=4, seed=2, flip=True)
    make_pairs(sources, out, settings, progress=False)
    flips = []
    for path in sorted((out / "params").glob("*.json")):
        record = json.loads(path.read_text())
        source = np.asarray(Image.open(sources / record["source"]).convert("RGB"))
        box = record["crop"]
        crop = source[box["top"] : box["top"] + CROP, box["left"] : box["left"] + CROP]
        expected = crop[:, ::-1] if box["flipped"] else crop
        assert np.array_equal(np.asarray(Image.open(out / record["hq"])), expected)
        flips.append(box["flipped"])
    assert any(flips) and not all(flips)  # 12 fair coin flips
    assert json.loads((out / CONFIG_FILE).read_text())["flip"] is True


def test_lq_is_aligned_with_its_hq_under_an_almost_identity_degradation(sources, tmp_path):
    """No blur, no resize but the final one, no noise, JPEG at 100: the LQ is the HQ downsampled in place."""
    preset = yaml.safe_load((PRESET_DIR / "realesrgan.yaml").read_text())
    preset["name"] = "identity"
    for stage in ("stage1", "stage2"):
        preset[stage].update(
            blur_prob=0.0,
            resize_probs=[0.0, 0.0, 1.0],
            gaussian_noise_prob=1.0,
            noise_sigma_range=[0.0, 0.0],
            jpeg_range=[100, 100],
        )
    preset["final"]["sinc_prob"] = 0.0
    preset["resize_modes"] = ["area"]
    path = tmp_path / "identity.yaml"
    path.write_text(yaml.safe_dump(preset))
    # Sharp structure (16 px blocks over a gradient), so that a one-pixel misalignment shows.
    folder = tmp_path / "blocks"
    folder.mkdir()
    yy, xx = np.mgrid[0:90, 0:110]
    blocks = ((yy // 16 + xx // 16) % 2)[..., None] * np.array([150, 90, 30]) + (xx + yy)[..., None] // 4
    Image.fromarray(blocks.clip(0, 255).astype(np.uint8)).save(folder / "blocks.png")
    out = tmp_path / "out"
    make_pairs(folder, out, PairSettings(preset=str(path), crop=CROP, crops_per_image=3), progress=False)
    for k in range(3):
        hq = np.asarray(Image.open(out / "hq" / f"blocks_{k:03d}.png"))
        lq = torch.from_numpy(np.asarray(Image.open(out / "lq" / f"blocks_{k:03d}.png")).copy())
        down = F.interpolate(
            torch.from_numpy(hq.copy()).permute(2, 0, 1)[None].float(), scale_factor=0.25, mode="area"
        )
        luma = torch.tensor([0.299, 0.587, 0.114])  # JPEG's Y: its 4:2:0 blurs the colour, not the luma
        down = torch.einsum("chw,c->hw", down[0], luma)  # (16, 16), 0-255
        grey = lq.float() @ luma
        errors = {
            (dy, dx): (grey[1:-1, 1:-1] - down.roll((dy, dx), dims=(0, 1))[1:-1, 1:-1]).abs().mean()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        }
        assert errors[0, 0] < 1.5, errors  # JPEG at quality 100 is all that differs
        assert all(errors[0, 0] < e / 10 for shift, e in errors.items() if shift != (0, 0))


def test_bad_and_small_files_are_skipped_with_the_reason(tmp_path, capsys):
    folder = tmp_path / "src"
    make_bad_inputs(folder)
    Image.fromarray(_photo(40, 40, 0)).save(folder / "small.png")
    Image.fromarray(_photo(70, 70, 1)).save(folder / "good.png")
    out = tmp_path / "out"
    code = main(["--hq", str(folder), "--out", str(out), "--crop", str(CROP), "--seed", "0"])
    assert code == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    skipped = {entry["file"]: entry["reason"] for entry in summary["skipped"]}
    broken = {name for name, kind in EXPECTED.items() if kind == "error"}
    assert broken <= set(skipped)
    assert "smaller than the 64 px crop" in skipped["small.png"]
    assert sorted(p.name for p in (out / "hq").iterdir()) == ["good_000.png"]
    assert summary["images"] == len(EXPECTED) + 2 and summary["pairs_written"] == 1
    assert summary["images_skipped"] == len(EXPECTED) + 1  # the "ok" corpus images are 64x48 < 64
    printed = capsys.readouterr()
    assert "1 written now" in printed.out and "skipped" in printed.out
    assert "Traceback" not in printed.out + printed.err
    for name in broken:
        assert name in printed.out


def test_cli_refuses_bad_arguments_with_one_line(tmp_path, capsys):
    assert main(["--hq", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    assert main(["--hq", str(tmp_path), "--out", str(tmp_path / "o"), "--scale", "3"]) == 1
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "--scale must be 1, 2 or 4" in err


def test_names_are_unique_across_subfolders_and_extensions(tmp_path):
    for rel in ("a/x.png", "b/x.png", "c/y.png", "c/y.jpg", "c/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(70, 70, len(rel))).save(tmp_path / rel)
    paths = sorted(tmp_path.rglob("*.*"))
    names = {p.relative_to(tmp_path).as_posix(): v for p, v in pair_names(paths).items()}
    assert names == {
        "a/x.png": ("a/x.png", "a_x"),
        "b/x.png": ("b/x.png", "b_x"),
        "c/y.jpg": ("c/y.jpg", "c_y_jpg"),
        "c/y.png": ("c/y.png", "c_y_png"),
        "c/z.png": ("c/z.png", "z"),
    }
    summary = make_pairs(
        str(tmp_path / "**" / "*.png"), tmp_path / "out", PairSettings(crop=CROP), progress=False
    )
    assert summary["pairs_written"] == 4
    assert sorted(p.stem for p in (tmp_path / "out" / "params").iterdir()) == [
        "a_x_000",
        "b_x_000",
        "y_000",  # no y.jpg among the PNGs: no collision
        "z_000",
    ]
    assert json.loads((tmp_path / "out" / "params" / "a_x_000.json").read_text())["source"] == "a/x.png"

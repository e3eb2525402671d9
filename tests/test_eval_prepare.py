"""Raw RealSR v3 / DRealSR test sets -> StableSR-style centre crops (gt/ 512 px, lq/ 128 px), on tiny
synthetic folders whose HR images are exact 4x nearest-neighbour copies of their LR images, so that an
aligned crop pair is recognisable pixel for pixel."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure.eval.cli import main as eval_main
from pure.eval.prepare import GT_SIDE, LQ_SIDE, PrepareError, find_drealsr, find_realsr, prepare
from pure.eval.prepare import main as prepare_main


def _pair(hr_path: Path, lr_path: Path, lr_size: tuple[int, int], seed: int, hr_extra: int = 0) -> np.ndarray:
    """Write an LR image of `lr_size` (w, h) and its 4x HR copy (plus `hr_extra` px of rounding)."""
    w, h = lr_size
    lr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    hr = np.kron(lr, np.ones((4, 4, 1), dtype=np.uint8))
    hr = np.pad(hr, ((0, hr_extra), (0, hr_extra), (0, 0)))
    for path, array in ((hr_path, hr), (lr_path, lr)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    return lr


def _realsr(raw: Path) -> dict[str, np.ndarray]:
    test = {"Canon": raw / "Canon" / "Test" / "4", "Nikon": raw / "Nikon" / "Test" / "4"}
    lrs = {
        "Canon_001": _pair(
            test["Canon"] / "Canon_001_HR.png", test["Canon"] / "Canon_001_LR4.png", (150, 140), 0
        ),
        "Nikon_001": _pair(
            test["Nikon"] / "Nikon_001_HR.png", test["Nikon"] / "Nikon_001_LR4.png", (131, 129), 1, 3
        ),
    }
    # other scales of the same set are not part of the x4 protocol and must be ignored
    _pair(
        raw / "Canon" / "Test" / "2" / "Canon_001_HR.png",
        raw / "Canon" / "Test" / "2" / "Canon_001_LR2.png",
        (8, 8),
        2,
    )
    return lrs


def _check_crops(out: Path, lrs: dict[str, np.ndarray]) -> None:
    assert sorted(p.name for p in (out / "gt").iterdir()) == sorted(f"{s}.png" for s in lrs)
    assert sorted(p.name for p in (out / "lq").iterdir()) == sorted(f"{s}.png" for s in lrs)
    for stem, lr in lrs.items():
        lq = np.asarray(Image.open(out / "lq" / f"{stem}.png"))
        gt = np.asarray(Image.open(out / "gt" / f"{stem}.png"))
        assert lq.shape == (LQ_SIDE, LQ_SIDE, 3) and gt.shape == (GT_SIDE, GT_SIDE, 3)
        top, left = (lr.shape[0] - LQ_SIDE) // 2, (lr.shape[1] - LQ_SIDE) // 2  # the LR centre
        np.testing.assert_array_equal(lq, lr[top : top + LQ_SIDE, left : left + LQ_SIDE])
        np.testing.assert_array_equal(gt, np.kron(lq, np.ones((4, 4, 1), dtype=np.uint8)))  # aligned


def test_realsr_v3_to_centre_crops_ready_for_eval(tmp_path, capsys):
    raw, out = tmp_path / "RealSR(V3)", tmp_path / "RealSR"
    lrs = _realsr(raw)
    assert [p.stem for p in find_realsr(raw)] == ["Canon_001", "Nikon_001"]
    assert prepare_main(["realsr", str(raw), str(out)]) == 0
    out_text = capsys.readouterr().out
    assert "wrote 2 pairs" in out_text
    # a set of another size than StableSR's (100 RealSR pairs) is said not to be comparable
    assert "has 2 realsr test pairs; StableSR's released set has 100, so means over" in out_text
    _check_crops(out, lrs)

    class Zero:  # the folders pair up for python -m pure.eval (stems and sizes match)
        name, version = "zero", "0"

        def score_pairs(self, spec, preds, gts):
            return [0.0] * len(preds)

    argv = [
        "--pred",
        str(out / "gt"),
        "--gt",
        str(out / "gt"),
        "--out",
        str(tmp_path / "r"),
        "--metrics",
        "psnr",
    ]
    assert eval_main(argv, backend=Zero()) == 0

    # one camera's Test/4 folder given directly
    assert [p.stem for p in find_realsr(raw / "Nikon" / "Test" / "4")] == ["Nikon_001"]


def test_drealsr_x4_to_centre_crops(tmp_path):
    raw = tmp_path / "DRealSR"
    test = raw / "Test_x4"
    lrs = {
        "DSC_1454": _pair(
            test / "test_HR" / "DSC_1454_x4.png", test / "test_LR" / "DSC_1454_x1.png", (160, 130), 3
        ),
        "panasonic_103": _pair(
            test / "test_HR" / "panasonic_103_x4.png",
            test / "test_LR" / "panasonic_103_x1.png",
            (128, 128),
            4,
        ),
    }
    assert prepare("DRealSR", raw, tmp_path / "out", log=lambda _: None) == 2
    _check_crops(tmp_path / "out", lrs)
    # Test_x4 itself, and the doubled Test_x4/Test_x4 some archives unpack to, are found as well
    assert len(find_drealsr(test)) == 2
    (tmp_path / "nested").mkdir()
    test.rename(tmp_path / "nested" / "Test_x4")
    (tmp_path / "outer" / "Test_x4").mkdir(parents=True)
    (tmp_path / "nested" / "Test_x4").rename(tmp_path / "outer" / "Test_x4" / "Test_x4")
    assert [p.stem for p in find_drealsr(tmp_path / "outer")] == ["DSC_1454", "panasonic_103"]


def test_layout_errors_name_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        PrepareError, match=r"not a RealSR v3 folder; expected RAW/\{Canon,Nikon\}/Test/4/\*_HR.png"
    ):
        find_realsr(tmp_path / "empty")
    with pytest.raises(PrepareError, match=r"not a DRealSR folder; expected RAW/Test_x4/test_HR/\*_x4.png"):
        find_drealsr(tmp_path / "empty")

    test = tmp_path / "r" / "Canon" / "Test" / "4"
    _pair(test / "Canon_001_HR.png", test / "Canon_001_LR4.png", (130, 130), 0)
    _pair(test / "Canon_002_HR.png", tmp_path / "elsewhere.png", (130, 130), 1)
    with pytest.raises(PrepareError, match=r"1 image\(s\) have no LR partner: Canon_002"):
        find_realsr(tmp_path / "r")

    d = tmp_path / "d" / "Test_x4"
    _pair(d / "test_HR" / "a_x4.png", d / "test_LR" / "a.png", (130, 130), 0)
    with pytest.raises(PrepareError, match=r"a.png: name does not end in _x1 or _x4"):
        find_drealsr(tmp_path / "d")
    with pytest.raises(PrepareError, match="unknown test set 'ost'; choose from: realsr, drealsr"):
        prepare("ost", tmp_path / "d", tmp_path / "o")


@pytest.mark.parametrize(
    ("lr_size", "hr_size", "message"),
    [
        ((130, 130), (130, 130), r"HR is 130x130 and LR 130x130; expected HR = 4 x LR .*RealSR v1/v2"),
        ((100, 140), (400, 560), r"LR is 100x140, smaller than the 128 px crop"),
    ],
)
def test_pairs_that_cannot_be_cropped_write_nothing(tmp_path, capsys, lr_size, hr_size, message):
    test = tmp_path / "raw" / "Canon" / "Test" / "4"
    _pair(test / "Canon_001_HR.png", test / "Canon_001_LR4.png", (130, 130), 0)  # a good pair first
    Image.new("RGB", hr_size).save(test / "Canon_002_HR.png")
    Image.new("RGB", lr_size).save(test / "Canon_002_LR4.png")
    assert prepare_main(["realsr", str(tmp_path / "raw"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Canon_002: ")
    assert re.search(message, err[0])
    assert not (tmp_path / "out").exists()  # checked before the first write: nothing half done


def test_existing_outputs_need_overwrite(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    lrs = _realsr(raw)
    prepare("realsr", raw, out, log=lambda _: None)
    with pytest.raises(PrepareError, match=r"Canon_001.png exists \(4 output\(s\) do\); pass --overwrite"):
        prepare("realsr", raw, out, log=lambda _: None)
    assert prepare("realsr", raw, out, overwrite=True, log=lambda _: None) == 2
    _check_crops(out, lrs)

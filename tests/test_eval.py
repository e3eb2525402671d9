"""Evaluation: registry, pairing errors, scoring with an injected backend, tables, CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pure.eval import (
    FULL_REFERENCE,
    METRICS,
    NO_REFERENCE,
    EvalError,
    MetricBackend,
    MetricUnavailable,
    PyiqaBackend,
    evaluate,
    format_table,
    get_metric,
    pair_images,
    parse_metrics,
)
from pure.eval.cli import main as eval_main

ROOT = Path(__file__).resolve().parents[1]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


class FakeBackend:
    """Deterministic stand-in: FR score = mean |pred - gt|, NR score = mean pixel, FID = mean-pixel gap."""

    name = "fake"
    version = "1.0"

    def __init__(self, unavailable: tuple[str, ...] = (), fail: dict | None = None) -> None:
        self.unavailable = unavailable
        self.fail = fail or {}  # (metric, stem or None for the folder metric) -> exception raised at runtime
        self.calls: list[tuple[str, list[str]]] = []

    def score_pairs(self, spec, preds, gts):
        if spec.name in self.unavailable:
            raise MetricUnavailable(spec.name, "weights unreachable")
        self.calls.append((spec.name, [Path(p).stem for p in preds]))
        for p in preds:
            if (spec.name, Path(p).stem) in self.fail:
                raise self.fail[(spec.name, Path(p).stem)]
        if spec.needs_reference:
            return [float(np.abs(_pixels(p) - _pixels(g)).mean()) for p, g in zip(preds, gts, strict=True)]
        return [float(_pixels(p).mean()) for p in preds]

    def score_folders(self, spec, pred_dir, gt_dir):
        self.calls.append((spec.name, []))
        if (spec.name, None) in self.fail:
            raise self.fail[(spec.name, None)]
        mean = lambda d: np.mean([_pixels(p).mean() for p in sorted(Path(d).iterdir())])  # noqa: E731
        return float(abs(mean(pred_dir) - mean(gt_dir)))


def _write(folder: Path, name: str, value: int, size=(16, 12)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for stem, p, g in (("a", 10, 20), ("b", 100, 70), ("c", 200, 200)):
        _write(pred, f"{stem}.png", p)
        _write(gt, f"{stem}.png", g)
    return pred, gt


# ---- registry -------------------------------------------------------------------------------------------


def test_registry_directions_and_reference_flags():
    lower = {name for name, spec in METRICS.items() if spec.lower_better}
    assert lower == {"lpips", "dists", "fid", "niqe"}
    assert set(FULL_REFERENCE) == {"psnr", "ssim", "lpips", "dists", "fid"}
    assert set(NO_REFERENCE) == {"niqe", "musiq", "maniqa", "clipiqa", "topiq_nr"}
    assert [n for n, s in METRICS.items() if s.folder_level] == ["fid"]
    assert METRICS["maniqa"].pyiqa_name == "maniqa-pipal"
    assert METRICS["topiq_nr"].pyiqa_name == "topiq_nr"
    for name in ("psnr", "ssim"):  # Y channel of YCbCr, set explicitly (pyiqa's defaults differ)
        assert METRICS[name].settings == {"test_y_channel": True, "color_space": "ycbcr"}
    assert METRICS["niqe"].arrow == "↓" and METRICS["musiq"].arrow == "↑"


def test_parse_metrics_aliases_order_and_errors():
    assert [s.name for s in parse_metrics("SSIM, psnr,topiq,maniqa-pipal,psnr")] == [
        "ssim",
        "psnr",
        "topiq_nr",
        "maniqa",
    ]
    assert get_metric("TOPIQ_NR").name == "topiq_nr"
    with pytest.raises(ValueError, match="unknown metric 'brisque'; choose from: psnr"):
        parse_metrics("psnr,brisque")
    with pytest.raises(ValueError, match="names no metric"):
        parse_metrics(" , ")


def test_fake_backend_satisfies_protocol_and_pyiqa_is_lazy():
    assert isinstance(FakeBackend(), MetricBackend)
    assert isinstance(PyiqaBackend(), MetricBackend)
    code = "import sys, pure.eval, pure.eval.cli; print('pyiqa' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.skipif(importlib.util.find_spec("pyiqa") is not None, reason="pyiqa is installed here")
def test_pyiqa_backend_without_pyiqa_reports_the_metric(folders):
    pred, _ = folders
    backend = PyiqaBackend(device="cpu")
    with pytest.raises(MetricUnavailable, match="pyiqa cannot be imported") as info:
        backend.score_pairs(METRICS["niqe"], [pred / "a.png"], None)
    assert info.value.metric == "niqe"


needs_pyiqa = pytest.mark.skipif(
    importlib.util.find_spec("pyiqa") is None, reason="needs pyiqa ('pure[eval]', or make test-pyiqa)"
)


@pytest.mark.pyiqa
@needs_pyiqa
def test_pyiqa_psnr_ssim_y_channel(folders):
    pred, gt = folders
    backend = PyiqaBackend(device="cpu")
    psnr = backend.score_pairs(METRICS["psnr"], [pred / "b.png"], [gt / "b.png"])[0]
    # grey images: Y = 16 + 219/255 * v, so |dY| = 30 * 219/255 on a 0..255 scale
    assert psnr == pytest.approx(10 * np.log10(255**2 / (30 * 219 / 255) ** 2), abs=0.05)
    ssim = backend.score_pairs(METRICS["ssim"], [pred / "c.png"], [gt / "c.png"])[0]
    assert ssim == pytest.approx(1.0, abs=1e-4)


@pytest.mark.pyiqa
@needs_pyiqa
def test_pyiqa_cli_scores_and_names_a_metric_it_cannot_load(folders, tmp_path):
    """The real backend end to end: PSNR/SSIM scored, NIQE (weights downloaded by pyiqa) either scored or,
    offline, skipped with its reason while the others go on."""
    pred, gt = folders
    out = tmp_path / "results"
    assert (
        eval_main(["--pred", str(pred), "--gt", str(gt), "--out", str(out), "--metrics", "psnr,ssim,niqe"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["psnr"]["count"] == 3 and summary["metrics"]["ssim"]["count"] == 3
    assert summary["metrics"]["psnr"]["pyiqa_name"] == "psnr"
    niqe = summary["metrics"].get("niqe", {})
    assert niqe.get("mean") is not None or "niqe" in summary["skipped"]
    assert "psnr" in (out / "table.md").read_text().lower()


# ---- pairing --------------------------------------------------------------------------------------------


def test_pairing_by_stem_across_suffixes(tmp_path):
    _write(tmp_path / "pred", "x.png", 1)
    _write(tmp_path / "gt", "x.jpg", 1)
    pairs = pair_images(tmp_path / "pred", tmp_path / "gt")
    assert [(p.stem, p.pred.name, p.gt.name) for p in pairs] == [("x", "x.png", "x.jpg")]
    assert pair_images(tmp_path / "pred", None)[0].gt is None


def test_pairing_errors(folders, tmp_path):
    pred, gt = folders
    _write(gt, "d.png", 5)
    with pytest.raises(EvalError, match=r"1 reference image\(s\) .* no restoration .*: d; restore them"):
        pair_images(pred, gt)
    (gt / "d.png").unlink()
    _write(pred, "e.png", 5)
    with pytest.raises(EvalError, match=r"no reference .*: e; pairs are matched by file stem"):
        pair_images(pred, gt)
    _write(pred, "e.jpg", 5)
    with pytest.raises(EvalError, match="share the stem 'e'"):
        pair_images(pred, gt)
    (pred / "e.jpg").unlink()
    (pred / "e.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match=r"--gt .*empty: folder has no image files"):
        pair_images(pred, tmp_path / "empty")
    with pytest.raises(EvalError, match=r"--pred .*nowhere: not a folder"):
        pair_images(tmp_path / "nowhere", gt)


def test_size_mismatch_is_reported_before_scoring(folders, tmp_path):
    pred, gt = folders
    _write(pred, "b.png", 100, size=(8, 8))
    backend = FakeBackend()
    with pytest.raises(EvalError, match=r"b \(8x8 vs GT 16x12\).*--size 512"):
        evaluate(pred, gt, parse_metrics("psnr"), backend, tmp_path / "out", log=lambda _: None)
    assert backend.calls == []
    # no-reference metrics do not compare sizes
    evaluate(pred, None, parse_metrics("niqe"), backend, tmp_path / "out", log=lambda _: None)


# ---- scoring, summary, table ----------------------------------------------------------------------------


def test_evaluate_writes_csv_summary_and_table(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "results"
    specs = parse_metrics("psnr,niqe,fid,lpips")
    summary = evaluate(
        pred, gt, specs, FakeBackend(unavailable=("lpips",)), out, "RealSR", log=lambda _: None
    )

    assert summary["metrics"]["psnr"]["mean"] == pytest.approx((10 + 30 + 0) / 3)
    assert summary["metrics"]["niqe"]["mean"] == pytest.approx((10 + 100 + 200) / 3)
    assert summary["metrics"]["fid"]["mean"] == pytest.approx(abs(310 / 3 - 290 / 3))
    assert summary["metrics"]["psnr"]["count"] == 3 and summary["count"] == 3
    assert summary["metrics"]["psnr"]["settings"] == {"test_y_channel": True, "color_space": "ycbcr"}
    assert summary["metrics"]["niqe"]["lower_better"] is True
    assert summary["skipped"] == {"lpips": "weights unreachable"}
    assert summary["backend"] == {"name": "fake", "version": "1.0"}
    assert summary["set"] == "realsr" and summary["reported"]["scores"]["psnr"] == 22.83
    assert json.loads((out / "summary.json").read_text()) == summary

    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["stem"] for r in rows] == ["a", "b", "c"]
    assert set(rows[0]) == {"stem", "pred", "gt", "psnr", "niqe"}
    assert float(rows[1]["psnr"]) == pytest.approx(30.0) and float(rows[2]["niqe"]) == pytest.approx(200)

    table = (out / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| | PSNR ↑ | LPIPS ↓ | FID ↓ | NIQE ↓ |"
    assert lines[2] == "| this run (3 images) | 13.33 | – | 6.67 | 103.3333 |"
    assert lines[3] == "| PURE, reported (RealSR) | 22.83 | 0.3821 | 188.33 | 5.4090 |"
    assert '"reported" rows are copied from the PURE paper' in table
    assert "lpips skipped: weights unreachable." in table
    assert "Metrics: fake 1.0; PSNR/SSIM on the Y channel (BT.601 YCbCr); FID folder against folder." in table


@pytest.mark.parametrize(
    ("test_set", "row"),
    [
        ("OST-Val", "| PURE, reported (OST-Val) | 18.52 | 0.4181 | 4.7977 | 0.6424 |"),
        ("drealsr", "| PURE, reported (DRealSR) | 24.73 | 0.6459 | 5.4846 | 0.5251 |"),
        ("RealLQ250", "| PURE, reported (RealLQ250) | – | – | 4.5054 | 0.5409 |"),
    ],
)
def test_reported_rows_for_each_set(test_set, row):
    from pure.eval.reported import REPORTED, canonical_set

    summary = {
        "count": 2,
        "set": canonical_set(test_set),
        "backend": {"name": "fake", "version": "1"},
        "metrics": {name: {"mean": 1.0} for name in ("psnr", "ssim", "niqe", "maniqa")},
        "skipped": {},
        "reported": {"source": "PURE paper, reported", "scores": REPORTED[canonical_set(test_set)]},
    }
    assert format_table(summary).splitlines()[3] == row


def test_no_reference_run_skips_full_reference_metrics(folders, tmp_path):
    pred, _ = folders
    summary = evaluate(
        pred, None, parse_metrics("psnr,musiq"), FakeBackend(), tmp_path / "o", log=lambda _: None
    )
    assert summary["skipped"] == {"psnr": "needs reference images (--gt)"}
    assert summary["gt_dir"] is None and "reported" not in summary
    table = (tmp_path / "o" / "table.md").read_text()
    assert "Test set: not given. Metrics: fake 1.0." in table and "Y channel" not in table


def test_rerun_scores_only_new_or_changed_images(folders, tmp_path):
    pred, gt = folders
    out, quiet = tmp_path / "out", lambda _: None
    evaluate(pred, gt, parse_metrics("psnr"), FakeBackend(), out, log=quiet)
    backend = FakeBackend()
    evaluate(pred, gt, parse_metrics("psnr,niqe"), backend, out, log=quiet)
    assert backend.calls == [("niqe", ["a", "b", "c"])]  # psnr reused, niqe new

    _write(pred, "b.png", 90)
    os.utime(pred / "b.png", ns=(1, 1))  # a different signature even on coarse-mtime file systems
    backend = FakeBackend()
    summary = evaluate(pred, gt, parse_metrics("psnr,niqe"), backend, out, log=quiet)
    assert backend.calls == [("psnr", ["b"]), ("niqe", ["b"])]
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx((10 + 20 + 0) / 3)

    backend = FakeBackend()
    evaluate(pred, gt, parse_metrics("psnr"), backend, out, overwrite=True, log=quiet)
    assert backend.calls == [("psnr", ["a", "b", "c"])]


# ---- runtime failures of a metric -----------------------------------------------------------------------

OOM = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(GPU 0; 79 GiB total capacity)")


def test_a_metric_failing_on_one_image_costs_only_that_cell(folders, tmp_path):
    pred, gt = folders
    out, logs = tmp_path / "out", []
    backend = FakeBackend(fail={("musiq", "b"): OOM})
    summary = evaluate(pred, gt, parse_metrics("psnr,musiq"), backend, out, "realsr", log=logs.append)

    # the failing chunk is retried image by image, so a and c keep their scores
    assert backend.calls == [
        ("psnr", ["a", "b", "c"]),
        ("musiq", ["a", "b", "c"]),
        *[("musiq", [s]) for s in "abc"],
    ]
    error = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert summary["failures"] == [{"metric": "musiq", "image": "b", "error": error}]
    assert summary["metrics"]["musiq"]["mean"] == pytest.approx((10 + 200) / 2)
    assert (summary["metrics"]["musiq"]["count"], summary["metrics"]["musiq"]["failed"]) == (2, 1)
    assert summary["metrics"]["psnr"]["failed"] == 0 and summary["metrics"]["psnr"]["count"] == 3
    assert f"musiq: could not score b: {error}" in logs
    assert json.loads((out / "summary.json").read_text()) == summary

    rows = {r["stem"]: r for r in csv.DictReader((out / "per_image.csv").open())}
    assert rows["b"]["musiq"] == "" and float(rows["c"]["musiq"]) == 200 and float(rows["b"]["psnr"]) == 30

    table = (out / "table.md").read_text()
    assert table.splitlines()[2] == "| this run (3 images) | 13.33 | 105.00* |"
    assert (
        f"musiq could not score 1 of 3 images (* = mean over the others): b; first error: {error}." in table
    )

    # failures are not cached: a rerun retries exactly the failed cell
    backend = FakeBackend()
    summary = evaluate(pred, gt, parse_metrics("psnr,musiq"), backend, out, "realsr", log=logs.append)
    assert backend.calls == [("musiq", ["b"])]
    assert summary["failures"] == [] and summary["metrics"]["musiq"]["mean"] == pytest.approx(310 / 3)
    assert "*" not in (out / "table.md").read_text().splitlines()[2]


def test_folder_metric_failure_and_wrong_score_counts_are_recorded(folders, tmp_path):
    pred, gt = folders

    class ShortBackend(FakeBackend):  # returns one score too few for the whole chunk, right ones alone
        def score_pairs(self, spec, preds, gts):
            scores = super().score_pairs(spec, preds, gts)
            return scores[:-1] if len(preds) > 1 and spec.name == "niqe" else scores

    backend = ShortBackend(fail={("fid", None): ValueError("Inception weights: checksum mismatch")})
    summary = evaluate(pred, gt, parse_metrics("fid,niqe"), backend, tmp_path / "o", log=lambda _: None)
    assert summary["failures"] == [
        {"metric": "fid", "image": None, "error": "ValueError: Inception weights: checksum mismatch"}
    ]
    assert summary["metrics"]["fid"] | {"settings": None} == summary["metrics"]["fid"] | {
        "mean": None,
        "count": 0,
        "failed": 3,
        "settings": None,
    }
    assert summary["metrics"]["niqe"]["count"] == 3 and summary["metrics"]["niqe"]["failed"] == 0
    table = (tmp_path / "o" / "table.md").read_text()
    assert table.splitlines()[2] == "| this run (3 images) | – | 103.3333 |"
    assert "- fid failed: ValueError: Inception weights: checksum mismatch." in table


def test_a_non_finite_score_marks_the_mean_as_partial(folders, tmp_path):
    pred, _ = folders

    class NanOnB(FakeBackend):
        def score_pairs(self, spec, preds, gts):
            scores = super().score_pairs(spec, preds, gts)
            return [float("nan") if Path(p).stem == "b" else v for p, v in zip(preds, scores, strict=True)]

    summary = evaluate(pred, None, parse_metrics("niqe"), NanOnB(), tmp_path / "o", log=lambda _: None)
    assert summary["failures"] == [] and summary["metrics"]["niqe"]["count"] == 2
    assert format_table(summary).splitlines()[2] == "| this run (3 images) | 105.0000* |"
    assert "- niqe gave a finite score for 2 of 3 images (* = mean over those)." in format_table(summary)


def test_interrupt_is_not_recorded_as_a_failure(folders, tmp_path):
    pred, _ = folders
    backend = FakeBackend(fail={("niqe", "a"): KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        evaluate(pred, None, parse_metrics("niqe"), backend, tmp_path / "o", log=lambda _: None)


def test_cli_exit_status_with_failed_cells(folders, tmp_path, capsys):
    pred, gt = folders
    argv = ["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "r"), "--metrics", "psnr,niqe"]
    assert eval_main(argv, backend=FakeBackend(fail={("niqe", "c"): OOM})) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: 1 score(s) could not be computed (niqe 1); their cells are empty, listed under "
        '"failures" in summary.json and in table.md; a rerun retries them'
    ]
    assert eval_main([*argv, "--strict"], backend=FakeBackend(fail={("niqe", "c"): OOM})) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --strict: scores missing for niqe"
    assert eval_main([*argv, "--strict"], backend=FakeBackend(unavailable=("niqe",))) == 1
    assert eval_main([*argv, "--strict", "--overwrite"], backend=FakeBackend()) == 0

    everything = {(m, s): OOM for m in ("psnr", "niqe") for s in "abc"}
    assert eval_main([*argv, "--overwrite"], backend=FakeBackend(fail=everything)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no metric could be computed")


# ---- CLI ------------------------------------------------------------------------------------------------


def test_cli_help_runs_without_pyiqa():
    out = subprocess.run(
        [sys.executable, "-m", "pure.eval", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "--pred" in out.stdout and "maniqa" in out.stdout and "per_image.csv" in out.stdout


def test_cli_scores_with_injected_backend_and_reports_errors(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "res"
    argv = [
        "--pred",
        str(pred),
        "--gt",
        str(gt),
        "--out",
        str(out),
        "--metrics",
        "psnr,ssim",
        "--set",
        "realsr",
    ]
    assert eval_main(argv, backend=FakeBackend()) == 0
    assert (out / "table.md").is_file() and (out / "per_image.csv").is_file()

    _write(gt, "zz.png", 1)
    assert eval_main(argv, backend=FakeBackend()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 reference image(s)")

    assert eval_main([*argv[:-4], "--metrics", "nope"], backend=FakeBackend()) == 2
    (gt / "zz.png").unlink()
    assert eval_main([*argv, "--overwrite"], backend=FakeBackend(unavailable=("psnr", "ssim"))) == 1


# ---- benchmark mode -------------------------------------------------------------------------------------


def test_benchmark_mode_restores_resumably_then_scores(tiny_checkpoint, tmp_path, capsys):
    lq, gt, pred, out = (tmp_path / name for name in ("lq", "gt", "pred", "res"))
    rng = np.random.default_rng(0)
    for stem in ("0001", "0002"):
        lq.mkdir(exist_ok=True)
        gt.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(lq / f"{stem}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(gt / f"{stem}.png")
    argv = ["--model", str(tiny_checkpoint), "--lq", str(lq), "--pred", str(pred), "--gt", str(gt)]
    argv += ["--out", str(out), "--metrics", "psnr,niqe", "--size", "32", "--batch-size", "2"]
    argv += ["--device", "cpu", "--max-text-tokens", "8"]  # the tiny random model would babble 256 tokens
    assert eval_main(argv, backend=FakeBackend()) == 0
    assert "2 image(s) to restore" in capsys.readouterr().out
    assert sorted(p.name for p in pred.iterdir()) == ["0001.png", "0002.png", "restoration.json"]
    assert Image.open(pred / "0001.png").size == (32, 32)
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert pictures == ["0001_compare.png", "0001_entropy.png", "0002_compare.png", "0002_entropy.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restoration"]["size"] == 32 and summary["restoration"]["cfg_scale"] == 0.8
    assert summary["metrics"]["psnr"]["count"] == 2

    record = json.loads((pred / "restoration.json").read_text())
    assert record["restored"] == ["0001", "0002"] and record["settings"] == {
        k: v for k, v in summary["restoration"].items() if k != "model_identity"
    }
    assert record["model_identity"]["dtype"] == "torch.float32"

    (pred / "0002.png").unlink()
    # the options python -m pure.infer has, on the real (tiny) model: Jacobi decoding, dtype, tokenizer
    tokenizer = tmp_path / "my_tokenizer.json"  # not the checkpoint's default path, so it must be passed
    tokenizer.write_bytes((tiny_checkpoint / "tokenizer.json").read_bytes())
    flags = ["--jacobi", "4", "--dtype", "float32", "--tokenizer", str(tokenizer)]
    # resuming 0002 with these would score images made two ways as one set: refused, nothing touched
    assert eval_main([*argv, "--no-pictures", *flags], backend=FakeBackend()) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert 'holds 1 restoration(s) made with other settings (dtype: null then, "float32" now; ' in err
    assert "jacobi_window: 0 then, 4 now; tokenizer: null then, " in err
    assert "pass --overwrite to restore every image again with the new settings, or give a new --pred" in err
    assert sorted(p.name for p in pred.iterdir()) == ["0001.png", "restoration.json"]
    assert json.loads((pred / "restoration.json").read_text()) == record

    assert eval_main([*argv, "--no-pictures", "--overwrite", *flags], backend=FakeBackend()) == 0
    assert "2 image(s) to restore" in capsys.readouterr().out
    assert (pred / "0002.png").is_file()
    restoration = json.loads((out / "summary.json").read_text())["restoration"]
    assert restoration["jacobi_window"] == 4 and restoration["dtype"] == "float32"
    assert restoration["tokenizer"] == str(tokenizer.resolve())
    assert restoration["model_identity"]["tokenizer"] == str(tokenizer)
    assert restoration["model_identity"]["dtype"] == "torch.float32"
    assert json.loads((pred / "restoration.json").read_text())["restored"] == ["0001", "0002"]


FAKE_IDENTITY = {"model": "fake", "dtype": "torch.float16"}


class _FakeRestorer:
    """Records what benchmark mode hands the restorer; restores to flat grey images."""

    def __init__(self) -> None:
        self.identity = dict(FAKE_IDENTITY)
        self.calls: list[dict] = []

    def restore_batch(self, images, seeds, size, **kwargs):
        import types

        self.calls.append({"n": len(images), "seeds": seeds, "size": size, **kwargs})
        return [types.SimpleNamespace(image=Image.new("RGB", (size, size), (9, 9, 9))) for _ in images]


def test_benchmark_flags_reach_the_restorer_as_in_pure_infer(tmp_path, monkeypatch):
    import torch

    from pure import infer
    from pure.eval.cli import DTYPE_NAMES
    from pure.restorer import PureRestorer

    assert sorted(DTYPE_NAMES) == sorted(infer.DTYPES)  # the same names, so the same flag values work
    loaded, restorer = [], _FakeRestorer()

    def from_pretrained(model, **kwargs):
        loaded.append((model, kwargs))
        return restorer

    monkeypatch.setattr(PureRestorer, "from_pretrained", staticmethod(from_pretrained))
    _write(tmp_path / "lq", "0001.png", 50, size=(8, 8))
    base = ["--model", "ckpt", "--lq", str(tmp_path / "lq"), "--pred", str(tmp_path / "p")]
    base += ["--out", str(tmp_path / "o"), "--metrics", "niqe", "--size", "16", "--device", "cpu"]
    base += ["--no-pictures", "--overwrite"]
    flags = ["--vq", "vq.pt", "--tokenizer", "tok.json", "--dtype", "bfloat16", "--jacobi", "--compile"]
    flags += ["--quantize", "int8"]
    assert eval_main([*base, *flags], backend=FakeBackend()) == 0
    expected = {
        "vq": "vq.pt",
        "tokenizer": "tok.json",
        "device": "cpu",
        "dtype": torch.bfloat16,
        "compile": True,
        "quantize": "int8",
        "threads": "auto",  # pure.infer's default: from the model's size
    }
    assert loaded == [("ckpt", expected)]
    [call] = restorer.calls
    assert call["sampling"].jacobi_window == 16  # bare --jacobi: pure.infer's default window
    assert (call["size"], call["seeds"], call["color_fix"]) == (16, [0], True)
    restoration = json.loads((tmp_path / "o" / "summary.json").read_text())["restoration"]
    assert restoration["jacobi_window"] == 16 and restoration["tokenizer"] == "tok.json"
    assert restoration["quantize"] == "int8"
    assert restoration["model_identity"] == FAKE_IDENTITY

    # without the flags: pure.infer's defaults (no Jacobi; the restorer picks dtype and tokenizer)
    loaded.clear()
    restorer.calls.clear()
    assert eval_main(base, backend=FakeBackend()) == 0
    expected = {"vq": None, "tokenizer": None, "device": "cpu", "dtype": None, "compile": False}
    assert loaded == [("ckpt", {**expected, "quantize": None, "threads": "auto"})]
    assert restorer.calls[0]["sampling"].jacobi_window == 0
    # the text budget is the decoder's own default, as in pure.infer (it was a stale 256 here)
    from pure.decoding.config import SamplingConfig

    assert restorer.calls[0]["sampling"].max_text_tokens == SamplingConfig().max_text_tokens


def test_benchmark_settings_not_given_are_the_checkpoints_sampling_file(tmp_path, monkeypatch):
    from pure.decoding.config import SAMPLING_FILE
    from pure.restorer import PureRestorer

    restorer = _FakeRestorer()
    monkeypatch.setattr(PureRestorer, "from_pretrained", staticmethod(lambda model, **kwargs: restorer))
    model = tmp_path / "ckpt"  # only its sampling.json is read: the loading is faked
    model.mkdir()
    (model / SAMPLING_FILE).write_text('{"cfg_scale": 1.0, "temperature": 0.0, "text_top_k": 2}')
    _write(tmp_path / "lq", "0001.png", 50, size=(8, 8))
    argv = ["--model", str(model), "--lq", str(tmp_path / "lq"), "--out", str(tmp_path / "o")]
    argv += ["--metrics", "niqe", "--size", "16", "--device", "cpu", "--no-pictures", "--overwrite"]

    assert eval_main([*argv, "--pred", str(tmp_path / "a")], backend=FakeBackend()) == 0
    assert (
        eval_main([*argv, "--pred", str(tmp_path / "b"), "--temperature", "0.5"], backend=FakeBackend()) == 0
    )
    own, given = (call["sampling"] for call in restorer.calls)
    assert (own.cfg_scale, own.temperature, own.text_top_k) == (1.0, 0.0, 2)
    assert (given.cfg_scale, given.temperature, given.text_top_k) == (1.0, 0.5, 2)
    restoration = json.loads((tmp_path / "o" / "summary.json").read_text())["restoration"]
    assert (restoration["cfg_scale"], restoration["temperature"]) == (1.0, 0.5)  # recorded as numbers
    assert restoration["text_top_k"] == 2  # the file's other fields too, where they are not PURE's

    (model / SAMPLING_FILE).write_text('{"cfg": 1.0}')
    assert eval_main([*argv, "--pred", str(tmp_path / "c")], backend=FakeBackend()) == 2


def _fake_benchmark(tmp_path, monkeypatch, restorer):
    """argv of a benchmark run of two 8 px LQ images restored by `restorer` (no model is loaded)."""
    from pure.restorer import PureRestorer

    monkeypatch.setattr(PureRestorer, "from_pretrained", staticmethod(lambda model, **kwargs: restorer))
    for stem in ("0001", "0002"):
        _write(tmp_path / "lq", f"{stem}.png", 50, size=(8, 8))
    argv = ["--model", "ckpt", "--lq", str(tmp_path / "lq"), "--pred", str(tmp_path / "p")]
    argv += ["--out", str(tmp_path / "o"), "--metrics", "niqe", "--size", "16", "--batch-size", "2"]
    return [*argv, "--no-pictures"]


def test_benchmark_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    restorer = _FakeRestorer()
    argv = _fake_benchmark(tmp_path, monkeypatch, restorer)
    pred = tmp_path / "p"
    assert eval_main(argv, backend=FakeBackend()) == 0
    record = json.loads((pred / "restoration.json").read_text())
    assert record["restored"] == ["0001", "0002"] and record["settings"]["cfg_scale"] == 0.8
    assert record["model_identity"] == FAKE_IDENTITY
    assert record["settings"]["lq_dir"] == str((tmp_path / "lq").resolve())

    (pred / "0002.png").unlink()
    capsys.readouterr()
    assert eval_main([*argv, "--cfg", "0.5", "--seed", "3"], backend=FakeBackend()) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err == (
        f"error: --pred {pred} holds 1 restoration(s) made with other settings (cfg_scale: 0.8 then, "
        "0.5 now; seed: 0 then, 3 now); resuming would mix them into one score; pass --overwrite to "
        "restore every image again with the new settings, or give a new --pred folder (and --out) to keep "
        f"both; or rerun with the settings of {pred / 'restoration.json'}"
    )
    assert len(restorer.calls) == 1  # nothing restored, nothing written
    assert json.loads((pred / "restoration.json").read_text()) == record

    # the same settings resume: only the missing image; the summary reports the recorded settings
    assert eval_main(argv, backend=FakeBackend()) == 0
    assert [call["n"] for call in restorer.calls] == [2, 1]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["restoration"]["cfg_scale"] == 0.8

    # all done, other settings: still refused (the summary would record settings the images lack)
    assert eval_main([*argv, "--no-color-fix"], backend=FakeBackend()) == 2
    assert "color_fix: true then, false now" in capsys.readouterr().err


def test_benchmark_resume_without_a_record_or_after_an_interrupted_overwrite(tmp_path, monkeypatch, capsys):
    class Interrupted(_FakeRestorer):  # stops after its first batch, as Ctrl-C would
        def restore_batch(self, images, seeds, size, **kwargs):
            if self.calls:
                raise KeyboardInterrupt
            return super().restore_batch(images, seeds, size, **kwargs)

    restorer = Interrupted()
    argv = _fake_benchmark(tmp_path, monkeypatch, restorer)
    pred = tmp_path / "p"
    for stem in ("0001", "0002"):  # restorations of unknown origin (e.g. an older version, pure.infer)
        _write(pred, f"{stem}.png", 7, size=(16, 16))
    assert eval_main(argv, backend=FakeBackend()) == 2
    err = capsys.readouterr().err
    assert "holds 2 restoration(s) of this set (0001 ...) but no record (restoration.json)" in err
    assert restorer.calls == [] and not (pred / "restoration.json").exists()

    # --overwrite interrupted after one image: the record lists only what the new settings made
    overwrite = ["--overwrite", "--batch-size", "1", "--cfg", "0.5"]
    assert eval_main([*argv, *overwrite], backend=FakeBackend()) == 130
    record = json.loads((pred / "restoration.json").read_text())
    assert record["restored"] == ["0001"] and record["settings"]["cfg_scale"] == 0.5
    # so resuming redoes 0002 although its (old) file exists
    restorer = _FakeRestorer()
    _fake_benchmark(tmp_path, monkeypatch, restorer)
    assert eval_main([*argv, "--cfg", "0.5"], backend=FakeBackend()) == 0
    assert "1 image(s) to restore" in capsys.readouterr().out
    assert [call["n"] for call in restorer.calls] == [1]
    assert json.loads((pred / "restoration.json").read_text())["restored"] == ["0001", "0002"]


def test_benchmark_resume_with_a_model_loaded_differently_is_refused(tmp_path, monkeypatch, capsys):
    """A default dtype resolves per machine (bf16 on CUDA, fp32 on CPU): checked after loading, before
    the first restoration."""
    restorer = _FakeRestorer()
    argv = _fake_benchmark(tmp_path, monkeypatch, restorer)
    assert eval_main(argv, backend=FakeBackend()) == 0
    (tmp_path / "p" / "0002.png").unlink()
    restorer.identity = {**FAKE_IDENTITY, "dtype": "torch.float32"}
    capsys.readouterr()
    assert eval_main(argv, backend=FakeBackend()) == 2
    err = capsys.readouterr().err
    assert 'loaded differently (dtype: "torch.float16" then, "torch.float32" now)' in err
    assert len(restorer.calls) == 1 and not (tmp_path / "p" / "0002.png").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--jacobi", "1"], "--jacobi must be 0 (off) or >= 2 (16 is the default); got 1"),
        (["--jacobi", "-3"], "--jacobi must be 0 (off) or >= 2 (16 is the default); got -3"),
        (["--max-text-tokens", "0"], "--max-text-tokens must be >= 1; got 0"),
        (["--cfg", "-1"], "--cfg must be >= 0 (1 = no guidance); got -1.0"),
    ],
)
def test_benchmark_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    _write(tmp_path / "lq", "0001.png", 50, size=(8, 8))
    argv = ["--model", "x", "--lq", str(tmp_path / "lq"), "--pred", str(tmp_path / "p")]
    assert eval_main([*argv, "--out", str(tmp_path / "o"), *flags], backend=FakeBackend()) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_benchmark_dtype_choices_are_checked_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        eval_main(["--model", "x", "--pred", "p", "--out", "o", "--dtype", "float64"])
    assert info.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


def test_benchmark_mode_needs_lq(tmp_path, capsys):
    argv = ["--model", "x", "--pred", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    assert eval_main(argv, backend=FakeBackend()) == 2
    assert "--model needs --lq" in capsys.readouterr().err


def test_pyiqa_backend_call_paths_with_a_stand_in_module(folders, tmp_path, monkeypatch):
    """The real backend on a stand-in `pyiqa`: settings passed, tensors in [0, 1], failures per metric."""
    import types

    import torch

    created = []

    class StandIn:
        def __init__(self, name, kwargs):
            self.name, self.kwargs = name, kwargs

        def __call__(self, x, y=None):
            if isinstance(x, str):  # folder-level: FID(pred_dir, gt_dir)
                return torch.tensor(7.0)
            assert x.shape[:2] == (1, 3) and float(x.min()) >= 0 and float(x.max()) <= 1
            return (x - y).abs().mean() * 255 if y is not None else x.mean() * 255

    def create_metric(name, device=None, as_loss=False, **kwargs):
        if name == "maniqa-pipal":
            raise OSError("cannot download maniqa weights\nsecond line")
        created.append((name, str(device), kwargs))
        return StandIn(name, kwargs)

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    pred, gt = folders
    specs = parse_metrics("psnr,fid,musiq,maniqa")
    logs = []
    summary = evaluate(pred, gt, specs, PyiqaBackend(device="cpu"), tmp_path / "r", log=logs.append)
    assert created[0] == ("psnr", "cpu", {"test_y_channel": True, "color_space": "ycbcr"})
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(40 / 3, abs=1e-3)
    assert summary["metrics"]["musiq"]["mean"] == pytest.approx(310 / 3, abs=1e-3)
    assert summary["metrics"]["fid"]["mean"] == 7.0
    assert summary["skipped"] == {"maniqa": "OSError: cannot download maniqa weights"}
    assert "skipped maniqa: OSError: cannot download maniqa weights" in logs


def test_protocol_warnings_for_stablesr_sets(tmp_path):
    from pure.eval.benchmark import protocol_warnings

    ok, small = (
        _write(tmp_path, "ok.png", 1, size=(128, 128)),
        _write(tmp_path, "small.png", 1, size=(64, 64)),
    )
    assert protocol_warnings("RealSR", [ok]) == []
    [line] = protocol_warnings("drealsr", [ok, small])
    assert line.startswith("warning: small.png is 64x64; the drealsr protocol (StableSR) uses 128 px")
    assert protocol_warnings("reallq250", [small]) == protocol_warnings(None, [small]) == []


def test_pyiqa_backend_out_of_memory_on_one_image(folders, tmp_path, monkeypatch):
    """The real backend on a stand-in `pyiqa` that runs out of CUDA memory on image b: the cache is given
    back, b is recorded, a and c keep their scores."""
    import types

    import torch

    def metric(x, y=None):
        if round(float(x.mean()) * 255) == 100:  # image b
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x.mean() * 255

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    stand_in = types.SimpleNamespace(create_metric=lambda name, device=None, as_loss=False, **kw: metric)
    monkeypatch.setitem(sys.modules, "pyiqa", stand_in)
    pred, _ = folders
    summary = evaluate(
        pred, None, parse_metrics("musiq"), PyiqaBackend(device="cpu"), tmp_path / "r", log=print
    )
    assert summary["failures"] == [
        {
            "metric": "musiq",
            "image": "b",
            "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
        }
    ]
    assert summary["metrics"]["musiq"]["mean"] == pytest.approx(105, abs=1e-3)
    assert len(emptied) == 2  # the chunk of three, then b alone


def test_scoring_a_benchmark_pred_folder_reports_its_recorded_settings(tmp_path, monkeypatch):
    argv = _fake_benchmark(tmp_path, monkeypatch, _FakeRestorer())
    assert eval_main(argv, backend=FakeBackend()) == 0
    score_only = ["--pred", str(tmp_path / "p"), "--out", str(tmp_path / "s"), "--metrics", "niqe"]
    assert eval_main(score_only, backend=FakeBackend()) == 0
    restoration = json.loads((tmp_path / "s" / "summary.json").read_text())["restoration"]
    assert restoration["cfg_scale"] == 0.8 and restoration["model_identity"] == FAKE_IDENTITY

    _write(tmp_path / "p", "extra.png", 3, size=(16, 16))  # not made by that run: no claim about it
    assert eval_main(score_only, backend=FakeBackend()) == 0
    assert "restoration" not in json.loads((tmp_path / "s" / "summary.json").read_text())

"""Records in PURE's shape, and records -> VQ codes -> shards: round trip, kill-and-resume, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")

import pure.data.pretokenize as pretokenize_module
from pure.data.captions import CaptionIndex
from pure.data.pairs import PairSettings, make_pairs
from pure.data.pretokenize import Tokenizers, pretokenize, shard_name
from pure.data.records import IMAGE_PLACEHOLDER, build_records, read_records
from pure.data.records import main as records_main
from pure.data.shards import PRETOKENIZE_MANIFEST, find_shards, load_data_config, load_shard_set, read_shard
from pure.sequence import INSTRUCTION, SequenceFormat
from pure.vocab import BOI_NAME
from pure.vq import pil_to_pixels

CROP = SIZE = 64  # tiny images: 64 px HQ, 16 px LQ upsampled to 64, 8 x 8 codes with the tiny VQ
CAPTIONS = {
    "img0.png": "A red barn in a field.",
    "img1.png": "A cat sleeping on a sofa.",
    "img2.png": "Boats.",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Pairs of three source images (3 crops each) and their records; img3 has no caption."""
    root = tmp_path_factory.mktemp("data")
    src = root / "src"
    src.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        yy, xx = np.mgrid[0:80, 0:88] / 88
        photo = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + g.normal(0, 10, (80, 88, 3))
        Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(src / f"img{i}.png")
    make_pairs(src, root / "pairs", PairSettings(crop=CROP, crops_per_image=3, seed=0), progress=False)
    captions = CaptionIndex({"file": name, "caption": text} for name, text in CAPTIONS.items())
    summary = build_records(root / "pairs", captions, root / "records.jsonl")
    assert summary["records"] == 9 and summary["missing_captions"] == ["img3_000", "img3_001", "img3_002"]
    return root


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


def test_records_have_pure_shape(dataset):
    records = read_records(dataset / "records.jsonl")
    assert len(records) == 9
    for record in records:
        assert list(record) == ["conversations", "image", "degradation", "id"]
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": f"{INSTRUCTION} {IMAGE_PLACEHOLDER}"}
        params = json.loads((dataset / "pairs" / "params" / f"{record['id']}.json").read_text())
        caption = CAPTIONS[params["source"]]
        assert gpt == {"from": "gpt", "value": f"{params['label']} {caption} {IMAGE_PLACEHOLDER}"}
        text = human["value"] + gpt["value"]
        assert text.count(IMAGE_PLACEHOLDER) == 2
        # Placeholders are consumed in order: LQ first (the human turn), then HQ (the answer).
        lq, hq = (dataset / p for p in record["image"])
        assert lq == dataset / "pairs" / "lq" / f"{record['id']}.png"
        assert hq == dataset / "pairs" / "hq" / f"{record['id']}.png"
        assert Image.open(lq).size == (CROP // 4, CROP // 4) and Image.open(hq).size == (CROP, CROP)
        assert record["degradation"] == {
            k: params[k] for k in ("label", "blur_score", "noise_score", "params")
        }


def test_missing_captions_are_skipped_or_empty(dataset, tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))
    argv = ["--pairs", str(dataset / "pairs"), "--captions", str(captions), "--out", str(out)]
    assert records_main(argv) == 0
    assert "9 of 12 pairs" in capsys.readouterr().out and len(read_records(out)) == 9
    assert records_main([*argv, "--allow-missing-captions", "--absolute-paths"]) == 0
    records = {r["id"]: r for r in read_records(out)}
    assert len(records) == 12
    label = records["img3_000"]["degradation"]["label"]
    assert records["img3_000"]["conversations"][1]["value"] == f"{label} {IMAGE_PLACEHOLDER}"
    assert Path(records["img3_000"]["image"][0]).is_absolute()
    assert records_main(["--pairs", str(dataset / "pairs"), "--out", str(out)]) == 1
    assert "--allow-missing-captions" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Pre-tokenisation
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(dataset, tiny_checkpoint):
    """The shard set of the records, one worker, 3 shards of 4, 4, 1 records."""
    out = dataset / "shards-ref"
    summary = pretokenize(
        dataset / "records.jsonl", tiny_checkpoint, out, shard_size=4, size=SIZE, progress=False
    )
    assert summary["examples"] == 9 and summary["shards"] == 3 and summary["failed"] == []
    return out


def _rows(folder) -> list[dict]:
    return load_shard_set(folder).to_pylist()


def _shard_rows(folder) -> dict[str, list[dict]]:
    return {p.name: read_shard(p).to_pylist() for p in find_shards(folder)}


def _pixels(path: Path) -> torch.Tensor:
    """Independently of the module: RGB, bicubic to SIZE, VQ pixels."""
    image = Image.open(path).convert("RGB")
    return pil_to_pixels(image.resize((SIZE, SIZE), Image.BICUBIC))


def test_records_shards_records_round_trip(dataset, reference, tiny_checkpoint):
    tok = Tokenizers.load(tiny_checkpoint)
    fmt: SequenceFormat = tok.format
    records = {r["id"]: r for r in read_records(dataset / "records.jsonl")}
    rows = _rows(reference)
    assert [r["id"] for r in rows] == list(records)  # record order, each once
    for row in rows:
        record = records[row["id"]]
        params = record["degradation"]
        caption = record["conversations"][1]["value"].split(params["label"], 1)[1].split(IMAGE_PLACEHOLDER)[0]
        lq_path, hq_path = (dataset / p for p in record["image"])
        codes = tok.vq.encode(torch.stack([_pixels(lq_path), _pixels(hq_path)]))  # (2, 8, 8)
        answer = fmt.answer_text(params["label"], caption)
        ids, labels = fmt.training_example(codes[0], answer, codes[1], INSTRUCTION)
        stored = torch.tensor(row["input_ids"])
        assert torch.equal(stored, ids) and row["length"] == len(ids)
        assert torch.equal(SequenceFormat.labels_from_prompt_length(stored, row["prompt_length"]), labels)
        # The prompt is exactly BOS + instruction + LQ block + <eot>; the labels supervise exactly the answer.
        assert torch.equal(stored[: row["prompt_length"]], fmt.prompt_ids(codes[0]))
        parsed = fmt.parse_answer(stored[row["prompt_length"] :], strict=True)
        assert parsed.degradation == params["label"] and parsed.caption == caption.strip()
        assert torch.equal(parsed.codes, codes[1])
        assert int(stored[-1]) == fmt.vocab.eot


def test_kill_at_any_point_and_resume_gives_the_exact_set(dataset, reference, tiny_checkpoint, monkeypatch):
    out = dataset / "shards-killed"
    records = dataset / "records.jsonl"
    real_write = pretokenize_module.write_shard
    calls = {"n": 0}

    def write_then_die(examples, folder):  # killed right after the second shard is complete
        result = real_write(examples, folder)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(pretokenize_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(records, tiny_checkpoint, out, shard_size=4, size=SIZE, progress=False)
    monkeypatch.setattr(pretokenize_module, "write_shard", real_write)
    assert len(find_shards(out)) == 2
    # A kill inside write_shard leaves a staging folder (with a schema file) behind: it must not count.
    stale = out / f".{shard_name(2)}.tmp-killed" / "shard"
    stale.mkdir(parents=True)
    (stale / "pure_shard.json").write_text("{}")

    summary = pretokenize(records, tiny_checkpoint, out, shard_size=4, size=SIZE, progress=False)
    assert summary["shards_written_now"] == 1 and summary["examples"] == 9
    assert not stale.exists()
    assert _shard_rows(out) == _shard_rows(reference)
    again = pretokenize(records, tiny_checkpoint, out, shard_size=4, size=SIZE, progress=False)
    assert again["shards_written_now"] == 0


def test_sigkill_of_the_command_and_rerun_gives_the_exact_set(dataset, reference, tiny_checkpoint):
    out = dataset / "shards-sigkill"
    argv = [
        sys.executable, "-m", "pure.data.pretokenize", "--records", str(dataset / "records.jsonl"),
        "--model", str(tiny_checkpoint), "--out", str(out), "--shard-size", "1", "--size", str(SIZE),
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if (out / shard_name(2)).exists():
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done = len(list(out.glob("shard-*")))
    assert 0 < done < 9, "the kill should land mid-way"
    summary = pretokenize(
        dataset / "records.jsonl", tiny_checkpoint, out, shard_size=1, size=SIZE, progress=False
    )
    assert summary["examples"] == 9
    assert _rows(out) == _rows(reference)


def test_two_workers_write_the_same_shards_as_one(dataset, reference, tiny_checkpoint):
    out = dataset / "shards-2workers"
    summary = pretokenize(
        dataset / "records.jsonl",
        tiny_checkpoint,
        out,
        shard_size=4,
        size=SIZE,
        workers=2,
        device="cpu",
        progress=False,
    )
    assert summary["examples"] == 9
    assert _shard_rows(out) == _shard_rows(reference)


def test_failed_records_are_reported_and_stable(dataset, tiny_checkpoint, tmp_path):
    records = read_records(dataset / "records.jsonl")[:4]
    records[1]["image"][0] = "pairs/lq/does_not_exist.png"
    boi = BOI_NAME  # text must never spell a special token
    records[2]["conversations"][1]["value"] = f"Small blur, small noise. {boi} {IMAGE_PLACEHOLDER}"
    bad = dataset / "bad-records.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "shards"
    summary = pretokenize(bad, tiny_checkpoint, out, shard_size=2, size=SIZE, progress=False)
    assert summary["examples"] == 2
    assert [f["id"] for f in summary["failed"]] == [records[1]["id"], records[2]["id"]]
    assert "no such file" in summary["failed"][0]["reason"]
    assert "special-token" in summary["failed"][1]["reason"]
    assert [r["id"] for r in _rows(out)] == [records[0]["id"], records[3]["id"]]
    rerun = pretokenize(bad, tiny_checkpoint, out, shard_size=2, size=SIZE, progress=False)
    assert rerun["shards_written_now"] == 0 and len(rerun["failed"]) == 2


def test_other_settings_are_refused_and_the_data_config_reads_the_set(
    dataset, reference, tiny_checkpoint, tmp_path
):
    manifest = json.loads((reference / PRETOKENIZE_MANIFEST).read_text())
    assert manifest["num_records"] == 9 and manifest["size"] == SIZE and manifest["codebook_size"] == 64
    with pytest.raises(ValueError, match="shard_size"):
        pretokenize(
            dataset / "records.jsonl", tiny_checkpoint, reference, shard_size=2, size=SIZE, progress=False
        )
    config = tmp_path / "data.yaml"
    config.write_text(f"sets:\n  - {{path: {reference}, ratio: 0.5}}\n")
    (shard_set,) = load_data_config(config)
    assert shard_set.ratio == 0.5 and len(load_shard_set(shard_set.path)) == 9


def test_cli_summary_and_bad_arguments(dataset, reference, tiny_checkpoint, capsys):
    from pure.data.pretokenize import main

    argv = [
        "--records",
        str(dataset / "records.jsonl"),
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(reference),
    ]
    assert main([*argv, "--shard-size", "4", "--size", str(SIZE), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "9 of 9 records in 3 shards" in out and "0 shards written now" in out and "exactly once" in out
    assert main([*argv, "--size", "48", "--shard-size", "4", "--device", "cpu"]) == 1
    assert main([*argv, "--model", str(dataset / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "--size must be a positive multiple of 32" in err and "is not a checkpoint folder" in err
    assert "Traceback" not in err


def test_cli_without_datasets_fails_in_one_line_and_writes_nothing(
    dataset, tiny_checkpoint, monkeypatch, capsys
):
    from pure.data.pretokenize import main

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    out = dataset / "no_shards"
    argv = ["--records", str(dataset / "records.jsonl"), "--model", str(tiny_checkpoint), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not installed: datasets (writes the shards)") and "pip install" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

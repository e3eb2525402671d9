"""Several processes (torchrun, gloo on the CPU): the same files as one process, one summary, the same resume.

Two ``torchrun --nproc-per-node 2`` runs start four Python processes in all (~6 s of imports each on 2 CPU
cores), so this module is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pure.distributed import Ranks

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--size", "64", "--max-text-tokens", "16", "--quiet", "--seed", "3"]


def test_shards_split_the_list_alike_on_every_rank():
    items = list(range(7))
    shards = [Ranks(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(item for shard in shards for item in shard) == items
    assert Ranks().shard(items) == items and Ranks().sum(5) == 5 and Ranks().gather("x") == ["x"]


def test_ranks_from_torchrun_s_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Ranks.from_env() == Ranks(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK must be in"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ranks = Ranks.from_env()
    assert ranks == Ranks(2, 4, 0) and not ranks.is_main
    assert ranks.device("cpu") == "cpu" and ranks.device("cuda:3") == "cuda:3"


def _lq_folder(folder: Path) -> Path:
    folder.mkdir()
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 30), (90, 90, 90)]
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (16, 16), colour)
        image.putpixel((i, i), (255, 255, 255))
        image.save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # one failure, on one rank
    return folder


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, "-m", "pure.infer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def _sidecar(path: Path) -> dict:
    record = json.loads(path.read_text())
    del record["timings"], record["output"]  # when it ran, and the folder it was written to
    return record


@pytest.mark.slow
def test_two_processes_write_what_one_does(tiny_checkpoint, tmp_path):
    from pure import infer

    lq = _lq_folder(tmp_path / "lq")
    one, two = tmp_path / "one", tmp_path / "two"
    model = ["--model", str(tiny_checkpoint), *COMMON]
    assert infer.main(["--input", str(lq), "--output", str(one), *model]) == 1  # broken.png fails

    done = _torchrun("--input", str(lq), "--output", str(two), *model)
    assert done.returncode == 1, done.stderr[-3000:]  # the failure of one rank is every rank's exit status
    summaries = [line for line in done.stdout.splitlines() if line.startswith("restored ")]
    assert summaries == ["restored 5, skipped 0 existing, failed 1"], done.stdout  # rank 0's, for both
    assert done.stderr.count("error: ") == 1 and "broken.png" in done.stderr

    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 10  # 5 PNGs, 5 sidecars
    for name in names:
        if name.endswith(".png"):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
        else:
            assert _sidecar(one / name) == _sidecar(two / name), name

    # resume: only the missing output is restored, by whichever rank owns it; one summary again
    (two / "img3.png").unlink()
    again = _torchrun("--input", str(lq), "--output", str(two), *model)
    summaries = [line for line in again.stdout.splitlines() if line.startswith("restored ")]
    assert summaries == ["restored 1, skipped 4 existing, failed 1"], again.stdout
    assert (one / "img3.png").read_bytes() == (two / "img3.png").read_bytes()


EVAL_SCRIPT = """
import sys

import numpy as np
from PIL import Image

from pure.eval.cli import main


class MeanPixel:  # a no-reference "metric" without pyiqa
    name, version = "mean-pixel", "1"

    def score_pairs(self, spec, preds, gts):
        return [float(np.asarray(Image.open(p), dtype=np.float64).mean()) for p in preds]


sys.exit(main(sys.argv[1:], backend=MeanPixel()))
"""


@pytest.mark.slow
def test_eval_benchmark_mode_on_two_processes_writes_what_one_does(tiny_checkpoint, tmp_path):
    script = tmp_path / "eval_mean_pixel.py"
    script.write_text(EVAL_SCRIPT)
    lq = _lq_folder(tmp_path / "lq")
    (lq / "broken.png").unlink()
    one_pred, two_pred = tmp_path / "pred_one", tmp_path / "pred_two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

    def run(name: str, launcher: list[str]) -> subprocess.CompletedProcess:
        argv = ["--model", str(tiny_checkpoint), "--lq", str(lq), "--pred", str(tmp_path / f"pred_{name}")]
        argv += ["--out", str(tmp_path / f"out_{name}"), "--metrics", "niqe", "--size", "32"]
        argv += ["--max-text-tokens", "8", "--no-pictures", "--seed", "1"]
        command = [sys.executable, *launcher, str(script), *argv]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("one", [])
    done = run("two", torchrun)
    assert done.stdout.count("5 image(s) to restore") == 1 and done.stdout.count("wrote ") == 1, done.stdout
    names = sorted(p.name for p in one_pred.iterdir())
    assert names == sorted(p.name for p in two_pred.iterdir())  # no rank records left behind
    for name in names:
        if name.endswith(".png"):
            assert (one_pred / name).read_bytes() == (two_pred / name).read_bytes(), name
    records = [json.loads((d / "restoration.json").read_text()) for d in (one_pred, two_pred)]
    assert records[0]["restored"] == records[1]["restored"] == [f"img{i}" for i in range(5)]
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("out_one", "out_two")]
    assert summaries[0]["metrics"]["niqe"] == summaries[1]["metrics"]["niqe"]

    # resume after an interruption: rank 1 had recorded img1 in its own file, rank 0 had not folded it in
    (two_pred / "img3.png").unlink()
    record = records[1] | {"restored": ["img0", "img2", "img4"]}
    (two_pred / "restoration.json").write_text(json.dumps(record))
    (two_pred / "restoration.rank1.json").write_text(json.dumps(record | {"restored": ["img1", "img3"]}))
    again = run("two", torchrun)
    assert "1 image(s) to restore" in again.stdout  # img3 only: img1 counts as done from rank 1's record
    assert (one_pred / "img3.png").read_bytes() == (two_pred / "img3.png").read_bytes()
    assert json.loads((two_pred / "restoration.json").read_text())["restored"] == records[0]["restored"]
    assert not list(two_pred.glob("restoration.rank*"))

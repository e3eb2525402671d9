"""Model card: written through huggingface_hub's card API, parses back, has the metrics; push mocked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard, constants
from PIL import Image

from pure import hub
from pure.eval import evaluate, parse_metrics


class GreyBackend:
    name = "fake"
    version = "0.1"

    def score_pairs(self, spec, preds, gts):
        return [float(np.asarray(Image.open(p)).mean()) / 100 for p in preds]

    def score_folders(self, spec, pred_dir, gt_dir):
        return 42.0


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def score_two_grey_images(tmp_path, metrics: str, backend) -> dict:
    """``python -m pure.eval``'s scoring of two grey pred/gt pairs into ``tmp_path/results``."""
    for sub in ("pred", "gt"):
        (tmp_path / sub).mkdir()
        for i, v in enumerate((50, 150)):
            Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / sub / f"{i}.png")
    return evaluate(
        tmp_path / "pred",
        tmp_path / "gt",
        parse_metrics(metrics),
        backend,
        tmp_path / "results",
        test_set="realsr",
        log=lambda _: None,
    )


@pytest.fixture
def summary_path(tmp_path):
    score_two_grey_images(tmp_path, "psnr,ssim,fid,musiq", GreyBackend())
    return tmp_path / "results" / "summary.json"


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_card_renders_and_parses_with_metrics(ckpt, summary_path, capsys):
    assert hub.main([str(ckpt), "--results", str(summary_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {ckpt / 'README.md'}"
    card = ModelCard.load(ckpt / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.base_model == "nonwhy/PURE"
    assert data.pipeline_tag == "image-to-image" and data.datasets == ["LSDIR", "FFHQ"]
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {"psnr": 1.0, "ssim": 1.0, "fid": 42.0, "musiq": 1.0}
    assert {r.dataset_name for r in data.eval_results} == {"RealSR"}
    assert json.loads(data.eval_results[0].metric_config) == {"color_space": "ycbcr", "test_y_channel": True}

    text = card.text
    assert "| ckpt (2 images) | 1.00 | 1.0000 | 42.00 | 1.00 |" in text
    assert "| PURE, reported (RealSR) | 22.83 | 0.6079 | 188.33 | 72.37 |" in text
    assert '"reported" rows are copied from the PURE paper' in text
    assert '`psnr`: pyiqa `psnr` with settings `{"color_space": "ycbcr", "test_y_channel": true}`' in text
    assert f"python -m pure.infer --model {ckpt}" in text
    assert f'PureRestorer.from_pretrained("{ckpt}")' in text


def test_card_without_results_and_custom_metadata(ckpt):
    card = hub.build_card(ckpt, repo_id="me/pure-x", license="mit", base_model=None, datasets=["me/data"])
    hub.write_card(card, ckpt)
    parsed = ModelCard.load(ckpt / "README.md")
    assert parsed.data.license == "mit" and parsed.data.datasets == ["me/data"]
    assert parsed.data.eval_results is None
    assert "No evaluation attached" in parsed.text
    assert "python -m pure.infer --model me/pure-x" in parsed.text


def test_push_offline_writes_only(ckpt, summary_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = FakeApi()
    assert hub.main([str(ckpt), "--results", str(summary_path), "--push", "me/pure-x"], api=api) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("offline") and "did not push to me/pure-x" in out[0]
    assert api.calls == [] and (ckpt / "README.md").is_file()


def test_push_uploads_folder(ckpt, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = FakeApi()
    assert hub.main([str(ckpt), "--push", "me/pure-x", "--private"], api=api) == 0
    assert api.calls[0] == (
        "create_repo",
        "me/pure-x",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    upload = api.calls[1][1]
    assert upload["repo_id"] == "me/pure-x" and upload["folder_path"] == ckpt
    assert "uploaded" in capsys.readouterr().out


def test_bad_inputs_give_one_line(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    assert hub.main([str(ckpt), "--results", str(bad)]) == 2
    assert hub.main([str(ckpt), "--results", str(tmp_path / "missing.json")]) == 2
    assert hub.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "not a summary.json written by python -m pure.eval" in err[0]


def test_partial_means_stay_out_of_the_model_index(ckpt, tmp_path):
    """A mean over fewer images than the set has is not a whole-set result: the table marks it and says
    n/N images; the model-index, which cannot say so, leaves it out."""

    class FailsOnOne(GreyBackend):
        def score_pairs(self, spec, preds, gts):
            if spec.name == "musiq" and any(p.stem == "1" for p in preds):
                raise RuntimeError("CUDA out of memory")
            return super().score_pairs(spec, preds, gts)

    summary = score_two_grey_images(tmp_path, "psnr,musiq", FailsOnOne())
    assert summary["metrics"]["musiq"]["count"] == 1 and summary["count"] == 2
    card = ModelCard(str(hub.build_card(ckpt, [summary])))
    assert {r.metric_type for r in card.data.eval_results} == {"psnr"}
    text = card.text
    assert "| ckpt (2 images) | 1.00 | 0.50* |" in text
    assert "musiq could not score 1 of 2 images (* = mean over the others): 1" in text
    assert (
        "- Means over part of the set, marked in the table and left out of the model-index metadata "
        "(not comparable with whole-set results): musiq (1/2 images)." in text
    )

    # every mean partial: no model-index at all rather than an empty or misleading one
    summary["metrics"]["psnr"]["count"] = 1
    card = ModelCard(str(hub.build_card(ckpt, [summary])))
    assert card.data.eval_results is None
    assert "| ckpt (2 images) | 1.00* | 0.50* |" in card.text

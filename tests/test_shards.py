"""Tests for pure.data.shards: the pre-tokenised shard schema, its writer/reader and the data config."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
import pyarrow as pa
from datasets import load_from_disk

from pure.data.shards import (
    PRETOKENIZE_MANIFEST,
    ShardError,
    ShardExample,
    ShardSet,
    check_made_with,
    find_shards,
    load_data_config,
    load_shard_set,
    read_shard,
    shard_features,
    shard_schema,
    shard_set_summary,
    write_shard,
)
from pure.imageio import file_sha256
from pure.sequence import IGNORE_INDEX, SequenceFormat


def _example(fmt: SequenceFormat, i: int, latent: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    k = fmt.vocab.codebook_size
    lq = torch.randint(0, k, (latent, latent), generator=g)
    hq = torch.randint(0, k, (latent, latent), generator=g)
    return fmt.training_example(lq, fmt.answer_text("Small blur, large noise.", f"Picture {i}."), hq)


def test_round_trip_keeps_ids_and_labels(tmp_path, tiny_format):
    examples = [ShardExample.from_training_example(f"ex/{i}", *_example(tiny_format, i)) for i in range(3)]
    folder = write_shard(examples, tmp_path / "shard-0")
    data = read_shard(folder)
    assert data.schema.equals(shard_schema()) and len(data) == 3
    assert load_from_disk(str(folder)).features == shard_features()  # a datasets folder too
    for i, row in enumerate(data.to_pylist()):
        ids, labels = _example(tiny_format, i)
        assert row["id"] == f"ex/{i}"
        assert row["input_ids"] == ids.tolist()
        assert row["length"] == len(ids)
        restored = SequenceFormat.labels_from_prompt_length(
            torch.tensor(row["input_ids"]), row["prompt_length"]
        )
        assert torch.equal(restored, labels)
    # uint32 on disk: PURE's ids go up to 73,727, beyond uint16
    assert data.schema.field("input_ids").type.value_type == pa.uint32()


def test_writer_takes_mappings_and_numpy(tmp_path):
    ids = np.arange(70000, 70010, dtype=np.uint32)
    write_shard([{"id": "a", "input_ids": ids, "prompt_length": 4}], tmp_path / "s")
    row = read_shard(tmp_path / "s").to_pylist()[0]
    assert row["input_ids"] == ids.tolist() and row["prompt_length"] == 4 and row["length"] == 10


def test_labels_that_are_not_prompt_then_answer_are_refused(tiny_format):
    ids, labels = _example(tiny_format, 0)
    labels = labels.clone()
    labels[-3] = IGNORE_INDEX  # a hole inside the answer cannot be stored as a prompt length
    with pytest.raises(ShardError, match="prompt length"):
        ShardExample.from_training_example("bad", ids, labels)


@pytest.mark.parametrize("prompt_length", [0, 10])
def test_prompt_length_must_leave_something_supervised(prompt_length):
    with pytest.raises(ShardError, match="prompt_length"):
        ShardExample(id="x", input_ids=torch.arange(10), prompt_length=prompt_length)


def test_write_is_atomic_and_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "other").write_text("x")
    with pytest.raises(FileExistsError):
        write_shard([ShardExample(id="x", input_ids=torch.arange(5), prompt_length=2)], tmp_path / "s")
    with pytest.raises(ShardError, match="no examples"):
        write_shard([], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging folder left behind


def test_reader_rejects_folders_that_are_not_shards(tmp_path):
    with pytest.raises(ShardError, match="not a PURE shard"):
        read_shard(tmp_path)
    with pytest.raises(ShardError, match="no PURE shards"):
        find_shards(tmp_path)
    folder = write_shard([ShardExample(id="x", input_ids=torch.arange(5), prompt_length=2)], tmp_path / "s")
    (folder / "pure_shard.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ShardError, match="schema version 99"):
        read_shard(folder)
    (folder / "pure_shard.json").write_text(json.dumps({"schema_version": 1}))
    (folder / "state.json").unlink()  # a copy that lost datasets' own files
    with pytest.raises(ShardError, match=r"no readable state\.json"):
        read_shard(folder)


def test_shard_set_reads_nested_shards_in_sorted_order(tmp_path):
    for name, start in (("b/shard-1", 100), ("a/shard-0", 0)):
        write_shard(
            [ShardExample(id=f"{start}", input_ids=torch.arange(start, start + 5), prompt_length=1)],
            tmp_path / "set" / name,
        )
    assert [p.relative_to(tmp_path / "set").as_posix() for p in find_shards(tmp_path / "set")] == [
        "a/shard-0",
        "b/shard-1",
    ]
    assert load_shard_set(tmp_path / "set").column("id").to_pylist() == ["0", "100"]


def test_data_config_resolves_relative_paths_and_rejects_unknown_keys(tmp_path):
    write_shard([ShardExample(id="x", input_ids=torch.arange(5), prompt_length=2)], tmp_path / "data/lsdir/s")
    config = tmp_path / "data/mix.yaml"
    config.write_text("sets:\n  - {path: lsdir, ratio: 0.5}\n  - {path: /abs/ffhq, name: faces}\n")
    sets = load_data_config(config)
    assert sets[0] == ShardSet(path=str((tmp_path / "data/lsdir").resolve()), ratio=0.5, name="lsdir")
    assert sets[1].name == "faces" and sets[1].ratio == 1.0
    assert shard_set_summary(sets[:1])[0]["examples"] == 1
    config.write_text("sets:\n  - {path: lsdir, weight: 2}\n")
    with pytest.raises(ShardError, match="keys"):
        load_data_config(config)
    config.write_text("sets:\n  - {path: lsdir, ratio: 0}\n")
    with pytest.raises(ShardError, match="ratio must be > 0"):
        load_data_config(config)


def test_training_reads_shards_without_datasets(tmp_path, tiny_format, monkeypatch):
    """The GPU machine has pyarrow but not datasets: the reader and the training set need only pyarrow,
    also in a worker process (which maps the files again instead of receiving a copy)."""
    import pickle

    from pure.train.data import ShardDataset

    examples = [ShardExample.from_training_example(f"ex/{i}", *_example(tiny_format, i)) for i in range(5)]
    write_shard(examples[:3], tmp_path / "a" / "shard-0")
    write_shard(examples[3:], tmp_path / "b" / "shard-0")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    sets = [ShardSet(str(tmp_path / "a")), ShardSet(str(tmp_path / "b"))]
    for dataset in (ShardDataset(sets), pickle.loads(pickle.dumps(ShardDataset(sets)))):
        assert len(dataset) == 5 and dataset.sizes == [3, 2]
        assert dataset.lengths.tolist() == [e.input_ids.numel() for e in examples]
        rows = dataset.__getitems__([4, 0, 2])
        for row, e in zip(rows, [examples[4], examples[0], examples[2]], strict=True):
            assert row["id"] == e.id and row["prompt_length"] == e.prompt_length
            assert row["input_ids"].dtype == np.uint32 and row["input_ids"].tolist() == e.input_ids.tolist()
    assert shard_set_summary(sets)[1]["examples"] == 2


def test_reader_rejects_a_shard_of_other_columns(tmp_path):
    folder = write_shard([ShardExample(id="x", input_ids=torch.arange(5), prompt_length=2)], tmp_path / "s")
    (arrow,) = folder.glob("*.arrow")
    table = pa.table({"input_ids": pa.array([[1, 2, 3]], pa.list_(pa.int64())), "id": ["x"]})
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(ShardError, match="has columns"):
        read_shard(folder)


def test_check_made_with_refuses_shards_of_another_tokenizer_or_vq(tmp_path):
    """pretokenize's manifest names the tokenizer and VQ the ids came from; a model with another one would
    train on ids that mean other tokens (a BPE learnt again from the same captions can differ)."""
    model = tmp_path / "model"
    (model / "vq").mkdir(parents=True)
    (model / "tokenizer.json").write_text('{"model": "A"}')
    (model / "vq" / "model.safetensors").write_bytes(b"codebook A")
    ours = {"tokenizer_sha256": file_sha256(model / "tokenizer.json"), "vq_config": {"codebook_size": 8}}
    ours["vq_sha256"] = file_sha256(model / "vq" / "model.safetensors")
    manifests = {
        "same": ours,
        "other_text": {**ours, "tokenizer_sha256": "1" * 64},
        "other_vq": {**ours, "vq_sha256": "2" * 64},
        "pt_vq": {**ours, "vq_sha256": "3" * 64, "vq_config": None},  # a .pt file: not comparable
    }
    for name, manifest in manifests.items():
        (tmp_path / name / "part").mkdir(parents=True)
        (tmp_path / name / "part" / PRETOKENIZE_MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "unrecorded").mkdir()
    sets = {name: ShardSet(str(tmp_path / name)) for name in [*manifests, "unrecorded"]}
    check_made_with([sets["same"], sets["pt_vq"], sets["unrecorded"]], model)
    check_made_with([sets["other_text"], sets["other_vq"]], tmp_path / "no_model")  # nothing to compare
    with pytest.raises(ShardError, match="other_text was pretokenised with another text tokenizer"):
        check_made_with([sets["same"], sets["other_text"]], model)
    with pytest.raises(ShardError, match=r"other_vq was pretokenised with another VQ .*/model/vq/model"):
        check_made_with([sets["other_vq"]], model)
    assert file_sha256(model / "tokenizer.json") == hashlib.sha256(b'{"model": "A"}').hexdigest()

"""Tests for pure.data.shards: the pre-tokenised shard schema, its writer/reader and the data config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")

from pure.data.shards import (
    ShardError,
    ShardExample,
    ShardSet,
    find_shards,
    load_data_config,
    load_shard_set,
    read_shard,
    shard_features,
    shard_set_summary,
    write_shard,
)
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
    assert data.features == shard_features()
    assert len(data) == 3
    for i, row in enumerate(data):
        ids, labels = _example(tiny_format, i)
        assert row["id"] == f"ex/{i}"
        assert row["input_ids"] == ids.tolist()
        assert row["length"] == len(ids)
        restored = SequenceFormat.labels_from_prompt_length(
            torch.tensor(row["input_ids"]), row["prompt_length"]
        )
        assert torch.equal(restored, labels)
    # uint32 on disk: PURE's ids go up to 73,727, beyond uint16
    assert str(data.features["input_ids"].feature.dtype) == "uint32"


def test_writer_takes_mappings_and_numpy(tmp_path):
    ids = np.arange(70000, 70010, dtype=np.uint32)
    write_shard([{"id": "a", "input_ids": ids, "prompt_length": 4}], tmp_path / "s")
    row = read_shard(tmp_path / "s")[0]
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
    assert load_shard_set(tmp_path / "set")["id"][:] == ["0", "100"]


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

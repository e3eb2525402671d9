"""Pre-tokenised training shards: the one schema that data preparation writes and training reads.

A *shard* is a Hugging Face ``datasets`` Arrow folder (``Dataset.save_to_disk``) with one row per
conversation::

    input_ids      list<uint32>   the whole teacher-forced sequence (spec 1.7); uint32 because PURE's
                                  vocabulary has 73,728 ids
    prompt_length  int32          tokens of the prompt (BOS, instruction, LQ block, <eot>): no loss there
    length         int32          len(input_ids), so samplers can group by length without reading ids
    id             string         a stable name of the example (e.g. "lsdir/0001234")

Writing a shard takes ``datasets``; reading one takes only ``pyarrow`` (:func:`read_shard`: a memory-mapped
``pyarrow.Table``), so training runs where ``datasets`` is not installed (the project's GPU machine).

Labels are not stored: they are :meth:`pure.sequence.SequenceFormat.labels_from_prompt_length` of the
ids and the prompt length (everything after the prompt is supervised).

A *shard set* is a folder holding one shard or several (found at any depth, read in sorted order),
and a *data config* is a YAML file that lists shard sets with sampling ratios::

    sets:
      - {path: lsdir, ratio: 1.0}        # relative paths are relative to this YAML file
      - {path: ffhq10k, ratio: 0.5}      # half of it, a different half every epoch

Ratios follow the original data config (``xllmx`` META): each epoch draws ``int(n * ratio)`` examples of
a set without replacement; a ratio above 1 repeats the set ``floor(ratio)`` times plus a random part.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pure.imageio import file_sha256
from pure.sequence import IGNORE_INDEX

SCHEMA_VERSION = 1
SHARD_COLUMNS = ("input_ids", "prompt_length", "length", "id")
_SCHEMA_FILE = "pure_shard.json"  # beside datasets' own files: marks a folder as a PURE shard
_UINT32_MAX = 2**32 - 1
PRETOKENIZE_MANIFEST = "pretokenize.json"  # what pure.data.pretokenize made a shard set from


class ShardError(ValueError):
    """A shard, shard set or data config is missing or does not follow the schema."""


def shard_schema():
    """The Arrow schema of a shard (see the module docstring): what :func:`read_shard` checks."""
    import pyarrow as pa

    return pa.schema(
        [
            ("input_ids", pa.list_(pa.uint32())),
            ("prompt_length", pa.int32()),
            ("length", pa.int32()),
            ("id", pa.string()),
        ]
    )


def shard_features():
    """The ``datasets.Features`` that :func:`write_shard` writes: :func:`shard_schema`'s."""
    from datasets import Features

    return Features.from_arrow_schema(shard_schema())


@dataclass
class ShardExample:
    """One row of a shard. ``input_ids`` is 1-D (any int dtype); the prompt gets no loss."""

    id: str
    input_ids: torch.Tensor
    prompt_length: int

    def __post_init__(self) -> None:
        ids = self.input_ids
        self.input_ids = (
            torch.from_numpy(ids.astype(np.int64))
            if isinstance(ids, np.ndarray)
            else torch.as_tensor(ids).long()
        )
        n = self.input_ids.numel()
        if self.input_ids.ndim != 1 or n == 0:
            raise ShardError(f"example {self.id!r}: input_ids must be a non-empty 1-D sequence")
        if not 0 < self.prompt_length < n:
            raise ShardError(
                f"example {self.id!r}: prompt_length must be in 1..{n - 1} (something must be "
                f"supervised); got {self.prompt_length}"
            )
        if int(self.input_ids.min()) < 0 or int(self.input_ids.max()) > _UINT32_MAX:
            raise ShardError(f"example {self.id!r}: token ids must fit in uint32")

    @classmethod
    def from_training_example(cls, id: str, input_ids: torch.Tensor, labels: torch.Tensor) -> ShardExample:
        """From :meth:`SequenceFormat.training_example`'s ``(input_ids, labels)``; checks that the labels
        are exactly "ignored prompt, then the ids" so that nothing is lost by storing the prompt length."""
        ignored = (labels == IGNORE_INDEX).long()
        prompt_length = int(ignored.cumprod(0).sum())  # the leading run of ignored labels
        supervised = labels[prompt_length:]
        if bool((supervised == IGNORE_INDEX).any()) or not torch.equal(
            supervised, input_ids[prompt_length:].to(supervised.dtype)
        ):
            raise ShardError(
                f"example {id!r}: labels must be {IGNORE_INDEX} over the prompt and equal to the ids after "
                "it (SequenceFormat.training_example); shards store only the prompt length"
            )
        return cls(id=id, input_ids=input_ids, prompt_length=prompt_length)

    def to_row(self) -> dict:
        return {
            "input_ids": self.input_ids.numpy().astype(np.uint32),
            "prompt_length": self.prompt_length,
            "length": self.input_ids.numel(),
            "id": self.id,
        }


def write_shard(examples: Iterable[ShardExample | Mapping], folder: str | os.PathLike) -> Path:
    """Write one shard folder atomically (it appears complete or not at all) and return its path.

    ``examples`` are :class:`ShardExample` or mappings with ``id``, ``input_ids`` and ``prompt_length``.
    """
    from datasets import Dataset

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty")

    columns: dict[str, list] = {name: [] for name in SHARD_COLUMNS}
    for example in examples:
        if not isinstance(example, ShardExample):
            example = ShardExample(
                id=str(example["id"]),
                input_ids=example["input_ids"],
                prompt_length=int(example["prompt_length"]),
            )
        for name, value in example.to_row().items():
            columns[name].append(value)
    dataset = Dataset.from_dict(columns, features=shard_features())
    if len(dataset) == 0:
        raise ShardError(f"no examples to write to {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as tmp:
        staging = Path(tmp) / "shard"
        with _quiet_datasets():
            dataset.save_to_disk(str(staging))
        (staging / _SCHEMA_FILE).write_text(
            json.dumps({"schema_version": SCHEMA_VERSION, "rows": len(dataset)})
        )
        if folder.exists():
            folder.rmdir()
        shutil.move(staging, folder)
    return folder


@contextmanager
def _quiet_datasets():
    """No per-shard progress bars (a data-prep job writes thousands of shards)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def is_shard(folder: str | os.PathLike) -> bool:
    return (Path(folder) / _SCHEMA_FILE).is_file()


def read_shard(folder: str | os.PathLike):
    """One shard as a memory-mapped ``pyarrow.Table`` (its schema checked): ``table.num_rows``,
    ``table.column("id").to_pylist()``, ``table.take(indices)``. Needs pyarrow only, not ``datasets``."""
    import pyarrow as pa

    folder = Path(folder)
    if not is_shard(folder):
        raise ShardError(f"{folder} is not a PURE shard (no {_SCHEMA_FILE}); write shards with write_shard")
    version = json.loads((folder / _SCHEMA_FILE).read_text()).get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{folder} has shard schema version {version}; this code reads {SCHEMA_VERSION}")
    try:  # save_to_disk's list of its Arrow files
        state = json.loads((folder / "state.json").read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{folder}: no readable state.json listing its Arrow files ({err})") from None
    table = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files])
    if not table.schema.equals(shard_schema()):  # metadata (datasets' features) aside
        raise ShardError(f"{folder} has columns {table.schema}; expected {shard_schema()}")
    return table


def find_shards(path: str | os.PathLike) -> list[Path]:
    """A shard folder, or every shard below a folder (sorted by path, so the order is stable)."""
    path = Path(path)
    if is_shard(path):
        return [path]
    if not path.is_dir():
        raise ShardError(f"shard set {path} does not exist")
    # Hidden folders hold writes in progress (or killed): never read them as shards.
    found = sorted(
        p.parent
        for p in path.rglob(_SCHEMA_FILE)
        if not any(part.startswith(".") for part in p.parent.relative_to(path).parts)
    )
    if not found:
        raise ShardError(f"no PURE shards under {path} (a shard folder holds {_SCHEMA_FILE})")
    return found


def load_shard_set(path: str | os.PathLike):
    """All shards of a shard set as one memory-mapped ``pyarrow.Table`` (rows in shard order)."""
    import pyarrow as pa

    return pa.concat_tables([read_shard(p) for p in find_shards(path)])


@dataclass
class ShardSet:
    """One entry of a data config: a shard set and its sampling ratio (examples per epoch / size)."""

    path: str
    ratio: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise ShardError("a shard set needs a path")
        if not self.ratio > 0:
            raise ShardError(f"shard set {self.path}: ratio must be > 0; got {self.ratio}")
        self.name = self.name or Path(self.path).name


def load_data_config(path: str | os.PathLike) -> list[ShardSet]:
    """Read a data-config YAML (``sets: [{path, ratio, name}, ...]``); relative paths are resolved
    against the YAML file's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"data config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) != {"sets"} or not isinstance(data["sets"], list):
        raise ShardError(f"{path}: a data config is a mapping with one key, 'sets' (a list of shard sets)")
    sets = []
    valid = {"path", "ratio", "name"}
    for i, entry in enumerate(data["sets"]):
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - valid:
            raise ShardError(f"{path}: sets[{i}] must be a mapping with keys {sorted(valid)} (path required)")
        entry = dict(entry)
        if not Path(entry["path"]).is_absolute():
            entry["path"] = str((path.parent / entry["path"]).resolve())
        sets.append(ShardSet(**entry))
    return sets


def check_made_with(sets: list[ShardSet], checkpoint: str | os.PathLike) -> None:
    """Refuse shard sets that :mod:`pure.data.pretokenize` made with another text tokenizer or another VQ
    than ``checkpoint``'s (its ``tokenizer.json`` and ``vq/``): their ids would stand for other tokens or
    other patches, and training would go on, learning nothing, without a word. What the manifest does not
    record (sets written otherwise, a VQ given as a ``.pt`` file) or the checkpoint lacks is not checked."""
    from pure.vq import WEIGHTS_NAME

    checkpoint = Path(checkpoint)
    files = {  # manifest key: (what it is, the checkpoint's file)
        "tokenizer_sha256": ("text tokenizer", checkpoint / "tokenizer.json"),
        "vq_sha256": ("VQ", checkpoint / "vq" / WEIGHTS_NAME),
    }
    hashes = {key: file_sha256(path) for key, (_, path) in files.items() if path.is_file()}
    for shard_set in sets:
        root = Path(shard_set.path)
        for manifest in sorted(root.rglob(PRETOKENIZE_MANIFEST)):
            if any(part.startswith(".") for part in manifest.relative_to(root).parts):
                continue  # a write in progress
            made = json.loads(manifest.read_text())
            for key, want in hashes.items():
                if key == "vq_sha256" and made.get("vq_config") is None:
                    continue  # a .pt VQ: its hash is not comparable with a folder's weights
                if made.get(key) and made[key] != want:
                    what, path = files[key]
                    raise ShardError(
                        f"shard set {shard_set.path} was pretokenised with another {what} (sha256 "
                        f"{made[key][:12]}) than the model's {path} ({want[:12]}): its ids would mean "
                        "other tokens. Pretokenise it again with this model (python -m pure.data.pretokenize "
                        "--model ...), or train from a checkpoint with the ones it was made with"
                    )


def shard_set_summary(sets: list[ShardSet]) -> list[dict]:
    """``[{path, ratio, name, examples}]`` for logs and model cards."""
    return [{**asdict(s), "examples": sum(read_shard(p).num_rows for p in find_shards(s.path))} for s in sets]

"""``python -m pure.data.pretokenize``: instruction records -> VQ codes -> token sequences -> shards.

For each record (``pure.data.records``; PURE's ``{conversations, image: [lq, hq]}`` shape):

1. both images are read (relative paths are relative to the records file's folder), blended onto white,
   and resized bicubically to ``--size`` x ``--size`` (512): a 128 px LQ is upsampled as PURE's
   ``var_center_crop`` does (spec 7.2) and as inference does (`PureRestorer.upsample_input`); a 512 px HQ
   is unchanged;
2. the VQ encodes them, in batches, to ``(size/8) x (size/8)`` codes;
3. `SequenceFormat.training_example(lq_codes, answer, hq_codes, instruction)` builds the ids and labels,
   stored as a `ShardExample` (ids + prompt length) with the record's ``id``.

Shards: shard ``i`` holds records ``[i * S, (i + 1) * S)`` of the records file (``S = --shard-size``), in
``OUT/shard-{i:05d}`` written by `write_shard` (atomically: a shard folder is complete or absent). A
record that fails (unreadable image, malformed record, text spelling a special token) is left out with
its reason in ``OUT/failures/shard-{i:05d}.json``, written before the shard.

Resume and workers: a rerun skips complete shards and redoes the rest, so a run killed at any point and
restarted ends with exactly the records' ids, none twice, none missing (except the failed ones, the same
on every run); the final check reads every shard's ids back and says so. ``--workers N`` starts N
processes that each take whole shards (with ``--device cuda``, worker w uses GPU ``w % device_count``);
the shards do not depend on N. ``OUT/pretokenize.json`` records what the shards were made from (records
file hash, shard size, image size, tokenizer and VQ hashes); a rerun with anything else is refused. Run one
command per output folder at a time.

Tokenizers: ``--model`` is a checkpoint folder (or Hub id) in ``python -m pure.infer --model``'s layout:
``tokenizer.json`` (+ ``config.json`` for its ``vocabulary_map``) and the VQ in ``vq/``; ``--vq``
overrides the VQ (LlamaGen's ``vq_ds8_c2i.pt`` or a folder from `VQModel.save_pretrained`). The language
model's weights are never loaded (nor downloaded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from PIL import Image

from pure.data.records import parse_record, read_records
from pure.data.shards import (
    PRETOKENIZE_MANIFEST,
    ShardError,
    ShardExample,
    is_shard,
    read_shard,
    write_shard,
)
from pure.imageio import file_sha256, load_image, save_json
from pure.sequence import LATENT_PER_GRID, SequenceFormat
from pure.tokenizer import PureTokenizer
from pure.vq import CONFIG_NAME, WEIGHTS_NAME, VQModel, pil_to_pixels, to_rgb

FAILURES_DIR = "failures"
DEFAULT_SIZE = 512
_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "vq/*")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Tokenizers:
    """The text tokenizer (with its sequence format) and the VQ of one checkpoint, on one device."""

    tokenizer: PureTokenizer
    vq: VQModel
    format: SequenceFormat
    identity: dict

    @classmethod
    def load(
        cls, model: str | os.PathLike, vq: str | os.PathLike | None = None, device: str = "cpu"
    ) -> Tokenizers:
        folder = _checkpoint_folder(model)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}; pass a checkpoint folder as --model")
        tokenizer = PureTokenizer.from_checkpoint(folder)
        vq_path = Path(vq) if vq is not None else folder / "vq"
        if not vq_path.exists():
            raise FileNotFoundError(
                f"no VQ tokenizer: {folder} has no vq/ folder; pass --vq vq_ds8_c2i.pt (LlamaGen's VQ-8)"
            )
        image_tokenizer = VQModel.from_pretrained(vq_path, device=device)
        if tokenizer.vocab.codebook_size != image_tokenizer.config.codebook_size:
            raise ValueError(
                f"the tokenizer names {tokenizer.vocab.codebook_size} image tokens but the VQ has "
                f"{image_tokenizer.config.codebook_size} codes: they must come from the same checkpoint"
            )
        weights = vq_path / WEIGHTS_NAME if vq_path.is_dir() else vq_path
        identity = {
            "tokenizer_sha256": file_sha256(tokenizer_file),
            "vq_sha256": file_sha256(weights),
            "vq_config": json.loads((vq_path / CONFIG_NAME).read_text()) if vq_path.is_dir() else None,
            "codebook_size": image_tokenizer.config.codebook_size,
        }
        return cls(tokenizer, image_tokenizer, SequenceFormat(tokenizer), identity)


def _checkpoint_folder(model: str | os.PathLike) -> Path:
    """A local folder as is; a Hub id: only its tokenizer files and vq/ (never the LM weights)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"--model {name} is not a checkpoint folder or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=list(_CHECKPOINT_FILES)))
    except Exception as err:  # hub errors have no common base beyond Exception
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(err).__name__
        raise FileNotFoundError(
            f"cannot get {name}: {why}. Download it on a machine with network "
            f"(`hf download {name} --local-dir DIR`) and pass --model DIR"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Records -> examples
# ---------------------------------------------------------------------------------------------------------


def load_pixels(path: Path, size: int) -> torch.Tensor:
    """An image as (3, size, size) VQ pixels in [-1, 1]: RGB (alpha over white), bicubic to size."""
    image = to_rgb(load_image(path))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return pil_to_pixels(image)


@dataclass
class _Prepared:
    id: str
    instruction: str
    answer: str
    lq: torch.Tensor  # (3, size, size)
    hq: torch.Tensor  # (3, size, size)


def encode_records(
    records: Sequence[dict], base: Path, tok: Tokenizers, size: int = DEFAULT_SIZE, batch_size: int = 8
) -> tuple[list[ShardExample], list[dict]]:
    """Records -> (examples in record order, failures ``[{"id", "reason"}]``). Deterministic."""
    examples: list[ShardExample] = []
    failures: list[dict] = []
    for start in range(0, len(records), batch_size):
        prepared: list[_Prepared] = []
        for record in records[start : start + batch_size]:
            record_id = str(record.get("id", ""))
            try:
                instruction, answer, lq_path, hq_path = parse_record(record)
                lq = load_pixels(base / lq_path, size)
                hq = load_pixels(base / hq_path, size)
                prepared.append(_Prepared(record_id, instruction, answer, lq, hq))
            except (ValueError, OSError) as err:  # ImageLoadError is a ValueError
                failures.append(
                    {"id": record_id, "reason": str(err).splitlines()[0] if str(err) else repr(err)}
                )
        if not prepared:
            continue
        pixels = torch.stack([p.lq for p in prepared] + [p.hq for p in prepared])  # (2B, 3, size, size)
        codes = tok.vq.encode(pixels).cpu()  # (2B, size/ds, size/ds)
        n = len(prepared)
        for p, lq_codes, hq_codes in zip(prepared, codes[:n], codes[n:], strict=True):
            try:
                ids, labels = tok.format.training_example(lq_codes, p.answer, hq_codes, p.instruction)
                examples.append(ShardExample.from_training_example(p.id, ids, labels))
            except ValueError as err:  # text spelling special tokens; ShardError is a ValueError
                failures.append({"id": p.id, "reason": str(err)})
    order = {str(r.get("id", "")): i for i, r in enumerate(records)}
    failures.sort(key=lambda f: order.get(f["id"], -1))
    return examples, failures


# ---------------------------------------------------------------------------------------------------------
# Shards: plan, one shard, resume
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    index: int
    records: list[dict]


def _failure_file(out: Path, index: int) -> Path:
    return out / FAILURES_DIR / f"{shard_name(index)}.json"


def shard_is_complete(out: Path, index: int, num_records: int) -> bool:
    """The shard folder is complete, or every record of the shard failed (recorded in its failure file)."""
    if is_shard(out / shard_name(index)):
        return True
    failures = _failure_file(out, index)
    return failures.is_file() and len(json.loads(failures.read_text())["failed"]) == num_records


def write_one_shard(
    job: ShardJob, out: Path, base: Path, tok: Tokenizers, size: int, batch_size: int
) -> dict:
    """Encode and write one shard (failures first); returns ``{"index", "written", "failed"}``."""
    examples, failures = encode_records(job.records, base, tok, size, batch_size)
    failure_file = _failure_file(out, job.index)
    if failures:
        save_json({"records": len(job.records), "failed": failures}, failure_file, overwrite=True)
    else:
        failure_file.unlink(missing_ok=True)
    folder = out / shard_name(job.index)
    if folder.is_dir() and not is_shard(folder) and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder (not one of ours: write_shard moves whole folders in)
    if examples:
        write_shard(examples, folder)
    return {"index": job.index, "written": len(examples), "failed": len(failures)}


_WORKER: dict = {}


def _init_worker(model: str, vq: str | None, devices: list[str], threads: int, counter) -> None:
    torch.set_num_threads(threads)
    with counter.get_lock():  # the rank of this worker: 0, 1, ... in start order
        rank = counter.value
        counter.value += 1
    _WORKER["tok"] = Tokenizers.load(model, vq, devices[rank % len(devices)])


def _worker_shard(args: tuple[ShardJob, Path, Path, int, int]) -> dict:
    job, out, base, size, batch_size = args
    return write_one_shard(job, out, base, _WORKER["tok"], size, batch_size)


def _devices(device: str | None, workers: int) -> list[str]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and workers > 1:
        return [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    return [device]


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / PRETOKENIZE_MANIFEST
    if path.is_file():
        stored = json.loads(path.read_text())
        keys = [k for k in manifest if k != "records_file"]
        changed = [k for k in keys if stored.get(k) != manifest[k]]
        if changed:
            raise ValueError(
                f"{out} holds shards made from other inputs or settings ({', '.join(changed)} differ); "
                "rerun with the same records, checkpoint, --size and --shard-size, or use a new --out"
            )
    else:
        save_json(manifest, path, overwrite=True)


def pretokenize(
    records_file: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    vq: str | os.PathLike | None = None,
    shard_size: int = 1000,
    size: int = DEFAULT_SIZE,
    workers: int = 1,
    device: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Write (or complete) the shard set ``out`` for ``records_file``; returns the summary dict."""
    from tqdm import tqdm

    if shard_size < 1 or batch_size < 1 or workers < 1:
        raise ValueError("--shard-size, --batch-size and --workers must be at least 1")
    start_time = time.perf_counter()
    records_file, out = Path(records_file), Path(out)
    records = read_records(records_file)
    if not records:
        raise ValueError(f"{records_file} holds no records")
    ids = [str(r.get("id", "")) for r in records]
    if any(not i for i in ids):
        raise ValueError(f"{records_file}: every record needs a non-empty id")
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"{records_file}: record ids must be unique; repeated: {dupes}")
    devices = _devices(device, workers)
    tok = Tokenizers.load(model, vq, devices[0])  # also checks everything before any work starts
    grid_px = LATENT_PER_GRID * tok.vq.config.downsample
    if size < grid_px or size % grid_px:
        raise ValueError(f"--size must be a positive multiple of {grid_px} (a grid cell); got {size}")

    num_shards = math.ceil(len(records) / shard_size)
    manifest = {
        "records_file": str(records_file.resolve()),
        "records_sha256": file_sha256(records_file),
        "num_records": len(records),
        "shard_size": shard_size,
        "num_shards": num_shards,
        "size": size,
        **tok.identity,
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)
    for stale in [*out.glob(".shard-*.tmp-*"), *(out / FAILURES_DIR).glob(".*.tmp-*")]:
        # Staging left by a killed write_shard / atomic_write (one command per folder at a time).
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    base = records_file.resolve().parent
    jobs = [ShardJob(i, records[i * shard_size : (i + 1) * shard_size]) for i in range(num_shards)]
    todo = [job for job in jobs if not shard_is_complete(out, job.index, len(job.records))]

    bar = tqdm(total=sum(len(j.records) for j in todo), unit="rec", desc="pretokenize", disable=not progress)
    written_now = 0
    try:
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                result = write_one_shard(job, out, base, tok, size, batch_size)
                written_now += result["written"]
                bar.update(len(job.records))
        else:
            del tok  # each worker loads its own
            context = get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // workers)
            init = (str(model), None if vq is None else str(vq), devices, threads, context.Value("i", 0))
            pool = context.Pool(workers, initializer=_init_worker, initargs=init)
            try:
                tasks = [(job, out, base, size, batch_size) for job in todo]
                sizes = {job.index: len(job.records) for job in todo}
                for result in pool.imap_unordered(_worker_shard, tasks):
                    written_now += result["written"]
                    bar.update(sizes[result["index"]])
                pool.close()
            except BaseException:
                pool.terminate()  # a shard being written is simply redone by the next run
                raise
            finally:
                pool.join()
    finally:
        bar.close()

    summary = verify_shard_set(out, jobs)
    summary.update(
        {
            "shards_written_now": len(todo),
            "examples_written_now": written_now,
            "seconds": round(time.perf_counter() - start_time, 2),
        }
    )
    return summary


def verify_shard_set(out: Path, jobs: Sequence[ShardJob]) -> dict:
    """Read every shard's ids back: each record is in its shard exactly once or listed as failed."""
    problems: list[str] = []
    examples = tokens = 0
    failed: list[dict] = []
    for job in jobs:
        expected = [str(r["id"]) for r in job.records]
        failure_file = _failure_file(out, job.index)
        job_failed = json.loads(failure_file.read_text())["failed"] if failure_file.is_file() else []
        failed += job_failed
        failed_ids = {f["id"] for f in job_failed}
        folder = out / shard_name(job.index)
        got: list[str] = []
        if is_shard(folder):
            shard = read_shard(folder)
            got = shard.column("id").to_pylist()
            tokens += sum(shard.column("length").to_pylist())
        elif len(failed_ids) != len(expected):
            problems.append(f"{shard_name(job.index)} is missing")
            continue
        want = [i for i in expected if i not in failed_ids]
        examples += len(got)
        if got != want:
            problems.append(
                f"{shard_name(job.index)} holds {len(got)} ids, expected {len(want)} "
                f"({len(set(want) - set(got))} missing, {len(got) - len(set(got))} repeated, "
                f"{len(set(got) - set(want))} unexpected)"
            )
    if problems:
        raise ShardError(f"shard set {out} is inconsistent: {'; '.join(problems[:5])}")
    return {
        "records": sum(len(j.records) for j in jobs),
        "shards": len(jobs),
        "examples": examples,
        "tokens": tokens,
        "failed": failed,
    }


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.data.pretokenize",
        description="Pre-tokenise instruction records into training shards: VQ-encode the LQ (bicubic to "
        "--size) and HQ images, build the token sequence with the checkpoint's tokenizer and write Arrow "
        "shards of --shard-size records. Resumable: rerun the same command after an interruption.",
    )
    parser.add_argument("--records", required=True, help="records JSONL (python -m pure.data.records)")
    parser.add_argument(
        "--model", required=True, help="checkpoint folder or Hub id with tokenizer.json (and vq/)"
    )
    parser.add_argument("--vq", default=None, help="VQ checkpoint overriding the checkpoint's vq/ folder")
    parser.add_argument("--out", required=True, help="shard set folder to create or complete")
    parser.add_argument("--shard-size", type=int, default=1000, help="records per shard (default 1000)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image size for the VQ (default 512)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes, each takes whole shards (default 1)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="records per VQ batch (default 8)")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda (all GPUs over the workers) or cuda:N (default: cuda if any)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from pure.train.engine import MissingPackageError, require_packages

    try:
        require_packages({"datasets": "writes the shards"})  # before the tokenizers load
    except MissingPackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = pretokenize(
            args.records,
            args.model,
            args.out,
            vq=args.vq,
            shard_size=args.shard_size,
            size=args.size,
            workers=args.workers,
            device=args.device,
            batch_size=args.batch_size,
        )
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    failed = summary["failed"]
    print(
        f"pretokenize: {summary['examples']} of {summary['records']} records in {summary['shards']} shards "
        f"at {args.out} ({summary['shards_written_now']} shards written now, {summary['tokens']} tokens); "
        f"{len(failed)} failed; ids verified: each record exactly once; {summary['seconds']:.1f} s"
    )
    for failure in failed[:10]:
        print(f"  failed {failure['id']}: {failure['reason']}")
    if len(failed) > 10:
        print(f"  ... {len(failed) - 10} more in {Path(args.out) / FAILURES_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m pure.data.records``: pairs + captions -> instruction records (JSONL) in PURE's public shape.

One line per pair of a ``pure.data.pairs`` folder::

    {"conversations": [
        {"from": "human", "value": "Perceive the degradation level, ... high-quality image. <|image|>"},
        {"from": "gpt", "value": "Medium blur, small noise. The image shows ... <|image|>"}],
     "image": ["pairs/lq/astronaut_000.png", "pairs/hq/astronaut_000.png"],
     "degradation": {"label": ..., "blur_score": ..., "noise_score": ..., "params": {...}},
     "id": "astronaut_000"}

This is TRAIN.md's shape (spec 1.3): images are used in the order of the ``<|image|>`` placeholders,
LQ (human turn) then HQ (answer). The answer text is `SequenceFormat.answer_text` of the degradation
label and the caption, then the placeholder. ``degradation`` carries the pair's recorded parameters,
label and scores. Image paths are relative to the records file's folder (``--absolute-paths``:
absolute), so a dataset folder can be moved as a whole.

Captions (a ``pure.data.captions`` JSONL, or any file it can ``--import``) are looked up by the sha256 of
the HQ file, then by the HQ file name, then by the pair's source image name (a caption of the whole source
image then serves all its crops). A pair without a caption is skipped and counted (the first names are
printed); ``--allow-missing-captions`` keeps it with an empty caption (answer = the degradation label only).

The file is written atomically (it is quick to rebuild, so there is nothing to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pure.data.captions import CaptionIndex, load_caption_index
from pure.data.pairs import PARAMS_DIR
from pure.imageio import atomic_write, file_sha256
from pure.sequence import INSTRUCTION, SequenceFormat

IMAGE_PLACEHOLDER = "<|image|>"
HUMAN, GPT = "human", "gpt"


def make_record(
    record_id: str,
    lq_path: str,
    hq_path: str,
    label: str,
    caption: str,
    degradation: dict | None = None,
    instruction: str = INSTRUCTION,
) -> dict:
    """One instruction record (see the module docstring)."""
    record = {
        "conversations": [
            {"from": HUMAN, "value": f"{instruction} {IMAGE_PLACEHOLDER}"},
            {"from": GPT, "value": SequenceFormat.answer_text(label, caption) + IMAGE_PLACEHOLDER},
        ],
        "image": [lq_path, hq_path],
    }
    if degradation is not None:
        record["degradation"] = degradation
    record["id"] = record_id
    return record


def parse_record(record: dict) -> tuple[str, str, str, str]:
    """A record -> (instruction, answer text before the HQ image, LQ path, HQ path), as stored.

    The answer text keeps its trailing space (what `SequenceFormat.training_example` takes). Raises
    `ValueError` naming what is wrong when the record is not in PURE's single-turn shape.
    """
    conversations = record.get("conversations") if isinstance(record, dict) else None
    images = record.get("image") if isinstance(record, dict) else None
    if (
        not isinstance(conversations, list)
        or len(conversations) != 2
        or [c.get("from") if isinstance(c, dict) else None for c in conversations] != [HUMAN, GPT]
    ):
        raise ValueError("conversations must be [{from: human, value}, {from: gpt, value}]")
    if not isinstance(images, list) or len(images) != 2 or not all(isinstance(p, str) for p in images):
        raise ValueError("image must be [lq_path, hq_path]")
    human, gpt = (str(c.get("value", "")) for c in conversations)
    for name, value in (("human", human), ("gpt", gpt)):
        if value.count(IMAGE_PLACEHOLDER) != 1 or not value.rstrip().endswith(IMAGE_PLACEHOLDER):
            raise ValueError(f"the {name} turn must end with one {IMAGE_PLACEHOLDER} and hold no other")
    instruction = human.rstrip()[: -len(IMAGE_PLACEHOLDER)].strip()
    answer = gpt.rstrip()[: -len(IMAGE_PLACEHOLDER)]
    return instruction, answer, images[0], images[1]


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records from a JSONL file (or a JSON list, the original PURE/Lumina format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read records {path}: {err.strerror or err}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{path}: not a JSON list of records ({err})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(
                    f"{path}:{n}: not a JSON line; rebuild it with python -m pure.data.records"
                ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: records must be JSON objects")
    return records


def _pair_records(pairs: Path) -> Iterator[tuple[Path, dict]]:
    folder = pairs / PARAMS_DIR
    if not folder.is_dir():
        raise ValueError(f"{pairs} has no {PARAMS_DIR}/ folder; make pairs with python -m pure.data.pairs")
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            yield path, json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not a pair record ({err})") from None


def build_records(
    pairs: str | os.PathLike,
    captions: CaptionIndex | None,
    out: str | os.PathLike,
    allow_missing_captions: bool = False,
    absolute_paths: bool = False,
) -> dict:
    """Write the records JSONL for a pair folder; returns a summary dict (``missing`` lists the pairs
    without a caption)."""
    pairs, out = Path(pairs), Path(out)
    base = out.resolve().parent
    lines, missing = [], []
    total = 0
    for path, pair in _pair_records(pairs):
        total += 1
        try:
            name, hq, lq = pair["id"], pairs / pair["hq"], pairs / pair["lq"]
            label = pair["label"]
            degradation = {k: pair[k] for k in ("label", "blur_score", "noise_score", "params")}
        except KeyError as err:
            raise ValueError(
                f"{path}: pair record without {err}; remake it with python -m pure.data.pairs"
            ) from None
        entry = None
        if captions is not None:
            entry = captions.lookup(file_sha256(hq) if hq.is_file() else None, hq.name)
            if entry is None and pair.get("source"):
                entry = captions.lookup(None, pair["source"])
        if entry is None:
            missing.append(name)
            if not allow_missing_captions:
                continue
        caption = entry["caption"] if entry is not None else ""

        def where(p: Path) -> str:
            return str(p.resolve()) if absolute_paths else os.path.relpath(p.resolve(), base)

        lines.append(make_record(name, where(lq), where(hq), label, caption, degradation))
    if not lines:
        raise ValueError(
            f"no records written: {total} pairs in {pairs}, {len(missing)} without a caption "
            "(pass --allow-missing-captions to use an empty caption)"
        )
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode()
    atomic_write(out, lambda f: f.write(data), overwrite=True)
    return {"pairs": total, "records": len(lines), "missing_captions": missing}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.data.records",
        description="Turn a pair folder (python -m pure.data.pairs) and captions (python -m "
        "pure.data.captions) into instruction records, JSONL in PURE's public shape.",
    )
    parser.add_argument("--pairs", required=True, help="pair folder (with hq/, lq/, params/)")
    parser.add_argument("--captions", default=None, help="caption JSONL (or JSON) of the HQ or source images")
    parser.add_argument("--out", required=True, help="records JSONL to write (replaced if it exists)")
    parser.add_argument(
        "--allow-missing-captions",
        action="store_true",
        help="keep pairs without a caption, with an empty one (default: skip and count them)",
    )
    parser.add_argument("--absolute-paths", action="store_true", help="store absolute image paths")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        captions = load_caption_index(args.captions) if args.captions else None
        if captions is None and not args.allow_missing_captions:
            raise ValueError("pass --captions FILE, or --allow-missing-captions to write records without any")
        summary = build_records(
            args.pairs, captions, args.out, args.allow_missing_captions, args.absolute_paths
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    missing = summary["missing_captions"]
    what = "kept with an empty caption" if args.allow_missing_captions else "skipped"
    print(
        f"records: {summary['records']} of {summary['pairs']} pairs -> {args.out}; "
        f"{len(missing)} without a caption ({what})"
    )
    if missing:
        print(f"  without a caption: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

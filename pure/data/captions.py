"""``python -m pure.data.captions``: captions of HQ images by a multimodal LLM, cached by image content.

PURE's answers describe the HQ (ground-truth) image with LLaVA-v1.5-13B prompted "Please describe this
image in detail." (spec 1.3). This module runs such a model through transformers' LLaVA classes
(`LlavaForConditionalGeneration` + the checkpoint's processor), batched and greedy, and appends one JSON
line per image to the output file::

    {"file": "astronaut_000.png", "sha256": "<sha256 of the file bytes>",
     "caption": "The image shows ...", "source": "model",
     "model": "llava-hf/llava-1.5-13b-hf", "prompt": "Please describe this image in detail."}

Caching: an image is captioned only when the output has no line with its content hash for the same
model and prompt (or an imported line, ``"source": "import"``), so a rerun skips everything already done
and an image whose content changed is captioned again. Identical files are captioned once. Lines are
appended and fsynced batch by batch; a line torn by a kill is dropped (the file is rewritten atomically)
on the next run, so the cache never holds a half-written record. Later lines win over earlier ones.

Existing captions: ``--import FILE`` takes a JSONL (or a JSON list or ``{file name: caption}`` mapping)
whose entries name an image by ``file`` (also ``image``, ``name`` or ``id``; matched on the base name)
and/or ``sha256`` and give the text as ``caption`` (or ``text``, ``description``). Imported captions are
copied into the output; the model is loaded only if some image is still without a caption (``--no-model``:
never; those images are reported as missing).

The model is injectable: `caption_images` takes any `Captioner` (a ``caption(images) -> texts`` object);
`LlavaCaptioner.from_pretrained` is the real loader. Model hubs: a Hub id is downloaded by transformers;
with ``HF_HUB_OFFLINE=1`` and no local copy the load fails at once with one line saying how to get it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from pure.imageio import ImageLoadError, atomic_write, file_sha256, list_images, load_image
from pure.vq import to_rgb

DEFAULT_MODEL = "llava-hf/llava-1.5-13b-hf"
DEFAULT_PROMPT = "Please describe this image in detail."
# LLaVA-1.5's conversation format, used when the processor has no chat template.
LLAVA_15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
IMPORT_SOURCE, MODEL_SOURCE = "import", "model"
_NAME_KEYS = ("file", "image", "name", "id")
_TEXT_KEYS = ("caption", "text", "description")


class CaptionModelError(RuntimeError):
    """The captioning model cannot be loaded; the message is one line that says how to fix it."""


@runtime_checkable
class Captioner(Protocol):
    """Anything that captions a batch: ``caption(images)`` takes RGB PIL images, returns one text each."""

    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class LlavaCaptioner:
    """A LLaVA-style model and its processor; greedy, batched captions of RGB images.

    ``model`` is a `LlavaForConditionalGeneration` (or any model with the same ``generate`` inputs) and
    ``processor`` its `LlavaProcessor`. Prompts are padded on the left so that every row's answer starts
    right after its prompt.
    """

    def __init__(self, model, processor, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 512) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.processor.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 512,
    ) -> LlavaCaptioner:
        """Load a LLaVA checkpoint (a Hub id or a local folder saved with ``save_pretrained``).

        Default device CUDA when available, else CPU; default dtype fp16 on CUDA (LLaVA-1.5's own), fp32 on
        CPU. Raises `CaptionModelError` with one line when the model cannot be found or read.
        """
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        try:
            processor = AutoProcessor.from_pretrained(model_id)
            model = LlavaForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
        except (OSError, ValueError) as err:
            raise CaptionModelError(_load_error(model_id, err)) from None
        return cls(model.to(device).eval(), processor, prompt, max_new_tokens)

    def prompt_text(self) -> str:
        """The model's text input for one image: its chat template when it has one, else LLaVA-1.5's."""
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}
            ]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA_15_TEMPLATE.format(prompt=self.prompt)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        if not images:
            return []
        text = [self.prompt_text()] * len(images)
        inputs = self.processor(images=list(images), text=text, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = {
            k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in inputs.items()
        }
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        answers = output[:, inputs["input_ids"].shape[1] :]  # (B, new tokens): prompts are left-padded
        return [t.strip() for t in self.processor.batch_decode(answers, skip_special_tokens=True)]


def _load_error(model_id: str, err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if Path(model_id).exists():
        return f"cannot load the captioning model from {model_id}: {first}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else first
    return (
        f"cannot load the captioning model {model_id}: {why}. Download it on a machine with network "
        f"(`hf download {model_id} --local-dir DIR`) and pass --model DIR, or give existing captions "
        "with --import"
    )


# ---------------------------------------------------------------------------------------------------------
# The caption file
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CaptionFile:
    """The parsed lines of a caption JSONL; ``torn`` lists the (1-based) numbers of unreadable lines."""

    entries: list[dict]
    torn: list[int] = field(default_factory=list)
    lines: int = 0


def read_caption_file(path: str | os.PathLike) -> CaptionFile:
    """Lines of a caption JSONL (missing file: none). Unreadable lines are listed, not fatal."""
    path = Path(path)
    parsed = CaptionFile([])
    if not path.is_file():
        return parsed
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            parsed.lines = n
            try:
                entry = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                entry = None
            if raw.endswith(b"\n") and _valid_entry(entry):
                parsed.entries.append(entry)
            else:
                parsed.torn.append(n)
    return parsed


def _valid_entry(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("caption"), str) and "sha256" in entry


def _repair(path: Path, parsed: CaptionFile) -> None:
    """Rewrite the file without its unreadable lines (atomically)."""
    data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in parsed.entries).encode()
    atomic_write(path, lambda f: f.write(data), overwrite=True)


class CaptionIndex:
    """Look-ups into caption entries by content hash and by file name; later entries win."""

    def __init__(self, entries: Iterable[dict] = ()) -> None:
        self.by_hash: dict[str, dict] = {}
        self.by_name: dict[str, dict] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: dict) -> None:
        if entry.get("sha256"):
            self.by_hash[entry["sha256"]] = entry
        if entry.get("file"):
            self.by_name[Path(entry["file"]).name] = entry

    def lookup(self, sha256: str | None = None, name: str | None = None) -> dict | None:
        """The entry of this content hash, else of this file name, else None."""
        if sha256 and sha256 in self.by_hash:
            return self.by_hash[sha256]
        if name:
            return self.by_name.get(Path(name).name)
        return None


def load_caption_index(path: str | os.PathLike) -> CaptionIndex:
    """A `CaptionIndex` of a caption JSONL written by this module (or of an import file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"caption file {path} does not exist; make it with python -m pure.data.captions"
        )
    entries = read_caption_file(path).entries
    return CaptionIndex(entries) if entries else CaptionIndex(read_import_file(path))


def read_import_file(path: str | os.PathLike) -> list[dict]:
    """Existing captions as entries ``{"file"?, "sha256"?, "caption"}`` (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read captions to import from {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)  # a whole-file JSON list or {file name: caption} mapping
    except ValueError:
        data = None
    if isinstance(data, list):
        raw = data
    elif isinstance(data, dict) and _text_of(data) is None:
        raw = [{"file": name, "caption": caption} for name, caption in data.items()]
    else:
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path}:{n}: not a JSON line") from None
    entries = []
    for n, item in enumerate(raw, 1):
        caption = _text_of(item) if isinstance(item, dict) else None
        name = next((item[k] for k in _NAME_KEYS if isinstance(item.get(k), str)), None) if caption else None
        sha = item.get("sha256") if caption is not None else None
        if caption is None or not (name or sha):
            raise ValueError(
                f"{path}: entry {n} needs a caption ({'/'.join(_TEXT_KEYS)}) and a file name "
                f"({'/'.join(_NAME_KEYS)}) or a sha256"
            )
        entries.append({"file": Path(name).name if name else None, "sha256": sha, "caption": caption})
    return entries


def _text_of(item: dict) -> str | None:
    return next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)


# ---------------------------------------------------------------------------------------------------------
# Captioning a folder
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Todo:
    name: str
    sha256: str
    path: Path


def caption_images(
    images: Sequence[Path],
    out: str | os.PathLike,
    captioner: Captioner | Callable[[], Captioner] | None,
    model_name: str = DEFAULT_MODEL,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    imported: Sequence[dict] = (),
    progress: bool = True,
) -> dict:
    """Caption ``images`` into the JSONL ``out``, skipping cached ones; returns a summary dict.

    ``captioner`` is a `Captioner`, or a function making one (called only if something needs the model),
    or None (no model: uncached images are reported as missing). ``model_name`` and ``prompt`` are the
    cache key written with each caption; ``imported`` are entries from `read_import_file`.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {batch_size}")
    out = Path(out)
    start = time.perf_counter()
    existing = read_caption_file(out)
    if existing.torn and existing.torn != [existing.lines]:
        raise ValueError(
            f"{out} is not a caption file of python -m pure.data.captions (line {existing.torn[0]} is not "
            "one of its records); choose another --out"
        )
    if existing.torn:  # a kill while appending tears the last line only
        _repair(out, existing)
        print(f"note: dropped the torn last line of {out} (an interrupted run)", file=sys.stderr)
    cache: dict[str, dict] = {}
    for entry in existing.entries:
        if entry.get("source") == IMPORT_SOURCE or (
            entry.get("model") == model_name and entry.get("prompt") == prompt
        ):
            cache[entry["sha256"]] = entry
    named_files = {e.get("file") for e in existing.entries}
    import_index = CaptionIndex(imported)

    summary = {
        "images": len(images),
        "cached": 0,
        "imported": 0,
        "captioned": 0,
        "skipped": [],
        "missing": [],
    }
    new_lines: list[dict] = []
    todo: list[_Todo] = []
    for path in images:
        try:
            sha = file_sha256(path)
        except OSError as err:
            summary["skipped"].append({"file": path.name, "reason": f"{path}: cannot read ({err.strerror})"})
            continue
        if sha in cache:
            summary["cached"] += 1
            if path.name not in named_files:  # same content under another name: name it too
                new_lines.append({**cache[sha], "file": path.name})
                named_files.add(path.name)
            continue
        found = import_index.lookup(sha, path.name)
        if found is not None:
            entry = {"file": path.name, "sha256": sha, "caption": found["caption"], "source": IMPORT_SOURCE}
            cache[sha] = entry
            new_lines.append(entry)
            named_files.add(path.name)
            summary["imported"] += 1
            continue
        todo.append(_Todo(path.name, sha, path))
    _append(out, new_lines)

    unique: dict[str, _Todo] = {}  # identical files are captioned once
    names_of: dict[str, list[str]] = {}
    for item in todo:
        unique.setdefault(item.sha256, item)
        names_of.setdefault(item.sha256, []).append(item.name)
    if todo and captioner is None:
        summary["missing"] = [t.name for t in todo]
    elif todo:
        model = captioner if isinstance(captioner, Captioner) else captioner()
        batch: list[tuple[_Todo, Image.Image]] = []
        bar = tqdm(total=len(unique), unit="img", desc="captions", disable=not progress)
        try:
            for item in unique.values():
                try:
                    batch.append((item, to_rgb(load_image(item.path))))
                except ImageLoadError as err:
                    summary["skipped"].append({"file": item.name, "reason": str(err)})
                    bar.write(f"skipped: {err}")
                    bar.update(1)
                if len(batch) == batch_size:
                    _caption_batch(model, batch, names_of, model_name, prompt, out, summary)
                    bar.update(len(batch))
                    batch = []
            if batch:
                _caption_batch(model, batch, names_of, model_name, prompt, out, summary)
                bar.update(len(batch))
        finally:
            bar.close()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _caption_batch(
    model: Captioner,
    batch: list[tuple[_Todo, Image.Image]],
    names_of: dict[str, list[str]],
    model_name: str,
    prompt: str,
    out: Path,
    summary: dict,
) -> None:
    texts = model.caption([image for _, image in batch])
    if len(texts) != len(batch):
        raise RuntimeError(f"the captioner returned {len(texts)} captions for {len(batch)} images")
    lines = [
        {
            "file": name,
            "sha256": item.sha256,
            "caption": text,
            "source": MODEL_SOURCE,
            "model": model_name,
            "prompt": prompt,
        }
        for (item, _), text in zip(batch, texts, strict=True)
        for name in names_of[item.sha256]
    ]
    _append(out, lines)
    summary["captioned"] += len(lines)


def _append(path: Path, entries: list[dict]) -> None:
    """Append whole lines and fsync: a kill can only tear the last line, which the next run drops."""
    if not entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode()
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.data.captions",
        description="Caption HQ images with a LLaVA model (greedy, batched), cached by image content hash "
        "in the output JSONL: a rerun captions only new or changed images. Existing captions can be "
        "imported instead.",
    )
    parser.add_argument("--images", required=True, help="folder (or glob) of images, e.g. PAIRS/hq")
    parser.add_argument("--out", required=True, help="caption JSONL to create or extend")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"LLaVA Hub id or folder (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"question asked per image (default {DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="caption length limit (default 512)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="default fp16 on GPU, fp32 on CPU",
    )
    parser.add_argument(
        "--import",
        dest="import_file",
        default=None,
        help="existing captions (JSONL/JSON) keyed by file name or sha256; used instead of the model",
    )
    parser.add_argument(
        "--no-model", action="store_true", help="never load the model: only cached and imported captions"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        images = list_images(args.images)
        imported = read_import_file(args.import_file) if args.import_file else []
        dtype = getattr(torch, args.dtype) if args.dtype else None

        def load() -> LlavaCaptioner:
            print(f"loading {args.model} ...", file=sys.stderr)
            return LlavaCaptioner.from_pretrained(
                args.model, args.device, dtype, prompt=args.prompt, max_new_tokens=args.max_new_tokens
            )

        summary = caption_images(
            images,
            args.out,
            None if args.no_model else load,
            model_name=args.model,
            prompt=args.prompt,
            batch_size=args.batch_size,
            imported=imported,
        )
    except KeyboardInterrupt:
        print("interrupted: finished batches are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except (CaptionModelError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"captions: {summary['images']} images -> {args.out}: {summary['captioned']} captioned now, "
        f"{summary['cached']} cached, {summary['imported']} imported, {len(summary['skipped'])} skipped, "
        f"{len(summary['missing'])} missing; {summary['seconds']:.1f} s"
    )
    for entry in summary["skipped"]:
        print(f"  skipped: {entry['reason']}")
    if summary["missing"]:
        shown = ", ".join(summary["missing"][:10]) + (" ..." if len(summary["missing"]) > 10 else "")
        print(f"  missing (no model, no import): {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

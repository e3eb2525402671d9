"""Hugging Face model card and upload for a PURE checkpoint folder.

    python -m pure.hub CHECKPOINT_DIR --results results/realsr/summary.json --push user/pure-mine

writes ``CHECKPOINT_DIR/README.md`` through huggingface_hub's card API (licence, base model, datasets,
pipeline tag, usage, and a metrics table per eval summary written by `python -m pure.eval`, with its
settings and the PURE paper's reported numbers beside it), then uploads the folder with
``HfApi.upload_folder``. Offline (``HF_HUB_OFFLINE=1``) it writes the card only, and says so.

A mean over fewer images than the run has (a metric failed on some, see ``score.partial_means``) is not
put in the card's ``model-index``: that format has no field for how many images a value covers (a
metric entry is type, value, name, config, args, verified), and leaderboards read its values as whole-set
results, comparable with other models'. Such a mean stays in the card's table, marked, with a line that
says how many images it covers and that the model-index leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants

from pure.eval.metrics import METRICS
from pure.eval.reported import SET_NAMES
from pure.eval.score import RESULT_FORMAT, format_table, partial_means
from pure.imageio import atomic_write

DEFAULT_BASE_MODEL = "nonwhy/PURE"
DEFAULT_LICENSE = "apache-2.0"
# PURE's training data (LSDIR + the first 10k FFHQ faces); pass Hub dataset ids with --dataset to link them.
DEFAULT_DATASETS = ("LSDIR", "FFHQ")
TAGS = ("image-restoration", "super-resolution", "real-world-super-resolution", "autoregressive", "chameleon")


class HubError(ValueError):
    """A problem with the card inputs, in one line that says what to do."""


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``summary.json`` written by ``python -m pure.eval``.

    Raises:
        HubError: missing, not JSON, or not an eval summary.
    """
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise HubError(f"--results {path}: cannot read ({err.strerror or err}); give a summary.json") from err
    except ValueError as err:
        raise HubError(f"--results {path}: not JSON ({err})") from err
    if not isinstance(summary, dict) or summary.get("format") != RESULT_FORMAT:
        raise HubError(f"--results {path}: not a summary.json written by python -m pure.eval")
    return summary


def offline() -> bool:
    """True when HF_HUB_OFFLINE is set now or was set when huggingface_hub was imported."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _eval_results(summaries: Sequence[dict[str, Any]]) -> list[EvalResult]:
    """The model-index entries: every whole-set mean (partial ones are left out, see the module doc)."""
    results = []
    for summary in summaries:
        set_key = summary.get("set") or "custom"
        partial = partial_means(summary)
        for name, entry in summary["metrics"].items():
            if entry.get("mean") is None or name in partial:
                continue
            results.append(
                EvalResult(
                    task_type="image-to-image",
                    task_name="Real-world image super-resolution (×4)",
                    dataset_type=set_key,
                    dataset_name=SET_NAMES.get(set_key, set_key),
                    metric_type=name,
                    metric_name=METRICS[name].label if name in METRICS else name,
                    metric_value=round(float(entry["mean"]), 6),
                    metric_config=json.dumps(entry.get("settings", {}), sort_keys=True),
                )
            )
    return results


def _settings_lines(summary: dict[str, Any]) -> list[str]:
    backend = summary["backend"]
    lines = [
        f"- {summary['count']} images; restorations `{summary['pred_dir']}`, references "
        f"`{summary.get('gt_dir') or 'none (no-reference metrics only)'}`; "
        f"scored {summary.get('created', '')} with {backend['name']} {backend['version']}.",
    ]
    for name, entry in summary["metrics"].items():
        settings = json.dumps(entry.get("settings", {}), sort_keys=True)
        lines.append(f"- `{name}`: pyiqa `{entry.get('pyiqa_name', name)}` with settings `{settings}`")
    partial = partial_means(summary)
    if partial:
        covers = ", ".join(f"{name} ({n}/{summary['count']} images)" for name, n in partial.items())
        lines.append(
            f"- Means over part of the set, marked in the table and left out of the model-index "
            f"metadata (not comparable with whole-set results): {covers}."
        )
    return lines


def build_card(
    folder: str | Path,
    summaries: Sequence[dict[str, Any]] = (),
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = DEFAULT_BASE_MODEL,
    datasets: Sequence[str] = DEFAULT_DATASETS,
) -> ModelCard:
    """The model card for the checkpoint in `folder`, with one metrics table per eval summary."""
    folder = Path(folder)
    model_id = repo_id or str(folder)
    model_name = (repo_id or folder.resolve().name).split("/")[-1]
    evals = _eval_results(summaries)
    data = ModelCardData(
        model_name=model_name,
        license=license,
        base_model=base_model,
        datasets=list(datasets) or None,
        pipeline_tag="image-to-image",
        library_name="pure",
        tags=list(TAGS),
        eval_results=evals or None,
    )
    body = [
        f"# {model_name}",
        "",
        "A PURE-style (Perceive, Understand, REstore) real-world image super-resolution model: an "
        "autoregressive Chameleon/Lumina-mGPT backbone that first describes the degradation and the "
        "content of a low-quality image, then writes the restored image as VQ tokens (×4, 512 px outputs).",
        "",
        "## Usage",
        "",
        "Command line (restores one image, a folder or a glob):",
        "",
        "```bash",
        f"python -m pure.infer --model {model_id} --input lq.png --output restored.png",
        f"python -m pure.infer --model {model_id} --input lq_folder/ --output restored/ --batch-size 4",
        "```",
        "",
        "Python:",
        "",
        "```python",
        "from pure.imageio import load_image",
        "from pure.restorer import PureRestorer",
        "",
        f'restorer = PureRestorer.from_pretrained("{model_id}")',
        'result = restorer.restore(load_image("lq.png"), seed=0)',
        'result.image.save("restored.png")  # result.entropy: per-token entropy of the image tokens',
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if not summaries:
        body += ["No evaluation attached. Score restorations with `python -m pure.eval` and pass its "
                 "`summary.json` to `python -m pure.hub --results`.", ""]  # fmt: skip
    for summary in summaries:
        set_key = summary.get("set")
        body += [f"### {SET_NAMES.get(set_key or '', set_key or 'custom test set')}", ""]
        body += [format_table(summary, run_label=f"{model_name} ({summary['count']} images)").rstrip(), ""]
        body += ["Settings:", "", *_settings_lines(summary), ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


def write_card(card: ModelCard, folder: str | Path) -> Path:
    """Write `card` to ``folder/README.md`` atomically (replacing an older card)."""
    path = Path(folder) / "README.md"
    text = str(card).encode("utf-8")
    atomic_write(path, lambda f: f.write(text), overwrite=True)
    return path


def push(folder: str | Path, repo_id: str, private: bool = False, api: HfApi | None = None) -> str:
    """Create `repo_id` if needed and upload `folder`; returns the repository URL."""
    api = api or HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message="Upload PURE checkpoint and model card",
        ignore_patterns=[".*", "**/.*"],
    )
    return str(url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.hub",
        description="Write a Hugging Face model card (README.md) into a checkpoint folder and optionally "
        "upload the folder. Offline (HF_HUB_OFFLINE=1) only the card is written.",
    )
    p.add_argument("folder", help="checkpoint folder (config.json, weights, tokenizer.json, vq/)")
    p.add_argument(
        "--results", action="append", default=[], help="summary.json from python -m pure.eval (repeatable)"
    )
    p.add_argument("--push", metavar="REPO_ID", help="upload the folder to this Hub model repository")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--license", default=DEFAULT_LICENSE, help=f"licence id (default {DEFAULT_LICENSE})")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help=f"default {DEFAULT_BASE_MODEL}")
    p.add_argument(
        "--dataset",
        action="append",
        help=f"training data, repeatable (default: {', '.join(DEFAULT_DATASETS)})",
    )
    return p


def main(argv: list[str] | None = None, api: HfApi | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.folder)
    try:
        if not folder.is_dir():
            raise HubError(f"{folder}: not a folder; give the checkpoint folder to publish")
        summaries = [load_results(path) for path in args.results]
        card = build_card(
            folder,
            summaries,
            repo_id=args.push,
            license=args.license,
            base_model=args.base_model,
            datasets=args.dataset or DEFAULT_DATASETS,
        )
        path = write_card(card, folder)
    except HubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.push:
        print(f"wrote {path}")
        return 0
    if offline():
        print(f"offline (HF_HUB_OFFLINE is set): wrote {path}; did not push to {args.push}")
        return 0
    url = push(folder, args.push, private=args.private, api=api)
    print(f"wrote {path} and uploaded {folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

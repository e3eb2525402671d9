"""Copy a finished PURE-tiny run into ``examples/pure-tiny/`` with its model card (the last step of
``recipes/pure_tiny/reproduce.sh`` with ``SHIP=1``).

    .venv/bin/python recipes/pure_tiny/ship.py --run outputs/pure_tiny --out examples/pure-tiny

The card is ``card_template.md`` filled with the run's own numbers: the VQ's hold-out PSNR, the training
steps, loss and time, and the hold-out table of ``python -m pure.eval.holdout``. The folder is staged and
swapped in whole, so a failed copy leaves the old one in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from pure.eval.holdout import SCALE  # the x4 the card measures: LQ side = image side / SCALE

HERE = Path(__file__).resolve().parent
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vq/config.json",
    "vq/model.safetensors",
)
OPTIONAL_FILES = ("sampling.json",)  # the checkpoint's decoding defaults, where the run chose some


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _last_logged(metrics_jsonl: Path) -> dict:
    """The last training-log line that has a loss (``metrics.jsonl`` of ``pure.train``)."""
    last = {}
    if metrics_jsonl.is_file():
        for line in metrics_jsonl.read_text().splitlines():
            entry = json.loads(line)
            if "loss" in entry:
                last = entry
    return last


def _inputs_and_data(data: dict, previous: dict | None) -> str:
    """What a stage's recipe does to the HQ image inputs, and its data mixture where it differs from the
    previous stage's (``previous`` None: the first stage, whose mixture the card states)."""
    noise, own = data.get("image_input_noise", 0) or 0, data.get("image_input_own", 0) or 0
    text = ""
    if noise and own:
        text += (
            f", {noise:.0%} of the HQ image inputs replaced by random codes and {own:.0%} by its own samples"
        )
    elif noise or own:
        text += f", {noise or own:.0%} of the HQ image inputs replaced" + (
            " by its own samples" if own else ""
        )
    sets = data.get("sets") or []
    if previous is not None and sets != (previous.get("sets") or []):
        text += " (data: " + " / ".join(f"{s.get('name', s['path'])} {s['ratio']:.0%}" for s in sets) + ")"
    return text


def card_fields(run: Path, stages: tuple[str, ...] = ("train",), vq_metrics: Path | None = None) -> dict:
    """The numbers the card quotes, read from the run's own files.

    ``stages`` are the run's training folders in order (``train``, then ``train2``... when each stage starts
    from the previous one's export); the card quotes their sum and the last one's model. ``vq_metrics`` is
    the tokenizer's ``metrics.json`` (default: the run's ``vq/metrics.json``; a committed tokenizer keeps
    its own).
    """
    vq = _json(vq_metrics or run / "vq" / "metrics.json")
    states, recipes, lines = [], [], []
    for i, stage in enumerate(stages, 1):
        export = run / stage / "export"
        state = _json(export / "trainer_state.json")
        recipe = yaml.safe_load((export / "training_config.yaml").read_text())
        last = _last_logged(run / stage / "metrics.jsonl")
        state.setdefault("step", last.get("step", "?"))
        state["loss"] = last.get("loss", float("nan"))
        states.append(state)
        recipes.append(recipe)
        lines.append(
            f"stage {i}: {state['step']} steps at peak lr {recipe['train']['lr']:g}"
            + _inputs_and_data(recipe.get("data", {}), recipes[-2].get("data", {}) if i > 1 else None)
            + f", {state.get('train_seconds', float('nan')) / 60:.0f} min"
        )
    config = _json(run / stages[-1] / "export" / "config.json")
    table = (run / "holdout" / "results.md").read_text()
    steps = [s["step"] for s in states]
    return {
        "vq_psnr": vq["holdout"]["psnr"],
        "vq_psnr_y": vq["holdout"]["psnr_y"],
        "vq_usage": vq["holdout"]["usage"],
        "vq_steps": vq.get("steps", "?"),
        "vq_minutes": vq["seconds"] / 60,
        "steps": sum(steps) if all(isinstance(s, int) for s in steps) else "?",
        "loss": states[-1]["loss"],
        "train_minutes": sum(s.get("train_seconds", float("nan")) for s in states) / 60,
        "stages": "; ".join(lines),
        "hidden": config.get("hidden_size"),
        "layers": config.get("num_hidden_layers"),
        "heads": config.get("num_attention_heads"),
        "vocab": config.get("vocab_size"),
        "image_size": config.get("pure_image_size"),
        "lq_size": config.get("pure_image_size", 0) // SCALE,
        "batch": recipes[-1]["train"]["global_batch_size"],
        "holdout_table": table.split("\n", 1)[1].strip(),  # without its "# Held-out measurement" title
    }


def ship(
    run: Path,
    out: Path,
    template: Path = HERE / "card_template.md",
    stages: tuple[str, ...] = ("train",),
    vq_metrics: Path | None = None,
) -> Path:
    export = run / stages[-1] / "export"
    missing = [name for name in CHECKPOINT_FILES if not (export / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{export} lacks {missing}: has the training run finished?")
    fields = card_fields(run, stages, vq_metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staging = Path(tmp) / "ship"
        for name in (*CHECKPOINT_FILES, *(n for n in OPTIONAL_FILES if (export / n).is_file())):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export / name, staging / name)
        shutil.copy2(run / "holdout" / "results.json", staging / "holdout_results.json")
        pictures = sorted((run / "holdout" / "pictures").glob("*_000_seed0.png"))  # first crop of each image
        (staging / "pictures").mkdir()
        for picture in pictures:
            shutil.copy2(picture, staging / "pictures" / picture.name)
        fields["pictures"] = "\n".join(f"![{p.stem}](pictures/{p.name})" for p in pictures)
        card = template.read_text().format(**fields)
        (staging / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(staging, out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="outputs/pure_tiny", help="the reproduce.sh output folder")
    p.add_argument("--out", default="examples/pure-tiny", help="the folder to (re)write")
    p.add_argument("--card", default=str(HERE / "card_template.md"), help="the card template to fill")
    p.add_argument(
        "--stages",
        nargs="+",
        default=["train"],
        help="the run's training folders in order; the last one's export is shipped (default: train)",
    )
    p.add_argument(
        "--vq-metrics",
        type=Path,
        default=None,
        help="the tokenizer's metrics.json (default: RUN/vq/metrics.json, the tokenizer the run trained)",
    )
    args = p.parse_args()
    shipped = ship(Path(args.run), Path(args.out), Path(args.card), tuple(args.stages), args.vq_metrics)
    print(f"shipped {shipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

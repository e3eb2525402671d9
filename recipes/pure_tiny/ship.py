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


def card_fields(run: Path) -> dict:
    """The numbers the card quotes, read from the run's own files."""
    vq = _json(run / "vq" / "metrics.json")
    train_state = _json(run / "train" / "export" / "trainer_state.json")
    last = _last_logged(run / "train" / "metrics.jsonl")
    table = (run / "holdout" / "results.md").read_text()
    config = _json(run / "train" / "export" / "config.json")
    recipe = yaml.safe_load((run / "train" / "export" / "training_config.yaml").read_text())
    return {
        "vq_psnr": vq["holdout"]["psnr"],
        "vq_psnr_y": vq["holdout"]["psnr_y"],
        "vq_usage": vq["holdout"]["usage"],
        "vq_steps": vq.get("steps", "?"),
        "vq_minutes": vq["seconds"] / 60,
        "steps": train_state.get("step", last.get("step", "?")),
        "loss": last.get("loss", float("nan")),
        "train_minutes": train_state.get("train_seconds", float("nan")) / 60,
        "hidden": config.get("hidden_size"),
        "layers": config.get("num_hidden_layers"),
        "heads": config.get("num_attention_heads"),
        "vocab": config.get("vocab_size"),
        "image_size": config.get("pure_image_size"),
        "lq_size": config.get("pure_image_size", 0) // SCALE,
        "batch": recipe["train"]["global_batch_size"],
        "holdout_table": table.split("\n", 1)[1].strip(),  # without its "# Held-out measurement" title
    }


def ship(run: Path, out: Path, template: Path = HERE / "card_template.md") -> Path:
    export = run / "train" / "export"
    missing = [name for name in CHECKPOINT_FILES if not (export / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{export} lacks {missing}: has the training run finished?")
    fields = card_fields(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staging = Path(tmp) / "ship"
        for name in CHECKPOINT_FILES:
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
    args = p.parse_args()
    print(f"shipped {ship(Path(args.run), Path(args.out), Path(args.card))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Export a trained model to a folder that ``python -m pure.infer --model DIR`` loads, with a model card.

Folder layout (the same as any PURE checkpoint)::

    config.json  model.safetensors  tokenizer.json  vq/  README.md (model card)
    training_config.yaml  run_info.json  trainer_state.json

LoRA adapters are merged into the base weights, so the folder is a plain model. The tokenizer and the
VQ image tokenizer are copied from the base checkpoint (fine-tuning changes neither).

``python -m pure.train.export RUN/checkpoints/step-00001000 --output DIR`` exports any saved checkpoint
(ZeRO-2 or ZeRO-3, full or LoRA) on a CPU machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pure.model import PureForConditionalGeneration, load_model, resolve_checkpoint
from pure.train.config import ConfigError, Recipe, load_recipe, recipe_to_yaml
from pure.train.loss import SupervisedLMLoss
from pure.train.modeling import apply_lora, merge_lora

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A [PURE](https://arxiv.org/abs/2503.11073) (Perceive, Understand, REstore) real-world image restoration
model: a Chameleon-architecture autoregressive model that estimates the degradation of a low-quality
image, describes its content, then generates the restored image token by token. Instruction-tuned from
`{{ base_model }}` with `python -m pure.train` ({{ method }}).

## Use

```bash
python -m pure.infer --model path/to/{{ model_name }} --input lq.png   # this folder
```

## Training

- base model: `{{ base_model }}`
- method: {{ method }}
- steps: {{ steps }} ({{ epochs }} epochs, {{ examples }} sequences seen), {{ world_size }} process(es)
- code: git commit `{{ git_commit }}`{% if git_dirty %} (with uncommitted changes){% endif %}
{% if metrics %}- last logged step: {{ metrics }}
{% endif %}

### Data

| set | path | sampling ratio | examples |
|---|---|---|---|
{% for s in data_sets %}| {{ s.name }} | `{{ s.path }}` | {{ s.ratio }} | {{ s.examples }} |
{% endfor %}

Sequences longer than {{ max_length }} tokens were skipped. Loss on the answer only (degradation text,
caption, the whole output image block and the final end-of-turn token).

### Hyper-parameters

| name | value |
|---|---|
{% for k, v in hparams.items() %}| {{ k }} | {{ v }} |
{% endfor %}

### Recipe

```yaml
{{ recipe_yaml }}```
"""


def _hub_id(name: str) -> str | None:
    """``name`` if it looks like a Hub id (``owner/name``, not a local folder)."""
    return name if name.count("/") == 1 and not Path(name).exists() and not name.startswith(".") else None


def _data_sets(recipe: Recipe) -> list[dict]:
    from pure.data.shards import ShardError, shard_set_summary

    try:
        sets = recipe.data.shard_sets()
    except ShardError:
        return [{"name": recipe.data.config, "path": recipe.data.config, "ratio": "-", "examples": "?"}]
    try:
        return shard_set_summary(sets)
    except (ShardError, OSError):
        return [{"name": s.name, "path": s.path, "ratio": s.ratio, "examples": "?"} for s in sets]


def model_card(recipe: Recipe, model_name: str, run: dict, state: dict):
    """A Hugging Face model card (``huggingface_hub.ModelCard``) describing the training run."""
    from huggingface_hub import ModelCard, ModelCardData

    base = recipe.export.base_model_id or _hub_id(recipe.model.init_from)
    card_data = ModelCardData(
        base_model=base,
        license=recipe.export.license or None,
        tags=list(recipe.export.tags),
        pipeline_tag="image-to-image",
        library_name="pure",
    )
    t, lo = recipe.train, recipe.lora
    method = (
        f"LoRA r={lo.r}, alpha={lo.alpha:g} on {', '.join(lo.target_modules)}, merged into the weights"
        if lo.enabled
        else "full fine-tuning"
    )
    hparams = {
        "learning rate": f"{t.lr:g} (cosine to {t.min_lr:g})",
        "warmup": f"{t.warmup_steps} steps" if t.warmup_steps >= 0 else f"{t.warmup_epochs:g} epochs",
        "epochs / max steps": f"{t.epochs:g} / {t.max_steps or '-'}",
        "global batch": f"{t.global_batch_size} sequences ({t.micro_batch_size} per device per micro-step)",
        "optimizer": f"AdamW betas {tuple(t.betas)}, eps {t.eps:g}, weight decay {t.weight_decay:g}"
        + (" on all parameters" if t.decay_all_parameters else " on matrices"),
        "gradient clipping": f"{t.grad_clip:g}",
        "residual dropout": f"{recipe.model.residual_dropout:g}",
        "z-loss weight": f"{recipe.model.z_loss_weight:g}",
        "precision": t.precision,
        "DeepSpeed config": f"`{t.deepspeed}`",
        "seed": str(recipe.seed),
    }
    logged = (state.get("metrics") or {}).items()
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in logged if isinstance(v, float))
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        base_model=base or recipe.model.init_from,
        method=method,
        steps=state.get("step", "?"),
        epochs=f"{state.get('epoch', 0):.3g}",
        examples=state.get("examples_seen", "?"),
        world_size=state.get("world_size", "?"),
        git_commit=run.get("git_commit", "unknown"),
        git_dirty=run.get("git_dirty"),
        metrics=metrics,
        data_sets=_data_sets(recipe),
        max_length=recipe.data.max_length,
        hparams=hparams,
        recipe_yaml=recipe_to_yaml(recipe),
    )


def export_model(
    lm: PureForConditionalGeneration,
    base_folder: str | Path,
    out_dir: str | Path,
    recipe: Recipe | None = None,
    run: dict | None = None,
    state: dict | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``lm`` (already merged) as an inference folder, atomically.

    ``base_folder`` provides ``tokenizer.json`` and ``vq/``. ``dtype`` defaults to the recipe's
    ``export.dtype`` (or the model's own dtype without a recipe).
    """
    out_dir = Path(out_dir)
    base_folder = Path(base_folder)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    if dtype is None:
        dtype = DTYPES[recipe.export.dtype] if recipe is not None else next(lm.parameters()).dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-") as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        config = copy.deepcopy(lm.config)
        config.dtype = dtype
        config.use_cache = True
        config.save_pretrained(staging)
        state_dict = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lm.state_dict().items()}
        save_file(state_dict, str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(base_folder / "tokenizer.json", staging / "tokenizer.json")
        if (base_folder / "vq").is_dir():
            shutil.copytree(base_folder / "vq", staging / "vq")
        if recipe is not None:
            (staging / "training_config.yaml").write_text(recipe_to_yaml(recipe))
            (staging / "run_info.json").write_text(json.dumps(run or {}, indent=2) + "\n")
            (staging / "trainer_state.json").write_text(json.dumps(state or {}, indent=2) + "\n")
            model_card(recipe, recipe.name, run or {}, state or {}).save(staging / "README.md")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.move(staging, out_dir)
    return out_dir


def consolidated_state_dict(checkpoint: Path, exclude_frozen: bool) -> dict[str, torch.Tensor]:
    """The fp32 state dict of the trained module (``lm.``-prefixed keys) from a DeepSpeed checkpoint."""
    if any(checkpoint.glob("*optim_states.pt")) and any(checkpoint.glob("zero_pp_rank_*")):
        from pure.train.engine import require_packages

        require_packages({"deepspeed": f"{checkpoint} is a DeepSpeed ZeRO checkpoint"})
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name, exclude_frozen_parameters=exclude_frozen
        )
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Rebuild the trained model from a checkpoint folder (its ``config.yaml`` says how), merge LoRA,
    and :func:`export_model` it."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.yaml").is_file():
        raise ConfigError(f"{checkpoint} is not a training checkpoint folder (no config.yaml)")
    recipe = load_recipe(checkpoint / "config.yaml")
    base = resolve_checkpoint(recipe.model.init_from)
    lm = load_model(base, device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    if recipe.lora.enabled:
        lo = recipe.lora
        lm = apply_lora(lm, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.modules_to_save)
    module = SupervisedLMLoss(lm)
    trained = consolidated_state_dict(checkpoint, exclude_frozen=recipe.lora.enabled)
    missing, unexpected = module.load_state_dict(trained, strict=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen or (not recipe.lora.enabled and missing):
        raise RuntimeError(
            f"{checkpoint} does not match the model its config.yaml describes: missing "
            f"{sorted(set(missing) - frozen)[:4]}, unexpected {unexpected[:4]}"
        )
    merged = merge_lora(module.lm)
    run = (
        json.loads((checkpoint / "run_info.json").read_text())
        if (checkpoint / "run_info.json").is_file()
        else {}
    )
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return export_model(merged, base, out_dir, recipe, run, state, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pure.train.export",
        description="Export a training checkpoint (RUN/checkpoints/step-N) to a folder that "
        "`python -m pure.infer --model` loads, LoRA merged, with a model card.",
    )
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    from pure.train.engine import MissingPackageError, latest_checkpoint

    checkpoint = Path(args.checkpoint)
    checkpoint = latest_checkpoint(checkpoint) or checkpoint  # a run folder has a config.yaml too
    try:
        out = export_checkpoint(checkpoint, args.output, overwrite=args.overwrite)
    except (ConfigError, FileExistsError, RuntimeError, MissingPackageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

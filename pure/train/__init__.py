"""Instruction tuning: ``python -m pure.train RECIPE.yaml [--set a.b=v ...] [--resume]``.

Modules, in the order a run uses them:

- :mod:`pure.train.config`: the typed recipe (YAML + ``--set`` overrides, unknown keys rejected).
- :mod:`pure.train.data`: shard sets mixed by ratio, length-grouped epoch plans, padding collator.
- :mod:`pure.train.modeling`: residual dropout, activation checkpointing, LoRA and its merge.
- :mod:`pure.train.loss`: cross-entropy on the supervised positions, LM head evaluated there only.
- :mod:`pure.train.engine`: DeepSpeed (config from the recipe) or the plain one-process engine,
  optimiser, atomic checkpoints, the packages a run needs.
- :mod:`pure.train.loop`: :func:`train`, the run from top to bottom.
- :mod:`pure.train.metrics`: step statistics, MFU, TensorBoard/JSONL/progress bar.
- :mod:`pure.train.export`: a merged inference folder with a Hugging Face model card.

The shard schema shared with data preparation is :mod:`pure.data.shards`.
"""

from pure.train.config import ConfigError, Recipe, load_recipe

__all__ = ["ConfigError", "Recipe", "load_recipe", "train"]


def train(*args, **kwargs):
    """See :func:`pure.train.loop.train` (imported on use: it pulls in transformers)."""
    from pure.train.loop import train as _train

    return _train(*args, **kwargs)

"""``python -m pure.train RECIPE.yaml [--set a.b=v ...] [--resume [CHECKPOINT]]``. See ``--help``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from pure.train.config import add_set_argument

EPILOG = """
examples:
  python -m pure.train recipes/train/tiny_cpu.yaml                      # CPU, a few steps, minutes
  python -m pure.train recipes/train/pure_7b_lora.yaml --set train.lr=1e-4 data.config=data.yaml
  python -m pure.train recipes/train/pure_7b_lora.yaml --resume        # continue from the latest checkpoint
  deepspeed --num_gpus 8 --module pure.train recipes/train/pure_7b_zero3.yaml
  torchrun --nproc_per_node 8 -m pure.train recipes/train/pure_7b_zero3.yaml
  (multi-node: recipes/train/launch_multinode.sh)

Without a launcher the trainer runs as one process (it sets RANK/WORLD_SIZE/MASTER_* itself); without
DeepSpeed installed, as one plain process (torch AdamW, no ZeRO; bf16 recipes only with LoRA).
The run folder (output_dir) receives config.yaml (the resolved recipe), run_info.json (git commit,
versions), deepspeed.json, metrics.jsonl, tensorboard/, checkpoints/ and export/ (the inference folder).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.train",
        description="Instruction-tune a PURE model on pre-tokenised shards with DeepSpeed "
        "(full fine-tuning or LoRA; ZeRO-2, ZeRO-3, CPU optimiser offload), or in one process without it "
        "(train.engine plain: torch AdamW).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="a YAML recipe (recipes/train/*.yaml)")
    add_set_argument(p, "train.lr=1e-5 lora.enabled=true")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue the run: from its latest checkpoint, or from the checkpoint folder given",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    # The `deepspeed` launcher appends --local_rank; the process reads LOCAL_RANK from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pure.train.config import ConfigError, load_recipe, recipe_to_yaml

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0

    from pure.data.shards import ShardError
    from pure.model import ModelLoadError
    from pure.train.engine import MissingPackageError, StaleBuildLockError, single_process_env
    from pure.train.loop import train

    single_process_env()
    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, and warns on every call.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    try:
        run_dir = train(
            recipe, resume=args.resume, command=[sys.executable, "-m", "pure.train", *sys.argv[1:]]
        )
    except (ConfigError, ShardError, ModelLoadError, MissingPackageError, StaleBuildLockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Deepen a trained checkpoint: each new decoder layer is a copy of the layer before it. By default the copy's
two output projections (attention's ``o_proj``, the MLP's ``down_proj``) are zeroed, so it adds nothing to the
residual stream until training moves them, and the grown model's logits are the original's.

    python recipes/pure_tiny/grow.py --model examples/pure-tiny --after 2,5 --out outputs/pure_tiny_v2/grown

``--after 2,5`` puts a new layer after layers 2 and 5 (0-based): 6 layers become 8. ``--share 0.5`` gives
each copy half its layer's output projections instead (and the layer the other half): not the same logits,
but new layers at full size from the start, where zeroed ones stay small under Adam's bounded steps (stage
7). Everything else in the folder (tokenizer, VQ, sampling.json) is copied as it is, so shards made with the
original pass the trainer's made-with check. Used by ``recipes/pure_tiny/stage7.sh``: does PURE-tiny v2 gain
from more capacity?
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # what a layer adds to the residual stream
# the weights are rewritten; the card, its pictures and results describe the original
NOT_COPIED = (WEIGHTS, "README.md", "pictures", "holdout_results.json")


def grow_state(
    state: dict[str, torch.Tensor], layers: int, after: list[int], share: float = 0.0
) -> dict[str, torch.Tensor]:
    """``state`` with a copy of layer ``i`` inserted after each ``i`` in ``after``; the copy's output
    projections are ``share`` times the layer's and the layer's own ``1 - share`` times: 0 (the default)
    leaves the logits as they were; 0.5 splits the layer's work between the two, close to the original but
    not equal (the copy reads the stream after the layer), with both at full-size weights from the start."""
    if not 0 <= share <= 1:
        raise ValueError(f"--share must be in [0, 1]; got {share}")
    if not after or any(not 0 <= i < layers for i in after) or len(set(after)) != len(after):
        raise ValueError(f"--after needs distinct layer indices in 0..{layers - 1}; got {after}")
    order: list[tuple[int, float]] = []  # (source layer, scale of its outputs), in the grown model's order
    for i in range(layers):
        order.append((i, 1 - share if i in after else 1.0))
        if i in after:
            order.append((i, share))
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    grown = {}
    for key, value in state.items():
        m = LAYER.match(key)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            grown[key] = value
    for new, (source, scale) in enumerate(order):
        for name, value in per_layer[source].items():
            grown[f"model.layers.{new}.{name}"] = value * scale if name in OUTPUTS else value.clone()
    return grown


def grow(model: Path, out: Path, after: list[int], share: float = 0.0) -> int:
    """Write the grown checkpoint folder; returns its number of layers."""
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    state = grow_state(load_file(model / WEIGHTS), layers, after, share)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    top = model.resolve()  # only its own files are left out: vq/ keeps its model.safetensors
    shutil.copytree(
        model, tmp, symlinks=True, ignore=lambda d, names: NOT_COPIED if Path(d).resolve() == top else ()
    )
    config["num_hidden_layers"] = layers + len(after)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
    tmp.rename(out)
    return config["num_hidden_layers"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="checkpoint folder to deepen")
    p.add_argument("--after", required=True, help="comma-separated 0-based layers to insert a new one after")
    p.add_argument("--out", required=True, type=Path, help="new checkpoint folder (must not exist)")
    p.add_argument(
        "--share",
        type=float,
        default=0.0,
        help="the copy's share of its layer's output projections (default 0: the same logits; 0.5: the two "
        "split the work, both at full-size weights)",
    )
    args = p.parse_args(argv)
    try:
        after = [int(x) for x in args.after.split(",") if x.strip()]
        layers = grow(args.model, args.out, after, args.share)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {layers} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

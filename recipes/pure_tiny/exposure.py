"""Does a trained model read its LQ input, or lean on its own previous codes? Exposure-bias diagnosis.

    python recipes/pure_tiny/exposure.py --model outputs/pure_tiny_v2/train2/export \
        --shards data/pure_tiny_v2/shards_scenes

On training sequences of a shard set, for the answer's HQ codes:

- teacher-forced accuracy: the argmax given the true previous codes (what the training loss sees);
- free-running accuracy: greedy decoding from the true prefix (prompt, answer text, grid tokens), the
  model's own codes fed back, newlines forced: what it does at inference, without sampling noise;
- copy accuracy: the LQ's code at the same place (what copying the input gives);
- per layer and head, the mean attention that the query predicting HQ code (r, c) puts on the LQ code at
  (r, c): a head that aligns output to input puts far more than uniform (1 / sequence length) there.

A model with teacher-forced accuracy far above its free-running accuracy relies on its previous codes,
which at inference are its own (exposure bias); `data.image_input_noise` in the training recipe is the
remedy tried in PURE-tiny v2's stage 2 (README).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pure.data.shards import find_shards, read_shard
from pure.model import load_model
from pure.sequence import SequenceFormat
from pure.tokenizer import PureTokenizer


def _blocks(ids: torch.Tensor, prompt_length: int, fmt: SequenceFormat) -> tuple[int, int, int, int]:
    """(LQ body start, HQ body start, h, w): bodies start after the block's head (``<boi>``, grid tokens)."""
    boi = (ids == fmt.vocab.boi).nonzero().flatten().tolist()
    lq, hq = boi[0], next(i for i in boi if i >= prompt_length)
    h, w = fmt.parse_image_block(ids[hq:]).shape
    head = len(fmt.grid_tokens(h, w))
    return lq + head, hq + head, h, w


@torch.no_grad()
def diagnose(model_dir: str, shards: str, n: int, free: int) -> dict:
    lm = load_model(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = PureTokenizer.from_checkpoint(model_dir, lm.config)
    fmt = SequenceFormat(tokenizer)
    rows = read_shard(find_shards(shards)[-1]).to_pylist()
    out: dict[str, list] = {"teacher_forced": [], "free_running": [], "copy": [], "attention": []}
    for k in range(min(n, len(rows))):
        row = rows[k]
        ids = torch.tensor(row["input_ids"], dtype=torch.long)
        lq_body, hq_body, h, w = _blocks(ids, row["prompt_length"], fmt)
        grid = (torch.arange(h)[:, None] * (w + 1) + torch.arange(w)).flatten()  # codes, not newlines
        hq, lq = hq_body + grid, lq_body + grid
        attentions: list[torch.Tensor] = []
        record = attentions.append
        hooks = [
            layer.self_attn.register_forward_hook(lambda m, i, o, record=record: record(o[1][0]))
            for layer in lm.model.layers
        ]
        logits = lm(ids[None]).logits[0]
        for hook in hooks:
            hook.remove()
        target = ids[hq]
        out["teacher_forced"].append((logits[hq - 1].argmax(-1) == target).float().mean().item())
        out["copy"].append((ids[lq] == target).float().mean().item())
        out["attention"].append(
            torch.stack([a[:, hq - 1, lq].mean(-1) for a in attentions])
        )  # (layers, heads)
        if k < free:
            step = lm(ids[None, :hq_body], use_cache=True)
            past, generated = step.past_key_values, []
            for _ in range(h):
                for c in range(w + 1):
                    token = fmt.vocab.newline if c == w else int(step.logits[0, -1].argmax())
                    generated.append(token)
                    step = lm(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                    past = step.past_key_values
            codes = torch.tensor(generated).view(h, w + 1)[:, :w].flatten()
            out["free_running"].append((codes == target).float().mean().item())
    out["attention"] = torch.stack(out["attention"]).mean(0)
    out["uniform"] = 1 / len(ids)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported checkpoint folder")
    p.add_argument("--shards", required=True, help="shard set (its last shard is read)")
    p.add_argument("-n", type=int, default=24, help="sequences for the teacher-forced figures (default 24)")
    p.add_argument(
        "--free",
        type=int,
        default=24,
        help="of which decoded free-running (default 24; 4 are too few to tell)",
    )
    args = p.parse_args(argv)
    d = diagnose(args.model, args.shards, args.n, args.free)
    mean = statistics.mean
    print(f"teacher-forced accuracy {mean(d['teacher_forced']):.3f} ({len(d['teacher_forced'])} sequences)")
    print(
        f"free-running accuracy   {mean(d['free_running']):.3f} ({len(d['free_running'])} sequences, greedy)"
    )
    print(f"copy accuracy           {mean(d['copy']):.3f}")
    print("attention of the query predicting HQ (r, c) on LQ (r, c), by layer and head")
    print(f"(uniform: {d['uniform']:.4f})")
    for layer, heads in enumerate(d["attention"].tolist()):
        print(f"  layer {layer}: " + " ".join(f"{x:.3f}" for x in heads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

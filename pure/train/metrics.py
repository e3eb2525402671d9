"""Step statistics reduced over ranks, the MFU estimate, and the logger (TensorBoard, JSONL, tqdm).

Logged per step: ``loss/total`` (the optimised value: the mean of the micro-batch losses), ``loss/text``
and ``loss/image`` (per-token means of the cross-entropy over the answer text and over the image block),
``loss/z`` when a z-loss is used, ``train/lr``, ``train/grad_norm`` (before clipping), ``perf/tokens_per_s``
(real, unpadded tokens of all ranks) and ``perf/mfu``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from pure.train.loss import LossOutput

# Dense bf16 peak TFLOP/s per device, for the MFU estimate (spec sheets, no sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
    "GH200": 989.0,
    "A6000": 155.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_flops(configured_tflops: float, device: torch.device) -> float:
    """Peak FLOP/s of one device: the recipe's value, else a known GPU's, else 0 (no MFU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key] * 1e12
    return 0.0


def flops_per_token(config, lora: bool):
    """``f(seq_len)``: training FLOPs per token (PaLM's estimate, ``6 N + 12 L H T``).

    ``N`` counts the decoder and LM head, not the embedding table. With LoRA there are no weight
    gradients for the frozen base: ``4 N + 8 L H T``. Activation recomputation is not counted (MFU, not
    hardware utilisation).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = layers * (4 * h * h + 3 * h * i) + config.vocab_size * h
    weights, attention = (4, 8) if lora else (6, 12)
    return lambda seq_len: weights * n + attention * layers * h * seq_len


class StepStats:
    """Sums over the micro-batches of one optimiser step on this rank."""

    def __init__(self, device: torch.device):
        # loss sum, text CE sum, image CE sum, text tokens, image tokens, z sum, tokens, sequences, micro
        self.sums = torch.zeros(9, dtype=torch.float64, device=device)
        self.ids: list[str] = []

    def add(self, out: LossOutput, batch: dict) -> None:
        values = [out.loss.detach(), out.text_ce_sum, out.image_ce_sum, out.n_text, out.n_image, out.z_loss]
        self.sums[:6] += torch.stack([v.to(self.sums) for v in values])
        self.sums[6] += batch["n_tokens"]
        self.sums[7] += len(batch["ids"])
        self.sums[8] += 1
        self.ids += batch["ids"]

    def reduce(self) -> dict:
        """Metrics of the whole step, over all ranks (a collective: every rank calls it)."""
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        loss, text, image, n_text, n_image, z, tokens, sequences, micro = sums.tolist()
        return {
            "loss": loss / micro,
            "loss_text": text / max(n_text, 1),
            "loss_image": image / max(n_image, 1),
            "z_loss": z / micro,
            "tokens": tokens,
            "seq_len": tokens / max(sequences, 1),
        }


class MetricsLogger:
    """Rank 0 writes TensorBoard events, ``metrics.jsonl`` and a progress bar; other ranks are silent."""

    NAMES: ClassVar[dict[str, str]] = {
        "loss": "loss/total",
        "loss_text": "loss/text",
        "loss_image": "loss/image",
        "z_loss": "loss/z",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "tokens_per_s": "perf/tokens_per_s",
        "mfu": "perf/mfu",
    }

    def __init__(self, run_dir: Path, cfg, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.last: dict = {}
        self.tensorboard = self.wandb = self.bar = self.jsonl = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_steps_after(
            run_dir / "metrics.jsonl", start_step
        )  # logged by a run killed after its checkpoint
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), resume="allow"
            )
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True
        )

    def note(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def step(self, step: int, metrics: dict, ids: list[str] | None = None) -> None:
        if not self.is_main:
            return
        self.last = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        if self.tensorboard is not None:
            for key, name in self.NAMES.items():
                if metrics.get(key) is not None and (key != "z_loss" or metrics[key]):
                    self.tensorboard.add_scalar(name, metrics[key], step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({self.NAMES[k]: v for k, v in self.last.items() if k in self.NAMES}, step=step)
        record = dict(self.last)
        if ids is not None:
            record["ids"] = ids
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.advance(step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)

    def close(self) -> None:
        for thing in (self.bar, self.tensorboard, self.jsonl):
            if thing is not None:
                thing.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_steps_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept), encoding="utf-8")

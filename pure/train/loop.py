"""The training run, top to bottom: set-up, model, data, the engine (DeepSpeed, or plain in one process
without it), the step loop, export.

Read :func:`train` first; everything it calls is small and lives in the sibling modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch

from pure.data.shards import check_made_with
from pure.model import default_attn_implementation, load_model, resolve_checkpoint
from pure.sequence import SequenceFormat
from pure.tokenizer import PureTokenizer
from pure.train.config import ConfigError, Recipe, load_recipe, recipe_to_dict
from pure.train.data import (
    OWN_SAMPLES_STREAM,
    UNCONDITIONAL_STREAM,
    TrainingData,
    input_noise_generator,
    replace_image_inputs,
    unconditional_rows,
)
from pure.train.engine import (
    PlainEngine,
    barrier,
    build_optimizer,
    check_build_locks,
    choose_engine,
    deepspeed_config,
    init_distributed,
    init_single_process,
    latest_checkpoint,
    learning_rate,
    load_checkpoint,
    require_packages,
    run_info,
    run_requirements,
    save_checkpoint,
    write_run_files,
)
from pure.train.loss import SupervisedLMLoss
from pure.train.metrics import MetricsLogger, StepStats, flops_per_token, peak_flops
from pure.train.modeling import add_residual_dropout, apply_lora, enable_gradient_checkpointing

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_training_model(recipe: Recipe, device_type: str) -> tuple[SupervisedLMLoss, SequenceFormat]:
    """The base checkpoint with dropout, checkpointing and LoRA as the recipe says, wrapped in the loss."""
    m = recipe.model
    folder = resolve_checkpoint(m.init_from)
    dtype = DTYPES[recipe.train.precision]
    attn = default_attn_implementation(device_type, dtype) if m.attn_implementation == "auto" else None
    lm = load_model(folder, device="cpu", dtype=dtype, attn_implementation=attn or m.attn_implementation)
    lm.train().requires_grad_(True)
    tokenizer = PureTokenizer.from_checkpoint(folder, lm.config)
    add_residual_dropout(lm, m.residual_dropout)
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if recipe.lora.enabled:
        lo = recipe.lora
        lm = apply_lora(lm, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.modules_to_save)
    module = SupervisedLMLoss(lm, z_loss_weight=m.z_loss_weight, chunk_size=m.loss_chunk_size)
    return module, SequenceFormat(tokenizer)


def train(recipe: Recipe, resume: str | None = None, command: list[str] | None = None) -> Path:
    """Run (or continue) the training that ``recipe`` describes; returns the run folder.

    ``resume``: ``"latest"`` continues from the run folder's newest checkpoint, a path from that
    checkpoint folder; ``None`` starts fresh (and refuses a run folder that already has checkpoints).
    """
    # -- where, who, what -------------------------------------------------------------------------------
    engine_kind = choose_engine(recipe)
    require_packages(run_requirements(recipe, engine_kind))  # before minutes of model loading
    if engine_kind == "deepspeed":
        check_build_locks()  # a killed build's lock would hang deepspeed.initialize silently
    dist = init_distributed() if engine_kind == "deepspeed" else init_single_process()
    run_dir = recipe.run_dir
    start_from = _resume_folder(run_dir, resume)
    if Path(recipe.model.init_from).is_dir():  # record where the weights really came from
        recipe.model.init_from = str(Path(recipe.model.init_from).resolve())
    torch.manual_seed(recipe.seed + dist.rank)  # dropout masks differ per rank; data order does not
    info = run_info(dist, command, engine_kind)

    # -- model and data ---------------------------------------------------------------------------------
    check_made_with(recipe.data.shard_sets(), resolve_checkpoint(recipe.model.init_from))
    module, fmt = load_training_model(recipe, dist.device.type)
    config = module.lm.config
    t = recipe.train
    data = TrainingData.build(
        recipe.data, fmt, t.global_batch_size, t.micro_batch_size, dist.world, dist.rank, recipe.seed
    )
    total_steps = t.max_steps or math.ceil(t.epochs * data.steps_per_epoch)
    warmup = t.warmup_steps if t.warmup_steps >= 0 else round(t.warmup_epochs * data.steps_per_epoch)

    # -- engine -----------------------------------------------------------------------------------------
    ds_config = deepspeed_config(t.deepspeed, recipe, dist.world, config.hidden_size)  # checks the batch too
    if engine_kind == "deepspeed":
        import deepspeed

        optimizer = build_optimizer(module, recipe, ds_config)
        engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    else:
        optimizer = build_optimizer(module, recipe, {})  # torch AdamW: no offload without DeepSpeed
        engine = PlainEngine(module, optimizer, data.accumulation, t.grad_clip, dist.device)
    step, changed, train_seconds = 0, [], 0.0
    if start_from is not None:
        loaded = load_checkpoint(engine, start_from, recipe, dist)
        step, train_seconds = loaded["step"], loaded.get("train_seconds", 0.0)
        changed = _changed_keys(load_recipe(start_from / "config.yaml"), recipe)
    if dist.is_main:
        write_run_files(run_dir, recipe, info)
        if engine_kind == "deepspeed":
            (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    barrier()

    log = MetricsLogger(run_dir, recipe.logging, dist.is_main, total_steps, step)
    log.note(
        f"{data.examples_per_epoch} examples per epoch ({data.skipped} longer than {recipe.data.max_length} "
        f"skipped), {data.steps_per_epoch} steps per epoch, {total_steps} steps, warmup {warmup}, "
        f"accumulation {data.accumulation}, {dist.world} process(es), starting at step {step}"
    )
    if engine_kind == "plain":
        log.note(
            f"plain engine ({'DeepSpeed is not installed' if t.engine == 'auto' else 'train.engine plain'}): "
            f"one process on {dist.device}, torch AdamW, no ZeRO or offload ({t.deepspeed} not used)"
        )
    if changed:
        log.note(f"resuming with a changed recipe ({', '.join(changed)}): not an exact continuation")
    tokens_flops = flops_per_token(config, recipe.lora.enabled)
    peak = peak_flops(recipe.logging.peak_tflops, dist.device)
    stop = _StopFlag()
    is_code = fmt.vocab.image_mask()
    code_ids = is_code.nonzero().squeeze(1)

    # -- the loop ---------------------------------------------------------------------------------------
    batches = iter(data.loader(step, total_steps))
    while step < total_steps:
        lr = learning_rate(step, total_steps, warmup, t.lr, t.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = StepStats(dist.device)
        started = time.perf_counter()
        for micro in range(data.accumulation):
            batch = next(batches)
            input_ids, labels, image_mask = batch["input_ids"], batch["labels"], batch["image_mask"]
            if recipe.data.unconditional:
                uncond = input_noise_generator(recipe.seed, step, micro, dist.rank, UNCONDITIONAL_STREAM)
                vocab, fraction = fmt.vocab, recipe.data.unconditional
                input_ids, labels, image_mask = unconditional_rows(
                    input_ids, labels, image_mask, vocab.boi, vocab.pad, fraction, uncond
                )
            if recipe.data.image_input_own or recipe.data.image_input_noise:
                codes = image_mask & is_code[input_ids]  # the answer's image codes
            if recipe.data.image_input_own:
                own = input_noise_generator(recipe.seed, step, micro, dist.rank, OWN_SAMPLES_STREAM)
                hit = codes & (torch.rand(input_ids.shape, generator=own) < recipe.data.image_input_own)
                samples = engine.module.own_samples(input_ids.to(dist.device), hit, code_ids, own)
                input_ids = input_ids.clone()
                input_ids[hit] = samples
            if recipe.data.image_input_noise:
                noise = input_noise_generator(recipe.seed, step, micro, dist.rank)
                input_ids = replace_image_inputs(input_ids, codes, recipe.data.image_input_noise, noise)
            out = engine(input_ids.to(dist.device), labels.to(dist.device), image_mask.to(dist.device))
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimiser at the accumulation boundary only
            stats.add(out, batch)
        step += 1
        seconds = time.perf_counter() - started
        train_seconds += seconds
        grad_norm = engine.get_global_grad_norm()
        if step % recipe.logging.every == 0 or step == total_steps:
            metrics = stats.reduce()
            metrics.update(lr=lr, grad_norm=_float(grad_norm), tokens_per_s=metrics["tokens"] / seconds)
            if peak:
                metrics["mfu"] = (
                    metrics["tokens_per_s"] * tokens_flops(metrics["seq_len"]) / (peak * dist.world)
                )
            log.step(step, metrics, ids=stats.ids if recipe.logging.sample_ids else None)
        else:
            log.advance(step)

        halt = step == t.halt_at_step or stop.any_rank(dist.device)
        if step % t.save_every == 0 or step == total_steps or halt:
            state = {
                "step": step,
                "epoch": step / data.steps_per_epoch,
                "total_steps": total_steps,
                "examples_seen": step * t.global_batch_size,
                "world_size": dist.world,
                "engine": engine_kind,
                "metrics": log.last,
                "seed": recipe.seed,
                "train_seconds": train_seconds,  # optimiser steps only, summed over resumed runs
            }
            save_checkpoint(engine, run_dir, step, state, recipe, info, dist)
        if halt:
            log.note(f"halted after step {step}; continue with --resume")
            break
    log.close()
    barrier()

    # -- export (rank 0 alone; the others are done) -------------------------------------------------------
    if step == total_steps and t.export_at_end and dist.is_main:
        from pure.train.export import export_checkpoint

        del engine, optimizer, module  # free the training copy before building the export one
        export_checkpoint(latest_checkpoint(run_dir), run_dir / "export", overwrite=True)
        log.note(f"exported {run_dir / 'export'} (python -m pure.infer --model {run_dir / 'export'})")
    return run_dir


def _resume_folder(run_dir: Path, resume: str | None) -> Path | None:
    existing = latest_checkpoint(run_dir)
    if resume is None:
        if existing is not None:
            raise ConfigError(
                f"{run_dir} already has checkpoints (latest {existing.name}): pass --resume to continue it, "
                "or set output_dir/name to start a new run"
            )
        return None
    if resume == "latest":
        if existing is None:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint to continue from")
        return existing
    folder = Path(resume)
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return folder


def _changed_keys(before: Recipe, after: Recipe) -> list[str]:
    """Dotted keys whose values differ (``train.halt_at_step`` and logging excepted: they change nothing)."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(recipe_to_dict(before)), flat(recipe_to_dict(after))
    ignored = ("name", "output_dir", "logging.", "train.halt_at_step", "train.export_at_end", "train.keep_")
    return [k for k in a if a[k] != b.get(k) and not k.startswith(ignored)]


def _float(value) -> float | None:
    return None if value is None else float(value)


class _StopFlag:
    """SIGTERM / SIGUSR1 (preemption, a scheduler's wall-time warning): save after this step and stop."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def any_rank(self, device: torch.device) -> bool:
        """True when any rank was signalled (all must save together)."""
        flag = torch.tensor([float(self.requested)], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

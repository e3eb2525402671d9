"""The training engine: DeepSpeed (process group, its config filled from the recipe) or, in one process
without it, :class:`PlainEngine`; the optimiser, atomic checkpoints that resume exactly, the packages a
run needs, and the run's identity (git commit, versions).

Checkpoint layout (one folder per saved step; ``latest`` names the newest complete one)::

    RUN/checkpoints/latest                       "step-00001000"
    RUN/checkpoints/step-00001000/
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's (ZeRO partitions, per rank)
        rng_state_rank00000.pt                           every RNG of that rank (dropout masks)
        trainer_state.json                               step, epoch, consumed examples, last metrics
        config.yaml, run_info.json                       the resolved recipe and git commit

:class:`PlainEngine` writes the same ``mp_rank_00_model_states.pt`` and its optimiser in
``plain_optimizer_states.pt``; a run resumes only with the engine that saved it.

A checkpoint is written as ``step-N.tmp`` and renamed when every rank has finished, so a run killed
while saving leaves the previous checkpoint as ``latest``. LoRA checkpoints hold only the trainable
weights; the frozen base comes from ``model.init_from`` again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pure.train.config import ConfigError, Recipe, recipe_to_yaml

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's name, without ZeRO-3; PlainEngine's too
PLAIN_OPTIMIZER_STATES = "plain_optimizer_states.pt"
_AUTO = "auto"


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class MissingPackageError(ImportError):
    """A package the run needs is not installed; the message names it and how to get it."""


def require_packages(needs: dict[str, str]) -> None:
    """Raise :class:`MissingPackageError` unless every package (``{name: what it is for}``) imports."""
    missing = {name: why for name, why in needs.items() if importlib.util.find_spec(name) is None}
    if missing:
        what = "; ".join(f"{name} ({why})" for name, why in missing.items())
        raise MissingPackageError(
            f"not installed: {what}. Install: pip install -c constraints.txt {' '.join(missing)} "
            "(or all that training uses: pip install -e '.[train]' -c constraints.txt)"
        )


def run_requirements(recipe: Recipe, engine: str) -> dict[str, str]:
    """The optional packages a training run of ``recipe`` imports, checked before the model loads."""
    needs = {"pyarrow": "reads the training shards"}
    if engine == "deepspeed":
        needs["deepspeed"] = (
            "train.engine deepspeed; --set train.engine=plain trains in one process without it"
        )
    if recipe.lora.enabled:
        needs["peft"] = "lora.enabled"
    if recipe.logging.tensorboard:
        needs["tensorboard"] = "logging.tensorboard; --set logging.tensorboard=false to do without"
    if recipe.logging.wandb:
        needs["wandb"] = "logging.wandb"
    return needs


def stale_build_locks(max_age_s: float = 600.0) -> list[Path]:
    """Lock files of torch C++ extension builds (DeepSpeed compiles its CPU ops this way) older than
    ``max_age_s``: left by a build that was killed, they make every later build wait forever, silently
    (torch's ``FileBaton``). Looks where torch builds: ``$TORCH_EXTENSIONS_DIR/NAME`` or the default
    root's ``PYTHON_ACCELERATOR/NAME``."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    locks = Path(root).glob("*/lock") if root else Path(get_default_build_root()).glob("*/*/lock")
    now = time.time()
    return sorted(lock for lock in locks if now - lock.stat().st_mtime > max_age_s)


class StaleBuildLockError(RuntimeError):
    """A killed extension build's lock would make DeepSpeed's set-up wait forever."""


def check_build_locks(max_age_s: float = 600.0) -> None:
    """Refuse to start when a stale extension-build lock would hang DeepSpeed's set-up without a word."""
    stale = stale_build_locks(max_age_s)
    if stale:
        names = " ".join(str(lock) for lock in stale)
        raise StaleBuildLockError(
            f"stale C++ extension build lock(s), more than {max_age_s / 60:g} minutes old: {names}. A build "
            f"was killed mid-way, and DeepSpeed would wait on it forever. If no other training run is "
            f"compiling now, delete them (rm {names}) and start again."
        )


def choose_engine(recipe: Recipe) -> str:
    """``"deepspeed"`` or ``"plain"``, as ``train.engine`` says (``auto``: DeepSpeed when installed)."""
    wanted = recipe.train.engine
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if wanted == "deepspeed" or (wanted == "auto" and importlib.util.find_spec("deepspeed") is not None):
        return "deepspeed"
    if world > 1:
        if wanted == "plain":
            raise ConfigError(f"train.engine plain runs one process; this launch has {world}: use deepspeed")
        require_packages({"deepspeed": f"training in {world} processes"})
    if recipe.train.precision == "bf16" and (not recipe.lora.enabled or recipe.lora.modules_to_save):
        why = "DeepSpeed is not installed" if wanted == "auto" else "train.engine is plain"
        raise ConfigError(
            f"{why}, and the plain engine updates the trained weights in place, so they must be fp32; with "
            "train.precision bf16 that holds for LoRA adapters only (not full fine-tuning, not "
            "lora.modules_to_save): use LoRA, or train.precision fp32, or install deepspeed"
        )
    return "plain"


def single_process_env() -> None:
    """Make ``python -m pure.train`` work without a launcher: one process, a free local port."""
    if any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def init_distributed() -> DistInfo:
    """DeepSpeed's process group (NCCL on GPUs, gloo on CPU) and this process's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(), local_rank)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def init_single_process() -> DistInfo:
    """One process without DeepSpeed: no process group; the first GPU when there is one."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return DistInfo(rank=0, world=1, local_rank=local_rank, device=torch.device("cuda", local_rank))
    return DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- DeepSpeed config -----------------------------------------------------------------------------------


def deepspeed_config(path: str | Path, recipe: Recipe, world: int, hidden_size: int) -> dict:
    """The DeepSpeed JSON with every recipe-owned field filled in.

    Batch sizes, gradient clipping and precision come from the recipe: the JSON must leave them
    ``"auto"`` or absent, so that the two can never disagree. ZeRO bucket sizes left ``"auto"`` are set
    from the hidden size (as transformers' integration does).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: {path} does not exist (see recipes/deepspeed/)")
    config = json.loads(path.read_text())
    t = recipe.train
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size x devices "
            f"= {t.micro_batch_size} x {world}; change either"
        )
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in owned.items():
        if config.get(key, _AUTO) != _AUTO:
            raise ConfigError(
                f'{path}: {key} is {config[key]!r}; set it to "auto" or remove it: the trainer fills it '
                "from the recipe (train.global_batch_size, micro_batch_size, grad_clip)"
            )
        config[key] = value
    if config.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{path}: fp16 is not supported; use train.precision bf16 or fp32")
    bf16 = config.setdefault("bf16", {})
    if bf16.get("enabled", _AUTO) != _AUTO:
        raise ConfigError(f'{path}: bf16.enabled must be "auto" or absent; set train.precision instead')
    bf16["enabled"] = t.precision == "bf16"
    zero = config.get("zero_optimization", {})
    for key, value in {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }.items():
        if zero.get(key) == _AUTO:
            zero[key] = value
    config.setdefault("steps_per_print", 2**31 - 1)  # we log ourselves
    config.setdefault("wall_clock_breakdown", False)
    left = [k for k, v in _flatten(config).items() if v == _AUTO]
    if left:
        raise ConfigError(f"{path}: the trainer does not know how to fill {left}; give values")
    return config


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_optimizer(model: torch.nn.Module, recipe: Recipe, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (DeepSpeed's CPU Adam when the optimiser is offloaded).

    PURE decays every parameter by ``weight_decay`` (``decay_all_parameters``); otherwise vectors
    (norms, biases) are not decayed.
    """
    t = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if t.decay_all_parameters:
        groups = [{"params": params, "weight_decay": t.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    kwargs = {"lr": t.lr, "betas": tuple(t.betas), "eps": t.eps}
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


class PlainEngine:
    """What the loop uses of DeepSpeed's engine, for one process without DeepSpeed (no ZeRO, no offload).

    As DeepSpeed does: each micro-batch's loss is divided by the accumulation steps; ``step()``, called
    after every micro-batch, updates the weights at the accumulation boundary only, after clipping the
    gradient norm to ``grad_clip`` (``get_global_grad_norm()``: the norm before clipping). The optimiser
    updates the parameters in place with no fp32 master copy, so every trainable parameter must be fp32
    (fp32 recipes; LoRA, whose adapters peft keeps in fp32 over a bf16 base).
    """

    kind = "plain"

    def __init__(self, module, optimizer, accumulation: int, grad_clip: float, device: torch.device):
        low = [n for n, p in module.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:
            raise ConfigError(
                f"train.engine plain trains parameters in place, so they must be fp32; {len(low)} are not "
                f"(e.g. {low[0]}): use train.precision fp32 or LoRA, or deepspeed (fp32 master weights)"
            )
        self.module = module.to(device)
        self.optimizer = optimizer
        self.accumulation = accumulation
        self.grad_clip = grad_clip
        self.device = device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.micro_steps = 0
        self.grad_norm: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self.grad_norm

    def save_checkpoint(
        self, save_dir: str, tag: str, save_latest: bool = False, exclude_frozen_parameters: bool = False
    ) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = self.module.state_dict()
        if exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        torch.save({"module": state}, folder / MODEL_STATES)
        torch.save(self.optimizer.state_dict(), folder / PLAIN_OPTIMIZER_STATES)

    def load_checkpoint(
        self,
        load_dir: str,
        tag: str,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = False,
    ) -> tuple[str, dict]:
        folder = Path(load_dir) / tag
        states = torch.load(folder / MODEL_STATES, map_location=self.device, weights_only=True)
        self.module.load_state_dict(states["module"], strict=load_module_strict)
        if load_optimizer_states:
            optimizer = torch.load(
                folder / PLAIN_OPTIMIZER_STATES, map_location=self.device, weights_only=True
            )
            self.optimizer.load_state_dict(optimizer)
        return str(folder), {}


# -- schedule -------------------------------------------------------------------------------------------


def learning_rate(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """PURE's schedule at ``step`` (0-based): linear warmup, then half a cosine down to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * min(progress, 1.0)))


# -- run identity ---------------------------------------------------------------------------------------


def git_state() -> dict:
    """Commit and dirtiness of the source tree this package was imported from ("unknown" outside git)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": bool(status) if status is not None else None}


def run_info(dist: DistInfo, command: list[str] | None = None, engine: str = "deepspeed") -> dict:
    import transformers

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if engine == "deepspeed":
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return {
        **git_state(),
        "command": command if command is not None else sys.argv,
        "engine": engine,
        "world_size": dist.world,
        "device": str(dist.device.type),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "versions": versions,
    }


def write_run_files(folder: Path, recipe: Recipe, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "config.yaml", recipe_to_yaml(recipe))
    _atomic_write(folder / "run_info.json", json.dumps(info, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_tag(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine, run_dir: Path, step: int, state: dict, recipe: Recipe, info: dict, dist: DistInfo
) -> Path:
    """Save engine + RNG + trainer state for ``step`` atomically; prune old ones. All ranks call this."""
    root = run_dir / CHECKPOINTS
    tag = checkpoint_tag(step)
    staging, final = root / f"{tag}.tmp", root / tag
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a step saved again after resuming from an earlier one
    barrier()
    engine.save_checkpoint(
        str(root), tag=staging.name, save_latest=False, exclude_frozen_parameters=recipe.lora.enabled
    )
    torch.save(rng_state(), staging / f"rng_state_rank{dist.rank:05d}.pt")
    if dist.is_main:
        write_run_files(staging, recipe, info)
        _atomic_write(staging / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
    barrier()
    if dist.local_rank == 0 and staging.exists():  # one rename per node (shared or local file systems)
        with contextlib.suppress(FileNotFoundError):  # another node renamed the shared folder first
            staging.rename(final)
    barrier()
    if dist.is_main:
        _atomic_write(root / LATEST, tag + "\n")
        keep = recipe.train.keep_checkpoints
        if keep > 0:
            done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, folder: Path, recipe: Recipe, dist: DistInfo) -> dict:
    """Restore engine, optimiser, RNG and trainer state from a checkpoint folder; returns the state."""
    state = json.loads((folder / TRAINER_STATE).read_text())
    saved_by, kind = state.get("engine", "deepspeed"), getattr(engine, "kind", "deepspeed")
    if saved_by != kind:
        raise ConfigError(
            f"{folder} was saved by the {saved_by} engine and this run uses {kind}: resume with "
            f"--set train.engine={saved_by} (the optimiser states differ), or start a new run from its export"
        )
    if state["world_size"] != dist.world:
        raise ConfigError(
            f"{folder} was saved by {state['world_size']} processes and this run has {dist.world}: "
            "resume with the same number (ZeRO partitions and per-rank RNG states are per process)"
        )
    loaded, _ = engine.load_checkpoint(
        str(folder.parent),
        tag=folder.name,
        load_module_strict=not recipe.lora.enabled,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    set_rng_state(torch.load(folder / f"rng_state_rank{dist.rank:05d}.pt", weights_only=False))
    return state

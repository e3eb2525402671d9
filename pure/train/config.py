"""Training configuration: typed dataclasses, loaded from a YAML recipe plus ``--set a.b=v`` overrides.

Every value is type-checked against its field; an unknown key fails with the list of valid keys, so a
typo never silently falls back to a default. The resolved recipe is written to every run folder and
checkpoint as ``config.yaml`` and loads back with :func:`load_recipe`.

Schema (defaults are the paper's full fine-tuning run, ``recipes/train/pure_7b_zero3.yaml``)::

    name, output_dir, seed
    model:   init_from, attn_implementation, gradient_checkpointing, residual_dropout,
             z_loss_weight, loss_chunk_size
    lora:    enabled, r, alpha, dropout, target_modules, modules_to_save
    data:    config | sets[{path, ratio, name}], max_length, group_by_length, length_window, num_workers
    train:   deepspeed, engine, precision, global_batch_size, micro_batch_size, epochs, max_steps, lr,
             min_lr, warmup_epochs, warmup_steps, betas, eps, weight_decay, decay_all_parameters, grad_clip,
             save_every, keep_checkpoints, halt_at_step, export_at_end
    logging: every, tensorboard, wandb, wandb_project, peak_tflops, sample_ids, progress
    export:  dtype, base_model_id, license, tags
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pure.data.shards import ShardSet, load_data_config

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
T = TypeVar("T")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message says which key and why."""


@dataclass
class ModelConfig:
    init_from: str = "nonwhy/PURE"
    """Checkpoint folder or Hub id to start from (config.json, safetensors, tokenizer.json, vq/)."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """``auto``: flash-attention 2 on CUDA in bf16 when installed, else sdpa."""
    gradient_checkpointing: bool = True
    residual_dropout: float = 0.05
    """Dropout on the attention and MLP outputs before each residual add (PURE: 0.05)."""
    z_loss_weight: float = 0.0
    """Weight of ``logsumexp(logits)**2`` at the supervised positions (PURE: 0, Lumina: 1e-5)."""
    loss_chunk_size: int = 0
    """Supervised positions per LM-head chunk (logits recomputed in backward); 0 = all at once."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters (e.g. ``lm_head``)."""


@dataclass
class DataConfig:
    config: str = ""
    """A data-config YAML listing shard sets (see :mod:`pure.data.shards`); or list them in ``sets``."""
    sets: list[ShardSet] = field(default_factory=list)
    max_length: int = 11776
    """Examples longer than this are skipped (and counted in the log); PURE's ``max_seq_len``."""
    group_by_length: bool = True
    length_window: int = 500
    """Length grouping: sort by length, shuffle inside windows of this many global batches."""
    num_workers: int = 2
    image_input_noise: float = 0.0
    """Fraction of the answer's image-code inputs replaced by codes drawn from the batch, labels kept
    (:func:`pure.train.data.replace_image_inputs`); against exposure bias in small models. PURE: 0."""
    image_input_own: float = 0.0
    """Fraction of the answer's image-code inputs replaced by the model's own samples of them, drawn from a
    teacher-forced pass without gradients (parallel scheduled sampling), labels kept
    (:meth:`pure.train.loss.SupervisedLMLoss.own_samples`): its mistakes as it makes them at inference.
    Applied before ``image_input_noise``; costs one more forward per micro-batch. PURE: 0."""
    unconditional: float = 0.0
    """Fraction of the examples replaced by their answer's image block alone, from position 0: the context
    of guidance's unconditional branch, which a model trained from scratch never sees otherwise
    (:func:`pure.train.data.unconditional_rows`). Applied first. PURE: 0 (its 7B model learnt it in
    pretraining)."""

    def shard_sets(self) -> list[ShardSet]:
        """The shard sets: those of the data-config YAML ``config``, or else ``sets``."""
        return load_data_config(self.config) if self.config else self.sets


@dataclass
class TrainConfig:
    deepspeed: str = "recipes/deepspeed/zero3.json"
    """DeepSpeed JSON; its batch sizes, clipping and precision are filled from this recipe."""
    engine: Literal["auto", "deepspeed", "plain"] = "auto"
    """``deepspeed``; ``plain``: one process, torch AdamW, no ZeRO (the JSON's ZeRO and offload settings are
    ignored; bf16 only for LoRA, whose adapters train in fp32); ``auto``: DeepSpeed when it is installed."""
    precision: Literal["bf16", "fp32"] = "bf16"
    global_batch_size: int = 128
    micro_batch_size: int = 4
    """Sequences per device per forward; accumulation = global / (micro * devices)."""
    epochs: float = 2.0
    max_steps: int = 0
    """> 0: train this many optimizer steps (the schedule ends there) instead of ``epochs``."""
    lr: float = 4e-4
    min_lr: float = 0.0
    warmup_epochs: float = 0.5
    warmup_steps: int = -1
    """>= 0 overrides ``warmup_epochs``."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_all_parameters: bool = True
    """PURE decays every parameter (norms, biases, embeddings too); false: only matrices."""
    grad_clip: float = 4.0
    save_every: int = 1000
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints; 0 keeps all."""
    halt_at_step: int = 0
    """> 0: save and stop after this step as if killed (time-limited jobs; resume with --resume)."""
    export_at_end: bool = True
    """Export an inference folder (merged LoRA, model card) from the last checkpoint."""


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "pure"
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for the MFU estimate; 0 = known GPUs only (no MFU on CPU)."""
    sample_ids: bool = False
    """Write the ids of rank 0's examples of every step to metrics.jsonl (data-order audits)."""
    progress: bool = True


@dataclass
class ExportConfig:
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    base_model_id: str = ""
    """Hub id for the model card's ``base_model`` (default: ``model.init_from`` when it is a Hub id)."""
    license: str = ""
    tags: list[str] = field(default_factory=lambda: ["image-restoration", "super-resolution", "pure"])


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/{name}"
    """Run folder; ``{name}`` is replaced by ``name``."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def validate(self) -> Recipe:
        """Checks across fields; raises :class:`ConfigError` saying what to change."""
        t, d = self.train, self.data
        checks = [
            (t.global_batch_size > 0 and t.micro_batch_size > 0, "train batch sizes must be > 0"),
            (
                t.global_batch_size % t.micro_batch_size == 0,
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size})",
            ),
            (t.epochs > 0 or t.max_steps > 0, "set train.epochs > 0 or train.max_steps > 0"),
            (t.lr > 0 and 0 <= t.min_lr <= t.lr, "need train.lr > 0 and 0 <= train.min_lr <= train.lr"),
            (
                len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
                "train.betas must be two values in [0, 1)",
            ),
            (t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip and train.weight_decay must be >= 0"),
            (t.save_every > 0, "train.save_every must be > 0"),
            (0 <= self.model.residual_dropout < 1, "model.residual_dropout must be in [0, 1)"),
            (self.model.z_loss_weight >= 0 and self.model.loss_chunk_size >= 0, "model: negative value"),
            (bool(d.config) != bool(d.sets), "give the training data as data.config (a YAML) or data.sets"),
            (d.max_length > 0 and d.length_window > 0, "data.max_length and data.length_window must be > 0"),
            (0 <= d.image_input_noise < 1, "data.image_input_noise must be in [0, 1)"),
            (0 <= d.image_input_own < 1, "data.image_input_own must be in [0, 1)"),
            (0 <= d.unconditional < 1, "data.unconditional must be in [0, 1)"),
            (
                not self.lora.enabled or (self.lora.r > 0 and self.lora.target_modules),
                "lora: r > 0 and targets",
            ),
            (self.logging.every > 0, "logging.every must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


# -- loading ------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from YAML) as type ``tp``, or :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping with keys {_field_names(tp)}; got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} must be one of {list(typing.get_args(tp))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list; got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer; got {value!r}")
        return value
    if tp is float:
        # PyYAML reads "4e-4" (no dot) as a string: accept numeric strings for floats only.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string; got {value!r} (quote it in YAML)")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # a schema bug, not user error


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, section: str, valid: list[str]) -> str:
    return f"unknown key {key}; valid keys{' in ' + section if section else ''}: {', '.join(valid)}"


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a mapping, type-checking every value; unknown keys are errors."""
    valid = _field_names(cls)
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(_unknown_key(f"{where}.{unknown[0]}" if where else unknown[0], where, valid))
    hints = _hints(cls)
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def apply_override(recipe: Recipe, override: str) -> None:
    """Apply one ``a.b=value`` (value in YAML syntax: ``1e-5``, ``true``, ``[q_proj, v_proj]``)."""
    if "=" not in override:
        raise ConfigError(f"--set takes key=value (e.g. train.lr=1e-5); got {override!r}")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    target, where = recipe, ""
    for i, name in enumerate(parts):
        valid = _field_names(type(target))
        if name not in valid:
            raise ConfigError(_unknown_key(key.strip(), where, valid))
        where = ".".join(parts[: i + 1])
        if i < len(parts) - 1:
            target = getattr(target, name)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(
                    f"{where} is a {_type_name(type(target))}, not a section; use --set {where}=..."
                )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {err}") from None
    setattr(target, parts[-1], _convert(value, _hints(type(target))[parts[-1]], where))


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The ``--set KEY=VALUE ...`` option of every recipe-driven CLI (collected in ``args.overrides``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"override recipe values, e.g. --set {example} (type-checked)",
    )


def load_yaml_dataclass(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Any typed recipe (``Recipe``, ``pure.train_vq.VQRecipe``): its YAML (defaults when ``path`` is None)
    read into ``cls`` with ``--set a.b=v`` overrides, every value type-checked; not yet validated."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections; got {type(data).__name__}")
    recipe = from_dict(cls, data)
    for override in overrides:
        apply_override(recipe, override)
    return recipe


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """A recipe YAML (or the defaults when ``path`` is None) with ``--set`` overrides, validated."""
    return load_yaml_dataclass(Recipe, path, overrides or []).validate()


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None, width=100)

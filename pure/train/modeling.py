"""Training-time model details: residual dropout, activation checkpointing, LoRA and its merge.

transformers' Chameleon has no residual dropout; PURE/Lumina's decoder applies ``dropout`` (0.05) to the
attention output and to the MLP output before each residual add (spec 2.1). Forward hooks add exactly
that to the unmodified upstream modules; they are a no-op in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer, ChameleonSwinDecoderLayer

from pure.model import PureForConditionalGeneration


def _dropout_output(p: float):
    def hook(module: nn.Module, args, output):
        if isinstance(output, tuple):  # attention returns (attn_output, attn_weights)
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    return hook


def add_residual_dropout(model: nn.Module, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout with probability ``p`` on what each decoder layer adds to its residual stream.

    Pre-norm layers (7B): on the ``self_attn`` and ``mlp`` outputs. Swin-norm layers (34B) normalise
    after the sublayer, so the dropout goes after those norms. Returns the hook handles (``.remove()``).
    """
    handles = []
    if p <= 0:
        return handles
    for layer in model.modules():
        if isinstance(layer, ChameleonSwinDecoderLayer):
            targets = (layer.input_layernorm, layer.post_attention_layernorm)
        elif isinstance(layer, ChameleonDecoderLayer):
            targets = (layer.self_attn, layer.mlp)
        else:
            continue
        handles += [m.register_forward_hook(_dropout_output(p)) for m in targets]
    if not handles:
        raise ValueError("no Chameleon decoder layers found to add residual dropout to")
    return handles


def enable_gradient_checkpointing(model: PureForConditionalGeneration) -> None:
    """Non-reentrant activation checkpointing on every decoder layer (PURE's ``--checkpointing``)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers 5.17 (the oldest supported) has only the older name
        model.gradient_checkpointing_enable({"use_reentrant": False})
    else:  # newer ones warn that the older name is deprecated
        enable({"use_reentrant": False})


def apply_lora(
    model: PureForConditionalGeneration,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    modules_to_save: Sequence[str] = (),
):
    """Wrap ``model`` with peft LoRA adapters; only the adapters (and ``modules_to_save``) train.

    Raises if a target name matches no module (peft would otherwise say little about which one).
    """
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} are not in the model; Chameleon's projections are "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )
    model.requires_grad_(False)
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> PureForConditionalGeneration:
    """The plain model with every adapter merged into its base weights (a no-op without adapters)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if not isinstance(model, PureForConditionalGeneration):
        raise TypeError(f"expected a PureForConditionalGeneration after merging; got {type(model).__name__}")
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

"""The attention the decode loop runs, whatever attention the model was loaded with.

A decode step attends a static KV cache through a boolean mask ``(R, 1, q, slots)`` that the loop builds:
which cache slots each query may see (the prompt, the text, the image so far; a guidance twin sees its own
image block only). flash-attention 2, which training may use, cannot take that mask: transformers' glue
reads a 2-D mask as left padding and keeps the wrong queries. So :func:`decoding_attention` routes the
model's attention layers to :func:`decode_attention` for the duration of a decode:

* run eagerly, it is PyTorch's sdpa (transformers' own integration) on the cache's first ``slots`` slots,
  the mask's width: the loop passes masks as wide as the slots in use, so a step reads the live cache only;
* inside ``torch.compile`` (CUDA graphs need one shape: the mask spans the whole capacity), it is flex
  attention with a block mask of the cache blocks that hold a visible slot (:func:`live_block_mask`): the
  kernel skips the others, so a step still reads the live cache only, with no host synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

DECODE_ATTENTION = "pure_decode"
KV_BLOCK = 128  # flex attention's block of cache slots; compiled capacities are multiples of it


def live_block_mask(allowed: torch.Tensor) -> BlockMask:
    """A flex-attention block mask of a boolean mask ``(R, 1, q, slots)`` (``slots`` a multiple of
    :data:`KV_BLOCK`): per row, the blocks holding a slot that some query sees come first (their count is
    ``kv_num_blocks``), and within them the mask applies slot by slot. Device ops only."""
    rows, _, q, slots = allowed.shape
    visible = allowed.view(rows, q, slots // KV_BLOCK, KV_BLOCK).any(-1).any(1)  # (R, blocks)
    count = visible.sum(-1, dtype=torch.int32)  # (R,)
    order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # visible first

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, 0, q_idx, kv_idx]

    return BlockMask.from_kv_blocks(
        count[:, None, None],
        order[:, None, None, :],
        BLOCK_SIZE=KV_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(q, slots),
    )


def layer_kwargs(attention_mask: torch.Tensor | None) -> dict:
    """What a forward hands every layer's :func:`decode_attention` besides the mask: inside ``torch.compile``,
    the :func:`live_block_mask` of a full-width boolean mask, built once per forward rather than per layer."""
    compiled = torch.compiler.is_compiling() and attention_mask is not None and attention_mask.ndim == 4
    if compiled and attention_mask.dtype == torch.bool and attention_mask.shape[-1] % KV_BLOCK == 0:
        return {"block_mask": live_block_mask(attention_mask)}
    return {}


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    block_mask: BlockMask | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query ``(R, H, q, D)``, key/value ``(R, Hkv, capacity, D)`` (the
    whole static cache), a boolean ``attention_mask`` ``(R, 1, q, slots)`` over the first ``slots`` slots
    (or ``None``: causal) -> ``((R, q, H, D), None)``. With ``block_mask`` (:func:`layer_kwargs`), flex
    attention reads only the blocks it lists."""
    slots = key.shape[-2] if attention_mask is None else attention_mask.shape[-1]
    key, value = key[:, :, :slots], value[:, :, :slots]
    if block_mask is not None:
        out = flex_attention(
            query,
            key,
            value,
            block_mask=block_mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


@contextlib.contextmanager
def decoding_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within this block the model's attention layers run :func:`decode_attention` (and transformers builds
    masks for it as for sdpa); the model's own choice is restored after. Nested blocks are no-ops."""
    config = model.config
    previous = config._attn_implementation
    if previous == DECODE_ATTENTION:
        yield
        return
    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
        AttentionMaskInterface.register(DECODE_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous

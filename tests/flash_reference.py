"""A CPU stand-in for the ``flash_attn`` package (flash-attention 2.x semantics), for tests.

The kernels compute attention in fp32 with plain tensor ops, with flash-attn 2.1+'s conventions: inputs are
``(batch, seqlen, heads, head_dim)`` (or ``(total, heads, head_dim)`` for the varlen kernel), keys may have
fewer heads (grouped queries), and ``causal`` masks are aligned to the bottom-right corner: query ``i`` of
``s_q`` sees key ``j`` of ``s_k`` iff ``j <= i + s_k - s_q``. :func:`install` makes transformers' own
flash-attention glue (``modeling_flash_attention_utils``, unchanged) call them, as it would call the real
kernels on a GPU.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool
) -> torch.Tensor:
    """One sequence: q ``(s_q, H, D)``, k/v ``(s_k, Hk, D)`` -> ``(s_q, H, D)``."""
    s_q, heads, dim = q.shape
    s_k = k.shape[0]
    if s_q == 0:
        return q.clone()
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * (scale or dim**-0.5)
    if causal:
        allowed = torch.arange(s_k)[None] <= torch.arange(s_q)[:, None] + (s_k - s_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a query that sees no key gets zeros, as flash-attn does
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``(B, s_q, H, D)`` queries against ``(B, s_k, Hk, D)`` keys and values."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and not softcap and alibi_slopes is None
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Packed sequences: ``q (total_q, H, D)``; sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and not softcap and block_table is None
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale, causal)
    return out


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Decoding against a cache ``(B, capacity, Hk, D)``: new ``k``/``v`` (if given) are written at each
    row's ``cache_seqlens`` (in place), then queries attend the first ``cache_seqlens + s_new`` slots of
    their row."""
    assert rotary_cos is None and cache_batch_idx is None and cache_leftpad is None and block_table is None
    batch = q.shape[0]
    lengths = (
        torch.full((batch,), k_cache.shape[1], dtype=torch.long) if cache_seqlens is None else cache_seqlens
    )
    lengths = torch.as_tensor(lengths).expand(batch)
    out = []
    for b in range(batch):
        end = int(lengths[b])
        if k is not None:
            k_cache[b, end : end + k.shape[1]] = k[b]
            v_cache[b, end : end + v.shape[1]] = v[b]
            end += k.shape[1]
        out.append(_attend(q[b], k_cache[b, :end], v_cache[b, :end], softmax_scale, causal))
    return torch.stack(out)


def install(monkeypatch) -> None:
    """Make ``import flash_attn`` give these kernels and transformers believe flash-attn 2 is installed."""
    import transformers.modeling_flash_attention_utils as glue
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    package.__version__ = "2.8.3"
    package.flash_attn_func = flash_attn_func
    package.flash_attn_varlen_func = flash_attn_varlen_func
    package.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(glue, "is_flash_attn_2_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(glue, "_loaded_implementation", None)  # import the kernels again, these ones

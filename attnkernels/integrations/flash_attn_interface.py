"""FlashAttention's Python interface on attnkernels' kernels: `from attnkernels import flash_attn_interface as flash_attn`.

FlashAttention 2's names, argument order, defaults, `(B, N, H, D)` layout and return
values, running on our kernels — CPU tensors included. The tensors are handed to the
kernels as transposed `(B, H, N, D)` views (no copies on the Triton path; the C++
launcher makes them contiguous).

What differs, and what is refused:
- `softmax_lse` of a row that sees no key is +inf, as FlashAttention returns it (ours is
  -inf; converted here). With `return_attn_probs=True` the third value (FlashAttention's
  dropout debugging matrix) is None.
- `deterministic` is accepted and ignored: our backward kernels are always deterministic.
- `dropout_p`, `softcap` and `alibi_slopes` ((Hq,) or (B, Hq) float32) have FlashAttention's
  meanings (softcap on the scaled logits; ALiBi -slope·|i + Nk - Nq - j|); dropout's mask
  comes from torch's default generator (attnkernels' Philox counters, not FlashAttention's,
  so the same seed gives other masks than FlashAttention).
- Not supported yet, refused with NotImplementedError naming the argument: in
  `flash_attn_with_kvcache` the rotary embedding (`rotary_cos/sin`), `cache_batch_idx`,
  `cache_leftpad` and `num_splits` other than 0/1; `block_table` in the varlen function.
- Varlen runs one fused-kernel call per sequence (softmax/varlen.py). The KV-cache entry is
  one `attention_with_kvcache` call on transposed views of the caches (softmax/kvcache.py:
  per-row lengths, paged caches read through block_table; no per-row loop, no gather). Like
  FlashAttention's, it is forward only: its output carries no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..softmax.api import attention
from ..softmax.kvcache import attention_with_kvcache


def _refuse(**others) -> None:
    for name, value in others.items():
        if value is not None:
            raise NotImplementedError(f"{name}: not supported by attnkernels' flash_attn_interface yet")


def _window(window_size) -> tuple[int, int]:
    left, right = window_size
    return int(left), int(right)


def _fa_lse(lse: Tensor) -> Tensor:
    """Ours (-inf for an empty row) -> FlashAttention's (+inf)."""
    return torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)


def _returns(out: Tensor, lse: Tensor, return_attn_probs: bool):
    return (out, _fa_lse(lse), None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Nq, Hq, D), k/v (B, Nk, Hk, D) -> out (B, Nq, Hq, Dv) [, softmax_lse (B, Hq, Nq), None]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, N, H, D), got {getattr(t, 'shape', type(t).__name__)}")
    out, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=softmax_scale,
                         window_size=_window(window_size), return_lse=True, dropout_p=dropout_p, softcap=softcap,
                         alibi_slopes=alibi_slopes)
    return _returns(out.transpose(1, 2), lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, N, 3, H, D)."""
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Nq, Hq, D), kv (B, Nk, 2, Hk, D)."""
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (total_q, Hq, D), k/v (total_k, Hk, D), cu_seqlens int32 (batch + 1,) -> out (total_q, Hq, Dv)
    [, softmax_lse (Hq, total_q), None]."""
    _refuse(block_table=block_table)
    out, lse = attention(q, k, v, causal=causal, scale=softmax_scale, window_size=_window(window_size),
                         return_lse=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, softcap=softcap,
                         alibi_slopes=alibi_slopes)
    return _returns(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, H, D)."""
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, Hq, D), kv (total_k, 2, Hk, D)."""
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q (B, Nq, Hq, D); k_cache/v_cache (B, Nc, Hk, D), or paged (num_blocks, page_size, Hk, D) with
    block_table int32 (B, max_pages); k/v (B, Nnew, Hk, D) are written into the cache **in place** at
    cache_seqlens, then each row attends to its first cache_seqlens + Nnew slots.
    -> out (B, Nq, Hq, Dv) [, softmax_lse (B, Hq, Nq)]."""
    _refuse(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad)
    if num_splits not in (0, 1):
        raise NotImplementedError(f"num_splits: {num_splits}; the split count is the kernels' choice here (pass 0)")
    if (k is None) != (v is None):
        raise ValueError("k, v: give both new keys and values, or neither")
    if cache_seqlens is None:  # FlashAttention: every row holds the whole cache
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[-1] * k_cache.shape[1]
        cache_seqlens = capacity
    # (B, N, H, D) -> (B, H, N, D) views; paged (num_blocks, page_size, H, D) -> (num_blocks, H, page_size, D):
    # the kernels take the strides, and the append writes through the views into the caller's caches.
    def t(x):
        return None if x is None else x.transpose(1, 2)

    out, lse = attention_with_kvcache(t(q), t(k_cache), t(v_cache), cache_seqlens=cache_seqlens, k_new=t(k),
                                      v_new=t(v), block_table=block_table, causal=causal, scale=softmax_scale,
                                      window_size=_window(window_size), softcap=softcap, alibi_slopes=alibi_slopes,
                                      return_lse=True)
    out = out.transpose(1, 2)
    return (out, _fa_lse(lse)) if return_softmax_lse else out

"""Attention against a KV cache (decoding): `attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=...)`.

Layouts (DESIGN.md, "KV cache"): q (B, Hq, Nq, D); k_cache / v_cache (B, Hk, Nc, D) / (B, Hk, Nc, Dv),
or paged (num_pages, Hk, page_size, D) with block_table (B, max_pages) int32 (row b's key j lives in
page block_table[b, j // page_size], slot j % page_size; page_size a power of two >= 16);
cache_seqlens (B,) int32, the filled slots of each row. k_new / v_new (B, Hk, Nnew, D) are written
into the cache **in place** at slots cache_seqlens[b] ... + Nnew - 1 (cache_seqlens itself is not
changed); then row b attends to its first L_b = cache_seqlens[b] + Nnew slots, with causal /
window / ALiBi bottom-right aligned to L_b (query i sits at position L_b - Nq + i).

Forward only, as FlashAttention's `flash_attn_with_kvcache`: decoding is inference, the output
carries no gradient (inputs that require grad are read as detached, no error) and the in-place
append is not recorded by autograd.

The op `torch.ops.attnkernels.attention_kvcache_fwd` runs the backend chosen by device
(backends.py, family "kvcache"): C++ (csrc/decode.cpp's split-KV kernel, which reads paged
caches page by page through block_table: no gather, no copy) for CPU tensors, Triton's split-K
decode kernel (triton_launch.decode_forward) for CUDA tensors, or the float64 reference. Query
blocks longer than 16 rows (chunked prefill) are correct on every backend; the C++ kernel runs
them as blocks of 16 rows, one pass over the cache each.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import _checks, backends
from ..conventions import softmax_scale
from ..op_call import EagerOp, accumulation_dtype
from . import modifiers
from .reference import attention_reference
from .windows import resolve_window

FAMILY = "kvcache"
MIN_PAGE_SIZE = 16


# --- the backends -------------------------------------------------------------------------


def kvcache_reference(q, k_cache, v_cache, cache_seqlens, block_table=None, *, scale, window_left=-1,
                      window_right=-1, softcap=0.0, alibi_slopes=None) -> tuple[Tensor, Tensor]:
    """The float64 oracle: per batch row, the row's first cache_seqlens[b] slots gathered and run through
    attention_reference. -> (out (B, Hq, Nq, Dv) float64, lse (B, Hq, Nq) float64)."""
    batch, q_heads, q_len, _ = q.shape
    outs, lses = [], []
    for b in range(batch):
        length = int(cache_seqlens[b])
        if block_table is None:
            k_b, v_b = k_cache[b, :, :length], v_cache[b, :, :length]
        else:
            page_size = k_cache.shape[2]
            pages = block_table[b, : (length + page_size - 1) // page_size].long()
            k_b = k_cache[pages].transpose(0, 1).flatten(1, 2)[:, :length]  # (Hk, L, D)
            v_b = v_cache[pages].transpose(0, 1).flatten(1, 2)[:, :length]
        slopes = None if alibi_slopes is None else alibi_slopes[b : b + 1]
        if length == 0:  # no key: out 0, lse -inf (conventions.py)
            outs.append(q.new_zeros(q_heads, q_len, v_cache.shape[-1], dtype=torch.float64))
            lses.append(q.new_full((q_heads, q_len), float("-inf"), dtype=torch.float64))
            continue
        out, lse = attention_reference(q[b : b + 1], k_b[None], v_b[None], window_size=(window_left, window_right),
                                       scale=scale, softcap=softcap, alibi_slopes=slopes)
        outs.append(out[0])
        lses.append(lse[0])
    if not outs:
        return (q.new_zeros(0, q_heads, q_len, v_cache.shape[-1], dtype=torch.float64),
                q.new_zeros(0, q_heads, q_len, dtype=torch.float64))
    return torch.stack(outs), torch.stack(lses)


def _reference_forward(q, k_cache, v_cache, cache_seqlens, block_table, scale, left, right, softcap, slopes):
    out, lse = kvcache_reference(q, k_cache, v_cache, cache_seqlens, block_table, scale=scale, window_left=left,
                                 window_right=right, softcap=softcap, alibi_slopes=slopes)
    return out.to(q.dtype), lse.to(accumulation_dtype(q.dtype))


def _cpu_forward(q, k_cache, v_cache, cache_seqlens, block_table, scale, left, right, softcap, slopes):
    return backends.cpu_kernels().attention_kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, scale, left,
                                                        right, softcap, slopes)


def triton_decode_forward():
    """triton_launch.decode_forward, or None where this tree does not have it yet."""
    from . import triton_launch

    return getattr(triton_launch, "decode_forward", None)


def _triton_forward(q, k_cache, v_cache, cache_seqlens, block_table, scale, left, right, softcap, slopes):
    decode_forward = triton_decode_forward()
    if decode_forward is None:
        raise NotImplementedError("attention_with_kvcache: the Triton decode kernel (triton_launch.decode_forward) "
                                  "is not in this build")
    return decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, scale=scale, window_left=left,
                          window_right=right, softcap=softcap, alibi_slopes=slopes)


def _no_backward(*args):
    raise RuntimeError("attention_with_kvcache is forward only (decoding)")


def _cpu_declines(device: torch.device) -> str | None:
    why = backends.cpu_declines(device)
    if why is None and not hasattr(backends.cpu_kernels(), "attention_kvcache_fwd"):
        why = "this build of the C++ kernels has no attention_kvcache_fwd (rebuild: python setup.py build_ext --inplace)"
    return why


backends.register(FAMILY, backends.Backend("cpu", _cpu_forward, _no_backward, _cpu_declines))
backends.register(FAMILY, backends.Backend("triton", _triton_forward, _no_backward, backends.triton_declines))
backends.register(FAMILY, backends.Backend("reference", _reference_forward, _no_backward,
                                           backends.reference_declines))


# --- the op -------------------------------------------------------------------------------


def _kvcache_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     block_table: Tensor | None, scale: float, window_left: int, window_right: int,
                     softcap: float, alibi_slopes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 / float64): q against row b's first
    cache_seqlens[b] cache slots (the lengths after any append; nothing is written here)."""
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
        return (q.new_zeros(*q.shape[:3], v_cache.shape[-1]),
                q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype)))
    backend = backends.select(FAMILY, q.device)
    out, lse = backend.forward(q, k_cache, v_cache, cache_seqlens, block_table, scale, window_left, window_right,
                               softcap, alibi_slopes)
    return out, lse


attention_kvcache_fwd = torch.library.custom_op("attnkernels::attention_kvcache_fwd", _kvcache_forward, mutates_args=())
# The op as attention_with_kvcache calls it (op_call.EagerOp: the implementation directly in a plain eager CPU
# call: a decode step is one call per generated token, and the op's Python wrappers cost as much as a small step).
_attention_kvcache_fwd = EagerOp(attention_kvcache_fwd, _kvcache_forward)


@attention_kvcache_fwd.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, window_left, window_right, softcap, alibi_slopes):
    batch, q_heads, q_len, _ = q.shape
    return (q.new_empty(batch, q_heads, q_len, v_cache.shape[-1]),
            q.new_empty(batch, q_heads, q_len, dtype=accumulation_dtype(q.dtype)))


# --- the public function --------------------------------------------------------------------


def _check_seqlens(cache_seqlens, batch: int, device) -> Tensor:
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected an int32 tensor of shape (B,) = ({batch},) (or an int), got "
                         f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} "
                         f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: device {cache_seqlens.device} differs from q's {device}")
    return cache_seqlens


def _check_block_table(block_table, batch: int, num_pages: int, device) -> None:
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 or \
            block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected int32 (B={batch}, max_pages), got "
                         f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if block_table.device != device:
        raise ValueError(f"block_table: device {block_table.device} differs from q's {device}")
    if block_table.numel() and torch.compiler.is_compiling():  # no host sync inside a graph (as cache_seqlens)
        torch._assert_async(((block_table >= 0) & (block_table < num_pages)).all(),
                            f"block_table: page indices must lie in [0, {num_pages}) (the cache's pages)")
    elif block_table.numel():
        low, high = (int(x) for x in torch.aminmax(block_table))  # one reduction (a decode step pays for each)
        if low < 0 or high >= num_pages:
            raise ValueError(f"block_table: page indices must lie in [0, {num_pages}) (the cache's pages), got "
                             f"[{low}, {high}]")


def _append(cache: Tensor, new: Tensor, cache_seqlens: Tensor, block_table: Tensor | None) -> None:
    """cache[row b, slots cache_seqlens[b] + t] = new[b, :, t], in place, for all b, t in one indexed write."""
    batch, _, n_new, _ = new.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(n_new, device=new.device)  # (B, Nnew)
    if block_table is None:
        first = torch.arange(batch, device=new.device)[:, None].expand(batch, n_new)
        slot = pos
    else:
        page_size = cache.shape[2]
        first = block_table.long().gather(1, pos // page_size)
        slot = pos % page_size
    # cache[first, :, slot] is (B, Nnew, Hk, D): the indexed dims come first.
    cache[first, :, slot] = new.permute(0, 2, 1, 3).to(cache.dtype)


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, cache_seqlens, k_new: Tensor | None = None,
                           v_new: Tensor | None = None, block_table: Tensor | None = None, causal: bool = False,
                           window_size=None, scale: float | None = None, softcap: float | None = None,
                           alibi_slopes: Tensor | None = None, return_lse: bool = False):
    """Attention of q against a KV cache, appending k_new / v_new first (in place).

    q (B, Hq, Nq, D); k_cache / v_cache (B, Hk, Nc, D) / (B, Hk, Nc, Dv), or paged (num_pages, Hk,
    page_size, D) with block_table int32 (B, max_pages); cache_seqlens int32 (B,) (or an int for every
    row): the slots already filled. k_new / v_new (B, Hk, Nnew, D) / (..., Dv) are written into the cache
    at slots cache_seqlens[b] ... (the caches change in place; cache_seqlens does not), then row b
    attends to its first cache_seqlens[b] + Nnew slots, causal / window_size / ALiBi bottom-right
    aligned to that length. causal, window_size, scale, softcap, alibi_slopes ((Hq,) or (B, Hq)) as in
    `attention`. Forward only: the output carries no gradient (as FlashAttention's kvcache call).
    -> out (B, Hq, Nq, Dv) [, lse (B, Hq, Nq) float32 (float64 for float64 inputs), -inf for a row that
    sees no key].
    """
    _checks.check_tensor("q", q)
    paged = block_table is not None
    cache_layout = "(num_pages, Hk, page_size, D)" if paged else "(B, Hk, Nc, D)"
    _checks.check_tensor("k_cache", k_cache, layout=cache_layout)
    _checks.check_tensor("v_cache", v_cache, layout=cache_layout)
    _checks.check_same_dtype_and_device(q=q, k_cache=k_cache, v_cache=v_cache)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k_cache.shape[1], v_cache.shape[-1]
    if k_cache.shape[-1] != head_dim:
        raise ValueError(f"k_cache: head dim {k_cache.shape[-1]} must equal q's head dim {head_dim}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache: expected {cache_layout} with the first three sizes of k_cache "
                         f"{tuple(k_cache.shape[:3])}, got {tuple(v_cache.shape)}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q, k_cache: the number of query heads ({q_heads}) must be a multiple of the number of "
                         f"key/value heads ({kv_heads}) (GQA/MQA)")
    for name, dim in (("q/k head dim D", head_dim), ("v head dim Dv", head_dim_v)):
        if not 1 <= dim <= _checks.MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected 1 <= D <= {_checks.MAX_HEAD_DIM}, got {dim}")
    if paged:
        page_size = k_cache.shape[2]
        if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(f"k_cache: page size {page_size} must be a power of two >= {MIN_PAGE_SIZE}")
        _check_block_table(block_table, batch, k_cache.shape[0], q.device)
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache: batch size {k_cache.shape[0]} must match q's {batch} (a paged cache needs "
                             "block_table)")
        capacity = k_cache.shape[2]
    cache_seqlens = _check_seqlens(cache_seqlens, batch, q.device)

    if (k_new is None) != (v_new is None):
        raise ValueError("k_new, v_new: give both new keys and values, or neither")
    n_new = 0
    if k_new is not None:
        for name, new, dim in (("k_new", k_new, head_dim), ("v_new", v_new, head_dim_v)):
            _checks.check_tensor(name, new, layout="(B, Hk, Nnew, D)")
            _checks.check_same_dtype_and_device(k_cache=k_cache, **{name: new})
            if new.shape[0] != batch or new.shape[1] != kv_heads or new.shape[3] != dim:
                raise ValueError(f"{name}: expected (B, Hk, Nnew, D) = ({batch}, {kv_heads}, Nnew, {dim}), "
                                 f"got {tuple(new.shape)}")
        if v_new.shape[2] != k_new.shape[2]:
            raise ValueError(f"v_new: {v_new.shape[2]} new tokens, k_new has {k_new.shape[2]}")
        n_new = k_new.shape[2]
    if batch and torch.compiler.is_compiling():
        # inside a compiled graph a host sync would break it: the same bound, checked by an op that
        # raises when the graph runs (still before anything is written)
        torch._assert_async(((cache_seqlens >= 0) & (cache_seqlens + n_new <= capacity)).all(),
                            f"cache_seqlens: a row is negative or holds more than the cache's {capacity} slots "
                            f"with {n_new} new tokens")
    elif batch:
        lengths = cache_seqlens.tolist()  # one host sync: the bounds must hold before anything is written
        for b, length in enumerate(lengths):
            if length < 0 or length + n_new > capacity:
                raise ValueError(f"cache_seqlens: row {b} holds {length} tokens + {n_new} new > the cache's "
                                 f"{capacity} slots" if length >= 0 else
                                 f"cache_seqlens: row {b} is {length}; expected >= 0")

    scale = softmax_scale(scale, head_dim)
    _checks.check_bool("causal", causal)
    left, right = resolve_window(window_size, causal)
    softcap = modifiers.check_softcap(softcap)
    slopes = modifiers.check_alibi_slopes(alibi_slopes, q)
    _checks.check_bool("return_lse", return_lse)

    with torch.no_grad():  # the cache is state (FlashAttention's semantics): no autograd through the append
        if n_new:
            _append(k_cache, k_new, cache_seqlens, block_table if paged else None)
            _append(v_cache, v_new, cache_seqlens, block_table if paged else None)
        lengths = cache_seqlens + n_new if n_new else cache_seqlens
        out, lse = _attention_kvcache_fwd(q.detach(), k_cache.detach(), v_cache.detach(), lengths, block_table,
                                          scale, left, right, softcap, slopes)
    return (out, lse) if return_lse else out

"""Packed variable-length batches (FlashAttention's varlen layout) on the fused kernels.

q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); `cu_seqlens_q/k` int32
(batch + 1,) starting at 0, non-decreasing, ending at total_q/total_k; sequence i is
rows cu[i]:cu[i+1] and attends only to itself, with causal/windows bottom-right
aligned per sequence. LSE is (Hq, total_q).

How it runs today: one fused-kernel call per sequence on a strided (1, H, Ni, D) view
of the packed tensors (no padding, no (total × total) anything; work Σ Nq_i·Nk_i),
outputs written back into the packed layout; autograd flows through each call. The
sequence boundaries are read on the host (`cu_seqlens.tolist()`), one sync per call.
A kernel that walks the boundaries itself (one launch for the batch) is the next step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..op_call import accumulation_dtype


def check_cu_seqlens(name: str, cu: Tensor, total: int, device) -> list[int]:
    """The boundaries as ints, or a ValueError/TypeError naming `name` and what was expected."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor (batch + 1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32 (FlashAttention's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D tensor (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: device {cu.device} differs from q's {device}")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {bounds[0]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name}: must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{name}: last entry {bounds[-1]} must equal the packed length {total}")
    return bounds


def _check_max(name: str, max_seqlen, lengths: list[int]) -> None:
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {max_seqlen!r}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{name}: {max_seqlen} is smaller than the longest sequence ({max(lengths)})")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int | None, max_seqlen_k: int | None, attend) -> tuple[Tensor, Tensor]:
    """(out (total_q, Hq, Dv), lse (Hq, total_q)) with `attend(q_i, k_i, v_i, i) -> (out_i, lse_i)` on
    (1, H, N_i, D) views of sequence i."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=3, layout="(total, H, D) (varlen)")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"v: packed length {v.shape[0]} must equal k's {k.shape[0]}")
    bounds_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    bounds_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q, cu_seqlens_k: batch sizes differ ({len(bounds_q) - 1} vs {len(bounds_k) - 1})")
    _check_max("max_seqlen_q", max_seqlen_q, [b - a for a, b in zip(bounds_q, bounds_q[1:])])
    _check_max("max_seqlen_k", max_seqlen_k, [b - a for a, b in zip(bounds_k, bounds_k[1:])])
    outs, lses = [], []
    for index, ((q0, q1), (k0, k1)) in enumerate(zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:]))):
        # (N_i, H, D) -> (1, H, N_i, D): views, the kernels' launchers take them as they are
        q_i, k_i, v_i = (t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        out_i, lse_i = attend(q_i, k_i, v_i, index)
        outs.append(out_i[0].transpose(0, 1))  # (N_i, Hq, Dv)
        lses.append(lse_i[0])  # (Hq, N_i)
    if not outs:
        return q.new_zeros(0, q.shape[1], v.shape[-1]), q.new_zeros(q.shape[1], 0, dtype=accumulation_dtype(q.dtype))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)

"""Windowed attention over a sharded sequence: only the window's boundary rows travel.

With window (left, right) no wider than a shard, rank r needs the last `left` key/value
rows of rank r−1 and the first `right` of rank r+1: O(w·D) bytes per rank instead of the
ring's O(N·D), and one local kernel call on [halo_left | own | halo_right]. The halo
exchange is differentiable (its backward sends the halo rows' gradients back home).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..conventions import UNBOUNDED
from ..softmax.api import attention
from ..softmax.windows import resolve_window
from . import comm


class _Halo(torch.autograd.Function):
    """x (B, H, L, D) -> [last `left` rows of rank−1 | x | first `right` rows of rank+1] (ends: none)."""

    @staticmethod
    def forward(ctx, x: Tensor, left: int, right: int, group):
        rank, world = comm.rank_and_world(group)
        has_prev, has_next = rank > 0, rank < world - 1
        from_prev = x.new_empty(*x.shape[:2], left if has_prev else 0, x.shape[3])
        from_next = x.new_empty(*x.shape[:2], right if has_next else 0, x.shape[3])
        send, recv = [], []
        if has_next:
            send.append((rank + 1, x[:, :, x.shape[2] - left:].contiguous()))
            recv.append((rank + 1, from_next))
        if has_prev:
            send.append((rank - 1, x[:, :, :right].contiguous()))
            recv.append((rank - 1, from_prev))
        comm.wait(comm.exchange(send, recv, group))
        ctx.sizes, ctx.group = (from_prev.shape[2], from_next.shape[2], left, right), group
        return torch.cat([from_prev, x, from_next], dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        got_prev, got_next, left, right = ctx.sizes
        rank, world = comm.rank_and_world(ctx.group)
        length = grad.shape[2] - got_prev - got_next
        grad_prev, own, grad_next = grad.split([got_prev, length, got_next], dim=2)
        own = own.clone()
        back_from_next = grad.new_zeros(*grad.shape[:2], left if rank < world - 1 else 0, grad.shape[3])
        back_from_prev = grad.new_zeros(*grad.shape[:2], right if rank > 0 else 0, grad.shape[3])
        send, recv = [], []
        if got_prev:
            send.append((rank - 1, grad_prev.contiguous()))
        if got_next:
            send.append((rank + 1, grad_next.contiguous()))
        if rank < world - 1:
            recv.append((rank + 1, back_from_next))
        if rank > 0:
            recv.append((rank - 1, back_from_prev))
        comm.wait(comm.exchange(send, recv, ctx.group))
        if back_from_next.shape[2]:
            own[:, :, length - left:] += back_from_next
        if back_from_prev.shape[2]:
            own[:, :, :right] += back_from_prev
        return own, None, None, None


def halo_window_attention(q: Tensor, k: Tensor, v: Tensor, window_size, *, group=None, causal: bool = False,
                          scale: float | None = None, return_lse: bool = False):
    """Sliding-window attention over a sequence sharded contiguously (rank r holds [rL, (r+1)L)).

    window_size: (left, right) as in `attention` (causal sets right = 0); both sides bounded and at
    most the shard length L. Returns this rank's out [and LSE], equal to the single-process kernel on
    the gathered sequence. Bytes sent per rank: (left + right) rows of k and v.
    """
    _checks.check_qkv(q, k, v)
    left, right = resolve_window(window_size, causal)
    shard = q.shape[2]
    ok, why = True, ""
    if UNBOUNDED in (left, right):
        ok, why = False, f"window_size: the halo exchange needs both sides bounded, got {(left, right)}; use ring_attention"
    elif left > shard or right > shard:
        ok, why = False, f"window_size: {(left, right)} is wider than the shard length {shard}; use ring_attention"
    elif k.shape[2] != shard:
        ok, why = False, f"k: each rank's key shard must have its query shard's length {shard}, got {k.shape[2]}"
    comm.agree(ok, why, group)
    rank, world = comm.rank_and_world(group)
    k_ext, v_ext = _Halo.apply(k, left, right, group), _Halo.apply(v, left, right, group)
    got_next = right if rank < world - 1 else 0
    # keys [rL - got_prev, (r+1)L + got_next): the band i - left <= j - got_prev <= i + right, bottom-right form
    with comm.busy():  # the forward's kernel time (its backward runs later, under autograd)
        return attention(q, k_ext, v_ext, window_size=(left + got_next, right - got_next), scale=scale,
                         return_lse=return_lse)


def halo_bytes(k: Tensor, v: Tensor, window_size, causal: bool = False) -> int:
    """Bytes one interior rank sends per call: its `left` last and `right` first rows of k and v."""
    left, right = resolve_window(window_size, causal)
    row = k.shape[0] * k.shape[1] * (k.shape[3] * k.element_size() + v.shape[3] * v.element_size())
    return (left + right) * row

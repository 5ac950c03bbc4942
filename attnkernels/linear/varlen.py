"""Packed variable-length batches for linear attention (flash-linear-attention's `cu_seqlens`).

q (total, Hq, D), k (total, Hk, D), v (total, Hk, Dv) and one int32 `cu_seqlens`
(batch + 1,) for all three (as fla: a sequence's queries are its keys); the state
(S, z) restarts at every sequence boundary, from `initial_state[i]` for sequence i
when given, and `return_final_state` returns each sequence's final state, stacked:
S (batch, Hk, M, Dv), z (batch, Hk, M).

How it runs today: one fused-kernel call per sequence on a strided (1, H, N_i, D) view
of the packed tensors (no padding; work Σ N_i·D·M), outputs written back into the
packed layout; autograd flows through each call. A kernel that walks the boundaries in
one launch is the next step (as for softmax/varlen.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..softmax.varlen import check_cu_seqlens


def _sequence_states(initial_state, batch: int):
    """initial_state -> one (S0 (1, Hk, M, Dv), z0 (1, Hk, M)) or None per sequence."""
    if initial_state is None:
        return [None] * batch
    s0, z0 = initial_state
    for name, t, rank in (("initial_state.S", s0, 4), ("initial_state.z", z0, 3)):
        if not isinstance(t, Tensor) or t.dim() != rank or t.shape[0] != batch:
            raise ValueError(f"{name}: with cu_seqlens expected one state per sequence, a {rank}-D tensor with "
                             f"dim 0 = batch = {batch}, got {tuple(getattr(t, 'shape', ()))}")
    return [(s0[i:i + 1], z0[i:i + 1]) for i in range(batch)]


def varlen_linear_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, initial_state,
                            return_final_state: bool, attend):
    """out (total, Hq, Dv) [, (S, z) stacked per sequence] with `attend(q_i, k_i, v_i, state_i)` ->
    (out_i, state_i) on (1, H, N_i, D) views."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=3, layout="(total, H, D) (packed, cu_seqlens)")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v: one cu_seqlens needs one packed length, got {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    bounds = check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device)
    batch = len(bounds) - 1
    outs, states = [], []
    for (start, end), state in zip(zip(bounds, bounds[1:]), _sequence_states(initial_state, batch)):
        q_i, k_i, v_i = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N_i, D) views
        out_i, final_i = attend(q_i, k_i, v_i, state)
        outs.append(out_i[0].transpose(0, 1))  # (N_i, Hq, Dv)
        states.append(final_i)
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    if not return_final_state:
        return out
    if not states:
        raise ValueError("cu_seqlens: return_final_state needs at least one sequence")
    return out, (torch.cat([s for s, _ in states]), torch.cat([z for _, z in states]))
